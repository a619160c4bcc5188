"""EDICT (Wallace et al. 2023): two coupled DDIM chains, x and y, mixed with weight p.

One step from level n−1 to n is four shears of the register pair (x, y), with the DDIM
coefficients a = scale_n/scale_{n−1} and b = C of DDIM's relation (in x coordinates)::

    x ← a·x + b·f(y)      y ← a·y + b·f(x)      x ← p·x + (1−p)·y      y ← p·y + (1−p)·x

Sampling applies them in order; inversion undoes them in reverse order. Two network calls
per step in both directions. The inverse divides by p twice per step, so rounding grows
like p^−2N.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

from belm.schedule import Schedule
from belm.solvers.base import Latent, Sampler
from belm.solvers.chain import Chain, Network, SingleLevelChain
from belm.solvers.relation import ddim_relation
from belm.solvers.reversible import ReversibleMixin

__all__ = ["EDICT", "EDICTChain", "Shear"]

X, Y = 0, 1


class Shear(NamedTuple):
    """register[target] ← keep·register[target] + mix·register[other] + f_coef·f(register[other])."""

    target: int
    keep: float
    mix: float
    f_coef: float

    @property
    def other(self) -> int:
        return 1 - self.target


class EDICTChain(SingleLevelChain):
    """The (x, y) register pair of EDICT at one level; steps are the four shears."""

    def __init__(self, shears: Sequence[Optional[tuple[Shear, ...]]], network: Network,
                 registers: list[torch.Tensor], level: int) -> None:
        self.shears, self.network, self.registers, self.level = shears, network, registers, level
        self.last_f = None

    def x(self, level: int) -> torch.Tensor:
        self._check_level(level)
        return self.registers[X]

    def window(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.registers)

    def _f_term(self, op: Shear, level: int) -> list[tuple[float, torch.Tensor]]:
        if op.f_coef == 0.0:
            return []
        self.last_f = self.network(self.registers[op.other], level)
        return [(op.f_coef, self.last_f)]

    def advance(self) -> None:
        n = self.level + 1
        regs = self.registers
        for op in self.shears[n]:
            terms = [(op.mix, regs[op.other])] + self._f_term(op, n - 1)
            out = regs[op.target].mul_(op.keep) if not torch.is_grad_enabled() else regs[op.target].mul(op.keep)
            for coef, term in terms:
                if coef != 0.0:
                    out.add_(term, alpha=coef)
            regs[op.target] = out
        self.level = n

    def retreat(self) -> None:
        n = self.level
        regs = self.registers
        for op in reversed(self.shears[n]):
            terms = [(op.mix, regs[op.other])] + self._f_term(op, n - 1)
            out = regs[op.target] if not torch.is_grad_enabled() else regs[op.target].clone()
            for coef, term in terms:
                if coef != 0.0:
                    out.sub_(term, alpha=coef)
            regs[op.target] = out.div_(op.keep)
        self.level = n - 1


class EDICT(ReversibleMixin, Sampler):
    """EDICT with mixing weight p ∈ (0, 1) (0.93 is the common default). The x branch is the output."""

    num_states = 2

    def __init__(self, eps_fn, schedule: Schedule, p: float = 0.93, **kwargs) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1 or not math.isfinite(p):
            raise ValueError(f"p must lie in (0, 1); got {p!r}. p = 0.93 is the usual choice")
        self.p = float(p)
        super().__init__(eps_fn, schedule, **kwargs)
        rows = ddim_relation(self.schedule).in_x()
        q = 1.0 - self.p
        self.shears: list[Optional[tuple[Shear, ...]]] = [None] + [
            (Shear(X, rows.A[n][0], 0.0, rows.C[n][0]), Shear(Y, rows.A[n][0], 0.0, rows.C[n][0]),
             Shear(X, self.p, q, 0.0), Shear(Y, self.p, q, 0.0))
            for n in range(1, self.schedule.num_steps + 1)]

    @property
    def name(self) -> str:
        return f"EDICT(p={self.p!r})"

    @property
    def invertible(self) -> bool:
        return True

    def _growth_hint(self) -> str:
        N = self.schedule.num_steps
        return (f"EDICT's inversion divides by p twice per step, so its state grows like p^-2N "
                f"(p = {self.p!r}, N = {N}: 10^{2 * N * math.log10(1 / self.p):.1f}; float64 round trips stay exact up to "
                f"N ≈ {int(math.log(1e7) / (-2 * math.log(self.p)))})")

    def chain_from_noise(self, x: torch.Tensor, level: int, network: Optional[Network] = None) -> Chain:
        network = network or self.network(self.model_dtype or x.dtype)
        return EDICTChain(self.shears, network, [self._owned(x), self._owned(x)], level)

    def chain_from_clean(self, x0: torch.Tensor, network: Optional[Network] = None) -> Chain:
        network = network or self.network(self.model_dtype or x0.dtype)
        return EDICTChain(self.shears, network, [self._owned(x0), self._owned(x0)], self.schedule.num_steps)

    def chain_from_latent(self, latent: Latent, network: Optional[Network] = None) -> Chain:
        network = network or self.network(self.model_dtype or latent.dtype)
        return EDICTChain(self.shears, network, [self._owned(s) for s in latent.states], latent.level)
