"""Preprocessing of the sklearn ``digits`` data set (shared by training scripts and loaders).

The single source of truth for how the bundled "digits" model sees its data:
8x8 images with values 0..16 are scaled to [-1, 1] and bilinearly upsampled to 16x16.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
NULL_CLASS = 10  # extra class index used as the "unconditional" label for classifier-free guidance
HELDOUT_SIZE = 297
SPLIT_SEED = 0


def preprocess_digits(images) -> torch.Tensor:
    """Map raw sklearn digit images to model inputs.

    ``images``: array-like of shape (M, 8, 8) or (M, 64) with values in 0..16.
    Returns a float32 tensor of shape (M, 1, 16, 16) with values in [-1, 1].
    """
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = x / 16.0 * 2.0 - 1.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp_(-1.0, 1.0).contiguous()


def load_raw_digits():
    """Return ``(images (1797, 8, 8) float64 in 0..16, labels (1797,) int64)`` from scikit-learn."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(np.int64)


def make_split(n: int, heldout: int = HELDOUT_SIZE, seed: int = SPLIT_SEED, labels=None) -> dict:
    """Seeded split of ``range(n)`` into train / held-out index lists (stratified when labels given)."""
    rng = np.random.default_rng(seed)
    if labels is None:
        perm = rng.permutation(n)
        held = np.sort(perm[:heldout])
    else:
        labels = np.asarray(labels)
        classes = np.unique(labels)
        # allocate held-out counts per class proportionally (largest remainder), then sample
        counts = np.array([(labels == c).sum() for c in classes], dtype=float)
        quota = counts / counts.sum() * heldout
        take = np.floor(quota).astype(int)
        rem = heldout - take.sum()
        take[np.argsort(-(quota - take), kind="stable")[:rem]] += 1
        held = np.sort(np.concatenate([
            rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, take)
        ]))
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    train = np.flatnonzero(mask)
    return {"seed": int(seed), "n_total": int(n), "train": train.tolist(), "heldout": held.tolist()}


def digits_tensors(indices=None):
    """Preprocessed images (M,1,16,16) in [-1,1] and labels (M,) int64, optionally restricted to indices."""
    images, labels = load_raw_digits()
    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64)
        images, labels = images[idx], labels[idx]
    return preprocess_digits(images), torch.as_tensor(labels, dtype=torch.int64)
