"""Count how many of the tensors a generator yields are still in memory when it yields the next
(the streaming writers of ``belm sample`` hold one batch, or one part, at a time).

Import from tests as ``from alive_batches import AliveBatches`` (pytest puts tests/ on sys.path).
"""

import gc
import weakref
from typing import Callable, Iterator

import torch


class AliveBatches:
    """Wraps a generator function: ``wrapped(...)`` yields what ``plain(...)`` yields and, before
    each item, records how many earlier items are still alive (``alive_before``); ``copies``
    keeps a clone of every item, to compare with what was written."""

    def __init__(self, plain: Callable[..., Iterator[torch.Tensor]]) -> None:
        self.plain = plain
        self.refs: list[weakref.ref] = []
        self.copies: list[torch.Tensor] = []
        self.alive_before: list[int] = []

    def wrapped(self, *args, **kwargs) -> Iterator[torch.Tensor]:
        for item in self.plain(*args, **kwargs):
            gc.collect()
            # The caller's loop variable may still hold the item before this one; no other.
            self.alive_before.append(sum(ref() is not None for ref in self.refs))
            self.refs.append(weakref.ref(item))
            self.copies.append(item.clone())
            yield item

    @property
    def most_alive(self) -> int:
        """The most earlier items alive when a new one was yielded (0 if at most one was yielded)."""
        return max(self.alive_before, default=0)
