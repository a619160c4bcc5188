"""Sample quality: FD-digits versus N per sampler on the bundled digits model."""

from __future__ import annotations

import os
import time

import torch

from belm.apps import tasks
from belm.models import digits_dataset

from .common import md_table, pyplot

SAMPLERS = [("DDIM", "ddim"), ("BDIA γ=1", "bdia"), ("O-BELM", "obelm"), ("EDICT p=0.93", "edict"),
            ("leapfrog3", "leapfrog3")]
GUIDANCE = 1.0


def run(device: str, quick: bool, plot_dir: str) -> tuple[str, dict]:
    from belm.apps.models import load_model

    ns = [5, 10] if quick else [10, 20, 50]
    num = 100 if quick else 300
    model = load_model("digits", device=device)
    reference, _ = digits_dataset("heldout")
    train, _ = digits_dataset("train")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:num]
    floor = tasks.fd_to_reference(model, train[pick], reference)
    seeds = list(range(num))
    classes = [s % 10 for s in seeds]
    fd: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for label, name in SAMPLERS:
        fd[label] = []
        t0 = time.perf_counter()
        for N in ns:
            images = tasks.generate(model, seeds, sampler=name, steps=N, condition=classes, guidance=GUIDANCE,
                                    batch_size=100, progress=False)
            fd[label].append(tasks.fd_to_reference(model, images.cpu(), reference))
        seconds[label] = time.perf_counter() - t0
    calls = {label: 2 if name == "edict" else 1 for label, name in SAMPLERS}
    rows = [[label] + fd[label] + [f"{calls[label]}·N", seconds[label]] for label, _ in SAMPLERS]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, _ in SAMPLERS:
        ax.plot([calls[label] * n for n in ns], fd[label], "o-", label=label)
    ax.axhline(floor, color="k", ls="--", lw=0.8, label=f"{num} training digits")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted({c * n for c in (1, 2) for n in ns})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("UNet calls per sample (EDICT: 2 per step)")
    ax.set_ylabel("FD-digits (lower is better)")
    ax.set_title(f"{num} samples vs the {len(reference)} held-out digits, guidance {GUIDANCE:g}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(plot_dir, "quality.png"), dpi=110)
    plt.close(fig)
    text = (f"{num} samples (seeds 0…{num - 1}, class = seed mod 10, guidance {GUIDANCE:g}: the conditional "
            "model without classifier-free guidance, one UNet call per ε) generated with "
            "`belm.apps.tasks.generate` (batches of 100), FD-digits (`fd_to_reference`: Fréchet distance in the "
            f"bundled classifier's 64-d feature space) to the {len(reference)} held-out digits. Reference floor: "
            f"{num} training digits vs the held-out digits: **{floor:.3g}**. EDICT makes 2 UNet calls per step, "
            "so its N column costs twice the network calls (the plot puts it at its real cost).\n\n"
            + md_table(["sampler"] + [f"FD N={n}" for n in ns] + ["UNet calls", "seconds (all N)"], rows)
            + "\n\n![quality](plots/quality.png)")
    return text, {"fd": fd, "floor": floor, "ns": ns}
