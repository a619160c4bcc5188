"""The engine shared by DDIM, BDIA, O-BELM and BELM(k): linear multistep relations.

A method of k steps is given by its *members* m = 1 … k: relations producing level n from
the m previous levels (:class:`~belm.solvers.relation.Relation`). Member 1 is always DDIM.
Member k is the method itself; members 1 … k−1 start the chain up.

Sampling from a tensor at level s uses member min(k, n − s) to produce level n (so step 0
is a DDIM step). Inversion from the clean level N first obtains the k − 1 states next to
it with the start-up members (member j produces level N from levels N−j … N−1 and is solved
for x_{N−j}; member 1 is DDIM inversion, which evaluates ε at the *known* cleaner point
because the relation needs it at the unknown one), then solves member k for its noisiest
state, down to the requested level. The latent holds the k states x_s … x_{s+k−1}, so
sampling it re-runs exactly the relations inversion solved: exact reconstruction.
Network calls: sample N, invert N, sample(latent) N − 1 (ε at levels 1 … N−1) for k ≥ 2.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from belm.solvers.base import Callback, Latent, Sampler, check_tensor
from belm.solvers.relation import Relation, shear, unshear

__all__ = ["MultistepSampler", "ddim_relation"]


def ddim_relation(schedule) -> Relation:
    """Member 1 of every method: x̄_n = x̄_{n−1} − H_{n−1} · ε(x_{n−1})."""
    N = schedule.num_steps
    a = torch.full((N + 1, 1), float("nan"), dtype=torch.float64)
    c = a.clone()
    a[1:, 0] = 1.0
    c[1:, 0] = -schedule.H
    return Relation("DDIM", 1, a, c, schedule)


class MultistepSampler(Sampler):
    """A k-step linear multistep sampler. Subclasses define :meth:`relation` for m ≥ 2."""

    steps = 1

    def __init__(self, eps_fn, schedule, *, exact: str = "float", **kwargs) -> None:
        super().__init__(eps_fn, schedule, **kwargs)
        if exact not in ("float", "bitwise"):
            raise ValueError(f"exact must be 'float' (default) or 'bitwise' (2-step methods); got {exact!r}")
        N = self.schedule.num_steps
        if N < self.steps:
            raise ValueError(f"{self.name} is a {self.steps}-step method and needs num_steps >= {self.steps}; "
                             f"the schedule has {N}. Use more steps or DDIM")
        self.members = [ddim_relation(self.schedule)] + [self.relation(m) for m in range(2, self.steps + 1)]
        for m, member in enumerate(self.members[1:], start=2):
            if member.m != m or not member.bidirectional:
                raise ValueError(f"{self.name}: member {m} must be a bidirectional {m}-step relation")
        # Converted once per (method, schedule): the loops only read Python floats.
        self._coef = [member.in_x() for member in self.members]
        self.exact_mode = exact
        self._lattice = None
        if exact == "bitwise":
            from belm.solvers.bitwise import LatticeEngine
            self._lattice = LatticeEngine(self)

    def relation(self, m: int) -> Relation:
        """The m-step member (2 ≤ m ≤ k) of this method on ``self.schedule``."""
        raise NotImplementedError

    @property
    def exact(self) -> bool:
        """Whether invert/sample round trips are exact (up to rounding)."""
        return self.members[-1].bidirectional and self.steps > 1

    # -- the relation, solved either way ------------------------------------------------
    def produce(self, n: int, m: int, state: Callable[[int], torch.Tensor],
                eps: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """x_n from member m, given ``state(level)`` for levels n−m … n−1 and ``eps(level)``."""
        A, C = self._coef[m - 1]
        A_n, C_n = A[n], C[n]
        terms = [(A_n[j - 1], state(n - j)) for j in range(1, m)]
        terms += [(C_n[j - 1], eps(n - j)) for j in range(1, m + 1) if C_n[j - 1] != 0.0]
        return shear(A_n[m - 1], state(n - m), terms)

    def recover(self, L: int, m: int, state: Callable[[int], torch.Tensor],
                eps: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """x_L from member m producing level n = L + m: the same relation solved for its
        noisiest state, given ``state(level)`` for levels L+1 … n."""
        n = L + m
        A, C = self._coef[m - 1]
        A_n, C_n = A[n], C[n]
        terms = [(A_n[j - 1], state(n - j)) for j in range(1, m)]
        terms += [(C_n[j - 1], eps(n - j)) for j in range(1, m) if C_n[j - 1] != 0.0]
        if C_n[m - 1] != 0.0:
            # Not bidirectional (DDIM): ε is needed at the unknown x_L; use it at the
            # known end x_n instead. This is the approximation that makes DDIM inexact.
            terms.append((C_n[m - 1], eps(n)))
        return unshear(A_n[m - 1], state(n), terms)

    # -- sampling ----------------------------------------------------------------------
    def sample(self, x: torch.Tensor | Latent, *, from_level: int = 0,
               callback: Optional[Callback] = None) -> torch.Tensor:
        if self._lattice is not None:
            return self._lattice.sample(x, from_level=from_level, callback=callback)
        N, k = self.schedule.num_steps, self.steps
        window, chain_start, out_dtype, device = self._begin(x, from_level, lambda level: min(k, N - level + 1))
        states = dict(enumerate(window, start=chain_start))
        eps = _Cache(self._network(self.model_dtype or out_dtype), states)
        first = chain_start + len(window)
        for n in self._bar(range(first, N + 1), "sample", N + 1 - first):
            states[n] = self.produce(n, min(k, n - chain_start), states.__getitem__, eps)
            if callback is not None:
                callback({"level": n, "timestep": self.schedule.timestep(n), "x": states[n],
                          "eps": eps.get(n - 1), "direction": "sample"})
            # Later steps need states ≥ n − k + 2 … n and ε only at levels ≥ n − k + 2.
            _forget(states, below=n - k + 1)
            _forget(eps, below=n - k + 2)
        return states[N].to(device=device, dtype=out_dtype)

    # -- inversion ---------------------------------------------------------------------
    def invert(self, x0: torch.Tensor, *, to_level: int = 0, callback: Optional[Callback] = None) -> Latent:
        if self._lattice is not None:
            return self._lattice.invert(x0, to_level=to_level, callback=callback)
        check_tensor(x0, "x0")
        N, k = self.schedule.num_steps, self.steps
        to_level = self._level_arg(to_level, "to_level")
        states: dict[int, torch.Tensor] = {N: x0.to(self.state_dtype)}
        eps = _Cache(self._network(self.model_dtype or x0.dtype), states)
        for L in self._bar(range(N - 1, to_level - 1, -1), "invert", N - to_level):
            # The k − 1 states next to the clean level come from the start-up members.
            states[L] = self.recover(L, min(k, N - L), states.__getitem__, eps)
            if callback is not None:
                callback({"level": L, "timestep": self.schedule.timestep(L), "x": states[L],
                          "eps": eps.get(L + 1), "direction": "invert"})
            # Keep only what later steps (and the latent) need: levels L … L+k−1.
            _forget(states, above=L + k - 1)
            _forget(eps, above=L + k - 2)
        kept = [states[level] for level in range(to_level, min(to_level + k, N + 1))]
        return self._make_latent(kept, to_level, x0.dtype)


class _Cache(dict):
    """ε by level, evaluated on first use at the state of that level."""

    def __init__(self, network: Callable[[torch.Tensor, int], torch.Tensor], states: dict) -> None:
        super().__init__()
        self._network, self._states = network, states

    def __call__(self, level: int) -> torch.Tensor:
        value = self.get(level)
        if value is None:
            value = self[level] = self._network(self._states[level], level)
        return value


def _forget(table: dict, *, below: Optional[int] = None, above: Optional[int] = None) -> None:
    for level in [lv for lv in table if (below is not None and lv < below) or (above is not None and lv > above)]:
        del table[level]
