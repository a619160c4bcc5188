#!/usr/bin/env python
"""Train the bundled class-conditional rectified-flow model "digits-flow" (belm/models/digits_flow).

Same UNet2DModel architecture, data, split, augmentation and null-class label dropout as
scripts/train_digits.py (the epsilon model "digits"; the shared loop is
scripts/digits_training.py), trained as a rectified flow:

    x_σ = (1 − σ)·x0 + σ·z,   σ ~ U(0, 1),   target v = dx/dσ = z − x0,

the network is called with timestep σ·1000 (diffusers' FlowMatchEulerDiscreteScheduler
convention, num_train_timesteps = 1000, shift = 1). Uniform σ (not SD3's logit-normal)
because exact inversion evaluates the network on the whole of [0, 1], including σ = 0
(the first inversion step) and σ = 1 (the first sampling step). Only EMA weights are saved
(safetensors), with a FlowMatchEulerDiscreteScheduler config.

    python scripts/train_digits_flow.py --steps 2800 --batch-size 64 --lr 1.5e-3 --seed 0 --threads 1
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_training import ROOT, Objective, parser, train  # noqa: E402

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)
TIME_SCALE = 1000.0  # the network's timestep is σ · TIME_SCALE


def flow_objective() -> Objective:
    from diffusers import FlowMatchEulerDiscreteScheduler

    def noise(x0: torch.Tensor, gen: torch.Generator):
        sigma = torch.rand((x0.shape[0],), generator=gen)
        z = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        return (1 - s) * x0 + s * z, sigma * TIME_SCALE, z - x0

    def heldout_mse(model, x0, labels, sigmas=(0.05, 0.25, 0.5, 0.75, 0.95), seed=123):
        """Held-out velocity MSE at a few σ (diagnostic)."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for s in sigmas:
            z = torch.randn(x0.shape, generator=g)
            pred = model((1 - s) * x0 + s * z, torch.full((x0.shape[0],), s * TIME_SCALE), class_labels=labels).sample
            out[str(s)] = float(F.mse_loss(pred, z - x0))
        return out

    return Objective(FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), noise, heldout_mse,
                     mse_key="heldout_velocity_mse",
                     info={"objective": "rectified flow, v = z - x0, sigma ~ U(0,1), timestep = 1000*sigma"})


def main(argv=None):
    args = parser(__doc__, ROOT / "belm" / "models" / "digits_flow", save_every=500).parse_args(argv)
    train(args, flow_objective)


if __name__ == "__main__":
    main()
