"""Coefficient rules as validated data.

A multistep method producing level n from the m previous levels is the linear relation
(in the schedule's ODE coordinates y = x / scale, τ, f = dy/dτ; for VP diffusion
y = x̄ = x / alpha, τ = σ̄ and f = ε)::

    y_n = Σ_{j=1..m} a[n, j−1] · y_{n−j}  +  Σ_{j=1..m} c[n, j−1] · f(x_{n−j})

:class:`Relation` holds a and c for every level of one schedule and checks on
construction that the rule is consistent (exact for y constant and for y = τ, the
order-1 conditions), like a Butcher tableau checks its row sums. It is *bidirectional
explicit* when c[:, m−1] = 0: f is never needed at either end point, so the same relation
can be solved for y_n (sampling) or for y_{n−m} (inversion) without approximation.

Samplers work in x (the network's coordinates) so that the network sees the state
itself, not a rescaled copy; :meth:`Relation.in_x` converts once per schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from belm.schedule import Schedule

__all__ = ["Relation", "RowsInX", "ddim_relation", "empty_tables"]

_CONSISTENCY_RTOL = 1e-9
# A residual within this fraction of the coefficients' magnitude is float64 cancellation, not a wrong
# formula: a correct rule on a grid with near-duplicate levels gives ~1e-16, a sign error ~0.4.
_ROUNDING_RESIDUAL = 1e-12


def empty_tables(schedule: Schedule, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-filled float64 (a, c) tables of shape (N + 1, m) for a rule to fill from row m on."""
    full = torch.full((schedule.num_steps + 1, m), float("nan"), dtype=torch.float64)
    return full, full.clone()


@dataclass(frozen=True)
class RowsInX:
    """One relation's rows in x coordinates, as Python floats (no tiny tensor ops in the loop).

    ``A[n][j−1]``, ``C[n][j−1]``: x_n = Σ_j A[n][j−1] · x_{n−j} + Σ_j C[n][j−1] · f(x_{n−j}).
    Rows n < m are empty lists.
    """

    m: int
    A: list[list[float]]
    C: list[list[float]]


@dataclass(frozen=True)
class Relation:
    """Coefficients of one m-step linear relation on one schedule (y coordinates).

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
        tau = self.schedule.tau
        n = torch.arange(self.m, N + 1)
        j = torch.arange(1, self.m + 1)
        past = tau[n[:, None] - j[None, :]]                     # τ_{n−j}, shape (rows, m)
        scale = past.abs().max(dim=1).values.clamp_min(1.0)
        # Exact for y = const (Σ a = 1) and for y = τ (f = 1): the order-1 conditions.
        const_err = (a.sum(dim=1) - 1.0).abs()
        linear_err = ((a * past).sum(dim=1) + c.sum(dim=1) - tau[n]).abs() / scale
        residual = torch.maximum(const_err, linear_err)
        worst = residual.max().item()
        if worst > _CONSISTENCY_RTOL:
            # A residual at the rounding level of the coefficients' own size is the grid's fault:
            # steps that differ by orders of magnitude (near-duplicate levels) make the
            # coefficients so large that float64 cancels them to noise.
            size = a.abs().sum(dim=1) + ((a * past).abs().sum(dim=1) + c.abs().sum(dim=1)) / scale
            row = int(residual.argmax())
            if residual[row] <= _ROUNDING_RESIDUAL * size[row]:
                raise ValueError(self._grid_message(int(n[row]), worst, float(size[row])))
            raise ValueError(f"{self.name}: coefficients are not consistent (order-1 residual {worst:.3g}); "
                             "check the rule's formulas")

    def _grid_message(self, n: int, residual: float, size: float) -> str:
        """Why this grid cannot carry the relation at row n: its steps and levels, by name."""
        s, m = self.schedule, self.m
        unit = "train timesteps" if s.kind == "discrete" else "sigmas"
        steps = [float(s.H[level]) for level in range(n - m, n)]
        ratio = max(steps) / min(steps)
        at = ", ".join(repr(s.timestep(level)) for level in range(n - m, n + 1))
        return (f"{self.name} cannot run on this grid (num_steps = {s.num_steps}): its steps into level {n} "
                f"(levels {n - m}…{n}, {unit} {at}; step sizes H = "
                f"{', '.join(f'{h:.3g}' for h in steps)}) differ by a factor {ratio:.3g}, so the relation's "
                f"coefficients (size {size:.3g}) cancel to rounding noise in float64 (order-1 residual "
                f"{residual:.3g}). Use a grid without (near-)duplicate levels: drop one of the close {unit}, "
                "or use fewer steps")

    @property
    def bidirectional(self) -> bool:
        """True when f is never evaluated at an end point, so inversion is exact."""
        return bool((self.c[self.m:, -1] == 0).all())

    def in_x(self) -> RowsInX:
        """The rows in x coordinates: A = a · scale_n / scale_{n−j}, C = c · scale_n."""
        scale = self.schedule.scale
        N = self.schedule.num_steps
        A: list[list[float]] = [[] for _ in range(N + 1)]
        C: list[list[float]] = [[] for _ in range(N + 1)]
        for n in range(self.m, N + 1):
            A[n] = [float(self.a[n, j - 1] * scale[n] / scale[n - j]) for j in range(1, self.m + 1)]
            C[n] = [float(self.c[n, j - 1] * scale[n]) for j in range(1, self.m + 1)]
        return RowsInX(self.m, A, C)


def ddim_relation(schedule: Schedule) -> Relation:
    """Member 1 of every method: y_n = y_{n−1} − H_{n−1} · f(x_{n−1}) (the Euler step in τ)."""
    a, c = empty_tables(schedule, 1)
    a[1:, 0] = 1.0
    c[1:, 0] = -schedule.H
    return Relation("DDIM", 1, a, c, schedule)
