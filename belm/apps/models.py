"""Model handles: the bundled digits model or a local diffusers folder, behind one interface.

A handle only composes adapters: it turns images into model space and back, and gives
``eps(condition, guidance)`` and ``schedule(N)``. Sampler logic stays in :mod:`belm.solvers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from belm.adapters import DiffusersEps
from belm.schedule import Schedule, default_spacing

__all__ = ["ModelHandle", "FlowModelHandle", "load_model", "image_shape", "BUNDLED_MODELS"]

#: the models shipped with belm (no folder needed); both see the bundled digits data set
BUNDLED_MODELS: tuple[str, ...] = ("digits", "digits-flow")


@dataclass
class ModelHandle:
    """What the applications need from a model.

    Attributes:
        name: "digits", "digits-flow" or the folder path.
        kind: "pixel" (x is the image) or "latent" (Stable Diffusion; x is the VAE latent).
        shape: (C, H, W) of x for sampling from noise.
        num_classes: class-conditional pixel models: number of classes (conditions are ids).
        null_class: the unconditional class id for guidance (None: no guidance possible).
        dataset: the bundled image set the model was trained on (``"digits"``), the source of
            images when none are given and the reference of FD; None for folders.
        flow: the network returns a velocity and ``schedule(N)`` is a flow σ grid (no spacing
            to choose): digits-flow, SD3, FLUX.
    """

    name: str
    kind: str
    unet: Any
    scheduler: Any
    shape: tuple[int, int, int]
    num_classes: Optional[int] = None
    null_class: Optional[int] = None
    sd: Any = None
    classifier: Any = None
    extra: dict = field(default_factory=dict)
    dataset: Optional[str] = None
    flow: bool = False

    def reference_images(self, split: str = "heldout") -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [−1, 1] and labels (B,) of the bundled data set.

        Raises:
            ValueError: the model has no bundled data set (a folder model).
        """
        if self.dataset != "digits":
            raise ValueError(f"model {self.name} has no bundled image set; pass images")
        from belm.models import digits_dataset
        return digits_dataset(split)

    # -- conditions --------------------------------------------------------------------
    @property
    def prompted(self) -> bool:
        return self.sd is not None

    def parse_condition(self, value: Any, arg: str) -> Any:
        """Class id (class-conditional models), prompt (SD) or None (unconditional)."""
        if value is None:
            return None
        if self.prompted:
            return str(value)
        if self.num_classes is None:
            raise ValueError(f"{arg}: model {self.name} is unconditional; omit {arg}")
        try:
            label = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{arg} must be a class id in [0, {self.num_classes - 1}]; got {value!r}") from None
        if not 0 <= label < self.num_classes:
            raise ValueError(f"{arg} must be a class id in [0, {self.num_classes - 1}]; got {label}")
        return label

    def eps(self, condition: Any = None, guidance: float = 1.0, batch: int = 1):
        """``eps_fn(x, t)`` for a condition (class id / prompt / None) and guidance scale."""
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0; got {guidance}")
        if self.prompted:
            return self.sd.eps(prompt=condition or "", guidance_scale=guidance)
        if condition is None:
            if self.num_classes is not None:
                return DiffusersEps(self.unet, self.scheduler, class_labels=self.null_class)
            return DiffusersEps(self.unet, self.scheduler)
        labels = torch.as_tensor(condition, dtype=torch.int64, device=self.unet.device)
        null = self.null_class if guidance != 1.0 else None
        return DiffusersEps(self.unet, self.scheduler, class_labels=labels,
                            guidance_scale=guidance, null_class_labels=null)

    def schedule(self, num_steps: int, spacing: Optional[str] = None, sampler: str = "obelm",
                 size: Optional[tuple[int, int]] = None) -> Schedule:
        """The grid of ``num_steps`` steps for ``sampler``.

        ``spacing``: None gives belm's default for that sampler
        (:func:`belm.schedule.default_spacing`: "trailing"), ``"config"`` the scheduler
        config's own spacing (the digits model's is "leading"), or an explicit name. Flow
        pipelines (SD3, FLUX) have no spacing (None or "config" only): their σ grid is the
        pipeline's, shifted by the image ``size`` (H, W) in pixels where the scheduler shifts
        dynamically (FLUX); default: the handle's ``shape``.
        """
        if self.flow:
            if spacing not in (None, "config"):
                raise ValueError(f"spacing={spacing!r} does not apply to the flow model {self.name} (its sigmas "
                                 "follow the scheduler's shift); omit it")
            H, W = size if size is not None else self.shape[1:]
            return self.sd.schedule(num_steps, height=int(H), width=int(W))
        if spacing is None:
            spacing = default_spacing(sampler)
        if self.prompted:
            return self.sd.schedule(num_steps, spacing=spacing, sampler=sampler)
        return Schedule.from_diffusers(self.scheduler, num_steps, spacing=spacing)

    # -- images ------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [−1, 1] → model space x0."""
        return self.sd.encode(images) if self.prompted else images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space → images (B, C, H, W) in [−1, 1]."""
        if self.prompted:
            return self.sd.decode_tensor(x.to(torch.float32))
        return x.clamp(-1, 1)

    def load_images(self, paths: list[str]) -> torch.Tensor:
        """Read image files into (B, C, H, W) in [−1, 1] at the model's resolution."""
        from belm.adapters.images import load_image, to_tensor
        if self.prompted:
            return torch.cat([self.sd.preprocess(load_image(p)) for p in paths])
        C, H, W = self.shape
        out = []
        for p in paths:
            img = load_image(p).convert("L" if C == 1 else "RGB").resize((W, H))
            out.append(to_tensor(img))
        x = torch.cat(out)
        return x[:, :1] if C == 1 and x.shape[1] != 1 else x


@dataclass
class FlowModelHandle(ModelHandle):
    """A rectified-flow pixel model (``"digits-flow"``): ``eps`` returns the velocity dx/dσ.

    Its ``schedule(N)`` is a kind="flow" schedule (``Schedule.from_diffusers`` on the
    FlowMatchEulerDiscreteScheduler), on which the samplers take a velocity function.
    """

    def schedule(self, num_steps: int, spacing: Optional[str] = None, sampler: str = "obelm",
                 size: Optional[tuple[int, int]] = None) -> Schedule:
        """The scheduler's own σ grid (shift included); a flow grid has no spacing to choose, and its
        last step is not tiny, so it suits exact inversion as it is."""
        if spacing not in (None, "config"):
            raise ValueError(f"spacing={spacing!r} does not apply to the flow model {self.name} (its sigmas follow "
                             "the scheduler's shift); omit it")
        return Schedule.from_diffusers(self.scheduler, num_steps)

    def eps(self, condition: Any = None, guidance: float = 1.0, batch: int = 1):
        """``fn(x, t)`` returning the velocity for a class id (or None) and guidance scale."""
        from belm.models import UNetVelocity
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0; got {guidance}")
        T = int(self.scheduler.config.num_train_timesteps)
        if condition is None:
            return UNetVelocity(self.unet, class_labels=self.null_class, num_train_timesteps=T)
        return UNetVelocity(self.unet, class_labels=torch.as_tensor(condition, dtype=torch.int64),
                            guidance_scale=guidance, null_class_labels=self.null_class, num_train_timesteps=T)


def load_model(model: str = "digits", *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> ModelHandle:
    """``"digits"``, ``"digits-flow"`` (bundled) or a local diffusers folder: a pixel UNet2DModel pipeline, or a
    Stable Diffusion 1.x/2.x, SDXL, SD3 or FLUX pipeline (through :func:`belm.adapters.from_folder`).

    Raises:
        FileNotFoundError: no such folder, or an incomplete one.
        ValueError: a folder belm cannot or must not run (other pipelines, unsupported schedulers,
            custom code, broken or truncated files, weights diffusers cannot load), in one line.
    """
    if model == "digits-flow":
        from belm.models import NULL_CLASS, NUM_CLASSES, load_digits_classifier, load_digits_flow_unet
        unet, scheduler = load_digits_flow_unet(dtype=dtype, device=device)
        return FlowModelHandle("digits-flow", "pixel", unet, scheduler, image_shape(model), NUM_CLASSES, NULL_CLASS,
                               classifier=load_digits_classifier(device=device), dataset="digits", flow=True)
    if model == "digits":
        from belm.models import NULL_CLASS, NUM_CLASSES, load_digits_classifier, load_digits_unet
        unet, scheduler = load_digits_unet(dtype=dtype, device=device)
        return ModelHandle("digits", "pixel", unet, scheduler, image_shape(model), NUM_CLASSES, NULL_CLASS,
                           classifier=load_digits_classifier(device=device), dataset="digits")
    folder = Path(model)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {model}: no such folder; pass 'digits', 'digits-flow' or a local "
                                "diffusers folder")
    from belm.adapters.folders import check_folder_files
    from belm.adapters.stable_diffusion import check_model_folder
    check_folder_files(folder)               # custom code, broken or truncated files: refused before diffusers
    kind = check_model_folder(folder)        # one-line refusals of what belm cannot run
    try:
        return _load_folder(folder, kind, dtype, device)
    except (RuntimeError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        # diffusers' errors can span many lines (a state dict's size mismatches): the first names the problem
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ValueError(f"--model {model}: could not load it: {lines[0] if lines else type(exc).__name__}"
                         + (" (and more; --debug shows it all)" if len(lines) > 1 else "")) from exc


def image_shape(model: str, kind: Optional[str] = None) -> tuple[int, int, int]:
    """(C, H, W) of the images ``model`` makes at its default size, without loading it: the bundled
    models' 1×16×16; for a folder (``kind`` from :func:`check_model_folder`), from its config
    files: a pixel UNet's (in_channels, sample_size, sample_size); for latent pipelines ("sd",
    "sdxl", "sd3", "flux") 3 channels and the network's sample_size (FLUX's config has none:
    FluxPipeline's 128) times the VAE factor 2^(len(block_out_channels) − 1).

    Raises:
        ValueError: a pixel UNet config without sample_size.
    """
    import json
    if model in BUNDLED_MODELS:
        from belm.models.data import IMAGE_SIZE
        return 1, IMAGE_SIZE, IMAGE_SIZE
    folder = Path(model)
    if kind is None:
        from belm.adapters.stable_diffusion import check_model_folder
        kind = check_model_folder(folder)

    def config(sub: str) -> dict:
        return json.loads((folder / sub / "config.json").read_text())
    if kind == "pixel":
        sub = "unet" if (folder / "unet").is_dir() else ""
        cfg = config(sub)
        size = cfg.get("sample_size")
        if not size:
            raise ValueError(f"{str(folder / sub / 'config.json')!r} has no sample_size; set the UNet's image size "
                             "there")
        size = size if isinstance(size, int) else size[0]
        return int(cfg.get("in_channels", 3)), int(size), int(size)
    cfg = config("transformer" if (folder / "transformer").is_dir() else "unet")
    sample = cfg.get("sample_size") or 128
    factor = 2 ** (len(config("vae").get("block_out_channels", (0,))) - 1)
    size = int(sample if isinstance(sample, int) else sample[0]) * factor
    return 3, size, size


def _load_folder(folder: Path, kind: str, dtype: torch.dtype, device: str | torch.device) -> ModelHandle:
    """The handle of a checked folder of ``kind`` (see :func:`check_model_folder`)."""
    model = str(folder)
    shape = image_shape(model, kind)
    if kind != "pixel":
        from belm.adapters import from_folder
        sd = from_folder(folder, dtype=dtype, device=device)
        return ModelHandle(str(folder), "latent", sd.unet, sd.scheduler, shape, sd=sd, flow=kind in ("sd3", "flux"))
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: no unet/config.json (nor model_index.json with a vae); "
                                "not a diffusers pipeline folder")
    from diffusers import DDIMScheduler, UNet2DModel
    unet = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True)
    unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    sched_dir = folder / "scheduler"
    if not (sched_dir / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"--model {model}: missing component scheduler/scheduler_config.json")
    scheduler = DDIMScheduler.from_pretrained(str(sched_dir), local_files_only=True)
    classes = getattr(unet.config, "num_class_embeds", None)
    return ModelHandle(str(folder), "pixel", unet, scheduler, shape, num_classes=classes, null_class=None)
