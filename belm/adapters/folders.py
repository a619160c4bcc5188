"""Loading diffusers pipeline folders offline (safetensors only) with clear errors.

Shared by the SD3, FLUX and SDXL helpers: a LOCAL folder written by
``save_pretrained`` is checked component by component before diffusers sees it (so a
missing part is named), then loaded with ``local_files_only=True`` and
``use_safetensors=True``; remote code is never trusted.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from belm.adapters.eps import _model_dtype_device

__all__ = ["load_pipeline_folder", "check_pipeline_folder", "check_folder_files", "cast_pipeline", "check_pipeline"]

_CONFIG_FILES = {"scheduler": "scheduler_config.json"}
_NOT_MODELS = ("tokenizer", "scheduler", "feature_extractor")
#: the libraries model_index.json may name for a component; any other is code shipped with the folder
_LIBRARIES = (None, "diffusers", "transformers")
#: safetensors' own limit on the JSON header (a larger length field means: not a safetensors file)
_MAX_HEADER = 100 * 2 ** 20


def _pickles_only(sub: Path, what: str) -> FileNotFoundError:
    """The refusal of a network folder without .safetensors weights (belm never unpickles)."""
    return FileNotFoundError(f"{what} has no .safetensors weights in {str(sub)!r} (belm never loads pickled "
                             "weights; re-save the pipeline with save_pretrained(..., safe_serialization=True))")


def _check_json(path: Path) -> Any:
    """The parsed file; ValueError naming it when it is not JSON, or is a config that is not an object
    or asks for custom code (``auto_map``: transformers' pointer to classes in the folder's .py files)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON ({exc}); restore the file (re-save or re-download "
                         "the pipeline)") from None
    config = path.name in ("config.json", "model_index.json") or path.name.endswith("_config.json")
    if config and not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object; restore the file (re-save or re-download the pipeline)")
    if isinstance(data, dict) and "auto_map" in data:
        raise ValueError(f"{str(path)!r} has an auto_map: it asks for custom code shipped with the folder, which "
                         "belm never runs; use a folder of diffusers' and transformers' own classes")
    return data


def _check_safetensors(path: Path) -> None:
    """ValueError naming ``path`` unless it starts with a safetensors header and holds every byte
    that header declares (catches a truncated download, or a pickle renamed .safetensors)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        header = f.read(length) if 0 < length <= _MAX_HEADER else b""
    try:
        entries = json.loads(header.decode("utf-8")) if len(header) == length else None
    except ValueError:
        entries = None
    truncated = f"{str(path)!r} is truncated: its header declares {{}} bytes, the file holds {size}; download or " \
                "save it again"
    if 0 < length <= _MAX_HEADER and 8 + length > size:
        raise ValueError(truncated.format(8 + length))
    if not isinstance(entries, dict):
        raise ValueError(f"{str(path)!r} is not a safetensors file (no safetensors header: a pickle under this "
                         "name?); belm loads real safetensors only: restore the file or re-save the pipeline with "
                         "save_pretrained(..., safe_serialization=True)")
    ends = [int(e["data_offsets"][1]) for k, e in entries.items() if k != "__metadata__" and isinstance(e, dict)
            and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2]
    if 8 + length + max(ends, default=0) > size:
        raise ValueError(truncated.format(8 + length + max(ends, default=0)))


def _check_weights(sub: Path) -> None:
    """Refuse a network folder whose only .safetensors are variants (``….fp16.safetensors``), which
    diffusers loads only when asked for that variant and belm never asks (one set of weights per folder)."""
    weights = sorted(p.name for p in sub.glob("*.safetensors"))
    if weights and not any(name.count(".") == 1 for name in weights):   # "stem.safetensors", shards included
        variants = sorted({name.split(".")[-2].split("-")[0] for name in weights})
        plain = weights[0].split(".")[0] + ".safetensors"
        raise ValueError(f"component {str(sub)!r} holds only {'/'.join(variants)} variant weights ({', '.join(weights)}); "
                         f"belm loads the full-precision files ({plain!r}): download those too, or rename the variant "
                         f"files without '.{variants[0]}' (they are then loaded and cast to --dtype)")


def check_folder_files(folder: Path) -> None:
    """Refuse, before anything is loaded, what belm must not or cannot load from a local model folder
    (the folder and its component subfolders): custom code (``*.py`` files, an ``auto_map`` in a
    JSON file, a model_index.json naming a custom pipeline or a component from another library),
    JSON files that do not parse, ``.safetensors`` files that are not safetensors or are truncated,
    network folders with pickled weights only or variant weights only (``*.fp16.safetensors``).

    Pickled files beside ``.safetensors`` weights are ignored (never opened): diffusers is asked
    for safetensors only.

    Raises:
        ValueError: one line naming the file and the fix.
        FileNotFoundError: a network folder without .safetensors weights.
    """
    index = folder / "model_index.json"
    if index.is_file():
        data = _check_json(index)
        cls = data.get("_class_name")
        if not isinstance(cls, str):
            raise ValueError(f"{str(index)!r}: _class_name {cls!r} names custom pipeline code, which belm never "
                             "runs; use a folder of a diffusers pipeline (StableDiffusionPipeline, "
                             "StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline)")
        for name, entry in data.items():
            if not name.startswith("_") and isinstance(entry, list) and entry and entry[0] not in _LIBRARIES:
                raise ValueError(f"{str(index)!r}: component {name!r} comes from {entry[0]!r}, custom code which "
                                 "belm never runs (only diffusers' and transformers' classes are loaded)")
    for sub in [folder] + sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(sub.iterdir()):
            if path.suffix == ".py":
                raise ValueError(f"{str(path)!r} is Python code in the model folder: belm never runs code shipped "
                                 "with a model; remove it, or use a folder written by save_pretrained")
            if path.suffix == ".json" and path != index:
                _check_json(path)
            if path.suffix == ".safetensors":
                _check_safetensors(path)
        if (sub / "config.json").is_file() and not sub.name.startswith(_NOT_MODELS):
            if not any(sub.glob("*.safetensors")):
                raise _pickles_only(sub, f"component {sub.name!r}")
            _check_weights(sub)


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
            raise _pickles_only(sub, f"{label} component {name!r}")


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
