"""Output folders that are never half-written nor stale, strict JSON, and picture helpers.

An output folder belongs to the user: belm records the files it wrote in
``.belm-outputs.json`` and, when the folder is reused, replaces exactly those (files of
the earlier run that this run does not write are removed); any other file in the folder is
left alone (and named once on stderr if it predates belm's record, so nothing is deleted
silently nor kept silently).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

__all__ = ["OutputDir", "to_uint8", "save_grid", "save_images", "check_writable", "strict_json", "MANIFEST",
           "grid_scale"]

#: The record of the files belm wrote into an output folder (one JSON list of names).
MANIFEST = ".belm-outputs.json"


def strict_json(data: Any) -> Any:
    """``data`` with every non-finite float replaced by None, so that ``json.dumps(..., allow_nan=False)``
    succeeds and strict parsers read it (e.g. a PSNR of an exact match, +inf, becomes null).
    Tuples become lists; dict keys become strings."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {str(k): strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    if isinstance(data, np.generic):
        return strict_json(data.item())
    return data


def check_writable(out: str | os.PathLike) -> Path:
    """Validate an output folder before any work: it must be creatable and writable."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} exists and is not a folder; choose a folder path")
    existing = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise PermissionError(f"--out {path} is not writable: {existing} is a file; choose another folder")
    try:
        # Actually try: os.access says yes to root even on read-only file systems.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise PermissionError(f"--out {path} is not writable ({exc.strerror}); choose a folder you can write to") \
            from None
    return path


class OutputDir:
    """Collect outputs in a hidden staging folder and move them into ``path`` only on success.

    Used as a context manager: an exception inside leaves ``path`` exactly as it was. On
    success each new file replaces its namesake atomically (``os.replace``), the files that
    belm's record (:data:`MANIFEST`) lists from an earlier run and this run did not write are
    removed, and the record is rewritten. Files belm did not write are kept.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = check_writable(path)
        self._stage: Path | None = None
        self.files: list[str] = []

    def __enter__(self) -> "OutputDir":
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._stage = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=parent))
        return self

    def file(self, name: str) -> Path:
        """Path to write ``name`` to (inside the staging folder)."""
        assert self._stage is not None, "use OutputDir as a context manager"
        self.files.append(name)
        target = self._stage / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_json(self, name: str, data: Any) -> None:
        """Strict JSON (no NaN/Infinity: non-finite floats are written as null)."""
        self.file(name).write_text(json.dumps(strict_json(data), indent=2, sort_keys=True, allow_nan=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        self.file(name).write_text(text)

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._stage is not None
        try:
            if exc_type is None:
                self._commit()
        finally:
            shutil.rmtree(self._stage, ignore_errors=True)

    def _commit(self) -> None:
        assert self._stage is not None
        existed = self.path.is_dir()
        self.path.mkdir(parents=True, exist_ok=True)
        record = self.path / MANIFEST
        previous: list[str] = []
        if record.is_file():
            try:
                previous = [str(n) for n in json.loads(record.read_text())]
            except (ValueError, TypeError):
                previous = []
        elif existed:
            foreign = sorted(p.name for p in self.path.iterdir() if p.name not in self.files)
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                print(f"belm: note: {self.path} already held files that belm did not record ({shown}); "
                      "they are kept. Use an empty --out folder to avoid mixing runs.", file=sys.stderr)
        new = set(self.files)
        for name in self.files:
            dest = self.path / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._stage / name, dest)
        for name in previous:
            stale = self.path / name
            # Only plain files inside the folder that belm wrote before and did not rewrite now.
            if name not in new and ".." not in Path(name).parts and stale.is_file():
                stale.unlink()
        tmp = self._stage / MANIFEST
        tmp.write_text(json.dumps(sorted(new), indent=0) + "\n")
        os.replace(tmp, record)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [−1, 1] → (B, H, W, C) uint8."""
    x = ((images.detach().to(torch.float32).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _pil(array: np.ndarray):
    from PIL import Image
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_images(out: OutputDir, images: torch.Tensor, names: Sequence[str], scale: int = 1) -> None:
    """One PNG per image (upscaled by ``scale`` with nearest neighbour, for tiny digits)."""
    from PIL import Image
    for array, name in zip(to_uint8(images), names):
        img = _pil(array)
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        img.save(out.file(name))


def grid_scale(height: int, width: int) -> int:
    """Nearest-neighbour upscaling factor for pictures of small images: 4 up to 32 px, 2 up to
    64 px, else 1 (Stable Diffusion images stay at their size)."""
    side = max(height, width)
    return 4 if side <= 32 else 2 if side <= 64 else 1


def save_grid(out: OutputDir, rows: Iterable[torch.Tensor], name: str, scale: int | None = None,
              pad: int = 1) -> None:
    """A grid PNG: each element of ``rows`` is a (B, C, H, W) tensor in [−1, 1] (one row).

    ``scale``: nearest-neighbour upscaling; None picks :func:`grid_scale` of the image size."""
    from PIL import Image
    rows = [to_uint8(r) for r in rows]
    H, W, C = rows[0].shape[1:]
    ncols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (H + pad) + pad, ncols * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            canvas[y:y + H, x:x + W] = img
    grid = _pil(canvas)
    scale = grid_scale(H, W) if scale is None else scale
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    grid.save(out.file(name))
