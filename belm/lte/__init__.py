"""Symbolic derivation and analysis of variable-step k-step BELM rules (sympy).

    >>> from belm.lte import derive_belm
    >>> rule = derive_belm(2)            # O-BELM: order 2, LTE O(h^3)
    >>> rule.a, rule.b, rule.order       # doctest: +SKIP

See :mod:`belm.lte.derive` for the conventions (indices, free parameters),
:mod:`belm.lte.stability` for zero-stability in both directions and
:mod:`belm.lte.scaled` for the step-ratio-scaled stable members.  A sampler takes
any rule through the small protocol :class:`RuleLike` (:mod:`belm.lte.protocols`).

Layering: this subpackage needs only sympy and numpy (no torch, no diffusers) and
imports nothing from belm outside ``belm.lte`` (tests/test_layers.py).  The search
and evaluation of rule families on samplers (research code) lives in
``benchmarks/rule_search.py``.
"""

from .derive import BELMRule, RationalLike, derive_belm, h_symbols, order_condition, unknown_symbols
from .named import NAMED_RULES, named_rule
from .protocols import RuleLike
from .scaled import ScaledBELMRule, scaled_rule
from .stability import (
    StabilityReport,
    analyse_constant_step,
    bidirectional_candidates,
    characteristic_polynomial,
    stability_report,
    zero_stability_scan,
)

__all__ = [
    "BELMRule",
    "NAMED_RULES",
    "RationalLike",
    "RuleLike",
    "ScaledBELMRule",
    "StabilityReport",
    "analyse_constant_step",
    "bidirectional_candidates",
    "characteristic_polynomial",
    "derive_belm",
    "h_symbols",
    "named_rule",
    "order_condition",
    "scaled_rule",
    "stability_report",
    "unknown_symbols",
    "zero_stability_scan",
]
