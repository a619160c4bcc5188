"""``belm demo``: every application on the bundled digits model, gathered in report.md."""

from __future__ import annotations

import contextlib
import math
import platform
import time
import warnings
from typing import Any, Iterator

import numpy as np
import torch

from belm.apps import tasks
from belm.apps.io import OutputDir, save_grid
from belm.apps.models import load_model
from belm.errors import GrowthWarning

__all__ = ["run_demo", "convergence_table", "OUTPUT_FILES"]

SAMPLERS = ["ddim", "bdia", "edict", "obelm"]
#: Every file the demo writes into its output folder (checked before the run: one of the
#: user's under these names is refused, not overwritten).
OUTPUT_FILES = ("reconstruction.png", "edit.png", "interpolation.png", *(f"samples_{n}.png" for n in SAMPLERS),
                "convergence.png", "report.md", "summary.json")


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2e}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4)) else f"{v:.3g}"


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) if isinstance(v, float) else str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def convergence_table(Ns=(10, 20, 40, 80, 160), samplers=("ddim", "bdia", "edict", "obelm"), batch: int = 64,
                      seed: int = 0) -> dict[str, list[float]]:
    """RMS endpoint error vs N on the analytic Gaussian mixture (SD schedule, linspace grid)."""
    from belm.analytic import GaussianMixture
    from belm.schedule import Schedule, make_betas
    from belm.solvers.registry import make_sampler
    gm = GaussianMixture.default()
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    xT = torch.randn(batch, gm.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    exact = gm.ode_solution(xT, float(Schedule.from_betas(betas, Ns[0], "linspace").sigma_bar[0]))
    table: dict[str, list[float]] = {}
    for name in samplers:
        for N in Ns:
            sched = Schedule.from_betas(betas, N, "linspace")
            out = make_sampler(name, gm.eps_fn(sched.alphas_cumprod), sched, progress=False).sample(xT)
            table.setdefault(name, []).append(float(((out - exact) ** 2).mean().sqrt()))
    return table


def _order(Ns, errs) -> float:
    return float(-np.polyfit(np.log(Ns), np.log(errs), 1)[0])


@contextlib.contextmanager
def growth_noted(notes: dict[str, str], key: str) -> Iterator[None]:
    """Record a :class:`~belm.errors.GrowthWarning` raised inside as ``notes[key]`` (its first
    sentence: the growth) instead of printing it; other warnings pass through unchanged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GrowthWarning)
        yield
    for w in caught:
        if issubclass(w.category, GrowthWarning):
            notes[key] = str(w.message).split(": ")[0]
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def run_demo(out_dir: str, *, quick: bool = False, progress: bool = True, settings: dict | None = None,
             model: str = "digits") -> dict:
    """Run the tour and write ``out_dir/report.md`` with its pictures. Returns the figures.

    ``settings``: the run's record (command, version, threads…) stored in summary.json.
    ``model``: a bundled model, "digits" (DDPM) or "digits-flow" (rectified flow)."""
    t_start = time.perf_counter()
    name = model
    model = load_model(name)
    heldout, labels = model.reference_images("heldout")
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(heldout), generator=gen)
    n_rec = 8 if quick else 16
    rec_images, rec_labels = heldout[pick[:n_rec]], labels[pick[:n_rec]]
    rec_steps = [10] if quick else [10, 50, 100]
    fd_steps = [10] if quick else [10, 20, 50]
    n_fd = 60 if quick else 150
    fd_guidance = 1.0     # class-conditional without guidance: keeps the demo within its 5-minute budget
    figures: dict[str, Any] = {}
    # Pictures are kept in memory and written in one short commit at the end: no staging
    # folder sits in the output folder during the run.
    grids: list[tuple[list[torch.Tensor], str]] = []
    # 1. reconstruction
    rec_rows, rec_grid = [], [rec_images]
    growth_notes: dict[str, str] = {}
    for name in SAMPLERS:
        row = [name]
        for N in rec_steps:
            # The table is about exactness, which growth does not affect: its warnings go
            # into the report, beside the row they concern, instead of the terminal.
            with growth_noted(growth_notes, f"{name} N={N}"):
                r = tasks.reconstruct(model, rec_images, sampler=name, steps=N, condition=rec_labels.tolist(),
                                      progress=progress)
            row.append(max(r["latent"]["max_abs_error"]))
            if N == rec_steps[-1]:
                rec_grid.append(r["reconstruction"])
        rec_rows.append(row)
    figures["reconstruction"] = {r[0]: dict(zip(rec_steps, r[1:])) for r in rec_rows}
    figures["growth_warnings"] = growth_notes
    grids.append((rec_grid, "reconstruction.png"))

    # 2. editing: each class to the next, 4 held-out digits per class
    per_class = 2 if quick else 4
    src_imgs, src, tgt = [], [], []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()[:per_class]
        src_imgs.append(heldout[idx])
        src += [c] * len(idx)
        tgt += [(c + 1) % 10] * len(idx)
    src_imgs = torch.cat(src_imgs)
    edit = tasks.edit(model, src_imgs, src, tgt, sampler="obelm", steps=50, freeze=0, guidance=3.0,
                      progress=progress)
    edited = edit["images"]
    predicted = tasks.classify(model, edited)
    success = float((predicted == torch.tensor(tgt)).float().mean())
    figures["edit_success_rate"] = success
    figures["edit_change_l2"], figures["edit_change_psnr"] = edit["change_l2"], edit["change_psnr"]
    grids.append(([src_imgs, edited], "edit.png"))

    # 3. interpolation between two inverted real digits
    a, b = heldout[pick[:1]], heldout[pick[1:2]]
    # Frames one at a time: the end frames then see the batch composition of their inversion.
    inter = tasks.interpolate(model, a, b, num=8, sampler="obelm", steps=50, condition=None, progress=progress,
                              batch_size=1)
    strip = inter["frames"][:, 0]
    figures["interpolation_endpoint_error"] = inter["endpoint_max_abs_error"]
    for key in ("latent_std", "latent_max_abs", "middle_confidence", "middle_fd"):
        figures[f"interpolation_{key}"] = inter.get(key)
    grids.append(([strip], "interpolation.png"))

    # 4. sampling and FD-digits at equal network calls
    seeds = list(range(n_fd))
    classes = [s % 10 for s in seeds]
    fd_rows = []
    for name in SAMPLERS:
        row = [name]
        for N in fd_steps:
            imgs = tasks.generate(model, seeds, sampler=name, steps=N, condition=classes,
                                  guidance=fd_guidance, batch_size=n_fd, progress=progress)
            row.append(tasks.fd_to_reference(model, imgs, heldout))
            if N == fd_steps[-1]:
                grids.append(([imgs[i:i + 10] for i in range(0, 50, 10)], f"samples_{name}.png"))
        fd_rows.append(row)
    figures["fd_digits"] = {r[0]: dict(zip(fd_steps, r[1:])) for r in fd_rows}
    held_a, held_b = heldout[: len(heldout) // 2], heldout[len(heldout) // 2:]
    figures["fd_heldout_halves"] = tasks.fd_to_reference(model, held_a, held_b)

    # 5. convergence on the analytic problem
    Ns = (10, 20, 40) if quick else (10, 20, 40, 80, 160)
    conv = convergence_table(Ns)
    figures["convergence"] = conv
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, errs in conv.items():
        ax.loglog(Ns, errs, "o-", label=f"{name} (order {_order(Ns, errs):.2f})")
    ax.set_xlabel("steps N")
    ax.set_ylabel("RMS error vs exact ODE")
    ax.set_title("Gaussian mixture, SD schedule")
    ax.legend(fontsize=8)
    fig.tight_layout()

    elapsed = time.perf_counter() - t_start
    figures["seconds"] = elapsed
    growth_text = "" if not growth_notes else (
        "\nExact, but not noise-like (`GrowthWarning`): "
        + "; ".join(f"{k}: {v}" for k, v in growth_notes.items())
        + ". Such latents reconstruct exactly but edit and interpolate poorly (README, \"Grids for "
        "both directions\").\n")
    report = f"""# belm demo report

Bundled model `{model.name}` (class-conditional UNet, 16×16{", rectified flow" if model.flow else ""}), CPU, torch {torch.__version__},
Python {platform.python_version()}; {elapsed:.0f} s in all. Regenerate with `{"make demo" if model.name == "digits" else "belm demo --model " + model.name}`.

## Reconstruction: max abs error of `sample(invert(x0))` over {n_rec} held-out digits

{_md_table(["sampler"] + [f"N={N}" for N in rec_steps], rec_rows)}

DDIM's inversion is approximate; BDIA (γ = 1), EDICT (p = 0.93) and O-BELM are exact up to
float64 rounding (the network runs in float32, the state in float64).
{growth_text}
![reconstruction](reconstruction.png)

(rows: originals, then {", ".join(SAMPLERS)} at N = {rec_steps[-1]})

## Editing: class c → c+1 (O-BELM, N = 50, full inversion with class c, guidance 3 for c+1)

Success rate by the bundled classifier: **{success:.2f}** ({len(src)} digits); mean change from the
source: L2 {_fmt(figures["edit_change_l2"])}, PSNR {_fmt(figures["edit_change_psnr"])} dB.

![edit](edit.png)

## Interpolation between two inverted real digits (O-BELM, N = 50)

Both tensors of the latent pair are slerped with the same weight; the frames are sampled one
at a time (the batch composition of the inversion), so the end frames come back exactly:
endpoint error {_fmt(figures["interpolation_endpoint_error"])}; latent std / max abs
{_fmt(inter["latent_std"])} / {_fmt(inter["latent_max_abs"])}; middle frames: classifier confidence
{_fmt(inter["middle_confidence"])} (FD-digits needs many pairs: `python -m benchmarks.editing`).

![interpolation](interpolation.png)

## Sampling quality: FD-digits ({n_fd} samples vs the {len(heldout)} held-out digits, guidance {fd_guidance:g})

{_md_table(["sampler"] + [f"N={N}" for N in fd_steps], fd_rows)}

For scale: FD-digits between the two halves of the held-out set is
{_fmt(figures["fd_heldout_halves"])}. EDICT uses 2 network calls per step.

""" + "\n".join(f"![{name}](samples_{name}.png)" for name in SAMPLERS) + f"""

## Convergence on the analytic Gaussian mixture

{_md_table(["sampler"] + [f"N={N}" for N in Ns] + ["order"], [[k, *v, _order(Ns, v)] for k, v in conv.items()])}

![convergence](convergence.png)
"""
    with OutputDir(out_dir) as out:
        for rows, file_name in grids:
            save_grid(out, rows, file_name)
        fig.savefig(out.file("convergence.png"), dpi=120)
        out.write_text("report.md", report)
        out.write_json("summary.json", {**(settings or {}), **figures, "threads": torch.get_num_threads()})
    plt.close(fig)
    print(f"belm demo: wrote {out_dir}/report.md ({elapsed:.0f} s)")
    print(_md_table(["sampler"] + [f"rec N={N}" for N in rec_steps], rec_rows))
    print(f"edit success rate: {success:.2f}")
    print(_md_table(["sampler"] + [f"FD N={N}" for N in fd_steps], fd_rows))
    return figures
