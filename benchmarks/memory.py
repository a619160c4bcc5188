"""Peak memory of sampling and inversion per method (the sampler's tensors, not the network's)."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys

import torch

from belm.schedule import Schedule, make_betas
from belm.solvers.registry import make_sampler

from .common import md_table

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


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = measure_all("cpu", "--quick" in sys.argv)
    if out is None:
        print("null")
    else:
        shape, N, reps, res = out
        print(json.dumps([list(shape), N, reps, [[label, d, v] for (label, d), v in res.items()]]))
