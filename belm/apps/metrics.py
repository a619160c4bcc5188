"""Figures the applications report: reconstruction errors and the Fréchet distance."""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from scipy import linalg

__all__ = ["reconstruction_errors", "feature_statistics", "frechet_distance", "FeatureExtractor"]

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


def reconstruction_errors(original: torch.Tensor, reconstructed: torch.Tensor,
                          data_range: float = 2.0) -> dict[str, list[float]]:
    """Per-image max abs error, MSE and PSNR (dB; inf for an exact match). Inputs (B, ...)."""
    if original.shape != reconstructed.shape:
        raise ValueError(f"shapes differ: {tuple(original.shape)} vs {tuple(reconstructed.shape)}")
    diff = (reconstructed.to(torch.float64) - original.to(torch.float64)).flatten(1)
    mse = (diff**2).mean(1)
    psnr = [math.inf if m == 0 else 10 * math.log10(data_range**2 / m) for m in mse.tolist()]
    return {"max_abs_error": diff.abs().max(1).values.tolist(), "mse": mse.tolist(), "psnr": psnr}


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (M, D), in float64."""
    f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    f = f.astype(np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (M >= 2, D); got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor,
                     extractor: Optional[FeatureExtractor] = None, batch_size: int = 256) -> float:
    """Fréchet distance ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) between two sets.

    ``a`` and ``b`` are features (M, D), or images when ``extractor`` maps an image batch
    to features (e.g. the bundled digit classifier's penultimate layer, or an Inception
    network for FID).
    """
    if extractor is not None:
        a, b = (_extract(extractor, x, batch_size) for x in (a, b))
    mu_a, cov_a = feature_statistics(a)
    mu_b, cov_b = feature_statistics(b)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():
            # Near-singular products (fewer samples than features): regularise as the FID
            # reference code does.
            eps = np.eye(cov_a.shape[0]) * 1e-6
            covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


@torch.no_grad()
def _extract(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([extractor(images[i:i + batch_size]).to(torch.float64)
                      for i in range(0, len(images), batch_size)])
