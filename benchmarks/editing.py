"""Editability of inverted latents: interpolation FD, class edits and latent statistics per grid.

Protocol (issue 12): 48 pairs of held-out digits of different classes, null class,
guidance 1; both latents inverted, every tensor slerped at weights 0.25 / 0.5 / 0.75;
FD-digits of those 144 middle frames to the held-out set; classifier confidence of the
middle frames. Class edits 3 → 8 (``belm.apps.tasks.edit`` defaults: inversion with class 3
at guidance 1, resampling with class 8 at guidance 3), success = classified as 8. Latent
statistics: std / max abs of the noisiest state of the inverted latents. Grids: the model
config's ("leading", last timestep 0) and belm's default (``default_spacing``: "trailing").

Run alone: ``python -m benchmarks.editing [--quick] [--tradeoff]`` (rewrites its two
blocks of RESULTS.md between the ``<!-- editing:… -->`` and ``<!-- grids:… -->`` markers,
or writes benchmarks/_work/editing-quick.md with --quick), or as sections of
``benchmarks.run`` through :func:`run` and :func:`tradeoff`.

Hook for other models: ``MODELS`` maps a label to a loader returning a model handle; the
digits-flow model (being trained elsewhere) goes there once ``load_model`` knows it.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch

from belm.apps import tasks
from belm.apps.models import load_model
from belm.models import digits_dataset
from belm.schedule import Schedule, default_spacing, make_betas
from belm.solvers.growth import growth
from belm.solvers.registry import make_sampler

from .common import md_table, pyplot

METHODS = [("DDIM", "ddim"), ("O-BELM", "obelm"), ("BDIA γ=1", "bdia")]
GRIDS = [("config (leading)", "config"), ("belm default", None)]
WEIGHTS = [0.25, 0.5, 0.75]
# label -> loader; add ("digits-flow", lambda: load_model("digits-flow")) when that model exists.
MODELS = {"digits": lambda: load_model("digits")}


def pairs(labels: torch.Tensor, count: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """``count`` disjoint pairs of indices with different labels, from a seeded permutation."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    a, b, used = [], [], set()
    for i in order:
        if len(a) == count:
            break
        if i in used:
            continue
        j = next((j for j in order if j not in used and j != i and labels[j] != labels[i]), None)
        if j is None:
            break
        a.append(i)
        b.append(j)
        used.update((i, j))
    return a, b


def run(device: str = "cpu", quick: bool = False, plot_dir: str = "benchmarks/plots") -> tuple[str, dict]:
    ns = [10] if quick else [10, 20, 50]
    num_pairs, num_edits = (8, 8) if quick else (48, 32)
    results: dict = {}
    texts = []
    for model_label, loader in MODELS.items():
        model = loader()
        heldout, labels = digits_dataset("heldout")
        ia, ib = pairs(labels, num_pairs)
        image_a, image_b = heldout[ia].to(device), heldout[ib].to(device)
        threes = heldout[labels == 3][:num_edits].to(device)
        num_edits = len(threes)                     # the held-out split has 30 threes
        rows, strips = [], {}
        for grid_label, spacing in GRIDS:
            for N in ns:
                for label, name in METHODS:
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")          # the growth is reported in the table
                        interp = tasks.interpolate(model, image_a, image_b, sampler=name, steps=N, weights=WEIGHTS,
                                                   spacing=spacing, progress=False)
                        ed = tasks.edit(model, threes, 3, 8, sampler=name, steps=N, spacing=spacing, progress=False)
                    sched = model.schedule(N, spacing, name)
                    g = growth(make_sampler(name, lambda x, t: x, sched, progress=False), data_std=1.0)
                    row = dict(grid=grid_label, N=N, method=label, last_t=int(sched.timesteps[-1]),
                               std=interp["latent_std"], max_abs=interp["latent_max_abs"], fd=interp["middle_fd"],
                               conf=interp["middle_confidence"], edit=ed["success_rate"],
                               edit_psnr=ed["change_psnr"], growth=g.inversion_x if g.modes else None,
                               seconds=time.perf_counter() - t0)
                    rows.append(row)
                    if N == ns[0]:
                        strips[(grid_label, label)] = interp["frames"][:, :4].cpu()
                    print(f"[editing] {model_label} {row}", flush=True)
        results[model_label] = rows
        path = _picture(model_label, image_a[:4].cpu(), image_b[:4].cpu(), strips, ns[0], plot_dir)
        table = md_table(["grid", "N", "method", "last t", "latent std", "latent max abs", "middle FD",
                          "middle conf.", "edit 3→8", "edit PSNR (dB)", "inv. growth (x, s=1)", "s"],
                         [[r["grid"], r["N"], r["method"], r["last_t"], r["std"], r["max_abs"], r["fd"], r["conf"],
                           r["edit"], r["edit_psnr"], r["growth"] if r["growth"] is not None else "–",
                           r["seconds"]] for r in rows])
        texts.append(f"**{model_label}** ({num_pairs} pairs, {num_edits} edits)\n\n{table}\n\n"
                     f"![interpolations]({os.path.relpath(path, os.path.dirname(plot_dir))})")
    header = (f"Protocol: {num_pairs} pairs of held-out digits of different classes (seeded), null class, "
              "guidance 1, every tensor of both latents slerped at weights 0.25/0.5/0.75; *middle FD* = "
              "FD-digits of those frames to the held-out set, *middle conf.* = the bundled classifier's mean top "
              f"probability on them. *edit 3→8*: {num_edits} held-out 3s inverted with class 3 (guidance 1), "
              "resampled with class 8 (guidance 3), success rate by the classifier; *edit PSNR*: edited vs "
              "source. *latent std / max abs*: noisiest state of the inverted interpolation latents (noise: "
              "≈ 1 / ≈ 4). *inv. growth*: `growth(sampler, data_std=1).inversion_x` (belm.solvers.growth). "
              f"belm default grid: `default_spacing(...)` = {default_spacing('obelm')!r}; config: the model's "
              "scheduler config (\"leading\", last timestep 0). The digits-flow model is not in the table yet "
              "(hook: `MODELS` in benchmarks/editing.py).\n\n")
    return header + "\n\n".join(texts), results


TRADEOFF_METHODS = [("DDIM", "ddim"), ("O-BELM", "obelm"), ("BDIA γ=1", "bdia"), ("leapfrog3 (a_3 = 1)", "leapfrog3"),
                    ("leapfrog3-scaled", "leapfrog3-scaled")]


def neutral_grid(betas, N: int, data_std: float = 1.0, target: float = 1.0) -> np.ndarray:
    """Uniform timesteps from T−1 down to the smallest t_last at which O-BELM's inversion
    growth (x coordinates, Gaussian data of std ``data_std``) is at most ``target``."""
    T = len(betas)
    ac = np.cumprod(1 - np.asarray(betas))
    for t_last in range(0, T - N):
        ts = np.round(np.linspace(T - 1, t_last, N)).astype(np.int64)
        if np.any(np.diff(ts) >= 0):
            continue
        sched = Schedule(ac, ts)
        if growth(make_sampler("obelm", lambda x, t: x, sched, progress=False), data_std).inversion_x <= target:
            return ts
    raise ValueError("no neutral uniform grid for this schedule and N")


def tradeoff(quick: bool = False) -> tuple[str, list]:
    """Accuracy (analytic Gaussian mixture) against inversion growth, per grid and method."""
    from belm.analytic import GaussianMixture
    from belm.schedule import grid_timesteps
    gm = GaussianMixture.default()
    xT = torch.randn(16 if quick else 64, gm.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    schedules = {"SD scaled_linear": (make_betas("scaled_linear", 1000, 0.00085, 0.012), 1),
                 "DDPM linear": (make_betas("linear", 1000, 1e-4, 0.02), 0)}
    rows = []
    for sched_label, (betas, offset) in schedules.items():
        ac = np.cumprod(1 - betas)
        for N in ([10] if quick else [10, 20]):
            grids = {f"leading (offset {offset})": grid_timesteps(1000, N, "leading", offset),
                     "linspace": grid_timesteps(1000, N, "linspace"),
                     "trailing": grid_timesteps(1000, N, "trailing"),
                     "neutral (uniform to t_last)": neutral_grid(betas, N)}
            for grid_label, ts in grids.items():
                sched = Schedule(ac, ts)
                exact = gm.ode_solution(xT, float(sched.sigma_bar[0]))
                eps = gm.eps_fn(sched.alphas_cumprod)
                for label, name in TRADEOFF_METHODS:
                    s = make_sampler(name, eps, sched, progress=False)
                    err = float(((s.sample(xT) - exact) ** 2).mean().sqrt())
                    g = growth(s, data_std=1.0)
                    rows.append([sched_label, N, grid_label, int(ts[-1]), label, err,
                                 g.inversion_x if g.modes else "–", g.inversion if g.modes else "–"])
    text = ("Trade-off: accuracy against editability. RMS endpoint error of sampling on the analytic "
            "`GaussianMixture.default()` (exact ODE endpoint from each grid's own σ̄_0, 64 points) and the "
            "parasitic mode's inversion growth (`growth(s, data_std=1)`: x coordinates, and x̄). *neutral*: "
            "uniform timesteps from 999 down to the smallest last timestep whose O-BELM inversion growth (x, s = 1) "
            "is ≤ 1 (`benchmarks.editing.neutral_grid`).\n\n"
            + md_table(["schedule", "N", "grid", "last t", "method", "RMS error", "inv. growth x (s=1)",
                        "inv. growth x̄ (s=1)"], rows))
    return text, rows


def _picture(model_label: str, a: torch.Tensor, b: torch.Tensor, strips: dict, N: int, plot_dir: str) -> str:
    """Rows: grid × method; columns: pairs, each as source a, the 3 middle frames, source b."""
    plt = pyplot()
    keys = list(strips)
    pairs_shown = a.shape[0]
    cols = pairs_shown * (len(WEIGHTS) + 2)
    fig, axes = plt.subplots(len(keys), cols, figsize=(cols * 0.45, len(keys) * 0.55 + 0.4))
    for r, key in enumerate(keys):
        frames = strips[key]
        for p in range(pairs_shown):
            tiles = [a[p]] + [frames[w, p] for w in range(len(WEIGHTS))] + [b[p]]
            for c, tile in enumerate(tiles):
                ax = axes[r, p * (len(WEIGHTS) + 2) + c]
                ax.imshow(tile[0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
        axes[r, 0].set_ylabel(f"{key[1]}\n{key[0]}", rotation=0, ha="right", va="center", fontsize=6)
    fig.suptitle(f"{model_label}: interpolations at N = {N} (source, w = 0.25 / 0.5 / 0.75, target)", fontsize=8)
    fig.subplots_adjust(left=0.12, right=0.995, top=0.9, bottom=0.01, wspace=0.05, hspace=0.08)
    os.makedirs(plot_dir, exist_ok=True)
    path = os.path.join(plot_dir, f"editing_{model_label}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_block(results_md: str, name: str, section: str) -> None:
    """Replace (or append) the block between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    with open(results_md) as f:
        current = f.read()
    block = f"{begin}\n{section}{end}"
    if begin in current and end in current:
        current = current[:current.index(begin)] + block + current[current.index(end) + len(end):]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    with open(results_md + ".tmp", "w") as f:
        f.write(current)
    os.replace(results_md + ".tmp", results_md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 pairs, N = 10; writes benchmarks/_work/")
    parser.add_argument("--tradeoff", action="store_true", help="only the grid trade-off table (no network)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    here = os.path.dirname(os.path.abspath(__file__))
    plot_dir = os.path.join(here, "_work" if args.quick else "plots")
    stamp = f"_`python -m benchmarks.editing{' --tradeoff' if args.tradeoff else ''}`, {time.strftime('%Y-%m-%d %H:%M')}, 1 thread"
    sections = {}
    if not args.tradeoff:
        t0 = time.perf_counter()
        text, _ = run("cpu", args.quick, plot_dir)
        sections["editing"] = (f"## Editing: interpolation, class edits and latent statistics per grid\n\n"
                               f"{stamp}, wall time {time.perf_counter() - t0:.0f} s._\n\n{text}\n")
    t0 = time.perf_counter()
    text, _ = tradeoff(args.quick)
    sections["grids"] = (f"## Grids: accuracy against inversion growth\n\n{stamp}, wall time "
                         f"{time.perf_counter() - t0:.0f} s._\n\n{text}\n")
    if args.quick:
        os.makedirs(plot_dir, exist_ok=True)
        with open(os.path.join(plot_dir, "editing-quick.md"), "w") as f:
            f.write("\n".join(sections.values()))
        return
    for name, section in sections.items():
        _write_block(os.path.join(here, "RESULTS.md"), name, section)


if __name__ == "__main__":
    main()
