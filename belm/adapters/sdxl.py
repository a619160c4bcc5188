"""Stable Diffusion XL adapter: two text encoders, pooled embeddings and added conditioning.

    sdxl = StableDiffusionXL.from_pretrained("path/to/sdxl-folder")   # offline, local folder
    z0 = sdxl.encode("cat.png")                                       # (1, 4, H/8, W/8) scaled latents
    eps = sdxl.eps(prompt="a cat", guidance_scale=5.0)                # DiffusersEps, CFG batched
    sched = sdxl.schedule(num_steps=50)

SDXL's UNet also takes ``added_cond_kwargs``: the pooled embedding of the second text
encoder (``text_embeds``) and ``time_ids`` = original size + crop corner + target size
(pixels). The adapter computes them as ``StableDiffusionXLPipeline`` does (original and
target size = the latent's size × the VAE factor, crop (0, 0)) and hands them to the UNet
through a thin wrapper, so :class:`~belm.adapters.DiffusersEps` (prediction types, CFG
batching, dtype handling) is reused unchanged. Prompts are encoded by the pipeline's own
``encode_prompt``, which also zeroes the unconditional embeddings when the folder says
``force_zeros_for_empty_prompt`` and no negative prompt is given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from belm.adapters.eps import DiffusersEps, _model_dtype_device
from belm.adapters.folders import cast_pipeline, check_pipeline, load_pipeline_folder
from belm.adapters.stable_diffusion import StableDiffusion

__all__ = ["StableDiffusionXL", "AddedConditionUNet"]

COMPONENTS_XL: tuple[str, ...] = ("vae", "unet", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                  "scheduler")


class AddedConditionUNet(torch.nn.Module):
    """An SDXL UNet with its added conditioning bound: called as ``unet(x, t, encoder_hidden_states=...)``.

    Args:
        unet: ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``.
        text_embeds: (B|1, P) pooled embeddings of the prompt (text_encoder_2's projection).
        uncond_text_embeds: (B|1, P) the negative prompt's, when ``guided``.
        vae_factor: pixels per latent pixel, for the size entries of ``time_ids``.
        guided: the calls come with batch 2B, unconditional half first (as DiffusersEps makes them).
        crops_coords_top_left: the crop corner entry of ``time_ids`` ((0, 0) in the pipeline).

    ``time_ids`` = (h·f, w·f, top, left, h·f, w·f) for an (h, w) latent (cached per size), the
    same for both halves (the pipeline's default ``negative_original_size`` = None).
    """

    def __init__(self, unet: torch.nn.Module, text_embeds: torch.Tensor, uncond_text_embeds: torch.Tensor | None,
                 vae_factor: int, guided: bool, crops_coords_top_left: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        if guided and uncond_text_embeds is None:
            raise ValueError("guided SDXL calls need uncond_text_embeds (the negative prompt's pooled embedding)")
        self.unet = unet
        self.text_embeds, self.uncond_text_embeds = text_embeds.detach(), \
            (None if uncond_text_embeds is None else uncond_text_embeds.detach())
        self.vae_factor, self.guided, self.crops = int(vae_factor), bool(guided), tuple(crops_coords_top_left)
        self._dtype, self._device = _model_dtype_device(unet)
        self._added: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def _added_cond(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        key = (n, h, w)
        if key not in self._added:
            B = n // 2 if self.guided else n

            def fit(v: torch.Tensor) -> torch.Tensor:
                if v.shape[0] not in (1, B):
                    raise ValueError(f"text_embeds have batch size {v.shape[0]} but x has batch size {B}")
                return v.expand(B, *v.shape[1:]).to(device=self._device, dtype=self._dtype)

            embeds = fit(self.text_embeds)
            if self.guided:
                embeds = torch.cat([fit(self.uncond_text_embeds), embeds])
            size = (h * self.vae_factor, w * self.vae_factor)
            time_ids = torch.tensor([size + self.crops + size], dtype=self._dtype, device=self._device)
            self._added[key] = {"text_embeds": embeds, "time_ids": time_ids.expand(n, -1)}
        return self._added[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=self._added_cond(x),
                         **kwargs)


class StableDiffusionXL(StableDiffusion):
    """The parts of a ``StableDiffusionXLPipeline`` belm needs (a :class:`StableDiffusion` with a
    second text encoder and added conditioning).

    ``encode`` / ``decode`` / ``schedule`` are StableDiffusion's; ``eps`` returns a
    :class:`DiffusersEps` over an :class:`AddedConditionUNet`.
    """

    def __init__(self, pipeline: Any) -> None:
        check_pipeline(pipeline, COMPONENTS_XL, "Stable Diffusion XL")
        super().__init__(pipeline.vae, pipeline.unet, pipeline.text_encoder, pipeline.tokenizer, pipeline.scheduler,
                         pipeline=pipeline)
        self.text_encoder_2, self.tokenizer_2 = pipeline.text_encoder_2, pipeline.tokenizer_2

    @classmethod
    def from_pretrained(cls, folder_or_pipeline: str | os.PathLike | Any, dtype: torch.dtype | None = torch.float32,
                        device: str | torch.device | None = None) -> "StableDiffusionXL":
        """Load from a LOCAL ``StableDiffusionXLPipeline`` folder (offline, safetensors only) or wrap a pipeline.

        Raises:
            FileNotFoundError: the folder, model_index.json, a component or its weights are missing.
            ValueError: a given pipeline lacks a component.
            RuntimeError: diffusers could not load the folder (message names the folder).
        """
        if isinstance(folder_or_pipeline, (str, os.PathLike)):
            pipe = load_pipeline_folder(Path(folder_or_pipeline), "StableDiffusionXLPipeline", COMPONENTS_XL,
                                        "Stable Diffusion XL", dtype, add_watermarker=False)
        else:
            pipe = folder_or_pipeline
            check_pipeline(pipe, COMPONENTS_XL, "Stable Diffusion XL")
        cast_pipeline(pipe, dtype, device)
        return cls(pipe)

    def prompt_embeds(self, prompt: str | list[str],  # type: ignore[override]
                      negative_prompt: str | list[str] | None = None,
                      guided: bool = False) -> tuple[torch.Tensor, ...]:
        """``StableDiffusionXLPipeline.encode_prompt``: (embeds, negative embeds, pooled, negative pooled).

        embeds: (B, 77, D1 + D2) penultimate hidden states of both encoders; pooled: (B, P).
        The negative ones are None unless ``guided``.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a non-empty list of strings; got {prompt!r}")
        if isinstance(negative_prompt, str) and len(prompts) > 1:
            negative_prompt = [negative_prompt] * len(prompts)
        if isinstance(negative_prompt, list) and len(negative_prompt) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negative_prompt)} entries but prompt has {len(prompts)}; "
                             "pass one negative prompt or one per prompt")
        with torch.no_grad():
            out = self.pipeline.encode_prompt(prompts, device=self.pipeline._execution_device,
                                              num_images_per_prompt=1, do_classifier_free_guidance=guided,
                                              negative_prompt=negative_prompt)
        return tuple(None if t is None else t.detach() for t in out)

    def eps(self, prompt: str | list[str] = "", guidance_scale: float = 5.0,
            negative_prompt: str | list[str] | None = None) -> DiffusersEps:
        """:class:`DiffusersEps` of the UNet conditioned on ``prompt`` with CFG and SDXL's added conditioning.

        Args:
            prompt: one prompt (broadcast over the batch) or B prompts (both encoders).
            guidance_scale: w >= 0; 1 disables guidance (one forward of batch B).
            negative_prompt: the unconditional prompt. None (the pipeline's default) gives zero
                embeddings when the folder sets ``force_zeros_for_empty_prompt``, else "".
        """
        guided = float(guidance_scale) != 1.0
        pe, npe, pooled, npooled = self.prompt_embeds(prompt, negative_prompt, guided)
        unet = AddedConditionUNet(self.unet, pooled, npooled, self.vae_factor, guided)
        return DiffusersEps(unet, self.scheduler, encoder_hidden_states=pe, uncond_encoder_hidden_states=npe,
                            guidance_scale=guidance_scale)
