"""Symbolic derivation and analysis of variable-step k-step BELM rules (sympy).

    >>> from belm.lte import derive_belm
    >>> rule = derive_belm(2)            # O-BELM: order 2, LTE O(h^3)
    >>> rule.a, rule.b, rule.order       # doctest: +SKIP

See :mod:`belm.lte.derive` for the conventions (indices, free parameters) and
:mod:`belm.lte.stability` for zero-stability in both directions.  This
subpackage needs only sympy and numpy (no torch, no diffusers).
"""

from .derive import BELMRule, RationalLike, derive_belm, h_symbols, order_condition, unknown_symbols
from .named import NAMED_RULES, named_rule
from .search import ScaledBELMRule, scaled_rule
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
