#!/usr/bin/env python
"""Sanity check for the bundled "digits" model: class-conditional DDIM samples with classifier-free
guidance, saved as a PNG grid (one row per class), scored by the bundled digit classifier.

    python scripts/sample_digits.py --per-class 20 --guidance 3 --steps 50 --out outputs/digits_grid.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from belm.models import NULL_CLASS, load_digits_classifier, load_digits_unet  # noqa: E402


@torch.no_grad()
def sample(unet, sched_cfg, labels, guidance=3.0, steps=50, seed=0):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(sched_cfg)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 1, 16, 16, generator=g)
    null = torch.full_like(labels, NULL_CLASS)
    for t in sched.timesteps:
        tt = torch.full((len(labels),), int(t))
        eps = unet(torch.cat([x, x]), torch.cat([tt, tt]), class_labels=torch.cat([labels, null])).sample
        e_c, e_u = eps.chunk(2)
        x = sched.step(e_u + guidance * (e_c - e_u), t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)


def save_grid(x, nrow, path, scale=4):
    from PIL import Image

    imgs = ((x[:, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    n, h, w = imgs.shape
    ncol = (n + nrow - 1) // nrow
    pad = 2
    canvas = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad), 64, np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "digits_grid.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    unet, sched = load_digits_unet()
    clf = load_digits_classifier()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    x = sample(unet, sched.config, labels, args.guidance, args.steps, args.seed)
    pred = clf.predict(x)
    acc = (pred == labels).float().mean().item()
    per = [(pred[labels == c] == c).float().mean().item() for c in range(10)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(x, args.per_class, args.out)
    print(f"guidance {args.guidance} steps {args.steps}: classifier accuracy on {len(labels)} samples = {acc:.3f}")
    print("per class:", " ".join(f"{c}:{a:.2f}" for c, a in enumerate(per)))
    print(f"grid -> {args.out}")


if __name__ == "__main__":
    main()
