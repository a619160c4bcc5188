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

from typing import Optional

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

    # -- sampling ----------------------------------------------------------------------
    def sample(self, x: torch.Tensor | Latent, *, from_level: int = 0,
               callback: Optional[Callback] = None) -> torch.Tensor:
        if self._lattice is not None:
            return self._lattice.sample(x, from_level=from_level, callback=callback)
        N, k = self.schedule.num_steps, self.steps
        window, chain_start, out_dtype, device = self._begin(x, from_level, lambda level: min(k, N - level + 1))
        eps_of = self._network(self.model_dtype or out_dtype)
        first = chain_start + len(window)
        eps_cache: dict[int, torch.Tensor] = {}
        for n in self._bar(range(first, N + 1), "sample", N + 1 - first):
            m = min(k, n - chain_start)
            A, C = self._coef[m - 1]
            A_n, C_n = A[n], C[n]
            # window[-j] is x_{n−j}
            for j in range(1, m + 1):
                if C_n[j - 1] != 0.0 and (n - j) not in eps_cache:
                    eps_cache[n - j] = eps_of(window[-j], n - j)
            terms = [(A_n[j - 1], window[-j]) for j in range(1, m)]
            terms += [(C_n[j - 1], eps_cache[n - j]) for j in range(1, m + 1) if C_n[j - 1] != 0.0]
            x_n = shear(A_n[m - 1], window[-m], terms)
            window.append(x_n)
            del window[:-k]
            if callback is not None:
                callback({"level": n, "timestep": self.schedule.timestep(n), "x": x_n,
                          "eps": eps_cache.get(n - 1), "direction": "sample"})
            # Later steps need ε only at levels ≥ n − k + 2.
            for level in [lv for lv in eps_cache if lv < n - k + 2]:
                del eps_cache[level]
        return window[-1].to(device=device, dtype=out_dtype)

    # -- inversion ---------------------------------------------------------------------
    def invert(self, x0: torch.Tensor, *, to_level: int = 0, callback: Optional[Callback] = None) -> Latent:
        if self._lattice is not None:
            return self._lattice.invert(x0, to_level=to_level, callback=callback)
        check_tensor(x0, "x0")
        N, k = self.schedule.num_steps, self.steps
        to_level = self._level_arg(to_level, "to_level")
        eps_of = self._network(self.model_dtype or x0.dtype)
        states: dict[int, torch.Tensor] = {N: x0.to(self.state_dtype)}
        eps_cache: dict[int, torch.Tensor] = {}
        for L in self._bar(range(N - 1, to_level - 1, -1), "invert", N - to_level):
            m = min(k, N - L)
            n = L + m
            A, C = self._coef[m - 1]
            A_n, C_n = A[n], C[n]
            for j in range(1, m):
                if C_n[j - 1] != 0.0 and (n - j) not in eps_cache:
                    eps_cache[n - j] = eps_of(states[n - j], n - j)
            terms = [(A_n[j - 1], states[n - j]) for j in range(1, m)]
            terms += [(C_n[j - 1], eps_cache[n - j]) for j in range(1, m) if C_n[j - 1] != 0.0]
            if C_n[m - 1] != 0.0:
                # Not bidirectional (DDIM): ε is needed at the unknown x_L; use it at the
                # known end x_n instead. This is the approximation that makes DDIM inexact.
                if n not in eps_cache:
                    eps_cache[n] = eps_of(states[n], n)
                terms.append((C_n[m - 1], eps_cache[n]))
            states[L] = unshear(A_n[m - 1], states[n], terms)
            # Keep only what later steps (and the latent) need: levels L … L+k−1.
            for level in [lv for lv in states if lv >= L + k]:
                del states[level]
            if callback is not None:
                callback({"level": L, "timestep": self.schedule.timestep(L), "x": states[L],
                          "eps": eps_cache.get(L + 1, eps_cache.get(n)), "direction": "invert"})
            for level in [lv for lv in eps_cache if lv >= L + k - 1]:
                del eps_cache[level]
        kept = [states[level] for level in range(to_level, min(to_level + k, N + 1))]
        return self._make_latent(kept, to_level, x0.dtype)
