"""Shared helpers: machine description, interleaved timing, tables, plots."""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from belm.schedule import make_betas


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def versions() -> dict:
    import diffusers
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__}


def machine_line(device: str) -> str:
    """One line naming the machine: CPU model, cores, threads, versions (and the GPU)."""
    v = versions()
    parts = [f"CPU {cpu_model()} ({os.cpu_count()} cores, torch intra-op threads {torch.get_num_threads()})"]
    if device == "cuda" and torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    parts.append(f"python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}")
    return "; ".join(parts)


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int | dict[str, int], device: str = "cpu",
                warmup: bool = True) -> dict[str, list[float]]:
    """Wall seconds of each fn, ``repeats`` times, interleaved in a rotating order so that
    drift of a shared machine hits every variant alike. ``repeats`` may be per name."""
    names = list(fns)
    reps = {n: (repeats[n] if isinstance(repeats, dict) else repeats) for n in names}
    if warmup:
        for n in names:
            fns[n]()
        sync(device)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(max(reps.values())):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            if len(out[n]) >= reps[n]:
                continue
            sync(device)
            t0 = time.perf_counter()
            fns[n]()
            sync(device)
            out[n].append(time.perf_counter() - t0)
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of per-repeat ratios (the two were timed next to each other in each repeat)."""
    k = min(len(num), len(den))
    return statistics.median([num[i] / den[i] for i in range(k)]) if k else math.nan


def fmt(v, digits: int = 3) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if math.isinf(v):
            return "inf"
        if abs(v) >= 1e4 or abs(v) < 1e-3:
            return f"{v:.{max(digits - 1, 1)}e}"
        return f"{v:.{digits}g}"
    return str(v)


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Section:
    """One part of RESULTS.md: a title, markdown text, and its wall time."""

    title: str
    text: str = ""
    seconds: float = 0.0
    plots: list[str] = field(default_factory=list)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# The Stable Diffusion training schedule, and the samplers every accuracy/exactness table
# covers (label, registry name, kwargs).
SD_SCHEDULE_BETAS = make_betas("scaled_linear", 1000, 0.00085, 0.012)
METHODS = [
    ("DDIM", "ddim", {}),
    ("BDIA γ=1", "bdia", {"gamma": 1.0}),
    ("BDIA γ=0.5", "bdia", {"gamma": 0.5}),
    ("EDICT p=0.93", "edict", {}),
    ("O-BELM", "obelm", {}),
    ("leapfrog3", "leapfrog3", {}),
]
