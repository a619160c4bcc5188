#!/usr/bin/env python
"""Train the bundled digit classifier (belm/models/digits/classifier.safetensors + classifier_config.json).

Uses the same preprocessing and the same train / held-out split (split.json, written by
scripts/train_digits.py, or recreated identically if absent) as the diffusion model.

    python scripts/train_classifier.py --epochs 30 --seed 0 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from belm.models.classifier import DigitClassifier  # noqa: E402
from belm.models.data import HELDOUT_SIZE, SPLIT_SEED, load_raw_digits, make_split, preprocess_digits  # noqa: E402


def augment(x, gen):
    """Random translation by -1..1 px (background -1) plus small per-image contrast jitter. No flips."""
    b = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (b,), generator=gen)
    dy = torch.randint(0, 3, (b,), generator=gen)
    out = torch.stack([pad[i, :, dy[i] : dy[i] + 16, dx[i] : dx[i] + 16] for i in range(b)])
    scale = 1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    return ((out + 1) * scale - 1).clamp(-1, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "belm" / "models" / "digits")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = load_raw_digits()
    split_path = args.out / "split.json"
    if split_path.exists():
        split = json.loads(split_path.read_text())
    else:
        split = make_split(len(labels), heldout=HELDOUT_SIZE, seed=SPLIT_SEED, labels=labels)
        args.out.mkdir(parents=True, exist_ok=True)
        split_path.write_text(json.dumps(split))
    tr, he = np.asarray(split["train"]), np.asarray(split["heldout"])
    x_tr, y_tr = preprocess_digits(images[tr]), torch.as_tensor(labels[tr])
    x_he, y_he = preprocess_digits(images[he]), torch.as_tensor(labels[he])

    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    n = x_tr.shape[0]
    steps_per_epoch = (n + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    t0 = time.time()
    for ep in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        tot = 0.0
        for i in range(0, n, args.batch_size):
            idx = perm[i : i + args.batch_size]
            loss = F.cross_entropy(model(augment(x_tr[idx], gen)), y_tr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        model.eval()
        acc = (model.predict(x_he) == y_he).float().mean().item()
        print(f"epoch {ep + 1:3d}  loss {tot / n:.4f}  held-out acc {acc:.4f}", flush=True)
    model.eval()
    acc = (model.predict(x_he) == y_he).float().mean().item()
    train_acc = (model.predict(x_tr) == y_tr).float().mean().item()
    wall = time.time() - t0
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / "classifier.safetensors"))
    (args.out / "classifier.safetensors").chmod(0o644)
    cfg = dict(model.config, heldout_accuracy=round(acc, 4), train_accuracy=round(train_acc, 4),
               epochs=args.epochs, seed=args.seed, wall_time_s=round(wall, 1))
    (args.out / "classifier_config.json").write_text(json.dumps(cfg, indent=2))
    print(f"held-out accuracy {acc:.4f} ({int(round(acc * len(he)))}/{len(he)}), train {train_acc:.4f}, {wall:.0f}s")


if __name__ == "__main__":
    main()
