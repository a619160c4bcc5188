"""DDIM, BDIA and O-BELM: each is its coefficient rule; the engine does the rest.

All rules are written in the schedule's ODE coordinates (y = x / scale, τ; for VP diffusion
y = x̄ = x/alpha, τ = σ̄ = sigma/alpha) and level indexing: the member producing level n from
levels n−2 (p), n−1 (t) reads

    y_n = a_1 · y_{n−1} + a_2 · y_{n−2} + c_1 · f(x_{n−1}),    H_t = H[n−1], H_p = H[n−2]

See docs/math.md for the formulas and their derivation.
"""

from __future__ import annotations

import math

import torch

from belm.schedule import Schedule
from belm.solvers.multistep import MultistepSampler
from belm.solvers.relation import Relation, empty_tables

__all__ = ["DDIM", "BDIA", "OBELM", "obelm_relation", "bdia_relation"]


def _two_step_tables(schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (N+1, 2) tables plus H_t, H_p for rows n = 2 … N."""
    N, H = schedule.num_steps, schedule.H
    a, c = empty_tables(schedule, 2)
    return a, c, H[1:N], H[0:N - 1]


def obelm_relation(schedule: Schedule) -> Relation:
    """O-BELM: a_1 = (H_p² − H_t²)/H_p², a_2 = H_t²/H_p², c_1 = −H_t (H_t + H_p)/H_p.

    The variable-step 2-step BELM of maximal order (LTE O((H_t + H_p)³)); the paper's
    a_{i,1}, a_{i,2}, b_{i,1} h_i with h_i = H_t, h_{i+1} = H_p.
    """
    a, c, Ht, Hp = _two_step_tables(schedule)
    a[2:, 0] = (Hp**2 - Ht**2) / Hp**2
    a[2:, 1] = Ht**2 / Hp**2
    c[2:, 0] = -Ht * (Ht + Hp) / Hp
    c[2:, 1] = 0.0
    return Relation("OBELM", 2, a, c, schedule)


def bdia_relation(schedule: Schedule, gamma: float) -> Relation:
    """BDIA(γ): x_{n} = γ·(x_{n−2} − D(x_{n−1}; n−1→n−2)) + D(x_{n−1}; n−1→n), in y form.

    With g = γ · scale_{n−2}/scale_n: a_2 = g, a_1 = 1 − g, c_1 = −H_t − g · H_p.
    """
    a, c, Ht, Hp = _two_step_tables(schedule)
    scale = schedule.scale
    g = gamma * scale[0:-2] / scale[2:]
    a[2:, 0] = 1.0 - g
    a[2:, 1] = g
    c[2:, 0] = -Ht - g * Hp
    c[2:, 1] = 0.0
    return Relation(f"BDIA(gamma={gamma!r})", 2, a, c, schedule)


class DDIM(MultistepSampler):
    """DDIM (Song et al. 2021): one network call per step; its inversion is *not* exact.

    Inversion evaluates ε at the cleaner point x_{n} instead of x_{n−1}; the round trip
    error is O(h) per step and is reported, never hidden.
    """

    num_states = 1


class OBELM(MultistepSampler):
    """O-BELM (Wang et al. 2024): the optimal 2-step BELM. Exact inversion, global order 2.

    ``exact="bitwise"`` selects the integer-lattice velocity form (see :mod:`belm.solvers.bitwise`).
    """

    num_states = 2

    def relation(self, m: int) -> Relation:
        return obelm_relation(self.schedule)


class BDIA(MultistepSampler):
    """BDIA (Zhang et al. 2024) with parameter γ ∈ (0, 1]: exact inversion, one call per step.

    Inversion divides by γ every step: float rounding grows like γ^−N (see the README).
    """

    num_states = 2

    def __init__(self, eps_fn, schedule: Schedule, gamma: float = 1.0, **kwargs) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1 \
                or not math.isfinite(gamma):
            raise ValueError(f"gamma must lie in (0, 1]; got {gamma!r}. gamma = 1 is the usual choice")
        self.gamma = float(gamma)
        super().__init__(eps_fn, schedule, **kwargs)

    @property
    def name(self) -> str:
        return f"BDIA(gamma={self.gamma!r})"

    def _growth_hint(self) -> str:
        if self.gamma == 1.0:
            return ""
        N = self.schedule.num_steps
        return (f"BDIA's inversion divides by gamma every step, so its state grows like gamma^-N "
                f"(gamma = {self.gamma!r}, N = {N}: 10^{N * math.log10(1 / self.gamma):.1f})")

    def relation(self, m: int) -> Relation:
        return bdia_relation(self.schedule, self.gamma)
