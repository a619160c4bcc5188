"""Sharded sampling: `belm sample` under torchrun (gloo, CPU) gives the bits of one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from belm.apps.sharding import shard

REPO = Path(__file__).resolve().parents[1]


# -- shard(): pure slicing, no process group --------------------------------------------
@pytest.mark.parametrize("n, size, block", [(5, 2, 1), (6, 2, 1), (7, 3, 1), (2, 4, 1), (0, 3, 1),
                                            (10, 2, 3), (6, 2, 64), (130, 3, 64), (9, 4, 2)])
def test_shard_partitions_the_seeds_into_whole_blocks(n, size, block):
    seeds = list(range(100, 100 + n))
    parts = [shard(seeds, block=block, rank=r, world_size=size) for r in range(size)]
    assert sum(parts, []) == seeds                       # disjoint, contiguous, in order, complete
    for part in parts:                                   # every slice starts on a batch boundary and,
        if part:                                         # but for the last, is whole batches
            start = seeds.index(part[0])
            assert start % block == 0
            assert len(part) % block == 0 or part[-1] == seeds[-1]
    counts = [-(-len(p) // block) for p in parts]        # batches per rank differ by at most one
    assert max(counts) - min(counts) <= 1


def test_shard_uneven_split_of_five_seeds():
    assert shard([3, 4, 5, 6, 7], rank=0, world_size=2) == [3, 4, 5]
    assert shard([3, 4, 5, 6, 7], rank=1, world_size=2) == [6, 7]


def test_shard_single_process_takes_everything(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert shard(list(range(5)), block=2) == list(range(5))
    with pytest.raises(ValueError, match="block"):
        shard([1, 2], block=0)


# -- the CLI under torchrun ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    # The same intra-op thread count in both runs (torchrun sets 1 per rank anyway): CPU
    # kernels may round differently with another thread count. Offline: loopback only.
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _outputs(folder: Path) -> dict:
    """Every file of a sample run, by name, but summary.json (its seconds and command differ)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "summary.json"}


@pytest.mark.slow
def test_torchrun_two_ranks_bit_identical_to_one_process(tmp_path):
    # --batch-size 3, 7 seeds: batches of 3, 3, 1; rank 0 samples the first two, rank 1 the
    # last (slices are whole batches).
    args = ["sample", "--model", "digits", "--num", "7", "--steps", "5", "--seed", "3", "--no-progress",
            "--batch-size", "3"]
    one, two = tmp_path / "D1", tmp_path / "D2"
    proc = subprocess.run([sys.executable, "-m", "belm.cli", *args, "--out", str(one)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # `--` ends torchrun's own options: its parser would take `--num` for an abbreviation of
    # its `--numa-binding`.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "belm.cli", "--"]
    proc = subprocess.run([*launcher, *args, "--out", str(two)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    from safetensors.torch import load_file
    assert load_file(str(two / "samples.safetensors"))["images"].shape == (7, 1, 16, 16)
    assert sorted(p.name for p in two.glob("sample_*.png")) == [f"sample_{s:06d}.png" for s in range(3, 10)]
    # samples.safetensors, every PNG and the grid: the bytes of one process; the parts are gone
    assert _outputs(two) == _outputs(one)
    assert not (two / ".belm-parts").exists()


# -- the assembly on rank 0, in process (two ranks simulated, one after the other) ----------
def test_sharded_sample_streams_parts_and_never_gathers_images(monkeypatch, tmp_path):
    # Before: rank 0 collected every rank's images with all_gather_object (every image in the
    # memory of every rank). Now each rank writes its batches as parts inside --out and rank 0
    # reads them back one part at a time; the outputs are those of one process.
    import torch.distributed as dist
    from alive_batches import AliveBatches

    from belm import cli
    from belm.apps import datasets, sharding

    def no_gather(*args, **kwargs):
        raise AssertionError("images were gathered between ranks")

    for name in ("all_gather_object", "gather_object", "all_gather", "gather", "broadcast_object_list"):
        monkeypatch.setattr(dist, name, no_gather)
    barriers = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: barriers.append(1))
    read = AliveBatches(datasets.iter_parts)
    monkeypatch.setattr(datasets, "iter_parts", read.wrapped)
    args = ["sample", "--num", "7", "--steps", "2", "--seed", "3", "--batch-size", "2", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main([*args, "--out", str(one)]) == 0
    assert not read.copies and not barriers                # one process: no parts, no barrier
    for rank in (1, 0):                             # rank 1 finishes first; rank 0 assembles after it
        monkeypatch.setattr(sharding, "world", lambda *a, rank=rank: (rank, 2))
        assert cli.main([*args, "--out", str(two)]) == 0
        if rank == 1:                               # its batches (seeds 7, 8 and 9) are parts in --out
            assert sorted(p.name for p in (two / ".belm-parts").iterdir()) == ["part-000002.safetensors",
                                                                               "part-000003.safetensors"]
            assert not (two / "samples.safetensors").exists()
    assert len(barriers) == 2 and len(read.copies) == 4 and read.most_alive <= 1
    assert _outputs(two) == _outputs(one)
    assert not (two / ".belm-parts").exists()
    assert not hasattr(sharding, "gather_in_order")
