"""End to end with the bundled digits UNet: sampler time ÷ the time of N bare UNet calls."""

from __future__ import annotations

import time

import torch

from belm.adapters import DiffusersEps
from belm.solvers.registry import make_sampler

from .common import interleaved, md_table, median, paired_ratio, sync


class TimedModel(torch.nn.Module):
    """Wraps the UNet and accumulates the wall time spent inside its forward."""

    def __init__(self, inner: torch.nn.Module, device: str) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.device_name = device
        self.seconds = 0.0
        self.calls = 0

    def forward(self, *args, **kwargs):
        sync(self.device_name)
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        sync(self.device_name)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


# (label, registry name, sampler kwargs, adapter check_finite, key variant: repeated)
VARIANTS = [
    ("O-BELM", "obelm", {}, True, True),
    ("O-BELM bitwise", "obelm", {"exact": "bitwise"}, True, True),
    ("O-BELM, sampler check_finite=False", "obelm", {"check_finite": False}, True, True),
    ("O-BELM, no NaN/Inf check at all", "obelm", {"check_finite": False}, False, True),
    ("DDIM", "ddim", {}, True, False),
    ("BDIA (γ=1)", "bdia", {}, True, False),
    ("EDICT", "edict", {}, True, False),
    ("leapfrog3", "leapfrog3", {}, True, False),
]


def run(device: str, quick: bool) -> tuple[str, dict]:
    from belm.apps.models import load_model

    batch, N = (16, 10) if quick else (64, 50)
    key_repeats = 1 if quick else 3
    model = load_model("digits", device=device)
    timed = TimedModel(model.unet, device)
    labels = (torch.arange(batch) % 10).to(device)
    x = torch.randn(batch, *model.shape, generator=torch.Generator().manual_seed(0)).to(device)
    schedule = model.schedule(N)
    x0 = model.encode(x.clamp(-1, 1))                    # any clean image works for timing inversion
    t_batch = [torch.full((batch,), int(t), dtype=torch.int64, device=device) for t in schedule.timesteps]

    @torch.no_grad()
    def bare():
        for t in t_batch:
            timed(x, t, class_labels=labels)

    with torch.no_grad():                                 # warm up the kernels before timing
        for t in t_batch[:2]:
            timed(x, t, class_labels=labels)
    fns, repeats = {"bare": bare}, {"bare": key_repeats}
    for label, name, kwargs, adapter_check, key in VARIANTS:
        eps = DiffusersEps(timed, model.scheduler, class_labels=labels, check_finite=adapter_check)
        s = make_sampler(name, eps, schedule, progress=False, **kwargs)
        fns[f"{label}|sample"] = (lambda s=s: s.sample(x))
        repeats[f"{label}|sample"] = key_repeats if key else 1
        if "check" not in label:
            fns[f"{label}|invert"] = (lambda s=s: s.invert(x0))
            repeats[f"{label}|invert"] = key_repeats if key and "bitwise" not in label else 1

    # Per run: wall time, and time and calls inside the UNet (read from the TimedModel counters).
    runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in fns}

    def counted(name, fn):
        def run_one():
            s0, c0 = timed.seconds, timed.calls
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            runs[name].append((time.perf_counter() - t0, timed.seconds - s0, timed.calls - c0))
        return run_one

    times = interleaved({k: counted(k, f) for k, f in fns.items()}, repeats, device, warmup=False)
    bare_t = times["bare"]
    call_time = median([inside / calls for _, inside, calls in runs["bare"]])
    rows, figures = [], {}
    for key in fns:
        if key == "bare":
            continue
        label, direction = key.split("|")
        t = times[key]
        calls = runs[key][0][2]
        # direct: ÷ N bare calls timed next to it; decomposed: ÷ N × the per-call UNet time measured
        # inside the very same run (immune to the UNet's speed drifting between runs).
        direct = paired_ratio(t, bare_t) if len(t) > 1 else median(t) / median(bare_t)
        decomposed = median([wall / (inside / calls * N) for wall, inside, _ in runs[key]])
        outside_ms = median([(wall - inside) / calls for wall, inside, _ in runs[key]]) * 1e3
        rows.append([label, direction, calls, len(t), median(t), direct, decomposed, outside_ms])
        figures[(label, direction)] = (direct, decomposed)

    def extra(a: str, b: str) -> tuple[float, float]:
        xa, xb = figures[(a, "sample")][1], figures[(b, "sample")][1]
        direct = paired_ratio(times[f"{a}|sample"], times[f"{b}|sample"])
        return direct - 1, xa / xb - 1

    text = (f"Batch {batch}, N = {N}, class labels 0…9, guidance 1 (one UNet call of batch {batch} per ε); "
            f"bare UNet call: {call_time * 1e3:.1f} ms (median). Key variants (O-BELM rows) repeated "
            f"{key_repeats}× interleaved with the bare loop, the others once.\n\n"
            "- *÷ bare*: sampler wall time ÷ wall time of N bare `unet(x, t, class_labels=...)` calls in the same "
            "run (median of per-repeat ratios for repeated rows; rows run once were timed minutes away from the "
            "bare loop and carry the UNet's speed drift on a shared CPU).\n"
            "- *÷ N·inside*: sampler wall time ÷ (N × the mean UNet forward time measured inside the same sampler "
            "run), median over runs: the headline figure, insensitive to that drift.\n"
            "- *outside ms/call*: wall time spent outside the UNet forward (sampler + adapter), per network call "
            "(median over runs).\n\n"
            + md_table(["method", "direction", "UNet calls", "runs", "seconds", "÷ bare", "÷ N·inside",
                        "outside ms/call"], rows))
    summary = {
        "obelm_sample": figures[("O-BELM", "sample")], "obelm_invert": figures[("O-BELM", "invert")],
        "edict_sample": figures[("EDICT", "sample")],
        "bitwise_overhead": extra("O-BELM bitwise", "O-BELM"),
        "check_cost_sampler": extra("O-BELM", "O-BELM, sampler check_finite=False"),
        "check_cost_all": extra("O-BELM", "O-BELM, no NaN/Inf check at all"),
    }
    text += ("\n\nDerived (direct, from neighbouring runs / from the ÷ N·inside column): bitwise O-BELM sampling costs "
             f"{_pct(summary['bitwise_overhead'])} more than float O-BELM sampling (target ≤ 10 %); the sampler's "
             f"NaN/Inf check (`check_finite=True` vs False) costs {_pct(summary['check_cost_sampler'])} "
             f"(target ≤ 2 %), the sampler's and the adapter's checks together {_pct(summary['check_cost_all'])}.")
    return text, summary


def _pct(pair) -> str:
    return " / ".join(f"{100 * v:+.1f} %" for v in pair)
