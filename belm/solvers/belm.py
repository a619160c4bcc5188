"""BELM(k): a sampler from any rule derived by :mod:`belm.lte`.

The rule gives a_j(h), b_j(h) of the paper's relation
x̄_{i−1} = Σ_j a_j x̄_{i−1+j} + Σ_j b_j h_{i−1+j} ε(x̄_{i−1+j}) with h_1 the step next to
the new point. In level indexing, producing level n: h_j = H[n−j], x̄_{i−1+j} = x̄_{n−j},
so c_j = b_j · H[n−j]. Start-up: the first k − 1 steps of a chain use the lower members
(DDIM, then the maximal-order j-step BELM for j = 2 … k−1; j = 2 is O-BELM).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from belm.errors import UnstableRuleError
from belm.schedule import Schedule
from belm.solvers.multistep import MultistepSampler
from belm.solvers.relation import Relation, empty_tables

__all__ = ["BELM", "rule_relation"]


def rule_relation(rule: Any, schedule: Schedule, name: Optional[str] = None) -> Relation:
    """The :class:`Relation` of a derived rule (no free parameters) on ``schedule``."""
    k, N = rule.k, schedule.num_steps
    a, c = empty_tables(schedule, k)
    if N >= k:
        H = schedule.H.numpy()
        n = np.arange(k, N + 1)
        h = np.stack([H[n - j] for j in range(1, k + 1)], axis=1)         # (rows, k): h_j = H[n−j]
        a_num, b_num = rule.numeric()(h)
        a[k:] = torch.from_numpy(np.ascontiguousarray(a_num))
        c[k:, : k - 1] = torch.from_numpy(np.ascontiguousarray(b_num * h[:, : k - 1]))
        c[k:, k - 1] = 0.0
    return Relation(name or f"BELM[{rule.key}]", k, a, c, schedule)


def _outside_unit_disk(roots) -> list[complex]:
    return [r for r in roots if not np.isfinite(abs(r)) or abs(r) > 1 + 1e-9]


class BELM(MultistepSampler):
    """A k-step BELM sampler from a derived rule (default: maximal order for k).

    Args:
        eps_fn, schedule: as for every sampler.
        k: number of steps (used when ``rule`` is None: ``derive_belm(k)``).
        rule: a :class:`belm.lte.BELMRule` without free parameters, or the name of one in
            :data:`belm.lte.NAMED_RULES` (e.g. ``"leapfrog3"``).
        allow_unstable: build even if the rule is not zero-stable in both directions
            (its sampling or its inversion then amplifies errors geometrically).
    """

    def __init__(self, eps_fn, schedule: Schedule, k: int = 2, rule: Any = None, *,
                 allow_unstable: bool = False, **kwargs: Any) -> None:
        from belm.lte import derive_belm, named_rule
        if rule is None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 2:
                raise ValueError(f"k must be an integer >= 2 (k = 1 is DDIM); got {k!r}")
            rule = derive_belm(k)
        elif isinstance(rule, str):
            rule = named_rule(rule)
        if getattr(rule, "free", ()):
            raise ValueError(f"rule {rule.key} has free parameters {', '.join(map(str, rule.free))}; "
                             "fix them first with rule.fix(...)")
        if not rule.zero_stable and not allow_unstable:
            fwd = _outside_unit_disk(rule.roots("forward"))
            inv = _outside_unit_disk(rule.roots("inverse"))
            raise UnstableRuleError(
                f"rule {rule.key} is not zero-stable in both directions: roots outside the unit disk "
                f"(or repeated on it) for sampling {fwd or 'none'}, for inversion {inv or 'none'} "
                f"(forward roots {list(rule.roots('forward'))}). Pass allow_unstable=True to build it anyway")
        self.rule = rule
        self.num_states = rule.k
        super().__init__(eps_fn, schedule, **kwargs)

    @property
    def name(self) -> str:
        return f"BELM[{self.rule.key}]"

    def relation(self, m: int) -> Relation:
        from belm.lte import derive_belm
        if m == self.num_states:
            return rule_relation(self.rule, self.schedule, self.name)
        return rule_relation(derive_belm(m), self.schedule)
