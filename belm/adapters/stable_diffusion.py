"""Stable Diffusion (latent) adapter: images <-> scaled latents, prompts -> ε function.

    sd = StableDiffusion.from_pretrained("path/to/sd-folder")      # offline, local folder
    z0 = sd.encode("cat.png")                                       # (1, 4, H/8, W/8) scaled latents
    eps = sd.eps(prompt="a cat", guidance_scale=7.5)                # DiffusersEps (CFG batched)
    sched = sd.schedule(num_steps=50)                               # belm.Schedule
    images = sd.decode(z0)                                          # list of PIL images

Latent convention (diffusers'): ``z = (mean(E(x)) − shift_factor) · scaling_factor``
and ``D(z / scaling_factor + shift_factor)``. Encoding uses the mean of the latent
distribution (no sampling), so it is deterministic. There is no sampler logic here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from belm.adapters.eps import PREDICTION_TYPES, DiffusersEps, _config_get, _model_dtype_device
from belm.adapters.folders import check_pipeline_folder
from belm.adapters.images import ImageInput, to_pil, to_tensor

__all__ = ["StableDiffusion", "COMPONENTS", "SUPPORTED_SCHEDULERS", "check_scheduler_config", "check_model_folder",
           "PIPELINE_KINDS", "FLOW_SCHEDULERS"]

#: diffusers scheduler classes whose config describes a discrete variance-preserving
#: schedule (``alphas_cumprod`` from betas), the only kind belm's samplers handle today.
SUPPORTED_SCHEDULERS: frozenset[str] = frozenset({
    "DDIMScheduler", "DDIMInverseScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "DPMSolverMultistepInverseScheduler", "UniPCMultistepScheduler",
    "DEISMultistepScheduler", "BELMScheduler", "BELMInverseScheduler",
})


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object")
    return data


def check_scheduler_config(config: dict, where: str) -> None:
    """Refuse schedulers belm cannot run exactly yet (flow matching, continuous σ, unknown classes).

    Args:
        config: the scheduler's config (``scheduler_config.json`` as a dict).
        where: the file it came from, for the message.

    Raises:
        ValueError: one line naming the class and what to do.
    """
    name = config.get("_class_name")
    flow = (isinstance(name, str) and name.startswith("Flow")) or config.get("use_flow_sigmas") \
        or config.get("prediction_type") == "flow_prediction"
    if flow:
        raise ValueError(f"{where}: {name or 'the scheduler'} is a flow-matching scheduler; belm supports discrete "
                         "VP (DDPM/DDIM-style) schedules only so far, so this model would be run on the wrong "
                         "noise schedule. Use a DDPM/DDIM-trained model")
    if name is not None and name not in SUPPORTED_SCHEDULERS:
        raise ValueError(f"{where}: unknown scheduler class {name!r}; belm supports discrete VP schedulers "
                         f"({', '.join(sorted(SUPPORTED_SCHEDULERS))}). If the model was trained with a DDPM "
                         "schedule, set \"_class_name\": \"DDIMScheduler\" in that file")


#: pipeline classes (model_index.json ``_class_name``) -> what :func:`check_model_folder` calls them;
#: the helpers live in belm.adapters (``from_folder`` picks them)
PIPELINE_KINDS: dict[str, str] = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                                  "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
#: the schedulers flow pipelines may carry (their grid is read from it)
FLOW_SCHEDULERS: frozenset[str] = frozenset({"FlowMatchEulerDiscreteScheduler", "FlowBELMScheduler",
                                             "FlowBELMInverseScheduler"})


def check_model_folder(folder: str | os.PathLike) -> str:
    """What kind of local diffusers folder this is, refusing what belm cannot load yet.

    Returns:
        "sd" (a Stable Diffusion 1.x/2.x pipeline folder), "sdxl", "sd3", "flux" (those
        pipelines, by model_index.json's ``_class_name``), or "pixel" (a pixel-space
        UNet2DModel folder, or a pipeline folder with ``unet/`` and ``scheduler/`` and no VAE).

    Raises:
        ValueError: one line naming the folder and the fix: a component subfolder (e.g.
            ``…/unet``) instead of the pipeline folder; other XL or transformer pipelines
            (img2img, refiner, PixArt, …); unknown or flow-matching schedulers on UNet models,
            non-flow schedulers on SD3/FLUX.
        FileNotFoundError: not a diffusers folder at all.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r}: no such folder")
    index_file = folder / "model_index.json"
    index = _read_json(index_file) if index_file.is_file() else {}
    cls = str(index.get("_class_name", ""))
    if not index and (folder / "config.json").is_file():
        cfg = _read_json(folder / "config.json")
        own = str(cfg.get("_class_name", ""))
        if own != "UNet2DModel" or (folder.parent / "model_index.json").is_file():
            raise ValueError(f"{str(folder)!r} holds one component ({own or 'config.json'}), not a pipeline; "
                             f"pass the pipeline folder that contains it ({str(folder.parent)!r})")
        if (folder / "scheduler_config.json").is_file():
            check_scheduler_config(_read_json(folder / "scheduler_config.json"),
                                   str(folder / "scheduler_config.json"))
        return "pixel"
    if not index and (folder / "scheduler_config.json").is_file():
        raise ValueError(f"{str(folder)!r} holds one component (a scheduler), not a pipeline; pass the pipeline "
                         f"folder that contains it ({str(folder.parent)!r})")
    supported = ", ".join(PIPELINE_KINDS)
    kind = PIPELINE_KINDS.get(cls)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    if kind in ("sd3", "flux"):
        name = _read_json(sched_file).get("_class_name") if sched_file.is_file() else None
        if name is not None and name not in FLOW_SCHEDULERS:
            raise ValueError(f"{str(sched_file)!r}: {cls} needs a flow-matching scheduler "
                             f"({', '.join(sorted(FLOW_SCHEDULERS))}); got {name!r}. Restore the folder's "
                             "FlowMatchEulerDiscreteScheduler config")
        return kind
    if kind is None and ("XL" in cls or "text_encoder_2" in index):
        raise ValueError(f"{str(folder)!r} is a {cls or 'two-text-encoder'} folder; belm supports the pipelines "
                         f"{supported} (for SDXL: a StableDiffusionXLPipeline folder, not a refiner/img2img one)")
    if kind is None and ("transformer" in index or (folder / "transformer").is_dir()):
        raise ValueError(f"{str(folder)!r} is a transformer pipeline ({cls or 'transformer/'}); belm supports the "
                         f"pipelines {supported}")
    if sched_file.is_file():
        check_scheduler_config(_read_json(sched_file), str(sched_file))
    if kind == "sdxl":
        return kind
    if "vae" in index or (folder / "vae").is_dir():
        return "sd"
    if not (folder / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r}: no unet/config.json (nor model_index.json with a vae); not a "
                                "diffusers pipeline folder")
    return "pixel"

#: The pipeline components the adapter needs.
COMPONENTS: tuple[str, ...] = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


class StableDiffusion:
    """The parts of a Stable Diffusion pipeline that belm needs, with image/latent I/O.

    Args:
        vae: ``AutoencoderKL``-like (``encode(x).latent_dist.mean``, ``decode(z).sample``).
        unet: ``UNet2DConditionModel``-like (called by :class:`DiffusersEps`).
        text_encoder: ``CLIPTextModel``-like (``text_encoder(ids)[0]`` -> (B, L, D)).
        tokenizer: a transformers tokenizer (padded to ``model_max_length``).
        scheduler: a diffusers scheduler (``alphas_cumprod``, ``config.prediction_type``).
        pipeline: the pipeline the parts came from, if any (kept for reference).

    Attributes:
        scaling_factor: ``vae.config.scaling_factor``.
        shift_factor: ``vae.config.shift_factor`` or None.
        vae_factor: 2 ** (len(vae.config.block_out_channels) − 1), the pixel/latent ratio.
        latent_channels: ``vae.config.latent_channels``.
    """

    def __init__(self, vae: Any, unet: Any, text_encoder: Any, tokenizer: Any, scheduler: Any, *,
                 pipeline: Any = None) -> None:
        parts = dict(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        for name, part in parts.items():
            if part is None:
                raise ValueError(f"Stable Diffusion component {name!r} is missing (None); "
                                 f"all of {COMPONENTS} are needed")
        self.vae, self.unet, self.text_encoder = vae, unet, text_encoder
        self.tokenizer, self.scheduler, self.pipeline = tokenizer, scheduler, pipeline
        prediction_type = _config_get(getattr(scheduler, "config", {}), "prediction_type", "epsilon") or "epsilon"
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"the scheduler's prediction_type must be one of {PREDICTION_TYPES}; got "
                             f"{prediction_type!r} (fix scheduler/scheduler_config.json)")
        for module in (vae, unet, text_encoder):
            if isinstance(module, torch.nn.Module):
                module.eval()
        config = vae.config
        get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
        self.scaling_factor: float = float(get("scaling_factor", 1.0) or 1.0)
        shift = get("shift_factor", None)
        self.shift_factor: float | None = None if shift is None else float(shift)
        self.vae_factor: int = 2 ** (len(get("block_out_channels", (0,))) - 1)
        self.latent_channels: int = int(get("latent_channels", 4))
        self._prompt_cache: dict[str, torch.Tensor] = {}

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder_or_pipeline: str | os.PathLike | Any, dtype: torch.dtype | None = torch.float32,
                        device: str | torch.device | None = None) -> "StableDiffusion":
        """Load from a LOCAL diffusers folder (offline, safetensors only) or wrap a pipeline.

        Args:
            folder_or_pipeline: a folder written by ``StableDiffusionPipeline.save_pretrained``
                (subfolders vae, unet, text_encoder, tokenizer, scheduler), or an already
                built pipeline object with those attributes.
            dtype: dtype of the networks (a given pipeline is cast in place); None keeps it.
            device: where to put the networks; None keeps them where they are (CPU after loading).

        Raises:
            FileNotFoundError: the folder, its model_index.json, or a component subfolder is missing.
            ValueError: a given pipeline lacks a component.
            RuntimeError: diffusers could not load the folder (message names the folder).
        """
        if isinstance(folder_or_pipeline, (str, os.PathLike)):
            pipe = cls._load_folder(Path(folder_or_pipeline), dtype)
        else:
            pipe = folder_or_pipeline
            missing = [name for name in COMPONENTS if getattr(pipe, name, None) is None]
            if missing:
                raise ValueError(f"pipeline {type(pipe).__name__} lacks the component(s) {missing}; "
                                 f"StableDiffusion needs {COMPONENTS}")
        for name in ("vae", "unet", "text_encoder"):
            module = getattr(pipe, name)
            current_dtype, current_device = _model_dtype_device(module)
            new_dtype = dtype if dtype is not None and dtype != current_dtype else None
            new_device = torch.device(device) if device is not None else None
            if new_device is not None and new_device == current_device:
                new_device = None
            if new_dtype is not None or new_device is not None:  # skip no-op casts (diffusers warns on them)
                module.to(device=new_device, dtype=new_dtype)
        return cls(pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, pipeline=pipe)

    @staticmethod
    def _load_folder(folder: Path, dtype: torch.dtype | None) -> Any:
        if not folder.is_dir():
            raise FileNotFoundError(f"Stable Diffusion folder not found: {str(folder)!r} (pass a local folder "
                                    "written by StableDiffusionPipeline.save_pretrained; hub ids are not supported)")
        if not (folder / "model_index.json").is_file():
            if (folder / "config.json").is_file() and (folder.parent / "model_index.json").is_file():
                raise FileNotFoundError(f"{str(folder)!r} is one component of a pipeline; pass the pipeline folder "
                                        f"({str(folder.parent)!r})")
            raise FileNotFoundError(f"{str(folder)!r} is not a diffusers pipeline folder: model_index.json is missing")
        kind = check_model_folder(folder)
        if kind in ("sdxl", "sd3", "flux"):
            raise ValueError(f"{str(folder)!r} is a {kind.upper()} pipeline folder, not Stable Diffusion 1.x/2.x; "
                             "load it with belm.adapters.from_folder(folder)")
        if kind != "sd":
            raise FileNotFoundError(f"{str(folder)!r} has no 'vae' component; it is not a Stable Diffusion folder")
        check_pipeline_folder(folder, COMPONENTS, "Stable Diffusion")
        from diffusers import StableDiffusionPipeline

        # `dtype` is the current name of diffusers' `torch_dtype` (older versions ignore it;
        # the components are cast again afterwards in any case).
        try:
            return StableDiffusionPipeline.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False, dtype=dtype or torch.float32)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"could not load the Stable Diffusion pipeline from {str(folder)!r}: {exc}") from exc

    # -- properties ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the UNet."""
        return _model_dtype_device(self.unet)[1]

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the UNet."""
        return _model_dtype_device(self.unet)[0]

    # -- images <-> latents -------------------------------------------------------------
    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """Image input(s) -> (B, 3, H, W) float32 tensor in [-1, 1], H and W center-cropped
        down to multiples of :attr:`vae_factor` (see :mod:`belm.adapters.images`)."""
        return to_tensor(image, multiple=self.vae_factor)

    def encode(self, image: ImageInput) -> torch.Tensor:
        """Scaled latents of image(s): (B, latent_channels, H/f, W/f) float32 on the VAE's device.

        ``image``: PIL image, path, uint8 array (H, W[, C]), float tensor (B, 3, H, W) in
        [-1, 1], or a list of these. Non-square sizes are fine; sizes that are not a
        multiple of the VAE factor f are center-cropped down to one. RGBA / greyscale /
        palette images are converted to RGB. Deterministic: the latent distribution's mean.

        Raises:
            FileNotFoundError / ValueError: unreadable path, zero-size image, bad tensor.
        """
        x = self.preprocess(image)
        dtype, device = _model_dtype_device(self.vae)
        with torch.no_grad():
            out = self.vae.encode(x.to(device=device, dtype=dtype))
            dist = getattr(out, "latent_dist", None)
            latents = dist.mean if dist is not None else getattr(out, "latents", None)
            if latents is None:
                raise TypeError(f"vae.encode returned {type(out).__name__} without latent_dist or latents")
        latents = latents.float()
        if self.shift_factor is not None:
            latents = latents - self.shift_factor
        return latents * self.scaling_factor

    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) or (C, h, w) -> images (B, 3, h·f, w·f) float32 in [-1, 1].

        Raises:
            ValueError: not a 3-D/4-D tensor with ``latent_channels`` channels.
        """
        C = self.latent_channels
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError(f"latents must be a floating-point tensor of shape (B, {C}, h, w)")
        if latents.ndim == 3:
            latents = latents.unsqueeze(0)
        if latents.ndim != 4 or latents.shape[1] != C:
            raise ValueError(f"latents must have shape (B, {C}, h, w) ({C} = vae.config.latent_channels "
                             f"channels); got {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or Inf; cannot decode")
        dtype, device = _model_dtype_device(self.vae)
        z = latents.to(device=device, dtype=torch.float32) / self.scaling_factor
        if self.shift_factor is not None:
            z = z + self.shift_factor
        with torch.no_grad():
            out = self.vae.decode(z.to(dtype))
            images = out.sample if hasattr(out, "sample") else out[0]
        return images.float().clamp(-1.0, 1.0)

    def decode(self, latents: torch.Tensor) -> list[Any]:
        """Scaled latents (B, C, h, w) -> list of B RGB PIL images of size (w·f, h·f)."""
        return to_pil(self.decode_tensor(latents))

    # -- text ---------------------------------------------------------------------------
    def _max_length(self) -> int:
        n = getattr(self.tokenizer, "model_max_length", None)
        limit = getattr(getattr(self.text_encoder, "config", None), "max_position_embeddings", None)
        if n is None or n > 100_000:  # tokenizers without a config report a huge sentinel
            n = limit if limit is not None else 77
        return int(n)

    def prompt_embeds(self, prompt: str | list[str]) -> torch.Tensor:
        """Text-encoder hidden states (B, L, D) for a prompt or a list of prompts.

        Each distinct prompt is encoded once and cached (``_prompt_cache``); L is the
        tokenizer's ``model_max_length`` (prompts are padded / truncated to it, as in
        ``StableDiffusionPipeline``).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a non-empty list of strings; got {prompt!r}")
        out = []
        for p in prompts:
            if p not in self._prompt_cache:
                self._prompt_cache[p] = self._encode_text(p)
            out.append(self._prompt_cache[p])
        return torch.cat(out)

    def _encode_text(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(prompt, padding="max_length", max_length=self._max_length(), truncation=True,
                             return_tensors="pt")
        _, device = _model_dtype_device(self.text_encoder)
        config = getattr(self.text_encoder, "config", None)
        mask = ids.attention_mask.to(device) if getattr(config, "use_attention_mask", False) else None
        with torch.no_grad():
            hidden = self.text_encoder(ids.input_ids.to(device), attention_mask=mask)[0]
        return hidden.detach()

    # -- eps and schedule ---------------------------------------------------------------
    def eps(self, prompt: str | list[str] = "", guidance_scale: float = 7.5,
            negative_prompt: str | list[str] | None = "") -> DiffusersEps:
        """:class:`DiffusersEps` of the UNet conditioned on ``prompt`` with CFG.

        Args:
            prompt: one prompt (broadcast over the batch) or B prompts.
            guidance_scale: w >= 0; 1 disables guidance (one forward of batch B).
            negative_prompt: the unconditional prompt ("" = SD's default; None = ""),
                one string or as many as ``prompt``.
        """
        cond = self.prompt_embeds(prompt)
        uncond = None
        if float(guidance_scale) != 1.0:
            neg = "" if negative_prompt is None else negative_prompt
            uncond = self.prompt_embeds(neg)
            if uncond.shape[0] != cond.shape[0]:
                if uncond.shape[0] != 1:
                    raise ValueError(f"negative_prompt has {uncond.shape[0]} entries but prompt has "
                                     f"{cond.shape[0]}; pass one negative prompt or one per prompt")
                uncond = uncond.expand(cond.shape[0], -1, -1)
        return DiffusersEps(self.unet, self.scheduler, encoder_hidden_states=cond,
                            uncond_encoder_hidden_states=uncond, guidance_scale=guidance_scale)

    def schedule(self, num_steps: int = 50, spacing: Optional[str] = None, sampler: str = "obelm",
                 **kwargs: Any) -> Any:
        """``belm.Schedule.from_diffusers(self.scheduler, num_steps, spacing=..., **kwargs)``.

        ``spacing=None`` gives belm's default grid for ``sampler``
        (:func:`belm.schedule.default_spacing`: "trailing"; SD 1.x folders are configured
        "leading" with offset 1, whose tiny last step makes exact inversion amplify the
        parasitic mode); ``"config"`` keeps the folder's scheduler config.
        """
        from belm.schedule import Schedule, default_spacing

        if spacing is None:
            spacing = default_spacing(sampler)
        return Schedule.from_diffusers(self.scheduler, num_steps, spacing=spacing, **kwargs)

    def __repr__(self) -> str:
        return (f"StableDiffusion(unet={type(self.unet).__name__}, dtype={self.dtype}, device={self.device}, "
                f"vae_factor={self.vae_factor}, latent_channels={self.latent_channels}, "
                f"scaling_factor={self.scaling_factor}, shift_factor={self.shift_factor})")
