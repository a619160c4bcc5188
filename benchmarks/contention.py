"""``python -m benchmarks.contention [--quick] [--threads 1 0] [--write]``: `make demo` on a shared CPU.

Times ``belm demo --no-progress`` (the command ``make demo`` runs) as a subprocess, alone and
while two CPU-bound processes (``while True: pass``, started and killed by this script) run
beside it, for each ``--threads`` setting (0 = torch's default, one thread per core).
Target (issue 15): under load ≤ 2× the idle time; a fair share of 2 cores among 3 busy
processes alone makes it 1.5×.

Other users of the machine are not under this script's control: the load average before
each run is recorded beside it, and the rows are run idle, loaded, idle again so that drift
shows. ``--write`` replaces this section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .sections import markers, write_section
from .common import cpu_model, load_average

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = markers("contention")


def _demo_seconds(threads: int, quick: bool) -> float:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "belm.cli", "demo", "--out", os.path.join(out, "demo"), "--no-progress",
               "--threads", str(threads)] + (["--quick"] if quick else [])
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "BELM_THREADS")}
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def measure(threads: int, quick: bool, busy: int = 2) -> dict:
    """Idle, loaded, idle again: seconds and the load average before each."""
    row: dict = {"threads": threads}
    row["load_idle"] = load_average()
    row["idle"] = _demo_seconds(threads, quick)
    procs = _busy(busy)
    try:
        time.sleep(1.0)
        row["load_loaded"] = load_average()
        row["loaded"] = _demo_seconds(threads, quick)
    finally:
        _stop(procs)
    row["load_idle2"] = load_average()
    row["idle2"] = _demo_seconds(threads, quick)
    row["ratio"] = row["loaded"] / min(row["idle"], row["idle2"])
    return row


def markdown(rows: list[dict], quick: bool, busy: int) -> str:
    lines = [BEGIN, "## `make demo` on a shared CPU (threads)", "",
             f"_`python -m benchmarks.contention{' --quick' if quick else ''}` on {time.strftime('%Y-%m-%d %H:%M')}; "
             f"CPU {cpu_model()} ({os.cpu_count()} cores). `belm demo{' --quick' if quick else ''} --no-progress` "
             f"timed as a subprocess alone (before and after) and beside {busy} processes running "
             "`while True: pass`. The machine is shared with other users: the load average (1/5/15 min) "
             "before each run is given._", "",
             "| --threads | idle s (load) | loaded s (load) | idle again s (load) | loaded ÷ idle | target |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        name = "0 (torch default)" if r["threads"] == 0 else str(r["threads"])
        ok = "met" if r["ratio"] <= 2 else "**not met**"
        lines.append(f"| {name} | {r['idle']:.1f} ({r['load_idle']}) | {r['loaded']:.1f} ({r['load_loaded']}) | "
                     f"{r['idle2']:.1f} ({r['load_idle2']}) | **{r['ratio']:.2f}×** | ≤ 2× ({ok}) |")
    lines += ["", "loaded ÷ idle divides by the faster of the two idle runs. A fair share of the 2 cores among "
              f"{busy + 1} busy processes alone gives 1.5×.", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.contention", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="time `belm demo --quick` instead of the full demo")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="--threads settings to compare")
    p.add_argument("--busy", type=int, default=2, help="number of CPU-bound processes beside the demo")
    p.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    rows = []
    for threads in args.threads:
        rows.append(measure(threads, args.quick, args.busy))
        print(rows[-1], flush=True)
    text = markdown(rows, args.quick, args.busy)
    print(text)
    if args.write:
        write_section("contention", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
