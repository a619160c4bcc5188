"""Loading diffusers pipeline folders offline (safetensors only) with clear errors.

Shared by the SD3, FLUX and SDXL helpers: a LOCAL folder written by
``save_pretrained`` is checked component by component before diffusers sees it (so a
missing part is named), then loaded with ``local_files_only=True`` and
``use_safetensors=True``; remote code is never trusted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from belm.adapters.eps import _model_dtype_device

__all__ = ["load_pipeline_folder", "check_pipeline_folder", "cast_pipeline", "check_pipeline"]

_CONFIG_FILES = {"scheduler": "scheduler_config.json"}
_NOT_MODELS = ("tokenizer", "scheduler", "feature_extractor")


def check_pipeline_folder(folder: Path, components: tuple[str, ...], label: str) -> None:
    """Raise FileNotFoundError naming the first missing part of ``folder``'s components:
    a subfolder, a network's config.json or .safetensors weights, the scheduler's config.
    ``label`` names the model family in the message, e.g. "Stable Diffusion 3"."""
    for name in components:
        sub = folder / name
        if not sub.is_dir():
            raise FileNotFoundError(f"{label} folder {str(folder)!r} has no {name!r} component (missing "
                                    f"subfolder {str(sub)!r})")
        if name.startswith(_NOT_MODELS):
            needed = _CONFIG_FILES.get(name)
            if needed is not None and not (sub / needed).is_file():
                raise FileNotFoundError(f"{label} component {name!r} is incomplete: {str(sub / needed)!r} is missing")
            continue
        if not (sub / "config.json").is_file():
            raise FileNotFoundError(f"{label} component {name!r} is incomplete: {str(sub / 'config.json')!r} "
                                    "is missing")
        if not any(sub.glob("*.safetensors")):
            raise FileNotFoundError(f"{label} component {name!r} has no .safetensors weights in {str(sub)!r} "
                                    "(belm never loads pickled weights; re-save the pipeline with "
                                    "save_pretrained(..., safe_serialization=True))")


def load_pipeline_folder(folder: Path, pipeline_class: str, components: tuple[str, ...], label: str,
                         dtype: torch.dtype | None, **kwargs: Any) -> Any:
    """Load ``diffusers.<pipeline_class>`` from a local folder after checking its parts.

    Args:
        folder: the pipeline folder (model_index.json + one subfolder per component).
        pipeline_class: e.g. "StableDiffusion3Pipeline".
        components: the subfolders that must exist (networks need config.json and
            .safetensors weights; the scheduler needs scheduler_config.json).
        label: the model family named in error messages, e.g. "Stable Diffusion 3".
        dtype: the networks' dtype (None: float32).
        kwargs: passed to ``from_pretrained`` (e.g. ``add_watermarker=False``).

    Raises:
        FileNotFoundError: the folder, model_index.json, a component or its weights are missing.
        RuntimeError: diffusers could not load the folder (the message names it).
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{label} folder not found: {str(folder)!r} (pass a local folder written by "
                                f"{pipeline_class}.save_pretrained; hub ids are not supported)")
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a diffusers pipeline folder: model_index.json is missing")
    check_pipeline_folder(folder, components, label)
    import diffusers

    cls = getattr(diffusers, pipeline_class)
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                   dtype=dtype or torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"could not load the {label} pipeline from {str(folder)!r}: {exc}") from exc


def check_pipeline(pipe: Any, components: tuple[str, ...], label: str) -> None:
    """Raise ValueError naming the components a pipeline object lacks."""
    missing = [name for name in components if getattr(pipe, name, None) is None]
    if missing:
        raise ValueError(f"pipeline {type(pipe).__name__} lacks the component(s) {missing}; the {label} adapter "
                         f"needs {components}")


def cast_pipeline(pipe: Any, dtype: torch.dtype | None, device: str | torch.device | None) -> None:
    """Move every network of ``pipe`` (its ``components`` that are torch modules) to dtype/device in place.

    No-op casts are skipped (diffusers warns on them); None keeps the current dtype / device.
    """
    for module in getattr(pipe, "components", {}).values():
        if not isinstance(module, torch.nn.Module):
            continue
        current_dtype, current_device = _model_dtype_device(module)
        new_dtype = dtype if dtype is not None and dtype != current_dtype else None
        new_device = torch.device(device) if device is not None else None
        if new_device is not None and new_device == current_device:
            new_device = None
        if new_dtype is not None or new_device is not None:
            module.to(device=new_device, dtype=new_dtype)
