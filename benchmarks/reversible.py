"""Reversible backpropagation: peak memory and time of one forward + backward through N steps.

Three ways to get d loss / d (x, UNet weights) through an N-step O-BELM chain of the bundled
digits UNet: ``grad="reversible"`` (recover states by exact inversion, O(k) memory),
``grad="autograd"`` (plain autograd: every activation of every call is kept) and plain
autograd with ``torch.utils.checkpoint`` around every network call (keeps the N states, the
activations are recomputed in backward).

Memory: each (variant, N) runs in a fresh process (no allocator state left by another
variant) with :class:`benchmarks.memory.CpuPeak`: the kernel's resident-set high-water mark
(VmHWM after a reset through /proc/self/clear_refs) above the resident set before the call,
glibc told to mmap every buffer ≥ 16 KiB and to trim its heap on every free, so freed tensors
(the UNet's activations are 16–512 KiB here) leave the resident set and new ones enter it. Time: all
variants in one process, interleaved in a rotating order (median of per-repeat ratios).

Run alone: ``python -m benchmarks.reversible [--quick]`` replaces this section of
benchmarks/RESULTS.md (or is part of ``python -m benchmarks.run``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import torch

from .common import interleaved, load_average, machine_line, md_table, median, paired_ratio

TITLE = "Reversible backpropagation: memory and time of forward + backward (CPU)"
VARIANTS = ("reversible", "autograd", "checkpoint")
BATCH = 8


def _setup(N: int, variant: str):
    """A closure running one forward + backward; the UNet's weights require grad."""
    from torch.utils.checkpoint import checkpoint

    from belm import OBELM, Schedule
    from belm.adapters import DiffusersEps
    from belm.models import load_digits_unet

    unet, scheduler = load_digits_unet()
    unet.requires_grad_(True)
    eps = DiffusersEps(unet, scheduler, class_labels=3, differentiable=True)
    fn = (lambda x, t: checkpoint(eps, x, t, use_reentrant=False)) if variant == "checkpoint" else eps
    sampler = OBELM(fn, Schedule.from_diffusers(scheduler, N), progress=False)
    x = torch.randn(BATCH, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    mode = "reversible" if variant == "reversible" else "autograd"

    def run() -> None:
        unet.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        sampler.sample(xi, grad=mode).square().mean().backward()

    return run


def _memory_child(N: int, variant: str) -> None:
    import ctypes

    from .memory import CpuPeak
    meter = CpuPeak()
    if not meter.ok:
        print("null")
        return
    # The UNet's activations at this size are 16 KiB … 512 KiB each, below CpuPeak's 1 MiB mmap
    # threshold: a freed one would stay in the heap and a later one reuse it unseen. mmap every
    # buffer of 16 KiB or more, and trim the heap top on every free.
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 16 << 10)                    # M_MMAP_THRESHOLD
    libc.mallopt(-1, 0)                           # M_TRIM_THRESHOLD
    run = _setup(N, variant)
    _setup(2, variant)()                          # warm-up: kernels, lazy module state, autograd engine
    print(json.dumps(meter.measure(run)))


def _memory(N: int, variant: str) -> int | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20), OMP_NUM_THREADS=str(torch.get_num_threads()))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.reversible", "--child", str(N), variant], env=env,
                          cwd=root, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError("memory subprocess failed:\n" + proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(device: str = "cpu", quick: bool = False) -> tuple[str, dict]:
    Ns = (10, 50) if quick else (10, 50, 200)
    # Repeats per N (interleaved): N = 200 costs minutes per repeat on a shared 2-core CPU.
    reps = {N: 1 for N in Ns} if quick else {10: 3, 50: 2, 200: 1}
    mem = {(N, v): _memory(N, v) for N in Ns for v in VARIANTS}
    if any(m is None for m in mem.values()):
        return "skipped: /proc/self/clear_refs or VmHWM not available on this system", {}
    times = {}
    for i, N in enumerate(Ns):
        fns = {v: _setup(N, v) for v in VARIANTS}
        times[N] = interleaved(fns, reps[N], warmup=i == 0)     # later N: kernels are warm already
    rows, fig = [], {}
    for N in Ns:
        t = times[N]
        for v in VARIANTS:
            rows.append([N, v, mem[N, v] / 2**20, mem[N, v] / mem[Ns[0], v], median(t[v]),
                         paired_ratio(t[v], t["autograd"])])
    top = Ns[-1]
    fig = {"mem_growth_reversible": mem[top, "reversible"] / mem[Ns[0], "reversible"],
           "mem_growth_autograd": mem[top, "autograd"] / mem[Ns[0], "autograd"],
           "mem_growth_checkpoint": mem[top, "checkpoint"] / mem[Ns[0], "checkpoint"],
           "time_ratio": {N: paired_ratio(times[N]["reversible"], times[N]["autograd"]) for N in Ns},
           "top_N": top}
    text = (f"O-BELM on the bundled digits UNet (1.16 M parameters, float32), batch {BATCH}×1×16×16, class 3; "
            "loss = mean(x_N²); gradients w.r.t. x and every UNet weight. Peak memory: resident-set high-water "
            "mark above the resident set before the call (after a warm-up call at N = 2), one fresh process per row "
            "whose glibc mmaps every buffer ≥ 16 KiB and trims its heap on free (see the module docstring); "
            f"time: median of {', '.join(f'{reps[N]} (N = {N})' for N in Ns)} interleaved repeat(s), ratio = "
            "median of per-repeat ratios to plain "
            "autograd at the same N.\n\n"
            + md_table(["N", "variant", "peak MiB", f"peak ÷ same variant at N = {Ns[0]}", "time s",
                        "time ÷ autograd"], rows)
            + f"\n\nTargets (issue 14): reversible peak at N = {top} ≤ 1.2× its peak at N = {Ns[0]}: "
            f"**{fig['mem_growth_reversible']:.2f}×** ({'met' if fig['mem_growth_reversible'] <= 1.2 else 'not met'}; "
            f"plain autograd {fig['mem_growth_autograd']:.1f}×, checkpoint {fig['mem_growth_checkpoint']:.1f}×); "
            f"time ≤ 3× plain autograd: "
            + ", ".join(f"N = {N}: **{r:.2f}×**" for N, r in fig["time_ratio"].items())
            + f" ({'met' if max(fig['time_ratio'].values()) <= 3 else 'not met'}).")
    return text, fig


def _splice(path: str, text: str, seconds: float, load_start: str) -> None:
    """Replace (or append) this section of RESULTS.md, leaving the others as they are."""
    body = (f"## {TITLE}\n\n_Machine: {machine_line('cpu')}. Section wall time {seconds:.0f} s; load average "
            f"{load_start} at the start, {load_average()} at the end (`python -m benchmarks.reversible`)._\n\n"
            f"{text}\n")
    page = open(path).read() if os.path.exists(path) else "# belm benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(TITLE)}\n.*?(?=^## |\Z)", re.S | re.M)
    page = pattern.sub(lambda _: body + "\n", page) if pattern.search(page) else page.rstrip("\n") + "\n\n" + body
    with open(path, "w") as f:
        f.write(page)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if sys.argv[1:2] == ["--child"]:
        _memory_child(int(sys.argv[2]), sys.argv[3])
    else:
        quick = "--quick" in sys.argv
        t0, load = time.perf_counter(), load_average()
        text, _ = run("cpu", quick)
        out = os.path.join("benchmarks", "_work", "RESULTS-quick.md") if quick else \
            os.path.join("benchmarks", "RESULTS.md")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        _splice(out, text, time.perf_counter() - t0, load)
        print(text)
