"""Symbolic engine (belm.lte): cold derivation times, and the named 3-step rules against O-BELM.

``python -m benchmarks.lte_timing [--quick]`` prints the section; ``python -m benchmarks.run``
includes it (``--only lte``).

* Cold derivation: each rule is derived in a fresh interpreter (``belm.lte`` imported
  first, not timed), so nothing is cached: belm.lte caches derivations in memory only
  (there is no disk cache). The figure that used to be a wall-clock assertion in
  tests/test_lte.py (``derive_belm(k)`` for k = 2, 3 under 5 s) is measured here.
* Accuracy of the named 3-step rules: RMS endpoint error ÷ O-BELM's on the real VP grids
  of :func:`benchmarks.rule_search.real_grids` (DDPM-linear, SD scaled-linear, cosine ×
  linspace/leading × N = 10, 20), analytic Gaussian mixture
  (:class:`benchmarks.rule_search.AnalyticBench`), and the step-size ratios of those grids.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import torch

from .common import md_table
from .rule_search import AnalyticBench, evaluate, real_grids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (label, Python expression evaluated after `from belm.lte import derive_belm, named_rule`,
#  in use: built by a sampler of the registry or BELM(k) for the k the docs offer)
RULES = [
    ("derive_belm(2) (O-BELM)", "derive_belm(2)", True),
    ("derive_belm(3)", "derive_belm(3)", True),
    ("derive_belm(4)", "derive_belm(4)", False),
    ("named_rule('leapfrog3')", "named_rule('leapfrog3')", True),
    ("named_rule('leapfrog3-scaled')", "named_rule('leapfrog3-scaled')", True),
]

_CHILD = """
import json, sys, time
from belm.lte import derive_belm, named_rule
t0 = time.perf_counter()
rule = {expr}
t1 = time.perf_counter()
rule.numeric()([1.0] * rule.k); rule.zero_stable
t2 = time.perf_counter()
again = {expr}
t3 = time.perf_counter()
print(json.dumps({{"derive": t1 - t0, "numeric_and_stability": t2 - t1, "cached": t3 - t2,
                  "same_object": again is rule}}))
"""


def cold_times(expr: str, repeats: int) -> dict[str, float]:
    """Median over ``repeats`` fresh interpreters of the cold derivation (seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _CHILD.format(expr=expr)], capture_output=True, text=True,
                             env=env, cwd=ROOT, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert all(r["same_object"] for r in runs), "derivations are not cached in memory"
    return {k: statistics.median(r[k] for r in runs) for k in ("derive", "numeric_and_stability", "cached")}


def named_vs_obelm(samples: int) -> tuple[list[list[object]], list[list[object]]]:
    grids = real_grids()
    bench = AnalyticBench(samples=samples)
    ob = evaluate(2, 1, 2, grids, bench)                          # O-BELM as the (k=2, q=2) member
    rows = []
    for label, (k, c, q) in (("leapfrog3", (3, 1, 0)), ("leapfrog3-scaled", (3, 1, 2))):
        cand = evaluate(k, c, q, grids, bench, reference=ob.errors)
        worst = int(np.argmax(cand.ratio))
        best = int(np.argmin(cand.ratio))
        rows.append([label, float(np.min(cand.ratio)), f"{grids[best][0]}", float(np.max(cand.ratio)),
                     f"{grids[worst][0]}", cand.geo_mean_ratio])
    ratios = []
    for label, sched in grids:
        H = sched.H.numpy()
        r = H[:-1] / H[1:]                                        # neighbouring σ̄-steps, noisy ÷ cleaner
        ratios.append([label, float(r.min()), float(r.max())])
    return rows, ratios


def run(device: str = "cpu", quick: bool = False) -> tuple[str, dict]:
    repeats = 1 if quick else 3
    samples = 16 if quick else 64
    times = {label: cold_times(expr, repeats) for label, expr, _ in RULES}
    trows = [[label, t["derive"], t["numeric_and_stability"], t["cached"] * 1e6] for label, t in times.items()]
    rows, ratios = named_vs_obelm(samples)
    text = (
        f"Cold derivation: each rule derived in a fresh interpreter (`belm.lte` already imported, "
        f"OMP_NUM_THREADS=1), median of {repeats}; \"numeric + stability\" is the first `rule.numeric()` "
        "(lambdify) and `rule.zero_stable` (exact roots); \"cached\" a second call in the same process "
        "(in-memory `lru_cache`; there is no disk cache). Target (issue 11 item 6): derivations under a "
        "second, so that an in-process cache suffices.\n\n"
        + md_table(["rule", "cold derive (s)", "numeric + stability (s)", "cached call (µs)"], trows)
        + f"\n\nNamed 3-step rules, RMS endpoint error ÷ O-BELM's on the {len(ratios)} real VP grids of "
        f"`benchmarks.rule_search.real_grids()` (analytic Gaussian mixture, {samples} points, float64):\n\n"
        + md_table(["rule", "best ratio", "on grid", "worst ratio", "on grid", "geo-mean ratio"], rows)
        + "\n\nStep-size ratios H_n / H_{n+1} of neighbouring σ̄-steps on those grids:\n\n"
        + md_table(["grid", "min ratio", "max ratio"], ratios)
    )
    return text, {"cold": {label: t["derive"] for label, t in times.items()},
                  "in_use": {label for label, _, used in RULES if used},
                  "ratio": {r[0]: (r[1], r[3]) for r in rows}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lte_timing", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one repeat, fewer points")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    text, _ = run("cpu", args.quick)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
