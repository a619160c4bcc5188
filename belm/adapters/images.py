"""Images in, tensors in [-1, 1] out (and back), for VAE-based adapters.

Accepted image inputs (see :func:`to_tensor`): a PIL image, a path to an image file,
a uint8 numpy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), a float tensor
(3, H, W) or (B, 3, H, W) with values in [-1, 1], or a list/tuple of these (same size
after cropping). Colour modes are normalised to RGB: greyscale is replicated,
palette images are expanded, and transparent images (RGBA, LA, PA, palette with
transparency) are composited onto a white background. EXIF orientation is applied.
Sizes that are not a multiple of the model factor are *center-cropped down* to the
nearest multiple (never resized), so the pixels that survive are unchanged.
PIL and numpy are imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["ImageInput", "load_image", "to_tensor", "to_pil", "center_crop_to_multiple"]

ImageInput = Any  # PIL.Image.Image | str | os.PathLike | numpy.ndarray | torch.Tensor | Sequence thereof

_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def load_image(path: str | os.PathLike) -> Any:
    """Open ``path`` as an RGB PIL image (fully loaded).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable image (message names the path).
    """
    from PIL import Image, UnidentifiedImageError

    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"image file not found: {p!r}")
    if os.path.isdir(p):
        raise ValueError(f"image path {p!r} is a directory; pass an image file")
    try:
        with Image.open(p) as im:
            # The header is read lazily: refuse a huge image before its pixels are allocated.
            # PIL's own decompression-bomb guard (MAX_IMAGE_PIXELS) stays on as well.
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and im.width * im.height > limit:
                raise ValueError(f"image {p!r} is {im.width}x{im.height} = {im.width * im.height} pixels, more "
                                 f"than the {limit} allowed (PIL.Image.MAX_IMAGE_PIXELS); downscale it first")
            im.load()
            return to_rgb(im)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image {p!r} refused as a possible decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {p!r}: {exc}") from exc


def to_rgb(image: Any) -> Any:
    """A PIL image in mode RGB (greyscale/palette expanded, transparency composited on white)."""
    from PIL import Image, ImageOps

    if image.width == 0 or image.height == 0:
        raise ValueError(f"image has zero size ({image.width}x{image.height}); pass a non-empty image")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - malformed EXIF must not make an image unreadable
        pass
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(np.round(arr / scale), 0, 255).astype(np.uint8))
    if image.mode in _TRANSPARENT_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def center_crop_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Center-crop the last two dims of ``x`` down to multiples of ``multiple``.

    Raises:
        ValueError: a side is shorter than ``multiple`` (zero-size included).
    """
    h, w = x.shape[-2], x.shape[-1]
    if h == 0 or w == 0:
        raise ValueError(f"image has zero size ({w}x{h}); pass a non-empty image")
    if h < multiple or w < multiple:
        raise ValueError(f"image is {w}x{h}; both sides must be at least {multiple} pixels (the VAE factor)")
    nh, nw = h - h % multiple, w - w % multiple
    top, left = (h - nh) // 2, (w - nw) // 2
    return x[..., top:top + nh, left:left + nw]


def _one_to_tensor(image: Any) -> torch.Tensor:
    """(1, 3, H, W) float32 tensor in [-1, 1] from one image input (or (B, 3, H, W) for a tensor)."""
    import numpy as np

    if isinstance(image, torch.Tensor):
        if not image.is_floating_point():
            raise ValueError(f"image tensor must be floating point with values in [-1, 1]; got dtype {image.dtype} "
                             "(for uint8 pixels pass a numpy array (H, W, C) or a PIL image)")
        if image.ndim == 3:
            image = image.unsqueeze(0)
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image tensor must have shape (B, 3, H, W) or (3, H, W); got {tuple(image.shape)}")
        if image.shape[0] == 0 or image.shape[-1] == 0 or image.shape[-2] == 0:
            raise ValueError(f"image tensor has zero size: shape {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise ValueError("image tensor contains NaN or Inf")
        lo, hi = float(image.min()), float(image.max())
        if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
            raise ValueError(f"image tensor values must lie in [-1, 1]; got range [{lo:.4g}, {hi:.4g}] "
                             "(map [0, 1] images with x * 2 - 1)")
        return image.clamp(-1, 1)
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8 (H, W[, C]) with values 0..255; got dtype {image.dtype} "
                             "(pass float images as a torch tensor (B, 3, H, W) in [-1, 1])")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ValueError(f"image array must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); "
                             f"got {image.shape}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"image array has zero size: shape {image.shape}")
        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(image))
    if not hasattr(image, "convert") or not hasattr(image, "mode"):
        raise TypeError("image must be a PIL image, a path, a uint8 numpy array (H, W, C), a float tensor "
                        f"(B, 3, H, W) in [-1, 1], or a list of these; got {type(image).__name__}")
    rgb = to_rgb(image)
    arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 127.5 - 1.0


def to_tensor(image: ImageInput, multiple: int = 1) -> torch.Tensor:
    """Image input(s) -> contiguous float32 CPU tensor (B, 3, H', W') in [-1, 1] (tensors keep their
    device; the layout is normalised so that equal pixels give equal VAE outputs).

    H', W' are H, W center-cropped down to multiples of ``multiple``.

    Raises:
        FileNotFoundError / ValueError: unreadable path, zero-size image, bad shape/dtype/range.
    """
    if isinstance(image, Sequence) and not isinstance(image, (str, bytes)):
        if len(image) == 0:
            raise ValueError("image list is empty; pass at least one image")
        parts = [center_crop_to_multiple(_one_to_tensor(im), multiple) for im in image]
        sizes = {tuple(p.shape[-2:]) for p in parts}
        if len(sizes) > 1:
            raise ValueError("images in a batch must have the same size after cropping; "
                             f"got sizes (H, W) {sorted(sizes)}")
        return torch.cat([p.to(parts[0].device) for p in parts]).contiguous()
    return center_crop_to_multiple(_one_to_tensor(image), multiple).contiguous()


def to_pil(x: torch.Tensor) -> list[Any]:
    """(B, 3, H, W) tensor in [-1, 1] -> list of B RGB PIL images (values clamped and rounded)."""
    from PIL import Image

    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) tensor in [-1, 1]; got shape {tuple(x.shape)}")
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
