"""Sharded sampling across processes (``torchrun --nproc_per_node=K -m belm.cli -- sample ...``).

Each rank takes a contiguous, disjoint slice of the seed range; every sample has its own
generator (:func:`belm.apps.tasks.seeded_noise`), and slice boundaries fall on multiples of
the batch size (``block``), so every batch a rank forms is a batch the single-process run
forms too: the union of the slices is bit-identical to a single-process run. (CPU kernels
may round differently for other batch compositions or intra-op thread counts; torchrun
sets ``OMP_NUM_THREADS=1`` per rank, so compare with a single process run with the same
setting.) No images cross between ranks: each rank writes its batches as part files inside
``--out`` and rank 0, after a barrier, reads them back one at a time in seed order and writes
the outputs (:func:`belm.apps.datasets.write_part`, :func:`belm.apps.datasets.iter_parts`).

The backend follows the device (nccl for CUDA devices, gloo otherwise), a CUDA rank is bound
to its ``LOCAL_RANK``, and the rendezvous is bounded in time: inherited ``WORLD_SIZE`` /
``RANK`` / ``MASTER_*`` variables without a launcher give one line, not a hang
(:func:`init_world`). Data sets are split by whole shards (:func:`shards_of_rank`).
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Optional, Sequence

import torch

__all__ = ["world", "shard", "init_world", "launched_world_size", "backend_for",
           "shards_of_rank", "RENDEZVOUS_TIMEOUT_ENV"]

#: seconds the ranks may take to meet (default 60): an inherited WORLD_SIZE without its launcher fails
#: after this long instead of waiting forever
RENDEZVOUS_TIMEOUT_ENV = "BELM_RENDEZVOUS_TIMEOUT"
#: collectives wait this long (a fast rank waits at the final barrier for the slowest one)
_COLLECTIVE_TIMEOUT = timedelta(days=7)


def launched_world_size() -> int:
    """``$WORLD_SIZE`` (1 when unset): how many ranks a launcher started.

    Raises:
        ValueError: not an integer >= 1.
    """
    raw = os.environ.get("WORLD_SIZE", "").strip() or "1"
    try:
        size = int(raw)
    except ValueError:
        raise ValueError(f"$WORLD_SIZE must be an integer >= 1; got {raw!r} (unset it for one process)") from None
    if size < 1:
        raise ValueError(f"$WORLD_SIZE must be an integer >= 1; got {size} (unset it for one process)")
    return size


def backend_for(device: str | torch.device | None) -> str:
    """nccl for CUDA devices, gloo for everything else (CPU, MPS, or no device named): CUDA
    being visible does not make a CPU run an nccl run."""
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


def init_world(device: str | torch.device | None = None, *, timeout_s: Optional[float] = None) -> str:
    """Join the launcher's process group once (no-op for one process or when joined already);
    returns the device this rank should use.

    ``device`` ``"cuda"`` (no index) becomes ``cuda:$LOCAL_RANK`` and is made the current
    device, so that the ranks of a node do not all crowd onto GPU 0; the backend follows the
    device (:func:`backend_for`). The rendezvous (the ranks meeting at ``MASTER_ADDR:MASTER_PORT``)
    may take ``timeout_s`` (default ``$BELM_RENDEZVOUS_TIMEOUT``, else 60 s); collectives
    afterwards wait much longer, as a fast rank waits for the slowest at the final barrier.

    Raises:
        ConnectionError: the variables are incomplete, or the other ranks did not join in time
            (one line naming the variables and the fix).
    """
    size = launched_world_size()
    device = "cpu" if device is None else str(device)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and size > 1:
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        device = f"cuda:{local}"
    if dev.type == "cuda" and size > 1:
        torch.cuda.set_device(torch.device(device))
    if size <= 1:
        return device
    import torch.distributed as dist
    if dist.is_initialized():
        return device
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v, "").strip()]
    if missing:
        raise ConnectionError(f"$WORLD_SIZE={size} but ${', $'.join(missing)} not set: launch with torchrun "
                              "(which sets them), or unset $WORLD_SIZE to run as one process")
    if timeout_s is None:
        raw = os.environ.get(RENDEZVOUS_TIMEOUT_ENV, "").strip() or "60"
        try:
            timeout_s = float(raw)
        except ValueError:
            raise ConnectionError(f"${RENDEZVOUS_TIMEOUT_ENV} must be a number of seconds; got {raw!r}") from None
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    short = timedelta(seconds=timeout_s)
    try:
        # The store first, with a short timeout: with inherited variables and no launcher,
        # rank 0 would otherwise wait for the missing ranks forever (and the others retry).
        extend = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        with _quiet_native_stderr():
            store, rank, size = next(dist.rendezvous("env://", timeout=short))
            dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=size,
                                    timeout=short if extend is not None else _COLLECTIVE_TIMEOUT)
            if extend is not None:
                # Every rank really there, in time: variables inherited from a parent torchrun job
                # reach that job's store, whose stale keys would otherwise stall the first collective.
                dist.barrier()
        store.set_timeout(_COLLECTIVE_TIMEOUT)
        if extend is not None:
            extend(_COLLECTIVE_TIMEOUT)
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConnectionError(
            f"rank {os.environ.get('RANK')} of $WORLD_SIZE={size} could not meet the other ranks at {where} within "
            f"{timeout_s:g} s ({first[:160]}): launch with torchrun, or unset WORLD_SIZE, RANK, MASTER_ADDR and "
            f"MASTER_PORT (inherited from a parent job?) to run as one process") from None
    return device


@contextlib.contextmanager
def _quiet_native_stderr():
    """c10d's C++ client logs every failed connection attempt with a stack of native frames; on
    failure the caller's one line says it all, so those logs are held back (file descriptor 2
    goes to a temporary file) and passed on only when the block succeeds."""
    import sys
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                held.seek(0)
                os.write(2, held.read())


def world(device: str | torch.device | None = None) -> tuple[int, int]:
    """(rank, world size), joining the launcher's process group (:func:`init_world`) if not
    joined yet: the backend follows ``device`` (None: gloo)."""
    if launched_world_size() <= 1:
        return 0, 1
    init_world(device)
    import torch.distributed as dist
    return dist.get_rank(), dist.get_world_size()


def shards_of_rank(num_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards ``rank`` computes: every ``world_size``-th one starting at ``rank`` (round
    robin, so the ranks' shares differ by at most one shard whatever the sizes). What a shard
    holds never depends on the world size; only who computes it does."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size - 1}]; got {rank}")
    return list(range(rank, num_shards, world_size))


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
