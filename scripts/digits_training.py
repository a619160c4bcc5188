"""The training loop shared by the bundled digits models.

``scripts/train_digits.py`` (ε-prediction DDPM, "digits") and ``scripts/train_digits_flow.py``
(rectified flow, "digits-flow") train the same ~1.2M-parameter diffusers UNet2DModel on
sklearn's 8×8 digits upsampled to 16×16, with the same seeded split, augmentation,
null-class label dropout (classifier-free guidance), AdamW with warm-up and cosine decay,
gradient clipping and EMA. They differ only in the :class:`Objective`: how a clean batch is
noised, what the network is trained to predict, and the held-out diagnostic. Only EMA weights
are saved (safetensors).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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


def build_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


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


#: ``noise(x0, gen) -> (network input, network timestep, regression target)``, all batched.
NoiseFn = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class Objective:
    """What one model is trained to predict.

    Attributes:
        scheduler: the diffusers scheduler saved beside the weights.
        noise: noises a clean batch (draws its randomness from ``gen``, in a fixed order, so
            that a seed reproduces a run bit for bit).
        heldout_mse: ``(ema_model, x_held, y_held) -> {level: mse}``, the diagnostic written
            to train_info.json under ``mse_key``.
        info: extra entries of train_info.json (e.g. a description of the objective).
        save_split: also write split.json (the ε model is the split's home; the flow model
            reuses it).
    """

    scheduler: Any
    noise: NoiseFn
    heldout_mse: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], dict]
    mse_key: str
    info: dict
    save_split: bool = False


def parser(doc: str, out: Path, save_every: int) -> argparse.ArgumentParser:
    """The command line both training scripts take (defaults: the bundled models' runs)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.12)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=save_every,
                   help="also save EMA weights every N steps (0: only at end)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps (the learning-rate schedule still spans --steps)")
    return p


def heldout_split() -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(split, x_train, y_train, x_held, y_held): the seeded class-stratified split, in [−1, 1]."""
    images, labels = load_raw_digits()
    split = make_split(len(labels), heldout=HELDOUT_SIZE, seed=SPLIT_SEED, labels=labels)
    train_idx, held_idx = np.asarray(split["train"]), np.asarray(split["heldout"])
    return (split, preprocess_digits(images[train_idx]), torch.as_tensor(labels[train_idx]),
            preprocess_digits(images[held_idx]), torch.as_tensor(labels[held_idx]))


def train(args: argparse.Namespace, make_objective: Callable[[], Objective]) -> dict:
    """Train, save the EMA weights (and the scheduler) under ``args.out``; returns train_info."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    split, x_train, y_train, x_held, y_held = heldout_split()
    n = x_train.shape[0]
    model = build_unet()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    objective = make_objective()
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
        objective.scheduler.save_pretrained(out / "scheduler")
        if objective.save_split:
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
        x_in, timestep, target = objective.noise(x0, gen)
        loss = F.mse_loss(model(x_in, timestep, class_labels=y).sample, target)
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
    with torch.no_grad():
        held_mse = objective.heldout_mse(ema, x_held, y_held)
    print(f"done: {stop} of {args.steps} steps in {wall / 60:.1f} min, final loss (mean last 500) "
          f"{final_loss:.4f}", flush=True)
    print(f"held-out {objective.mse_key} (EMA, conditional): {held_mse}", flush=True)
    info = dict(**objective.info, steps=args.steps, stopped_after=stop, seed=args.seed, threads=args.threads,
                batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay, p_uncond=args.p_uncond,
                wall_time_s=round(wall, 1), final_loss=round(final_loss, 5), n_params=n_params,
                torch=torch.__version__, platform=platform.platform())
    info[objective.mse_key] = held_mse
    (args.out / "train_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    return info
