#!/usr/bin/env python
"""Train the bundled class-conditional pixel diffusion model "digits" (belm/models/digits).

A ~1.2M-parameter diffusers UNet2DModel on sklearn's 8x8 digits upsampled to 16x16, epsilon
prediction, DDPM linear betas 1e-4..0.02 with T=1000, classifier-free guidance via a null
class (index 10) used for label dropout. Only EMA weights are saved (safetensors).

    python scripts/train_digits.py --steps 2800 --batch-size 64 --lr 1.5e-3 --seed 0 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from belm.models.data import (  # noqa: E402
    HELDOUT_SIZE,
    NULL_CLASS,
    SPLIT_SEED,
    load_raw_digits,
    make_split,
    preprocess_digits,
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    num_class_embeds=NULL_CLASS + 1,
    norm_num_groups=8,
    attention_head_dim=32,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    clip_sample=False,
)


def build_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation: random integer translation by -1..1 pixels (background = -1). No flips."""
    b = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (b,), generator=gen)
    dy = torch.randint(0, 3, (b,), generator=gen)
    out = torch.empty_like(x)
    for i in range(b):  # cheap: 128 slices of 18x18
        out[i] = pad[i, :, dy[i] : dy[i] + 16, dx[i] : dx[i] + 16]
    return out


@torch.no_grad()
def eps_mse(model, x0, labels, alphas_cumprod, timesteps=(50, 250, 500, 750), seed=123):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=g)
        a = alphas_cumprod[t]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = model(xt, torch.full((x0.shape[0],), t), class_labels=labels).sample
        out[int(t)] = float(F.mse_loss(pred, noise))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "belm" / "models" / "digits")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.12)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=1000, help="also save EMA weights every N steps (0: only at end)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = load_raw_digits()
    split = make_split(len(labels), heldout=HELDOUT_SIZE, seed=SPLIT_SEED, labels=labels)
    train_idx = np.asarray(split["train"])
    held_idx = np.asarray(split["heldout"])
    x_train = preprocess_digits(images[train_idx])
    y_train = torch.as_tensor(labels[train_idx])
    x_held = preprocess_digits(images[held_idx])
    y_held = torch.as_tensor(labels[held_idx])
    n = x_train.shape[0]

    model = build_unet()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    sched = build_scheduler()
    ac = sched.alphas_cumprod.float()
    sqrt_ac, sqrt_1mac = ac.sqrt(), (1 - ac).sqrt()
    T = sched.config.num_train_timesteps
    n_params = sum(q.numel() for q in model.parameters())
    print(f"UNet params: {n_params:,}  train={n} heldout={len(held_idx)}  steps={args.steps}", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4, betas=(0.9, 0.999))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog)))

    def save(tag=""):
        out = args.out
        (out / "unet").mkdir(parents=True, exist_ok=True)
        ema.save_pretrained(out / "unet", safe_serialization=True)
        sched.save_pretrained(out / "scheduler")
        (out / "split.json").write_text(json.dumps(split))
        for f in out.rglob("*"):
            if f.is_file():
                f.chmod(0o644)  # safetensors writes 0600; package data should be world-readable
        print(f"saved EMA weights to {out} {tag}", flush=True)

    t0 = time.time()
    losses = []
    perm = torch.randperm(n, generator=gen)
    pos = 0
    model.train()
    for step in range(args.steps):
        if pos + args.batch_size > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        x0 = augment(x_train[idx], gen)
        y = y_train[idx].clone()
        drop = torch.rand(y.shape, generator=gen) < args.p_uncond
        y[drop] = NULL_CLASS
        t = torch.randint(0, T, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = sqrt_ac[t].view(-1, 1, 1, 1) * x0 + sqrt_1mac[t].view(-1, 1, 1, 1) * noise
        pred = model(xt, t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        for g_ in opt.param_groups:
            g_["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step == 0:
            el = time.time() - t0
            print(f"step {step + 1:6d}  loss {np.mean(losses[-args.log_every:]):.4f}  lr {lr_at(step):.2e}  "
                  f"{(step + 1) / el:.2f} it/s  {el / 60:.1f} min", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save(f"(step {step + 1})")
    wall = time.time() - t0
    final_loss = float(np.mean(losses[-500:]))
    save("(final)")
    held_mse = eps_mse(ema, x_held, y_held, ac)
    print(f"done: {args.steps} steps in {wall / 60:.1f} min, final loss (mean last 500) {final_loss:.4f}", flush=True)
    print(f"held-out eps-MSE (EMA, conditional): {held_mse}", flush=True)

    info = dict(steps=args.steps, seed=args.seed, threads=args.threads, batch_size=args.batch_size, lr=args.lr,
                ema_decay=args.ema_decay, p_uncond=args.p_uncond, wall_time_s=round(wall, 1),
                final_loss=round(final_loss, 5), heldout_eps_mse=held_mse, n_params=n_params,
                torch=torch.__version__, platform=platform.platform())
    (args.out / "train_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
