#!/usr/bin/env python
"""Train the bundled class-conditional pixel diffusion model "digits" (belm/models/digits).

A ~1.2M-parameter diffusers UNet2DModel on sklearn's 8x8 digits upsampled to 16x16, epsilon
prediction, DDPM linear betas 1e-4..0.02 with T=1000, classifier-free guidance via a null
class (index 10) used for label dropout. Only EMA weights are saved (safetensors). The loop,
data and optimiser are shared with the flow model (scripts/digits_training.py).

    python scripts/train_digits.py --steps 2800 --batch-size 64 --lr 1.5e-3 --seed 0 --threads 1
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_training import ROOT, Objective, parser, train  # noqa: E402

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    clip_sample=False,
)


def epsilon_objective() -> Objective:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    ac = scheduler.alphas_cumprod.float()
    sqrt_ac, sqrt_1mac = ac.sqrt(), (1 - ac).sqrt()
    T = scheduler.config.num_train_timesteps

    def noise(x0: torch.Tensor, gen: torch.Generator):
        t = torch.randint(0, T, (x0.shape[0],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        return sqrt_ac[t].view(-1, 1, 1, 1) * x0 + sqrt_1mac[t].view(-1, 1, 1, 1) * eps, t, eps

    def heldout_mse(model, x0, labels, timesteps=(50, 250, 500, 750), seed=123):
        g = torch.Generator().manual_seed(seed)
        out = {}
        for t in timesteps:
            eps = torch.randn(x0.shape, generator=g)
            xt = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * eps
            pred = model(xt, torch.full((x0.shape[0],), t), class_labels=labels).sample
            out[int(t)] = float(F.mse_loss(pred, eps))
        return out

    return Objective(scheduler, noise, heldout_mse, mse_key="heldout_eps_mse", info={}, save_split=True)


def main(argv=None):
    args = parser(__doc__, ROOT / "belm" / "models" / "digits", save_every=1000).parse_args(argv)
    train(args, epsilon_objective)


if __name__ == "__main__":
    main()
