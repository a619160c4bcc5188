"""Pick the pipeline helper for a local diffusers folder from its ``model_index.json``.

    helper = from_folder("path/to/folder")    # StableDiffusion, StableDiffusionXL,
                                               # StableDiffusion3 or Flux, by _class_name

All helpers share :class:`~belm.adapters.StableDiffusion`'s interface (``encode``,
``decode``, ``decode_tensor``, ``preprocess``, ``eps(prompt=..., guidance_scale=...)``,
``schedule(num_steps, ...)``); on SD3 / FLUX ``eps`` is the velocity function and the
schedule is a flow schedule (FLUX's also needs the image size: ``schedule(N, height=, width=)``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from belm.adapters.flux import Flux
from belm.adapters.sd3 import StableDiffusion3
from belm.adapters.sdxl import StableDiffusionXL
from belm.adapters.stable_diffusion import StableDiffusion

__all__ = ["PIPELINE_ADAPTERS", "adapter_class", "from_folder"]

#: diffusers pipeline class (model_index.json's ``_class_name``) -> belm helper class
PIPELINE_ADAPTERS: dict[str, type] = {
    "StableDiffusionPipeline": StableDiffusion,
    "StableDiffusionXLPipeline": StableDiffusionXL,
    "StableDiffusion3Pipeline": StableDiffusion3,
    "FluxPipeline": Flux,
}


def adapter_class(folder: str | os.PathLike) -> type:
    """The helper class for ``folder`` (read from its model_index.json ``_class_name``).

    Raises:
        FileNotFoundError: no folder, or no model_index.json in it.
        ValueError: unreadable model_index.json, or a pipeline class belm has no helper for.
    """
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {str(path)!r} (pass a local diffusers pipeline folder)")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a diffusers pipeline folder: model_index.json is missing")
    try:
        name = json.loads(index_file.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"could not read {str(index_file)!r}: {exc}") from exc
    if name not in PIPELINE_ADAPTERS:
        raise ValueError(f"{str(path)!r} holds a {name!r}; belm supports {sorted(PIPELINE_ADAPTERS)} folders")
    return PIPELINE_ADAPTERS[name]


def from_folder(folder: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
                device: str | torch.device | None = None, **kwargs: Any) -> Any:
    """``adapter_class(folder).from_pretrained(folder, dtype, device, **kwargs)`` (offline, safetensors only)."""
    return adapter_class(folder).from_pretrained(folder, dtype=dtype, device=device, **kwargs)
