"""``python -m benchmarks.run [--quick] [--device cpu|cuda] [--out benchmarks/RESULTS.md] [--threads 1]``.

Measures belm's sampler overhead, end-to-end cost with the bundled UNet, peak memory,
accuracy on the analytic Gaussian mixture, round-trip exactness and sample quality
(FD-digits), and the symbolic engine (cold derivation times, named rules vs O-BELM), and writes
a Markdown page with its plots (``plots/`` beside it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

from . import accuracy, e2e, exactness, flow_quality, lte_timing, memory, overhead, quality, reversible
from .common import Section, load_average, log, machine_line
from .sections import marked_sections


def _pct(v: float) -> str:
    return f"{100 * v:+.1f} %"


def _ok(flag: bool) -> str:
    return "met" if flag else "**not met**"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, a smoke test (≤ 2 minutes on 2 cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: also measure overhead, end-to-end, memory and exactness on the GPU")
    p.add_argument("--out", default=None,
                   help="Markdown output file (default benchmarks/RESULTS.md; with --quick "
                        "benchmarks/_work/RESULTS-quick.md, git-ignored, so a smoke test never replaces the "
                        "committed page); plots go to plots/ beside it")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op CPU threads (default 1: stable figures on a shared machine; 0 = torch's "
                        "default)")
    p.add_argument("--only", default=None,
                   help="comma-separated subset of sections: overhead,e2e,memory,accuracy,accuracy-flow,exactness,"
                        "quality,flow-quality,lte,reversible")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is None:
        args.out = os.path.join("benchmarks", "_work", "RESULTS-quick.md") if args.quick else \
            os.path.join("benchmarks", "RESULTS.md")
    t_start = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    load_start = load_average()
    only = set(args.only.split(",")) if args.only else None
    gpu = args.device == "cuda" and torch.cuda.is_available()
    if gpu:   # bitwise exactness on the GPU needs deterministic kernels (set before CUDA starts)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    sections: list[Section] = []
    figures: dict[str, object] = {}

    def section(key: str, title: str, fn, *fargs) -> None:
        if only is not None and key.split("@")[0] not in only:
            return
        log(f"{title} ...")
        t0 = time.perf_counter()
        try:
            text, fig = fn(*fargs)
            figures[key] = fig
        except Exception:                                   # a failed section is reported, not fatal
            text = "**failed**:\n\n```\n" + traceback.format_exc()[-3000:] + "\n```"
        sec = Section(title, text, time.perf_counter() - t0)
        sections.append(sec)
        log(f"{title}: {sec.seconds:.0f} s")

    q = args.quick
    section("overhead", "Sampler overhead per step (CPU)", overhead.run, "cpu", q, plot_dir)
    section("e2e", "End to end with the bundled UNet (CPU)", e2e.run, "cpu", q)
    section("memory", "Peak memory of sampling and inversion (CPU)", memory.run, "cpu", q)
    section("accuracy", "Accuracy: RMS endpoint error and empirical order", accuracy.run, "cpu", q, plot_dir)
    section("accuracy-flow", "Accuracy and round trips on flow and continuous-σ schedules", accuracy.run_continuous,
            "cpu", q, plot_dir)
    section("exactness", "Exactness: round-trip error (CPU)", exactness.run, "cpu", q, plot_dir)
    section("quality", "Sample quality: FD-digits (CPU)", quality.run, "cpu", q, plot_dir)
    section("lte", "Symbolic engine (belm.lte)", lte_timing.run, "cpu", q)
    section("flow-quality", "digits-flow: FD-digits, class accuracy, round trip (CPU)", flow_quality.run, "cpu", q,
            plot_dir)
    section("reversible", reversible.TITLE, reversible.run, "cpu", q)
    if gpu:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        section("overhead@cuda", "GPU: sampler overhead per step", overhead.run, "cuda", q, plot_dir)
        section("e2e@cuda", "GPU: end to end with the bundled UNet", e2e.run, "cuda", q)
        section("memory@cuda", "GPU: peak memory (CUDA allocator)", memory.run, "cuda", q)
        section("exactness@cuda", "GPU: exactness", exactness.run, "cuda", q, None)

    wall = time.perf_counter() - t_start
    page = render(args, sections, figures, wall, load_start, gpu)
    if os.path.isfile(args.out):    # sections written by stand-alone scripts (editing, contention, ...) stay
        with open(args.out) as f:
            kept = [sec for sec in marked_sections(f.read()) if sec not in page]
        page = page.rstrip("\n") + "\n\n" + "\n\n".join(kept) + "\n" if kept else page
    with open(args.out, "w") as f:
        f.write(page)
    log(f"wrote {args.out} in {wall:.0f} s")
    return 0


def summary_lines(figures: dict) -> list[str]:
    lines = []
    ov = figures.get("overhead")
    if ov:
        parts = []
        for shape in overhead.SHAPES:
            r64, r32 = ov[(shape, "O-BELM")], ov[(shape, "O-BELM, state float32")]
            parts.append(f"{'×'.join(map(str, shape))}: **{r64:.2f}×** (float64 state; float32 state {r32:.2f}×; "
                         f"float64 without the NaN check {ov[(shape, 'O-BELM, check_finite=False')]:.2f}×)")
        worst = max(ov[(shape, "O-BELM")] for shape in overhead.SHAPES)
        lines.append(f"- O-BELM step ÷ diffusers `DDIMScheduler.step` (target ≤ 1.0×, {_ok(worst <= 1.0)}): "
                     + "; ".join(parts) + ".")
    ee = figures.get("e2e")
    if ee:
        ob_s, ob_i, ed = ee["obelm_sample"], ee["obelm_invert"], ee["edict_sample"]
        lines.append(f"- End to end ÷ N bare UNet calls, O-BELM (target ≤ 1.02, "
                     f"{_ok(max(ob_s[1], ob_i[1]) <= 1.02)}): sample **{ob_s[1]:.3f}**, invert **{ob_i[1]:.3f}** "
                     f"(÷ bare-loop timings: {ob_s[0]:.3f} / {ob_i[0]:.3f}); EDICT sample {ed[1]:.2f} (≈ 2 by "
                     "construction).")
        bw, ck = ee["bitwise_overhead"], ee["check_cost_sampler"]
        lines.append(f"- Bitwise O-BELM sampling vs float (target ≤ 10 %, {_ok(bw[1] <= 0.10)}): **{_pct(bw[1])}**; "
                     f"NaN/Inf check cost (target ≤ 2 %, {_ok(ck[1] <= 0.02)}): **{_pct(ck[1])}** "
                     "(from the drift-free ÷ N·inside figures; the direct ones are in the section).")
    mem = figures.get("memory")
    if mem:
        lines.append("- Peak sampling memory ÷ DDIM: " + ", ".join(
            f"{label} {mem[(label, 'sample')]:.2f}" for label, _, _ in memory.VARIANTS if label != "DDIM") + ".")
    acc = figures.get("accuracy")
    if acc:
        lines.append("- Empirical order (N ≥ 40): " + ", ".join(f"{label} {order:.2f}"
                                                             for label, (_, order) in acc.items()) + ".")
    qual = figures.get("quality")
    if qual:
        n = qual["ns"][-1]
        best = min(qual["fd"], key=lambda k: qual["fd"][k][-1])
        lines.append(f"- FD-digits at N = {n}: " + ", ".join(f"{k} {v[-1]:.3g}" for k, v in qual["fd"].items())
                     + f" (floor {qual['floor']:.3g}; best {best}).")
    lte = figures.get("lte")
    if lte:
        used = max(v for k, v in lte["cold"].items() if k in lte["in_use"])
        others = [f"{k} {v:.2f} s" for k, v in lte["cold"].items() if k not in lte["in_use"]]
        lines.append(f"- Cold derivation of a rule in a fresh process (target < 1 s, so that an in-memory cache "
                     f"suffices, {_ok(used < 1.0)}): rules in use (k ≤ 3, named rules) at most **{used:.2f} s**"
                     + (f"; {', '.join(others)}" if others else "") + ".")
    rv = figures.get("reversible")
    if rv:
        worst = max(rv["time_ratio"].values())
        lines.append(f"- Reversible backprop, peak memory at N = {rv['top_N']} ÷ N = 10 (target ≤ 1.2×, "
                     f"{_ok(rv['mem_growth_reversible'] <= 1.2)}): **{rv['mem_growth_reversible']:.2f}×** (plain "
                     f"autograd {rv['mem_growth_autograd']:.1f}×); time ÷ plain autograd (target ≤ 3×, "
                     f"{_ok(worst <= 3)}): " + ", ".join(f"N = {n}: **{r:.2f}×**" for n, r in rv["time_ratio"].items())
                     + ".")
    return lines


def render(args, sections: list[Section], figures: dict, wall: float, load_start: str, gpu: bool) -> str:
    mode = "quick mode: smaller sizes, fewer repeats" if args.quick else "full mode"
    machine = machine_line("cuda" if gpu else "cpu")
    start_1min = float(load_start.split("/")[0]) if load_start != "n/a" else 0.0
    busy = start_1min >= 0.5 or float((load_average().split("/") + ["0"])[0] or 0) >= 1.5 \
        if load_start != "n/a" else False
    shared = (f"load average (1/5/15 min) {load_start} at the start and {load_average()} at the end on "
              f"{os.cpu_count()} cores"
              + (": the CPU was shared with other work while this ran, so absolute times are inflated and "
                 "noisy; ratios are measured within one run with interleaved variants." if busy else
                 " (no other significant load)."))
    if args.device == "cuda" and not gpu:
        gpu_note = "GPU rows: `--device cuda` was requested but no CUDA device is available; skipped."
    elif not gpu:
        gpu_note = ("GPU rows: not measured (no CUDA device on this machine); `python -m benchmarks.run --device "
                    "cuda` adds GPU overhead, end-to-end, memory and exactness tables.")
    else:
        gpu_note = "GPU rows: below, in the sections marked GPU."
    head = [
        "# belm benchmarks",
        "",
        f"Generated by `python -m benchmarks.run{' --quick' if args.quick else ''}"
        f"{' --device cuda' if args.device == 'cuda' else ''}` ({mode}) on {time.strftime('%Y-%m-%d %H:%M')}; "
        f"**total wall time {wall:.0f} s** ({wall / 60:.1f} min).",
        "",
        f"Machine: {machine}.",
        "",
        f"Conditions: {shared} {gpu_note}",
        "",
        "Reproduce: `make bench` (full) or `make bench-quick` (writes benchmarks/_work/RESULTS-quick.md).",
        "",
        "Method: every timing is the median of repeated runs; every ratio compares variants timed in the same "
        "run, interleaved in a rotating order (median of the per-repeat ratios).",
        "",
        "## Headline figures",
        "",
        *summary_lines(figures),
        "",
        "| section | wall time (s) |",
        "|---|---|",
        *[f"| {s.title} | {s.seconds:.0f} |" for s in sections],
        "",
    ]
    body = []
    for s in sections:
        body += [f"## {s.title}", "", f"_Machine: {machine}. Section wall time {s.seconds:.0f} s._", "",
                 s.text, ""]
    return "\n".join(head + body)


if __name__ == "__main__":
    sys.exit(main())
