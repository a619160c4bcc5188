"""``python -m benchmarks.datasets [--num 2000] [--steps 10] [--write]``: `belm invert` on a folder, 1 vs 2 processes.

Writes ``--num`` digits of the bundled set (held-out first, then training digits, repeated if
more are asked for than the 1797 there are) as 16x16 PNGs into a temporary folder, then times
``belm invert FOLDER`` on the bundled digits model as one process and under
``torchrun --nproc_per_node=2`` (gloo, CPU; every rank one intra-op thread), each into a
fresh latents folder. Reported per rank (from the run's summary.json): images, seconds of
inversion, images/s, peak resident memory; per run: wall seconds of the whole command (start-up
included), the job's images/s (images ÷ the slowest rank's seconds) and the ratio of 2 to 1
process. The two runs' shard files and index are compared byte for byte.

The machine may be shared: the load average before each run is recorded beside it; a 2-core
machine cannot give 2 processes more than 2×, and less when other work holds a core.
``--write`` replaces this section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import cpu_model, load_average
from .sections import markers, write_section

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = markers("datasets")


def write_digits(folder: Path, num: int) -> None:
    """``num`` bundled digits as PNG files digit_000000.png, … (held-out first)."""
    import torch
    from PIL import Image

    from belm.apps.io import to_uint8
    from belm.models import digits_dataset
    images = torch.cat([digits_dataset("heldout")[0], digits_dataset("train")[0]])
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num):
        Image.fromarray(to_uint8(images[i % len(images)][None])[0][..., 0]).save(folder / f"digit_{i:06d}.png")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_invert(images: Path, out: Path, processes: int, steps: int, shard_size: int, workers: int) -> dict:
    """One ``belm invert`` run; its summary's per-rank figures plus wall seconds and the load before."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "BELM_THREADS")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    launcher = [sys.executable, "-m", "belm.cli"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--nnodes=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "belm.cli", "--"]
    command = [*launcher, "invert", str(images), "--out", str(out), "--steps", str(steps), "--shard-size",
               str(shard_size), "--workers", str(workers), "--no-progress", "--threads", "1"]
    load = load_average()
    t0 = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    ranks = summary["ranks"]
    slowest = max(r["seconds"] for r in ranks)
    return {"processes": processes, "wall_s": wall, "load": load, "ranks": ranks,
            "images": sum(r["images"] for r in ranks), "job_images_per_s": sum(r["images"] for r in ranks) / slowest}


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("shard-*.safetensors")) + ["index.json"]
    return names == sorted(p.name for p in b.glob("shard-*.safetensors")) + ["index.json"] and \
        all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def markdown(rows: list[dict], num: int, steps: int, shard_size: int, workers: int, identical: bool) -> str:
    one, two = rows
    lines = [BEGIN, "## Data sets: `belm invert` on 1 and 2 processes", "",
             f"_`python -m benchmarks.datasets --num {num} --steps {steps}` on {time.strftime('%Y-%m-%d %H:%M')}; "
             f"CPU {cpu_model()} ({os.cpu_count()} cores), shared with other work (load average 1/5/15 min "
             f"before each run given). {num} bundled digits as PNGs, bundled digits model, obelm, {steps} steps, "
             f"shards of {shard_size}, {workers} decoding worker(s) per rank, 1 intra-op thread per rank, gloo._", "",
             "| processes | rank | images | seconds | images/s | CPU ms per image | peak RSS MiB | "
             "wall s (load before) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for r in row["ranks"]:
            lines.append(f"| {row['processes']} | {r['rank']} | {r['images']} | {r['seconds']:.1f} | "
                         f"{r['images_per_s']:.1f} | {1000 * r['cpu_seconds'] / r['images']:.0f} | "
                         f"{r['peak_rss_mib']:.0f} | {row['wall_s']:.1f} ({row['load']}) |")
    ratio = two["job_images_per_s"] / one["job_images_per_s"]
    lines += ["", f"Job throughput (images ÷ the slowest rank's seconds): 1 process "
              f"{one['job_images_per_s']:.1f} images/s, 2 processes {two['job_images_per_s']:.1f} images/s: "
              f"**{ratio:.2f}×**. On an idle 2-core machine the ratio is at most 2×; here other processes took "
              "a varying share of the cores (see the load averages), so the ratio measures the load as much as "
              "belm: the CPU time per image (each rank's own process, decoding workers not counted), which the "
              "load does not change, shows what a rank costs. Wall time includes each rank's start-up (imports, "
              f"model load). Shards and index of the two runs {'identical byte for byte' if identical else '**differ**'}.",
              END]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.datasets", description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=2000, help="images in the folder")
    p.add_argument("--steps", type=int, default=10, help="inversion steps")
    p.add_argument("--shard-size", type=int, default=32, help="images per shard")
    p.add_argument("--workers", type=int, default=1, help="DataLoader decoding workers per rank")
    p.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="belm-datasets-") as tmp:
        images = Path(tmp) / "images"
        write_digits(images, args.num)
        rows = []
        for processes in (1, 2):
            rows.append(run_invert(images, Path(tmp) / f"latents-{processes}", processes, args.steps,
                                   args.shard_size, args.workers))
            print(rows[-1], flush=True)
        identical = same_files(Path(tmp) / "latents-1", Path(tmp) / "latents-2")
    text = markdown(rows, args.num, args.steps, args.shard_size, args.workers, identical)
    print(text)
    if args.write:
        write_section("datasets", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
