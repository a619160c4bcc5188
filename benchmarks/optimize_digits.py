"""Latent optimization vs edit on held-out digits (issue 14's `belm optimize` acceptance run).

Picks the digits exactly as ``belm edit --source S --num K --seed 0`` does (held-out split,
class S, ``torch.randperm`` seeded 0, first K), runs :func:`belm.apps.optimize.optimize_latents`
with its defaults, writes pictures and summary.json into ``--out`` and prints the summary.

    python -m benchmarks.optimize_digits --source 3 --target 8 --num 16 --out outputs/optimize
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=int, default=3)
    p.add_argument("--target", type=int, default=8)
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--confidence", type=float, default=None)
    p.add_argument("--out", default=os.path.join("benchmarks", "_work", "optimize"))
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from belm.apps.io import OutputDir
    from belm.apps.models import load_model
    from belm.apps.optimize import optimize_latents, save_optimize
    from belm.models import digits_dataset

    model = load_model("digits")
    images, labels = digits_dataset("heldout")
    images = images[labels == args.source]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    images = images[order[: args.num]]
    result = optimize_latents(model, images, args.source, args.target, steps=args.steps, confidence=args.confidence)
    with OutputDir(args.out) as out:
        save_optimize(out, result)
    print(json.dumps(result["summary"], indent=1, sort_keys=True))
    return result["summary"]


if __name__ == "__main__":
    main()
