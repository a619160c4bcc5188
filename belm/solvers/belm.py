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


#: the largest k for which ``BELM(k=k)`` derives its maximal-order rule: the symbolic derivation
#: takes 0.1 s for k = 3, seconds for k = 4 and over 10 minutes for k = 5.
MAX_DERIVED_K = 4
#: from this k on the maximal-order rule is refused without deriving it (see :func:`_check_derivable`)
_REFUSED_UNDERIVED_K = 4


def _check_derivable(k: int, allow_unstable: bool) -> None:
    """Refuse up-front what derivation would only refuse after seconds to minutes.

    The maximal-order k-step BELM has order 2k − 2; it is explicit in the new point, and
    Dahlquist's first barrier bounds a zero-stable explicit k-step method to order ≤ k. So for
    every k ≥ 3 it is not zero-stable (k = 3 is still derived, in 0.1 s, to show its roots).
    """
    if k > MAX_DERIVED_K and allow_unstable:
        raise ValueError(f"k={k}: deriving the maximal-order {k}-step rule symbolically takes over 10 minutes "
                         f"(and it is not zero-stable); BELM derives k <= {MAX_DERIVED_K}. Pass a rule of your own "
                         "(rule=belm.lte.derive_belm(k, ...)) to build a larger one")
    if k >= _REFUSED_UNDERIVED_K and not allow_unstable:
        raise UnstableRuleError(
            f"k={k}: the maximal-order {k}-step BELM (order {2 * k - 2}) is not zero-stable in both directions: "
            f"a zero-stable explicit {k}-step method has order <= {k} (Dahlquist's first barrier), so it is refused "
            "before its derivation. Use k=2 (O-BELM) or a stable named rule (rule='leapfrog3'), or pass "
            "allow_unstable=True to build it anyway")


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
            _check_derivable(k, allow_unstable)
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
