"""Sharded sampling across processes (``torchrun --nproc_per_node=K -m belm.cli -- sample ...``).

Each rank takes a contiguous, disjoint slice of the seed range; every sample has its own
generator (:func:`belm.apps.tasks.seeded_noise`), and slice boundaries fall on multiples of
the batch size (``block``), so every batch a rank forms is a batch the single-process run
forms too: the union of the slices is bit-identical to a single-process run. (CPU kernels
may round differently for other batch compositions or intra-op thread counts; torchrun
sets ``OMP_NUM_THREADS=1`` per rank, so compare with a single process run with the same
setting.) Rank 0 gathers the images in seed order and writes the outputs. gloo on CPU,
nccl on GPU.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

__all__ = ["world", "shard", "gather_in_order"]


def world() -> tuple[int, int]:
    """(rank, world size), initialising the default process group under torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shard(seeds: Sequence[int], *, block: int = 1, rank: Optional[int] = None,
          world_size: Optional[int] = None) -> list[int]:
    """This rank's contiguous slice of ``seeds`` (all of them in a single process).

    Slices are made of whole blocks of ``block`` seeds (the batch size), spread as evenly as
    possible (the first ranks get one block more); some ranks may get none. ``rank`` and
    ``world_size`` default to :func:`world`.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1; got {block}")
    if rank is None or world_size is None:
        rank, world_size = world()
    blocks = -(-len(seeds) // block)
    per, extra = divmod(blocks, world_size)
    first = rank * per + min(rank, extra)
    count = per + (1 if rank < extra else 0)
    return list(seeds[first * block:(first + count) * block])


def gather_in_order(images: torch.Tensor, mine: Sequence[int], seeds: Sequence[int]) -> Optional[torch.Tensor]:
    """All images in the order of ``seeds`` on rank 0; None on the other ranks."""
    rank, size = world()
    if size == 1:
        return images
    import torch.distributed as dist
    parts: list = [None] * size
    dist.all_gather_object(parts, (list(mine), images.cpu()))
    dist.barrier()
    if rank != 0:
        return None
    by_seed = {s: img for part_seeds, part in parts for s, img in zip(part_seeds, part)}
    return torch.stack([by_seed[s] for s in seeds])
