"""The bundled rectified-flow model "digits-flow": FD-digits of Euler vs O-BELM, class accuracy of
conditional samples at guidance 1 and 3, and the round trip of held-out digits.

    python -m benchmarks.flow_quality            # prints the Markdown section
"""

from __future__ import annotations

import sys
import time

import torch

from belm.apps import tasks
from belm.models import digits_dataset

from .common import md_table

SAMPLERS = [("Euler = DDIM", "ddim"), ("O-BELM", "obelm")]


def run(device: str, quick: bool, plot_dir: str | None = None) -> tuple[str, dict]:
    from belm.apps.models import load_model

    ns = [10, 20]
    num = 100 if quick else 200
    model = load_model("digits-flow", device=device)
    reference, _ = digits_dataset("heldout")
    train, _ = digits_dataset("train")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:num]
    floor = tasks.fd_to_reference(model, train[pick], reference)
    seeds = list(range(num))
    classes = [s % 10 for s in seeds]
    truth = torch.tensor(classes)
    summary: dict = {"floor": floor, "fd": {}, "accuracy": {}}
    fd_rows, acc_rows = [], []
    t0 = time.perf_counter()
    for label, name in SAMPLERS:
        fds = []
        for N in ns:
            images = tasks.generate(model, seeds, sampler=name, steps=N, condition=classes, guidance=1.0,
                                    batch_size=100, progress=False)
            fds.append(tasks.fd_to_reference(model, images, reference))
            acc1 = float((tasks.classify(model, images) == truth).float().mean())
            images3 = tasks.generate(model, seeds, sampler=name, steps=N, condition=classes, guidance=3.0,
                                     batch_size=100, progress=False)
            acc3 = float((tasks.classify(model, images3) == truth).float().mean())
            summary["accuracy"][(label, N)] = (acc1, acc3)
            acc_rows.append([f"{label}, N={N}", acc1, acc3, tasks.fd_to_reference(model, images3, reference)])
        summary["fd"][label] = fds
        fd_rows.append([label] + fds)
    held, labels = digits_dataset("heldout")
    x0 = held[:32]
    rt_rows = []
    for guidance in (1.0, 3.0):
        for N in (10, 20):
            out = tasks.reconstruct(model, x0, sampler="obelm", steps=N, condition=labels[:32].tolist(),
                                    guidance=guidance, progress=False)
            worst = max(out["latent"]["max_abs_error"])
            summary.setdefault("round_trip", {})[(guidance, N)] = worst
            rt_rows.append([f"O-BELM, N={N}, guidance {guidance:g}", worst])
    wall = time.perf_counter() - t0
    text = (f"`load_model(\"digits-flow\")`: the digits UNet trained as a rectified flow "
            "(scripts/train_digits_flow.py), float32 network, float64 state, flow grid "
            "`FlowMatchEulerDiscreteScheduler(shift=1)` (σ_0 = 1). "
            f"{num} class-conditional samples (seed s, class s mod 10) vs the {len(reference)} held-out digits; "
            f"FD floor ({num} training digits): {floor:.3g}.\n\n"
            "FD-digits at guidance 1 (lower is better):\n\n"
            + md_table(["sampler"] + [f"N={n}" for n in ns], fd_rows)
            + "\n\nClassifier accuracy of the conditional samples (bundled digit classifier, 99.7 % on held-out "
            "digits) and FD-digits at guidance 3:\n\n"
            + md_table(["sampler, steps", "accuracy, guidance 1", "accuracy, guidance 3", "FD-digits, guidance 3"],
                       acc_rows)
            + "\n\nRound trip (invert then sample) of 32 held-out digits with their labels, max abs error "
            "(target ≤ 1e-5):\n\n" + md_table(["method", "max abs error"], rt_rows)
            + f"\n\nSection time {wall:.0f} s.")
    return text, summary


if __name__ == "__main__":
    torch.set_num_threads(1)
    text, summary = run("cpu", "--quick" in sys.argv)
    print(text)
