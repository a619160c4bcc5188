"""Coefficient rules as validated data, and the shear: the one primitive of every sampler.

A multistep method producing level n from the m previous levels is the linear relation
(in rescaled coordinates x̄ = x / alpha, ε = dx̄/dσ̄)::

    x̄_n = Σ_{j=1..m} a[n, j−1] · x̄_{n−j}  +  Σ_{j=1..m} c[n, j−1] · ε(x_{n−j})

:class:`Relation` holds a and c for every level of one schedule and checks on
construction that the rule is consistent (exact for x̄ constant and for x̄ = σ̄, the
order-1 conditions), like a Butcher tableau checks its row sums. It is *bidirectional
explicit* when c[:, m−1] = 0: ε is never needed at either end point, so the same relation
can be solved for x̄_n (sampling) or for x̄_{n−m} (inversion) without approximation.

Samplers work in x (the network's coordinates) so that the network sees the state
itself, not a rescaled copy; :meth:`Relation.in_x` converts once per schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from belm.schedule import Schedule

__all__ = ["Relation", "shear", "unshear"]

_CONSISTENCY_RTOL = 1e-9


@dataclass(frozen=True)
class Relation:
    """Coefficients of one m-step linear relation on one schedule (x̄ coordinates).

    Attributes:
        name: method identity, e.g. ``"OBELM"`` or ``"BDIA(gamma=0.5)"``.
        m: number of previous states the relation uses.
        a, c: float64 tensors of shape (N + 1, m). Row n produces level n; rows n < m are
            unused and hold NaN.
        schedule: the schedule the coefficients belong to.
    """

    name: str
    m: int
    a: torch.Tensor
    c: torch.Tensor
    schedule: Schedule

    def __post_init__(self) -> None:
        N = self.schedule.num_steps
        if self.a.shape != (N + 1, self.m) or self.c.shape != (N + 1, self.m):
            raise ValueError(f"{self.name}: coefficient tables must have shape {(N + 1, self.m)}; "
                             f"got a {tuple(self.a.shape)}, c {tuple(self.c.shape)}")
        rows = slice(self.m, N + 1)
        a, c = self.a[rows], self.c[rows]
        if a.numel() == 0:
            return
        if not (torch.isfinite(a).all() and torch.isfinite(c).all()):
            raise ValueError(f"{self.name}: non-finite coefficients (are two grid levels equal?)")
        if (a[:, -1] == 0).any():
            raise ValueError(f"{self.name}: a[:, m-1] = 0 somewhere: the relation cannot be inverted")
        sb = self.schedule.sigma_bar
        n = torch.arange(self.m, N + 1)
        j = torch.arange(1, self.m + 1)
        past = sb[n[:, None] - j[None, :]]                      # σ̄_{n−j}, shape (rows, m)
        scale = past.abs().max(dim=1).values.clamp_min(1.0)
        # Exact for x̄ = const (Σ a = 1) and for x̄ = σ̄ (ε = 1): the order-1 conditions.
        const_err = (a.sum(dim=1) - 1.0).abs()
        linear_err = ((a * past).sum(dim=1) + c.sum(dim=1) - sb[n]).abs() / scale
        worst = torch.maximum(const_err, linear_err).max().item()
        if worst > _CONSISTENCY_RTOL:
            raise ValueError(f"{self.name}: coefficients are not consistent (order-1 residual {worst:.3g}); "
                             "check the rule's formulas")

    @property
    def bidirectional(self) -> bool:
        """True when ε is never evaluated at an end point, so inversion is exact."""
        return bool((self.c[self.m:, -1] == 0).all())

    def in_x(self) -> tuple[list[list[float]], list[list[float]]]:
        """Coefficients in x coordinates as Python floats, indexed [n][j−1].

        x_n = Σ_j A[n][j−1] · x_{n−j} + Σ_j C[n][j−1] · ε_{n−j}, with
        A = a · alpha_n / alpha_{n−j} and C = c · alpha_n. Plain floats keep the sampling
        loop free of tiny tensor ops.
        """
        alpha = self.schedule.alpha
        N = self.schedule.num_steps
        A: list[list[float]] = [[] for _ in range(N + 1)]
        C: list[list[float]] = [[] for _ in range(N + 1)]
        for n in range(self.m, N + 1):
            A[n] = [float(self.a[n, j - 1] * alpha[n] / alpha[n - j]) for j in range(1, self.m + 1)]
            C[n] = [float(self.c[n, j - 1] * alpha[n]) for j in range(1, self.m + 1)]
        return A, C


def _rows(schedule: Schedule, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (NaN) a, c tables of shape (N + 1, m)."""
    N = schedule.num_steps
    full = torch.full((N + 1, m), float("nan"), dtype=torch.float64)
    return full.clone(), full.clone()


def shear(keep: float, target: torch.Tensor, terms: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """keep · target + Σ coef · tensor (a new tensor)."""
    out = target.mul(keep)
    for coef, tensor in terms:
        if coef != 0.0:
            out.add_(tensor, alpha=coef)
    return out


def unshear(keep: float, result: torch.Tensor, terms: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """The inverse of :func:`shear` for the same terms: (result − Σ coef · tensor) / keep."""
    out = result.clone()
    for coef, tensor in terms:
        if coef != 0.0:
            out.sub_(tensor, alpha=coef)
    return out.div_(keep)
