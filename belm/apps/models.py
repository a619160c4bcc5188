"""Model handles: the bundled digits model or a local diffusers folder, behind one interface.

A handle only composes adapters: it turns images into model space and back, and gives
``eps(condition, guidance)`` and ``schedule(N)``. Sampler logic stays in :mod:`belm.solvers`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from belm.adapters import DiffusersEps
from belm.schedule import Schedule

__all__ = ["ModelHandle", "load_model"]


@dataclass
class ModelHandle:
    """What the applications need from a model.

    Attributes:
        name: "digits" or the folder path.
        kind: "pixel" (x is the image) or "latent" (Stable Diffusion; x is the VAE latent).
        shape: (C, H, W) of x for sampling from noise.
        num_classes: class-conditional pixel models: number of classes (conditions are ids).
        null_class: the unconditional class id for guidance (None: no guidance possible).
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
            return self.sd.eps(prompt=condition or "", guidance_scale=guidance, negative_prompt="")
        if condition is None:
            if self.num_classes is not None:
                return DiffusersEps(self.unet, self.scheduler, class_labels=self.null_class)
            return DiffusersEps(self.unet, self.scheduler)
        labels = torch.as_tensor(condition, dtype=torch.int64, device=self.unet.device)
        null = self.null_class if guidance != 1.0 else None
        return DiffusersEps(self.unet, self.scheduler, class_labels=labels,
                            guidance_scale=guidance, null_class_labels=null)

    def schedule(self, num_steps: int, spacing: Optional[str] = None, sampler: str = "obelm") -> Schedule:
        """TEMP stub (dropped on merge): spacing None = belm's default for ``sampler``."""
        from belm.schedule import default_spacing
        return Schedule.from_diffusers(self.scheduler, num_steps, spacing=spacing or default_spacing(sampler))

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


def load_model(model: str = "digits", *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> ModelHandle:
    """``"digits"`` (bundled) or a local diffusers folder (pixel UNet2DModel or Stable Diffusion)."""
    if model == "digits":
        from belm.models import NULL_CLASS, NUM_CLASSES, load_digits_classifier, load_digits_unet
        unet, scheduler = load_digits_unet(dtype=dtype, device=device)
        return ModelHandle("digits", "pixel", unet, scheduler, (1, 16, 16), NUM_CLASSES, NULL_CLASS,
                           classifier=load_digits_classifier(device=device))
    folder = Path(model)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {model}: no such folder; pass 'digits' or a local diffusers folder")
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    if "vae" in index or (folder / "vae").is_dir():
        from belm.adapters import StableDiffusion
        sd = StableDiffusion.from_pretrained(folder, dtype=dtype, device=device)
        f = sd.vae_factor
        size = int(getattr(sd.unet.config, "sample_size", 64)) * f
        return ModelHandle(str(folder), "latent", sd.unet, sd.scheduler, (3, size, size), sd=sd)
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
    cfg = unet.config
    classes = getattr(cfg, "num_class_embeds", None)
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return ModelHandle(str(folder), "pixel", unet, scheduler, (cfg.in_channels, size, size),
                       num_classes=classes, null_class=None)
