"""Peak memory of sampling and inversion per method (the sampler's tensors, not the network's),
and whether a process's peak memory stays flat in the number of steps N.

``python -m benchmarks.memory --in-n [--quick]`` measures the second alone and replaces its
section of benchmarks/RESULTS.md (``python -m benchmarks.run`` writes the first).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time

import torch

from belm.schedule import Schedule, make_betas
from belm.solvers.registry import make_sampler

from .common import load_average, machine_line, md_table
from .sections import markers, write_section

VARIANTS = [
    ("DDIM", "ddim", {}),
    ("BDIA (γ=1)", "bdia", {}),
    ("O-BELM", "obelm", {}),
    ("O-BELM, state float32", "obelm", {"state_dtype": torch.float32}),
    ("O-BELM bitwise", "obelm", {"exact": "bitwise"}),
    ("EDICT", "edict", {}),
    ("leapfrog3", "leapfrog3", {}),
]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class CpuPeak:
    """Peak resident memory above the current level, by resetting the kernel's high-water mark
    (``/proc/self/clear_refs`` ← 5) and reading VmHWM. glibc is told to mmap every buffer of
    1 MiB or more (``MALLOC_MMAP_THRESHOLD_`` in a fresh process, so that no large free heap
    region left by earlier work can serve an allocation unseen), so a freed tensor really leaves
    the resident set and a new one really enters it."""

    def __init__(self) -> None:
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)     # M_MMAP_THRESHOLD
            self._reset()
            _status("VmHWM")
            self.ok = True
        except (OSError, KeyError, AttributeError):
            self.ok = False

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def measure(self, fn) -> int:
        gc.collect()
        before = _status("VmRSS")
        self._reset()
        out = fn()
        peak = _status("VmHWM")
        del out
        return peak - before


class CudaPeak:
    ok = True

    @staticmethod
    def measure(fn) -> int:
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return peak - before


def measure_all(device: str, quick: bool) -> tuple[tuple, int, int, dict] | None:
    shape = (2, 4, 256, 256) if quick else (4, 4, 256, 256)    # 0.5M / 1M elements: 4 / 8 MiB per f64 state
    N, reps = (6, 1) if quick else (8, 2)
    meter = CudaPeak() if device == "cuda" else CpuPeak()
    if not meter.ok:
        return None
    schedule = Schedule.from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012), N)
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    res = {}
    for label, name, kwargs in VARIANTS:
        s = make_sampler(name, lambda v, t: torch.tanh(v), schedule, progress=False, **kwargs)
        s.sample(x[:1])                                    # warm-up (coefficients, lattice code paths)
        res[(label, "sample")] = min(meter.measure(lambda: s.sample(x)) for _ in range(reps))
        res[(label, "invert")] = min(meter.measure(lambda: s.invert(x)) for _ in range(reps))
    return shape, N, reps, res


def _in_fresh_process(quick: bool) -> tuple[tuple, int, int, dict] | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20), OMP_NUM_THREADS=str(torch.get_num_threads()))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory"] + (["--quick"] if quick else []),
                          env=env, cwd=root, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError("memory subprocess failed:\n" + proc.stderr[-2000:])
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    if data is None:
        return None
    shape, N, reps, rows = data
    return tuple(shape), N, reps, {(label, d): v for label, d, v in rows}


def run(device: str, quick: bool) -> tuple[str, dict]:
    got = measure_all(device, quick) if device == "cuda" else _in_fresh_process(quick)
    if got is None:
        return "skipped: /proc/self/clear_refs or VmHWM not available on this system", {}
    shape, N, reps, res = got
    unit = 8 * int(torch.Size(shape).numel())                 # one float64 state tensor
    numel = unit // 8
    rows = []
    base = res[("DDIM", "sample")]
    for label, _, _ in VARIANTS:
        ps, pi = res[(label, "sample")], res[(label, "invert")]
        rows.append([label, ps / 2**20, ps / unit, ps / base, pi / 2**20, pi / unit, pi / base])
    how = ("torch.cuda.max_memory_allocated() above the allocation before the call" if device == "cuda" else
           "peak resident set (VmHWM after resetting it via /proc/self/clear_refs) above the resident set before "
           "the call, in a fresh process whose glibc mmaps every buffer ≥ 1 MiB (MALLOC_MMAP_THRESHOLD_), so freed "
           "tensors leave the resident set and new ones enter it")
    text = (f"Input {'×'.join(map(str, shape))} float32 ({numel * 4 / 2**20:.0f} MiB; one float64 state "
            f"= {unit / 2**20:.0f} MiB), N = {N}, ε = tanh(x) (allocates one output per call, like a network; "
            f"the network's own activations are not included). Measured: {how}; min of {reps} run(s). The output "
            "tensor (or latent) itself is included.\n\n"
            + md_table(["method", "sample MiB", "sample ÷ f64 state", "sample ÷ DDIM", "invert MiB",
                        "invert ÷ f64 state", "invert ÷ DDIM sample"], rows))
    return text, {k: v / base for k, v in res.items()}


# -- flat in N: peak RSS of a fresh process per configuration ------------------------------------
IN_N_SHAPES = [(8, 4, 64, 64), (8, 4, 128, 128)]      # Stable Diffusion's latent of 512² images, and 1024²
IN_N_STEPS = (10, 200)
IN_N_MODES = ("sample", "reversible")
IN_N_TARGET = 1.1                                     # peak RSS at N = 200 ≤ 1.1× at N = 10 (issue 20)


def _rss_kib() -> int:
    return _status("VmRSS") // 1024


def in_n_child(shape: tuple[int, ...], N: int, mode: str) -> dict:
    """One O-BELM sampling (``mode="sample"``) or sampling + backward with ``grad="reversible"``
    of a ``shape`` batch in this process; the process's peak RSS (``ru_maxrss``) and its RSS
    just before the call, in KiB. ε = tanh(x): cheap, deterministic, one new output per call."""
    schedule = Schedule.from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012), N, spacing="trailing")
    sampler = make_sampler("obelm", lambda v, t: torch.tanh(v), schedule, progress=False)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    before = _rss_kib()
    if mode == "reversible":
        x.requires_grad_(True)
        sampler.sample(x, grad="reversible").square().mean().backward()
    else:
        sampler.sample(x)
    return {"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def _in_n_fresh(shape: tuple[int, ...], N: int, mode: str) -> dict:
    # glibc's default allocator settings: what users get (no MALLOC_* tuning, unlike measure_all).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--in-n-child", "x".join(map(str, shape)),
                           str(N), mode], env=env, cwd=root, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError("memory subprocess failed:\n" + proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_in_n(quick: bool = False) -> tuple[str, dict]:
    """Peak RSS against N, one fresh process per (shape, N, mode); figures: peak ratio N=200 ÷ N=10."""
    shapes = IN_N_SHAPES[:1] if quick else IN_N_SHAPES
    lo, hi = IN_N_STEPS
    got = {(shape, N, mode): _in_n_fresh(shape, N, mode) for shape in shapes for mode in IN_N_MODES
           for N in IN_N_STEPS}
    rows, fig = [], {}
    for shape in shapes:
        for mode in IN_N_MODES:
            a, b = got[shape, lo, mode], got[shape, hi, mode]
            ratio = b["peak"] / a["peak"]
            fig[("x".join(map(str, shape)), mode)] = ratio
            rows.append(["×".join(map(str, shape)), mode, a["peak"] / 1024, b["peak"] / 1024,
                         (a["peak"] - a["before"]) / 1024, (b["peak"] - b["before"]) / 1024,
                         f"**{ratio:.3f}×** ({'met' if ratio <= IN_N_TARGET else 'not met'})"])
    text = (f"O-BELM on a trailing grid of Stable Diffusion's betas, ε = tanh(x), float32 input, float64 state; "
            f"`sample` = `sampler.sample(x)`, `reversible` = `sampler.sample(x, grad=\"reversible\")` and backward of "
            f"mean(x_N²) to x. Each row pair is two fresh processes (N = {lo} and N = {hi}) with glibc's default "
            "allocator settings; peak = the process's `ru_maxrss` (interpreter, torch and the input included), "
            "above = peak − RSS just before the call. Target (issue 20): peak at N = "
            f"{hi} ≤ {IN_N_TARGET}× peak at N = {lo}.\n\n"
            + md_table(["batch", "mode", f"peak MiB N = {lo}", f"peak MiB N = {hi}", f"above MiB N = {lo}",
                        f"above MiB N = {hi}", f"peak N = {hi} ÷ N = {lo}"], rows)
            + "\n\nBefore the fix of issue 20 (each level's 0-dim `t` tensor created lazily at its first step, "
            "between the per-step network buffers, pinning glibc's heap) the same rows read, peak N = 200 ÷ N = 10: "
            "1.361× / 1.305× (8×4×64×64 sample / reversible) and 0.922× / 1.936× (8×4×128×128); now every "
            "level's `t` is created at the first network call (`Sampler._model_times_on`).")
    return text, fig


def main_in_n(quick: bool) -> None:
    t0, load = time.perf_counter(), load_average()
    text, _ = run_in_n(quick)
    begin, end = markers("memory-in-n")
    section = (f"{begin}\n## Peak memory against the number of steps N (CPU)\n\n_`python -m benchmarks.memory --in-n"
               f"{' --quick' if quick else ''}` on {time.strftime('%Y-%m-%d %H:%M')}; {machine_line('cpu')}; load "
               f"average {load} at the start, {load_average()} at the end; {time.perf_counter() - t0:.0f} s._\n\n"
               f"{text}\n{end}")
    if quick:
        print(section)
    else:
        write_section("memory-in-n", section)
        print(text)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if sys.argv[1:2] == ["--in-n-child"]:
        print(json.dumps(in_n_child(tuple(int(v) for v in sys.argv[2].split("x")), int(sys.argv[3]), sys.argv[4])))
        sys.exit(0)
    if "--in-n" in sys.argv:
        main_in_n("--quick" in sys.argv)
        sys.exit(0)
    out = measure_all("cpu", "--quick" in sys.argv)
    if out is None:
        print("null")
    else:
        shape, N, reps, res = out
        print(json.dumps([list(shape), N, reps, [[label, d, v] for (label, d), v in res.items()]]))
