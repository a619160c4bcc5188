"""Output folders that are never half-written, and picture helpers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

__all__ = ["OutputDir", "to_uint8", "save_grid", "save_images", "check_writable"]


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

    Used as a context manager: an exception inside leaves ``path`` exactly as it was.
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
        self.file(name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def write_text(self, name: str, text: str) -> None:
        self.file(name).write_text(text)

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._stage is not None
        try:
            if exc_type is None:
                self.path.mkdir(parents=True, exist_ok=True)
                for name in self.files:
                    dest = self.path / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(self._stage / name, dest)
        finally:
            shutil.rmtree(self._stage, ignore_errors=True)


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


def save_grid(out: OutputDir, rows: Iterable[torch.Tensor], name: str, scale: int = 4, pad: int = 1) -> None:
    """A grid PNG: each element of ``rows`` is a (B, C, H, W) tensor in [−1, 1] (one row)."""
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
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    grid.save(out.file(name))
