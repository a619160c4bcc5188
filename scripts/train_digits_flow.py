#!/usr/bin/env python
"""Train the bundled class-conditional rectified-flow model "digits-flow" (belm/models/digits_flow).

Same UNet2DModel architecture, data, split, augmentation and null-class label dropout as
scripts/train_digits.py (the epsilon model "digits"), trained as a rectified flow:

    x_σ = (1 − σ)·x0 + σ·z,   σ ~ U(0, 1),   target v = dx/dσ = z − x0,

the network is called with timestep σ·1000 (diffusers' FlowMatchEulerDiscreteScheduler
convention, num_train_timesteps = 1000, shift = 1). Uniform σ (not SD3's logit-normal)
because exact inversion evaluates the network on the whole of [0, 1], including σ = 0
(the first inversion step) and σ = 1 (the first sampling step). Only EMA weights are saved
(safetensors), with a FlowMatchEulerDiscreteScheduler config.

    python scripts/train_digits_flow.py --steps 2800 --batch-size 64 --lr 1.5e-3 --seed 0 --threads 1
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
sys.path.insert(0, str(ROOT / "scripts"))

from train_digits import augment, build_unet  # noqa: E402  (same architecture and augmentation)

from belm.models.data import (  # noqa: E402
    HELDOUT_SIZE,
    NULL_CLASS,
    SPLIT_SEED,
    load_raw_digits,
    make_split,
    preprocess_digits,
)

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)
TIME_SCALE = 1000.0  # the network's timestep is σ · TIME_SCALE


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


@torch.no_grad()
def velocity_mse(model, x0, labels, sigmas=(0.05, 0.25, 0.5, 0.75, 0.95), seed=123):
    """Held-out velocity MSE at a few σ (diagnostic, written to train_info.json)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in sigmas:
        z = torch.randn(x0.shape, generator=g)
        xs = (1 - s) * x0 + s * z
        pred = model(xs, torch.full((x0.shape[0],), s * TIME_SCALE), class_labels=labels).sample
        out[str(s)] = float(F.mse_loss(pred, z - x0))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "belm" / "models" / "digits_flow")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.12)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=500, help="also save EMA weights every N steps (0: only at end)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps (the learning-rate schedule still spans --steps)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = load_raw_digits()
    split = make_split(len(labels), heldout=HELDOUT_SIZE, seed=SPLIT_SEED, labels=labels)
    x_train = preprocess_digits(images[np.asarray(split["train"])])
    y_train = torch.as_tensor(labels[np.asarray(split["train"])])
    x_held = preprocess_digits(images[np.asarray(split["heldout"])])
    y_held = torch.as_tensor(labels[np.asarray(split["heldout"])])
    n = x_train.shape[0]

    model = build_unet()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    sched = build_scheduler()
    n_params = sum(q.numel() for q in model.parameters())
    print(f"UNet params: {n_params:,}  train={n} heldout={x_held.shape[0]}  steps={args.steps}", flush=True)
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
        for f in out.rglob("*"):
            if f.is_file():
                f.chmod(0o644)  # safetensors writes 0600; package data should be world-readable
        print(f"saved EMA weights to {out} {tag}", flush=True)

    t0 = time.time()
    losses = []
    perm = torch.randperm(n, generator=gen)
    pos = 0
    model.train()
    stop = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    for step in range(stop):
        if pos + args.batch_size > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        x0 = augment(x_train[idx], gen)
        y = y_train[idx].clone()
        y[torch.rand(y.shape, generator=gen) < args.p_uncond] = NULL_CLASS
        sigma = torch.rand((x0.shape[0],), generator=gen)
        z = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xs = (1 - s) * x0 + s * z
        pred = model(xs, sigma * TIME_SCALE, class_labels=y).sample
        loss = F.mse_loss(pred, z - x0)
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
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < stop:
            save(f"(step {step + 1})")
    wall = time.time() - t0
    final_loss = float(np.mean(losses[-500:]))
    save("(final)")
    held_mse = velocity_mse(ema, x_held, y_held)
    print(f"done: {stop} of {args.steps} steps in {wall / 60:.1f} min, final loss (mean last 500) "
          f"{final_loss:.4f}", flush=True)
    print(f"held-out velocity MSE (EMA, conditional): {held_mse}", flush=True)
    info = dict(objective="rectified flow, v = z - x0, sigma ~ U(0,1), timestep = 1000*sigma",
                steps=args.steps, stopped_after=stop, seed=args.seed, threads=args.threads,
                batch_size=args.batch_size, lr=args.lr,
                ema_decay=args.ema_decay, p_uncond=args.p_uncond, wall_time_s=round(wall, 1),
                final_loss=round(final_loss, 5), heldout_velocity_mse=held_mse, n_params=n_params,
                torch=torch.__version__, platform=platform.platform())
    (args.out / "train_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
