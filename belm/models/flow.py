"""Velocity function of a class-conditional rectified-flow UNet (the bundled "digits-flow").

The model is trained on x_σ = (1 − σ)·x0 + σ·z and predicts v = dx/dσ = z − x0; it takes
diffusers' flow timestep σ·1000 (``FlowMatchEulerDiscreteScheduler``, T = 1000). belm's
flow schedules call ``fn(x, t)`` with t = σ (0-dim float64 tensor), so :class:`UNetVelocity`
only rescales t, batches classifier-free guidance into one forward pass and returns v.
No sampler logic and no diffusers import here (the UNet is duck-typed).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["UNetVelocity"]


class UNetVelocity:
    """``fn(x, t) -> v``: a UNet2DModel-like velocity network with class-label guidance.

    Args:
        unet: called as ``unet(x, timestep, class_labels=...)`` returning ``.sample`` (or a tensor).
        class_labels: int or (B,) / (1,) long tensor; None for an unconditional model.
        guidance_scale: w >= 0; v = v_u + w·(v_c − v_u). 1: one forward of batch B; otherwise one
            forward of batch 2B (unconditional half first), so the function stays deterministic.
        null_class_labels: the unconditional label(s), needed when ``guidance_scale != 1``.
        num_train_timesteps: the network's timestep is σ · num_train_timesteps (diffusers: 1000).

    Call: x (B, C, H, W), any float dtype; t: σ in [0, 1] (float or 0-dim / (B,) tensor).
    Returns v shaped like x in x's dtype and device; the network runs in its own dtype.
    """

    def __init__(self, unet: Any, *, class_labels: torch.Tensor | int | None = None, guidance_scale: float = 1.0,
                 null_class_labels: torch.Tensor | int | None = None, num_train_timesteps: int = 1000) -> None:
        if not callable(unet):
            raise TypeError(f"unet must be a callable torch module; got {type(unet).__name__}")
        if isinstance(unet, torch.nn.Module):
            unet.eval()
        self.unet = unet
        w = float(guidance_scale)
        if not (w >= 0 and w != float("inf")):
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance); got {guidance_scale!r}")
        self.guidance_scale = w
        self.class_labels = None if class_labels is None else torch.as_tensor(class_labels, dtype=torch.int64)
        self.null_class_labels = None if null_class_labels is None else torch.as_tensor(null_class_labels,
                                                                                        dtype=torch.int64)
        if w != 1.0 and (self.class_labels is None or self.null_class_labels is None):
            raise ValueError(f"guidance_scale={w} needs class_labels and null_class_labels (the model's null "
                             "class id), or guidance_scale=1")
        self.num_train_timesteps = int(num_train_timesteps)
        params = next(iter(unet.parameters()), None) if isinstance(unet, torch.nn.Module) else None
        self.dtype = params.dtype if params is not None else torch.float32
        self.device = params.device if params is not None else torch.device("cpu")

    def _labels(self, labels: torch.Tensor, batch: int, name: str) -> torch.Tensor:
        labels = labels.reshape(-1)
        if labels.numel() not in (1, batch):
            raise ValueError(f"{name} has {labels.numel()} entries but x has batch size {batch}; pass 1 or {batch}")
        return labels.expand(batch).to(self.device)

    def __call__(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4:
            raise TypeError(f"x must be a floating-point tensor of shape (B, C, H, W); got "
                            f"{getattr(x, 'shape', type(x).__name__)}")
        B = x.shape[0]
        sigma = torch.as_tensor(t).detach()
        if not sigma.is_floating_point():
            raise TypeError(f"t must be the level's σ as a float (a flow schedule: Schedule.from_diffusers("
                            f"FlowMatchEulerDiscreteScheduler, N)); got dtype {sigma.dtype}, an integer timestep?")
        if not torch.isfinite(sigma).all() or (sigma < 0).any() or (sigma > 1).any():
            raise ValueError(f"t must be σ in [0, 1]; got {sigma.tolist()}")
        timestep = (sigma.to(torch.float64) * self.num_train_timesteps).to(self.device, torch.float32)
        timestep = timestep.reshape(-1).expand(B) if timestep.numel() == 1 else timestep.reshape(B)
        x_in = x.to(device=self.device, dtype=self.dtype).contiguous()
        labels = None if self.class_labels is None else self._labels(self.class_labels, B, "class_labels")
        with torch.no_grad():
            if self.guidance_scale == 1.0:
                v = self._forward(x_in, timestep, labels)
                return v.to(device=x.device, dtype=x.dtype)
            null = self._labels(self.null_class_labels, B, "null_class_labels")
            out = self._forward(torch.cat([x_in, x_in]), torch.cat([timestep, timestep]),
                                torch.cat([null, labels])).to(device=x.device, dtype=x.dtype)
        v_u, v_c = out[:B], out[B:]
        return v_u + self.guidance_scale * (v_c - v_u)

    def _forward(self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        out = self.unet(x, timestep, class_labels=labels) if labels is not None else self.unet(x, timestep)
        return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, (tuple, list)) else out)

    def __repr__(self) -> str:
        return (f"UNetVelocity(unet={type(self.unet).__name__}, guidance_scale={self.guidance_scale}, "
                f"conditional={self.class_labels is not None})")
