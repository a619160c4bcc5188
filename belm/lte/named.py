"""Named BELM rules for later use (sampler configs, latent tags).

* ``"o-belm"``: ``derive_belm(2)``, the 2-step rule of maximal order 2
  (LTE O(h³)); constant steps: leapfrog, ρ(ζ) = ζ² − 1.
* ``"leapfrog3"``: ``derive_belm(3, order=2, a_3=1, a_2=0)``, a 3-step rule of
  order 2 (LTE O(h³)) that is zero-stable in both directions: constant-step
  ρ(ζ) = ζ³ − 1 (the three cube roots of unity, simple and as far apart as
  possible), i.e. ``x̄_{n+3} = x̄_n − (3/2)h(ε_{n+1} + ε_{n+2})``.  It lies in
  the bidirectionally stable set of the order-2 3-step family,
  ``{a_3 = 1, −3 < a_2 < 1}`` (see ``belm.lte.stability``), and
  since ``a_3 = 1`` inversion divides by exactly 1.  Its constant ``a_j`` keep full
  weight on the oldest state, so on real VP grids, whose neighbouring σ̄-steps differ
  by large factors, its error can exceed O-BELM's by orders of magnitude.
* ``"leapfrog3-scaled"``: the same constant-step method with step-ratio-scaled
  coefficients (:func:`belm.lte.scaled.scaled_rule` ``(3, c=1, q=2)``):
  ``a_3 = (h_1/h_3)², a_2 = (h_1/h_2)² − (h_1/h_3)²``, ``a_1`` = O-BELM's.  Order 2,
  zero-stable both ways on every grid (the differences obey a constant-coefficient
  recurrence), so it never blows up where leapfrog3 does.

Measured errors of both against O-BELM on real VP grids (and the grids' step ratios):
``python -m benchmarks.lte_timing``, figures in benchmarks/RESULTS.md, section
"Symbolic engine (belm.lte)"; the full family search: notebooks/lte_order.ipynb.

A 3-step rule of order ≥ 3 that is zero-stable both ways does not exist
(constant steps: order 4 has ρ = (ζ−1)(ζ²+10ζ+1); the order-3 family has
ρ = (ζ−1)(ζ² + 5(a_3+1)ζ + a_3), which is not zero-stable in *either*
direction for any a_3 -- both root conditions force a_3 = −1, where
ρ = (ζ−1)²(ζ+1) has a double root on the circle).
"""

from __future__ import annotations

from typing import Any

from .derive import BELMRule, derive_belm
from .scaled import scaled_rule

NAMED_RULES: dict[str, dict[str, Any]] = {
    "o-belm": {"k": 2},
    "leapfrog3": {"k": 3, "order": 2, "a_3": 1, "a_2": 0},
    # "scaled": step-ratio-scaled member (belm.lte.scaled), not a derive_belm spec
    "leapfrog3-scaled": {"k": 3, "scaled": {"c": 1, "q": 2}},
}


def named_rule(name: str) -> BELMRule:
    """Return the rule registered under ``name`` (see :data:`NAMED_RULES`)."""
    try:
        spec = dict(NAMED_RULES[name])
    except KeyError:
        raise ValueError(f"unknown named rule {name!r}; known: {', '.join(NAMED_RULES)}") from None
    if "scaled" in spec:
        return scaled_rule(spec["k"], **spec["scaled"])
    return derive_belm(spec.pop("k"), spec.pop("order", None), **spec)
