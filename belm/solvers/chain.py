"""The one stepping core: an explicit chain of states that advances or retreats one level.

A :class:`Chain` holds a window of consecutive levels ``lo … hi`` of one trajectory and
the network outputs it still needs. :meth:`Chain.advance` produces level ``hi + 1`` (one
sampling step, towards the clean level N); :meth:`Chain.retreat` recovers level ``lo − 1``
(one inversion step, towards the noise). Every loop in belm drives a chain: ``sample`` and
``invert``, the bitwise lattice mode, EDICT, the diffusers schedulers and reversible
backpropagation. The rule "which states and which f are still needed" lives here only.

:class:`MultistepChain` runs a k-step linear multistep method given by its members
m = 1 … k (:class:`~belm.solvers.relation.RowsInX`; member 1 is DDIM, members < k start
the chain up). Sampling from a chain seeded with one state at level s uses member
min(k, n − s) to produce level n; inversion from a chain seeded at the clean level N
recovers level L with member min(k, N − L), solved for its noisiest state; every other step
(a chain seeded with a full window of k states, a latent, and retreats that undo advances)
uses member k.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from belm.solvers.relation import RowsInX

__all__ = ["Chain", "MultistepChain", "SingleLevelChain", "Network"]

#: ``network(x_state, level) -> f``: the method's function (ε or velocity) at a state.
Network = Callable[[torch.Tensor, int], torch.Tensor]


class Chain:
    """Explicit state of one trajectory between two directions.

    Attributes:
        lo, hi: the noisiest and cleanest level the chain currently holds.
        last_f: the network output the last step evaluated (for callbacks), or None.
    """

    lo: int
    hi: int
    last_f: Optional[torch.Tensor] = None

    def advance(self) -> None:
        """Produce level ``hi + 1`` (one sampling step)."""
        raise NotImplementedError

    def retreat(self) -> None:
        """Recover level ``lo − 1`` (one inversion step)."""
        raise NotImplementedError

    def x(self, level: int) -> torch.Tensor:
        """The state at ``level`` (lo ≤ level ≤ hi) in x coordinates; the chain's own tensor."""
        raise NotImplementedError

    def window(self) -> tuple[torch.Tensor, ...]:
        """The tensors a latent at level ``lo`` must hold, noisiest first."""
        raise NotImplementedError

    def event(self, direction: str) -> dict:
        """The callback dict of the step just taken (copies: the chain reuses its buffers)."""
        level = self.hi if direction == "sample" else self.lo
        return {"level": level, "x": self.x(level).clone(), "eps": self.last_f, "direction": direction}


class SingleLevelChain(Chain):
    """A chain whose whole state lives at one level (the bitwise lattice, EDICT's registers)."""

    level: int

    @property
    def lo(self) -> int:  # type: ignore[override]
        return self.level

    @property
    def hi(self) -> int:  # type: ignore[override]
        return self.level

    def _check_level(self, level: int) -> None:
        if level != self.level:
            raise KeyError(f"{type(self).__name__} holds level {self.level} only; asked for {level}")


def _reuse_buffers() -> bool:
    """Overwrite a state that is about to be dropped, unless autograd may still need it."""
    return not torch.is_grad_enabled()


class MultistepChain(Chain):
    """A k-step linear multistep method on a window of at most k states.

    Args:
        members: rows of members 1 … k in x coordinates (member m at index m − 1).
        network: evaluates f at a state; called only for levels whose f was not supplied.
        states: level → tensor (state dtype, owned by the chain: it is updated in place).
        start: the sampling origin of a chain seeded with one noisy state at s (start = s);
            −inf for chains seeded with a full window or at the clean level.
        end: the inversion origin of a chain seeded with one clean state at N (end = N);
            +inf otherwise.
    """

    def __init__(self, members: Sequence[RowsInX], network: Network, states: dict[int, torch.Tensor], *,
                 start: float = -math.inf, end: float = math.inf) -> None:
        self.members = members
        self.k = len(members)
        self.network = network
        self.states = dict(states)
        self.f: dict[int, torch.Tensor] = {}
        self.start, self.end = start, end
        self.last_f = None

    @property
    def lo(self) -> int:  # type: ignore[override]
        return min(self.states)

    @property
    def hi(self) -> int:  # type: ignore[override]
        return max(self.states)

    def x(self, level: int) -> torch.Tensor:
        return self.states[level]

    def window(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.states[level] for level in sorted(self.states))

    def supply(self, level: int, f: torch.Tensor) -> None:
        """Hand the chain f at ``level`` (a diffusers pipeline calls the network itself)."""
        self.f[level] = f

    def replace(self, level: int, x: torch.Tensor) -> None:
        """Continue from a state the caller changed (drops f evaluated at the old one)."""
        self.states[level] = x
        self.f.pop(level, None)

    def f_at(self, level: int) -> torch.Tensor:
        value = self.f.get(level)
        if value is None:
            value = self.f[level] = self.network(self.states[level], level)
        return value

    def advance(self) -> None:
        n = self.hi + 1
        m = int(min(self.k, n - self.start))
        rows = self.members[m - 1]
        A, C = rows.A[n], rows.C[n]
        # Every f first: a buffer reused below may be the state one of them is evaluated at.
        f_terms = [(C[j - 1], self.f_at(n - j)) for j in range(1, m + 1) if C[j - 1] != 0.0]
        self.last_f = self.f.get(n - 1)
        oldest = self.states[n - m]
        # With member k the oldest state leaves the window: write x_n into its buffer.
        out = oldest.mul_(A[m - 1]) if m == self.k and _reuse_buffers() else oldest.mul(A[m - 1])
        for j in range(1, m):
            out.add_(self.states[n - j], alpha=A[j - 1])
        for coef, f in f_terms:
            out.add_(f, alpha=coef)
        self.states[n] = out
        # Later sampling steps read f only at levels ≥ n − k + 2.
        self._keep(n - self.k + 1, n, f_lo=n - self.k + 2, f_hi=n)

    def retreat(self) -> None:
        L = self.lo - 1
        m = int(min(self.k, self.end - L))
        n = L + m
        rows = self.members[m - 1]
        A, C = rows.A[n], rows.C[n]
        f_terms = [(C[j - 1], self.f_at(n - j)) for j in range(1, m) if C[j - 1] != 0.0]
        if C[m - 1] != 0.0:
            # Not bidirectional (DDIM): f is needed at the unknown x_L; use it at the known
            # end x_n instead. This is the approximation that makes DDIM inversion inexact.
            f_terms.append((C[m - 1], self.f_at(n)))
        self.last_f = self.f.get(L + 1)
        newest = self.states[n]
        out = newest if m == self.k and _reuse_buffers() else newest.clone()
        for j in range(1, m):
            out.sub_(self.states[n - j], alpha=A[j - 1])
        for coef, f in f_terms:
            out.sub_(f, alpha=coef)
        out.div_(A[m - 1])
        self.states[L] = out
        # Later inversion steps read f only at levels ≤ L + k − 2.
        self._keep(L, L + self.k - 1, f_lo=L, f_hi=L + self.k - 2)

    def _keep(self, lo: int, hi: int, *, f_lo: int, f_hi: int) -> None:
        """Keep the states at levels lo … hi and f at levels f_lo … f_hi: what later steps read."""
        for level in [lv for lv in self.states if not lo <= lv <= hi]:
            del self.states[level]
        for level in [lv for lv in self.f if not f_lo <= lv <= f_hi]:
            del self.f[level]
