r"""Step-ratio-scaled members of the bidirectionally zero-stable 2- and 3-step BELM families.

Which members exist (:mod:`belm.lte.stability`): a rule is zero-stable for sampling
*and* inversion only if every constant-step root of ρ is simple and unimodular.

* ``k = 2``: order 2 is O-BELM.  The order-1 family has one free parameter ``a_2``;
  with a constant value, bidirectional stability forces ``a_2 = 1`` (ρ = ζ² − 1;
  ``a_2 = −1`` gives the double root (ζ − 1)²).
* ``k = 3``: order ≥ 3 has no stable member.  Order 2 has two free parameters; the
  stable members are ``a_3 = 1, a_2 = c − 1`` with ``−2 < c < 2``:
  ρ(ζ) = (ζ − 1)(ζ² + cζ + 1).  ``c = 1`` is ``"leapfrog3"``.

With *constant* ``a_j`` these members keep the full weight ``a_3 = 1`` on the oldest
(noisiest, largest-step) state, so their LTE grows like ``h_3³`` and their ``b_j`` like
``h_3²/(h_1 h_2)``: on VP grids, whose steps in σ̄ shrink by large factors from one
step to the next, they lose badly (see notebooks/lte_order.ipynb).

**Step-ratio-scaled members.**  Writing ``D_n = x̄_n − x̄_{n−1}``, the homogeneous part of
any consistent 3-step relation is ``D_n = −(a_2 + a_3) D_{n−1} − a_3 D_{n−2}`` (2-step:
``D_n = −a_2 D_{n−1}``).  With ``w_n = h_1^q`` (``h_1`` = the step that produces level n)
and ``D_n = w_n V_n``, the choice

.. math::  a_3 = (h_1/h_3)^q,\qquad a_2 + a_3 = c\,(h_1/h_2)^q \qquad (k = 3),
           \qquad a_2 = (h_1/h_2)^q \quad (k = 2)

makes ``V_n = −c V_{n−1} − V_{n−2}`` (resp. ``V_n = −V_{n−1}``) a *constant-coefficient*
recurrence on every grid: zero-stability in both directions holds on variable steps by
construction, with the rounding amplification of inversion bounded by the step-size
ratio ``(h_max/h_min)^q`` (independent of N), as for O-BELM.  The free parameters of the
order-2 (k = 3) / order-1 (k = 2) family are substituted (:func:`scaled_parameters`), so
every scaled 3-step member keeps order 2; ``q = 0`` gives back the constant members and
``(k, q) = (2, 2)`` is O-BELM itself (order 2).

This module is what the library needs of the family (the named rule
``"leapfrog3-scaled"``); the search over ``(c, q)`` and its measurements live in
``benchmarks/rule_search.py``, outside the package.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import sympy as sp

from .derive import BELMRule, _to_rational, derive_belm, order_condition

__all__ = ["ScaledBELMRule", "scaled_rule", "scaled_family", "scaled_parameters"]


@dataclass(frozen=True, eq=True)
class ScaledBELMRule(BELMRule):
    """A :class:`BELMRule` whose free parameters are step-ratio expressions (see module doc).

    ``c`` and ``q`` are the family parameters; :attr:`key` names them, e.g.
    ``"belm(k=3,order=2,scaled,c=1,q=2)"``.  It has no free parameters, so it can be
    used by :class:`belm.BELM` like any derived rule (it satisfies
    :class:`~belm.lte.protocols.RuleLike`).
    """

    c: sp.Rational = sp.Integer(1)
    q: sp.Rational = sp.Integer(2)

    @property
    def key(self) -> str:
        return f"belm(k={self.k},order={self.requested_order},scaled,c={self.c},q={self.q})"

    @property
    def name(self) -> str:
        return self.key

    def __str__(self) -> str:
        return self.key


def _check_params(k: int, c: sp.Rational, q: sp.Rational) -> None:
    if k not in (2, 3):
        raise ValueError(f"scaled members exist for k = 2 and k = 3; got k={k!r}")
    if q < 0:
        raise ValueError(f"q must be >= 0 (q = 0: constant coefficients); got q={q}")
    if k == 2 and c != 1:
        raise ValueError(f"k=2: bidirectional zero-stability forces c = a_2(constant steps) = 1; got c={c}")


def scaled_family(k: int) -> BELMRule:
    """The parametric family the scaled members are taken from: ``k = 2``: order 1
    (free ``a_2``); ``k = 3``: order 2 (free ``a_2, a_3``)."""
    if k not in (2, 3):
        raise ValueError(f"scaled members exist for k = 2 and k = 3; got k={k!r}")
    return derive_belm(2, order=1) if k == 2 else derive_belm(3, order=2)


def scaled_parameters(k: int, h: Sequence[Any], c: Any, q: Any) -> list[Any]:
    """Values of the free parameters of :func:`scaled_family` ``(k)``, in its ``free``
    order (``k = 2``: ``[a_2]``; ``k = 3``: ``[a_2, a_3]``), for step sizes ``h``.

    ``h = (h_1, ..., h_k)``: sympy symbols (exact rule) or float64 arrays of shape
    ``(M,)`` each (one value per row); ``c``, ``q`` numbers of the matching kind.
    """
    if k == 2:
        return [(h[0] / h[1]) ** q]
    r3 = (h[0] / h[2]) ** q
    return [c * (h[0] / h[1]) ** q - r3, r3]


def _vanishes(expr: sp.Expr, h: Sequence[sp.Symbol]) -> bool:
    """Whether ``expr`` (rational in h, possibly with rational powers) is identically 0."""
    if sp.cancel(sp.together(expr)) == 0:
        return True
    for pt in [(3, 5, 11), (7, 2, 13), (17, 19, 5)]:
        val = sp.N(expr.subs(dict(zip(h, [sp.Rational(v, 7) for v in pt]))), 60)
        if abs(val) > sp.Float("1e-45", 60):
            return False
    return True


def scaled_rule(k: int, c: Any = 1, q: Any = 2) -> BELMRule:
    """The step-ratio-scaled stable member ``(k, c, q)`` (module docstring).

    ``q = 0`` returns the constant-coefficient member from :func:`derive_belm`
    (``k=2``: ``a_2 = 1``; ``k=3``: ``a_3 = 1, a_2 = c − 1``), ``(2, 1, 2)`` returns
    ``derive_belm(2)`` (O-BELM); otherwise a :class:`ScaledBELMRule`.  ``c`` and ``q``
    are rationals (ints, floats via their repr, ``"3/2"``); a ``c`` outside the stable
    range (−2, 2) is accepted (the rule then reports ``zero_stable == False``), a k=2
    member needs ``c = 1``.
    """
    c_, q_ = _to_rational("c", c), _to_rational("q", q)
    _check_params(int(k), c_, q_)
    return _scaled_cached(int(k), c_, q_)


@functools.lru_cache(maxsize=256)
def _scaled_cached(k: int, c: sp.Rational, q: sp.Rational) -> BELMRule:
    if q == 0:
        return derive_belm(2, order=1, a_2=1) if k == 2 else derive_belm(3, order=2, a_3=1, a_2=c - 1)
    if k == 2 and q == 2:
        return derive_belm(2)
    fam = scaled_family(k)
    h = fam.h
    sub = dict(zip(fam.free, scaled_parameters(k, h, c, q)))
    a = tuple(sp.factor(sp.cancel(x.subs(sub))) for x in fam.a)
    b = tuple(sp.factor(sp.cancel(x.subs(sub))) for x in fam.b)
    p = fam.order
    while p < 2 * k - 2 and _vanishes(order_condition(p + 1, a, b, h), h):
        p += 1
    lte = sp.factor(sp.cancel(order_condition(p + 1, a, b, h)))
    return ScaledBELMRule(k=k, requested_order=fam.order, order=p, h=h, a=a, b=b, free=(),
                          fixed=(), lte_coefficient=lte, c=c, q=q)
