"""Exactness: round-trip max error sample(invert(x0)) − x0 per method × state × N."""

from __future__ import annotations

import math
import os

import torch

from belm.errors import LatticeOverflowError, NonFiniteError
from belm.schedule import Schedule
from belm.solvers.registry import make_sampler

from .common import METHODS, SD_SCHEDULE_BETAS as BETAS, fmt, md_table, pyplot

NS = [10, 50, 200, 1000]
BITWISE = {"bdia", "obelm"}                                 # exact="bitwise": 2-step methods
# "exact" = round-trip max error at most this (float32: ~100 ulp at 1; float64: the README's 1e-9)
THRESHOLD = {"float32": 1e-5, "float64": 1e-9, "bitwise": 0.0}


def nonlinear_eps(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic, smooth, nonlinear stand-in for a network (tests/reference.py)."""
    tt = float(t) / 1000.0
    return torch.tanh(0.8 * x + 0.3 * tt) + 0.2 * torch.sin(2.0 * x) * (1.0 - tt) + 0.05 * x.mean()


def round_trip(name: str, kwargs: dict, state: str, N: int, x0: torch.Tensor) -> float | str:
    extra = {"exact": "bitwise"} if state == "bitwise" else {"state_dtype": getattr(torch, state)}
    s = make_sampler(name, nonlinear_eps, Schedule.from_betas(BETAS, N, "linspace"), progress=False,
                     model_dtype=torch.float32, **kwargs, **extra)
    try:
        back = s.sample(s.invert(x0))
    except LatticeOverflowError:
        return "refused"
    except NonFiniteError:
        return "overflow"
    err = float((back.to(torch.float64) - x0.to(torch.float64)).abs().max())
    return err if math.isfinite(err) else "overflow"


def run(device: str, quick: bool, plot_dir: str | None) -> tuple[str, dict]:
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1).to(device)
    results: dict[tuple[str, str], list] = {}
    for label, name, kwargs in METHODS:
        for state in ("float32", "float64") + (("bitwise",) if name in BITWISE else ()):
            results[(label, state)] = [round_trip(name, kwargs, state, N, x0) for N in NS]
    rows = []
    for (label, state), errs in results.items():
        ok = [N for N, e in zip(NS, errs) if isinstance(e, float) and e <= THRESHOLD[state]]
        last = max([N for N in NS if all(isinstance(e, float) and e <= THRESHOLD[state]
                                         for n, e in zip(NS, errs) if n <= N)], default=None)
        verdict = "never" if not ok else ("all N" if last == NS[-1] else f"N ≤ {last}")
        rows.append([label, state] + [e if isinstance(e, str) else fmt(e, 2) for e in errs] + [verdict])
    text = ("x0: 2×3×8×8 uniform in [−1, 1] (float64, so that the error of a float64 state is not hidden by "
            "rounding to float32); ε = the deterministic nonlinear `nonlinear_eps` of tests/reference.py, "
            "evaluated in float32 (`model_dtype=float32`); SD schedule, linspace grid on "
            f"{device.upper()}. Max |sample(invert(x0)) − x0|; *exact up to* = largest N with the error ≤ "
            f"{THRESHOLD['float32']:g} (float32 state), ≤ {THRESHOLD['float64']:g} (float64), = 0 (bitwise). "
            "`overflow`: the inversion diverged to Inf/NaN (NonFiniteError); `refused`: the int64 lattice cannot "
            "hold the chain (LatticeOverflowError, raised before any work).\n\n"
            + md_table(["method", "state"] + [f"N={n}" for n in NS] + ["exact up to"], rows))
    if plot_dir is not None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        colors = {label: f"C{i}" for i, (label, _, _) in enumerate(METHODS)}
        for (label, state), errs in results.items():
            if state == "bitwise":
                continue
            pts = [(n, e) for n, e in zip(NS, errs) if isinstance(e, float) and e > 0]
            if pts:
                ax.loglog(*zip(*pts), "o-" if state == "float64" else "s--", color=colors[label],
                          label=f"{label} ({state})", lw=1)
        ax.set_xlabel("N (steps)")
        ax.set_ylabel("round-trip max error (solid: float64 state, dashed: float32)")
        ax.set_title("sample(invert(x0)); bitwise: 0, overflow: not drawn")
        ax.legend(fontsize=6, ncol=2)
        ax.grid(True, which="both", lw=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(plot_dir, "exactness.png"), dpi=110)
        plt.close(fig)
        text += "\n\n![exactness](plots/exactness.png)"
    return text, results
