"""Bundled, offline models: the class-conditional pixel diffusion model "digits" and a digit classifier.

Everything here loads from package data (safetensors + JSON) under ``DIGITS_PATH``; nothing is
downloaded. Regenerate the files with ``scripts/train_digits.py`` and ``scripts/train_classifier.py``.

* :func:`load_digits_unet` -> ``(UNet2DModel, DDPMScheduler)``: epsilon prediction, 16x16x1 images in
  [-1, 1], DDPM linear betas 1e-4..0.02, T=1000; ``class_labels`` 0..9, or ``NULL_CLASS`` (10) for the
  unconditional branch of classifier-free guidance.
* :func:`load_digits_flow_unet` -> ``(UNet2DModel, FlowMatchEulerDiscreteScheduler)``: the same UNet
  architecture trained as a rectified flow on the same data and split (velocity v = z − x0 of
  x_σ = (1 − σ)·x0 + σ·z, timestep σ·1000, shift 1); wrap it with :class:`UNetVelocity`.
* :func:`load_digits_classifier` -> :class:`DigitClassifier` (``forward`` logits, ``features`` 64-d).
* :func:`digits_dataset` -> preprocessed sklearn digits, ``"train"`` or ``"heldout"`` split.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .classifier import DigitClassifier
from .data import IMAGE_SIZE, NULL_CLASS, NUM_CLASSES, digits_tensors, preprocess_digits
from .flow import UNetVelocity

DIGITS_PATH = Path(__file__).resolve().parent / "digits"
DIGITS_FLOW_PATH = Path(__file__).resolve().parent / "digits_flow"

__all__ = [
    "DIGITS_PATH",
    "DIGITS_FLOW_PATH",
    "UNetVelocity",
    "load_digits_flow_unet",
    "NULL_CLASS",
    "NUM_CLASSES",
    "IMAGE_SIZE",
    "DigitClassifier",
    "load_digits_unet",
    "load_digits_classifier",
    "digits_classifier_config",
    "digits_dataset",
    "digits_split",
    "preprocess_digits",
]

_REGEN = {
    "unet": "python scripts/train_digits.py --steps 2800 --batch-size 64 --lr 1.5e-3 --seed 0 --threads 1",
    "classifier": "python scripts/train_classifier.py --epochs 30 --seed 0 --threads 1",
    "flow": "python scripts/train_digits_flow.py --steps 2800 --batch-size 64 --lr 1.5e-3 --seed 0 --threads 1",
}


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled digits model file missing: {path}. Regenerate it from the repository root with:  {_REGEN[what]}"
        )
    return path


def _load_bundled(folder: Path, what: str, scheduler_class: Any, dtype: torch.dtype, device: Any):
    """(unet, scheduler) of a bundled model folder: safetensors only, eval mode, frozen."""
    from diffusers import UNet2DModel

    _require(folder / "unet" / "config.json", what)
    _require(folder / "unet" / "diffusion_pytorch_model.safetensors", what)
    _require(folder / "scheduler" / "scheduler_config.json", what)
    unet = UNet2DModel.from_pretrained(
        str(folder / "unet"), use_safetensors=True, local_files_only=True, torch_dtype=dtype,
        low_cpu_mem_usage=False,
    )
    if unet.dtype != dtype:  # a no-op .to(dtype) makes diffusers warn on every load
        unet = unet.to(dtype=dtype)
    unet = unet.to(device=device).eval().requires_grad_(False)
    return unet, scheduler_class.from_pretrained(str(folder / "scheduler"), local_files_only=True)


def load_digits_unet(dtype: torch.dtype = torch.float32, device="cpu"):
    """Return ``(unet, scheduler)``: the bundled UNet2DModel (eval mode, EMA weights) and its DDPMScheduler."""
    from diffusers import DDPMScheduler

    return _load_bundled(DIGITS_PATH, "unet", DDPMScheduler, dtype, device)


def load_digits_flow_unet(dtype: torch.dtype = torch.float32, device="cpu"):
    """Return ``(unet, scheduler)``: the bundled rectified-flow UNet2DModel (eval mode, EMA weights)
    and its FlowMatchEulerDiscreteScheduler (T = 1000, shift 1). Sample it on
    ``Schedule.from_diffusers(scheduler, N)`` with ``UNetVelocity(unet, class_labels=...)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return _load_bundled(DIGITS_FLOW_PATH, "flow", FlowMatchEulerDiscreteScheduler, dtype, device)


def digits_classifier_config() -> dict:
    """The bundled classifier's configuration: ``channels``, ``feature_dim`` (the dimension of the
    features FD-digits compares), ``num_classes``, ``dropout`` (classifier_config.json)."""
    return json.loads(_require(DIGITS_PATH / "classifier_config.json", "classifier").read_text())


def load_digits_classifier(device="cpu") -> DigitClassifier:
    """Return the bundled :class:`DigitClassifier` in eval mode (input (B,1,16,16) in [-1, 1])."""
    from safetensors.torch import load_file

    cfg = digits_classifier_config()
    model = DigitClassifier(
        channels=tuple(cfg["channels"]), feature_dim=cfg["feature_dim"], num_classes=cfg["num_classes"],
        dropout=cfg.get("dropout", 0.2),
    )
    state = load_file(str(_require(DIGITS_PATH / "classifier.safetensors", "classifier")))
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)


def digits_split() -> dict:
    """The seeded train / held-out index split of sklearn's 1797 digits used for training (split.json)."""
    return json.loads(_require(DIGITS_PATH / "split.json", "unet").read_text())


def digits_dataset(split: str = "heldout"):
    """Preprocessed digits of one split: ``(images (M,1,16,16) float32 in [-1,1], labels (M,) int64)``.

    ``split``: ``"heldout"`` (never seen by either model in training) or ``"train"``.
    """
    if split not in ("heldout", "train"):
        raise ValueError(f"split must be 'heldout' or 'train', got {split!r}")
    return digits_tensors(digits_split()[split])
