"""EDICT (Wallace et al. 2023): two coupled DDIM chains, x and y, mixed with weight p.

One step from level n−1 to n is four shears of the register pair (x, y), with the DDIM
coefficients a = alpha_n/alpha_{n−1} and b = sigma_n − sigma_{n−1}·a::

    x ← a·x + b·ε(y)      y ← a·y + b·ε(x)      x ← p·x + (1−p)·y      y ← p·y + (1−p)·x

Sampling applies them in order; inversion undoes them in reverse order with
:func:`~belm.solvers.relation.unshear`. Two network calls per step in both directions.
The inverse divides by p twice per step, so rounding grows like p^−2N.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from belm.schedule import Schedule
from belm.solvers.base import Callback, Latent, Sampler, check_tensor
from belm.solvers.multistep import ddim_relation
from belm.solvers.relation import shear, unshear

__all__ = ["EDICT"]

X, Y = 0, 1


class Shear(NamedTuple):
    """register[target] ← keep·register[target] + mix·register[other] + eps_coef·ε(register[other])."""

    target: int
    keep: float
    mix: float
    eps_coef: float

    @property
    def other(self) -> int:
        return 1 - self.target


class EDICT(Sampler):
    """EDICT with mixing weight p ∈ (0, 1) (0.93 is the common default). The x branch is the output."""

    steps = 2

    def __init__(self, eps_fn, schedule: Schedule, p: float = 0.93, **kwargs) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1 or not math.isfinite(p):
            raise ValueError(f"p must lie in (0, 1); got {p!r}. p = 0.93 is the usual choice")
        self.p = float(p)
        super().__init__(eps_fn, schedule, **kwargs)
        A, C = ddim_relation(self.schedule).in_x()
        q = 1.0 - self.p
        self._shears = [None] + [
            (Shear(X, A[n][0], 0.0, C[n][0]), Shear(Y, A[n][0], 0.0, C[n][0]),
             Shear(X, self.p, q, 0.0), Shear(Y, self.p, q, 0.0))
            for n in range(1, self.schedule.num_steps + 1)]

    @property
    def name(self) -> str:
        return f"EDICT(p={self.p:g})"

    exact = True

    def _terms(self, op: Shear, registers: list, eps_of, level: int) -> list:
        terms = [(op.mix, registers[op.other])]
        if op.eps_coef != 0.0:
            terms.append((op.eps_coef, eps_of(registers[op.other], level)))
        return terms

    def sample(self, x: torch.Tensor | Latent, *, from_level: int = 0,
               callback: Optional[Callback] = None) -> torch.Tensor:
        N = self.schedule.num_steps
        # A latent holds the (x, y) pair; a noisy tensor starts both branches.
        registers, start, out_dtype, device = self._begin(x, from_level, lambda level: 2)
        if len(registers) == 1:
            registers = registers * 2
        eps_of = self._network(self.model_dtype or out_dtype)
        for n in self._bar(range(start + 1, N + 1), "sample", N - start):
            for op in self._shears[n]:
                registers[op.target] = shear(op.keep, registers[op.target],
                                             self._terms(op, registers, eps_of, n - 1))
            if callback is not None:
                callback({"level": n, "timestep": self.schedule.timestep(n), "x": registers[X],
                          "eps": None, "direction": "sample"})
        return registers[X].to(device=device, dtype=out_dtype)

    def invert(self, x0: torch.Tensor, *, to_level: int = 0, callback: Optional[Callback] = None) -> Latent:
        check_tensor(x0, "x0")
        N = self.schedule.num_steps
        to_level = self._level_arg(to_level, "to_level")
        eps_of = self._network(self.model_dtype or x0.dtype)
        registers = [x0.to(self.state_dtype)] * 2
        for n in self._bar(range(N, to_level, -1), "invert", N - to_level):
            for op in reversed(self._shears[n]):
                registers[op.target] = unshear(op.keep, registers[op.target],
                                               self._terms(op, registers, eps_of, n - 1))
            if callback is not None:
                callback({"level": n - 1, "timestep": self.schedule.timestep(n - 1), "x": registers[X],
                          "eps": None, "direction": "invert"})
        return self._make_latent(registers, to_level, x0.dtype)
