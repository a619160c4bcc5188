r"""Zero-stability of BELM rules in both directions (constant steps).

For constant steps (all :math:`h_j = h`) the coefficients :math:`a_j` of a
BELM rule are numbers (they are homogeneous of degree 0 in the step sizes, so
``h_j = 1`` is no loss of generality).  Write the states as a sequence
``y_n`` in sampling order (``n`` grows towards the clean end, ``y_{n+k} =
x̄_{i-1}``, ``y_{n+k-j} = x̄_{i-1+j}``); sampling computes
``y_{n+k} = Σ_j a_j y_{n+k-j} + (ε terms)``, whose homogeneous part has
the characteristic polynomial

.. math::  \rho(\zeta) = \zeta^k - \sum_{j=1}^{k} a_j \zeta^{k-j}.

*Forward* (sampling) zero-stability is the root condition on :math:`\rho`: all
roots in the closed unit disk, those on the unit circle simple.

*Inverse* (inversion) runs the same relation backwards, solving for
``y_n`` (division by :math:`a_k`); its characteristic polynomial is the
reversed polynomial :math:`\zeta^k\rho(1/\zeta) = 1 - \sum_j a_j\zeta^j`,
whose roots are :math:`1/\zeta` for the roots :math:`\zeta` of :math:`\rho`.
A forward root at 0 (i.e. :math:`a_k = 0`) maps to infinity: such a rule
cannot be inverted at all.

Bidirectional zero-stability therefore requires **every root of ρ to be
simple and on the unit circle** (|ζ| ≤ 1 and |1/ζ| ≤ 1; a multiple root on the
circle violates the forward condition).  Because ρ has real coefficients its
roots are closed under conjugation, and for unimodular roots
:math:`\bar\zeta = 1/\zeta`; hence the root multiset is closed under
:math:`\zeta\mapsto 1/\zeta`, which forces

.. math::  \zeta^k\rho(1/\zeta) = c_k\,\rho(\zeta),\qquad c_k = -a_k = \pm 1,

i.e. with :math:`c = (1, -a_1, \dots, -a_k)`: :math:`c_i = c_k c_{k-i}` for
all ``i`` (ρ palindromic or anti-palindromic).  These are *necessary*
conditions, linear in the coefficients; :func:`bidirectional_candidates`
solves them for the free parameters of a family, so that the question "does
any member of this family work both ways?" reduces to checking finitely many
points or a lower-dimensional sub-family.

Root computations are done on the exact rational polynomial: multiplicities
come from an exact square-free factorisation, root locations from 50-digit
numerical roots of each square-free factor (a root counts as on the circle
when ``||ζ| - 1| < 1e-30``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import sympy as sp

from .protocols import ConstantStepRule

ZETA = sp.Symbol("zeta")

#: Numerical precision (digits) for the roots and tolerance for |ζ| = 1.
_DIGITS = 50
_CIRCLE_TOL = sp.Float("1e-30", _DIGITS)


def characteristic_polynomial(a: Sequence[Any], zeta: sp.Symbol = ZETA) -> sp.Expr:
    r"""Return :math:`\rho(\zeta) = \zeta^k - \sum_j a_j \zeta^{k-j}` for coefficients ``a``."""
    k = len(a)
    return zeta**k - sum(sp.sympify(a[j - 1]) * zeta ** (k - j) for j in range(1, k + 1))


@dataclass(frozen=True)
class StabilityReport:
    """Constant-step root analysis of one (fully fixed) BELM rule.

    ``forward_roots`` are the roots of ρ, repeated by multiplicity, sorted;
    ``inverse_roots`` are their reciprocals (``inf`` for a root at 0), in the
    same order.  ``violations`` lists human-readable reasons for instability.
    """

    a_constant: tuple[sp.Rational, ...]
    rho: sp.Expr
    forward_roots: tuple[complex, ...]
    multiplicities: tuple[int, ...]
    inverse_roots: tuple[complex, ...]
    forward_stable: bool
    inverse_stable: bool
    invertible: bool
    violations: tuple[str, ...]

    @property
    def zero_stable(self) -> bool:
        """Zero-stable for sampling *and* inversion."""
        return self.forward_stable and self.inverse_stable

    @property
    def forward_moduli(self) -> tuple[float, ...]:
        return tuple(abs(z) for z in self.forward_roots)

    @property
    def inverse_moduli(self) -> tuple[float, ...]:
        return tuple(abs(z) for z in self.inverse_roots)


def analyse_constant_step(a: Sequence[Any]) -> StabilityReport:
    """Root analysis for numeric (rational) constant-step coefficients ``a``.

    Raises ``ValueError`` if a coefficient is not a number (free parameter).
    """
    a_q = []
    for j, val in enumerate(a, start=1):
        v = sp.nsimplify(sp.sympify(val), rational=True)
        if not v.is_Rational:
            raise ValueError(
                f"a_{j} = {val} is not a rational number at constant steps; fix the free "
                "parameters first (rule.fix(...))"
            )
        a_q.append(v)
    rho = characteristic_polynomial(a_q)
    poly = sp.Poly(rho, ZETA, domain=sp.QQ)
    _, factors = poly.sqf_list()

    entries: list[tuple[sp.Expr, int]] = []  # (high-precision root, multiplicity)
    for fac, mult in factors:
        if fac.degree() == 1:
            # exact linear factor: no numerics needed
            c1, c0 = fac.all_coeffs()
            entries.append((sp.Rational(-c0, c1), mult))
            continue
        for r in fac.nroots(n=_DIGITS, maxsteps=500):
            entries.append((r, mult))

    fwd_ok, inv_ok, violations = True, True, []
    roots, mults, inv_roots = [], [], []
    for r, mult in entries:
        z = complex(sp.N(r, 17))
        mod = sp.Abs(sp.N(r, _DIGITS))
        if r == 0:
            inv = complex(float("inf"), 0.0)
            inv_ok = False
            violations.append("root 0 (a_k = 0): not invertible, inverse has a root at infinity")
        else:
            inv = complex(sp.N(1 / r, 17))
        on_circle = abs(mod - 1) < _CIRCLE_TOL
        if on_circle:
            if mult > 1:
                fwd_ok = inv_ok = False
                violations.append(f"root {z:.6g} on the unit circle has multiplicity {mult}")
        elif mod > 1:
            fwd_ok = False
            violations.append(f"forward root {z:.6g} has |zeta| = {float(mod):.6g} > 1")
        elif r != 0:
            # |ζ| < 1 forward  <=>  |1/ζ| > 1 for the inverse recursion
            inv_ok = False
            violations.append(f"inverse root {inv:.6g} has |1/zeta| = {float(1 / mod):.6g} > 1")
        roots.extend([z] * mult)
        mults.extend([mult] * mult)
        inv_roots.extend([inv] * mult)

    order = sorted(range(len(roots)), key=lambda i: (round(roots[i].real, 12), round(roots[i].imag, 12)))
    return StabilityReport(
        a_constant=tuple(a_q),
        rho=sp.expand(rho),
        forward_roots=tuple(roots[i] for i in order),
        multiplicities=tuple(mults[i] for i in order),
        inverse_roots=tuple(inv_roots[i] for i in order),
        forward_stable=fwd_ok,
        inverse_stable=inv_ok,
        invertible=a_q[-1] != 0,
        violations=tuple(dict.fromkeys(violations)),
    )


def stability_report(rule: ConstantStepRule) -> StabilityReport:
    """Constant-step stability report of a rule without free parameters."""
    if rule.free:
        raise ValueError(
            f"{rule.key} has free parameters {', '.join(map(str, rule.free))}: fix them "
            "(rule.fix(name=value)) before asking for its roots, or use "
            "bidirectional_candidates / zero_stability_scan for the whole family"
        )
    return analyse_constant_step(rule.constant_step_a())


def bidirectional_candidates(rule: ConstantStepRule) -> list[dict[sp.Symbol, sp.Expr]]:
    """Free-parameter values satisfying the *necessary* condition for
    bidirectional zero-stability (ρ palindromic with a_k = -1, or
    anti-palindromic with a_k = +1; see the module docstring).

    Returns a list of solution dicts ``{free symbol: value}``; a free symbol
    missing from a dict stays free on that branch (a sub-family).  An empty
    list proves that no member of the family is zero-stable in both
    directions.  Members of the returned sets must still be checked (roots
    simple and on the circle), e.g. with ``rule.fix(...).zero_stable``.
    """
    a = rule.constant_step_a()
    k = rule.k
    c = [sp.Integer(1)] + [-x for x in a]
    out: list[dict[sp.Symbol, sp.Expr]] = []
    for sign in (1, -1):  # c_k = -a_k = sign
        eqs = [sp.expand(c[k] - sign)] + [sp.expand(c[i] - sign * c[k - i]) for i in range(k + 1)]
        eqs = [e for e in eqs if e != 0]
        if not rule.free:
            if not eqs:
                out.append({})
            continue
        sols = sp.solve(eqs, list(rule.free), dict=True) if eqs else [{}]
        for s in sols:
            if s not in out:
                out.append(s)
    return out


def zero_stability_scan(
    rule: ConstantStepRule, tol: float = 1e-9, sep: float = 1e-6, **params: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised *numerical* root test over a grid of free-parameter values.

    ``params`` maps every free parameter name to an array (broadcast
    together).  Returns boolean arrays ``(forward_ok, inverse_ok)``.  A root
    counts as on the circle when ``||ζ|-1| <= tol`` and as multiple when two
    such roots are closer than ``sep`` (numerically split double roots are
    ~sqrt(eps) ≈ 1e-8 apart).  Meant for exploration/plots; the exact
    verdict for one member is ``rule.fix(...).zero_stable``.
    """
    names = [str(f) for f in rule.free]
    missing = set(names) - set(params)
    extra = set(params) - set(names)
    if missing or extra:
        raise ValueError(f"zero_stability_scan needs exactly the free parameters {names}; "
                         f"missing {sorted(missing)}, unexpected {sorted(extra)}")
    arrays = np.broadcast_arrays(*[np.asarray(params[n], dtype=np.float64) for n in names]) if names else []
    shape = arrays[0].shape if arrays else ()
    a_funcs = [sp.lambdify(list(rule.free), x, "numpy") for x in rule.constant_step_a()]
    cols = [np.broadcast_to(np.asarray(f(*arrays), dtype=np.float64), shape) for f in a_funcs]
    fwd = np.zeros(shape, dtype=bool)
    inv = np.zeros(shape, dtype=bool)
    for idx in np.ndindex(*shape):
        coeffs = np.array([1.0] + [-c[idx] for c in cols])
        z = np.roots(coeffs)
        # np.roots drops trailing zeros -> a_k == 0 means roots at 0
        n_zero = len(coeffs) - 1 - len(z)
        mod = np.abs(z)
        on = np.abs(mod - 1) <= tol
        zc = z[on]
        simple = all(abs(zc[i] - zc[j]) > sep for i in range(len(zc)) for j in range(i))
        fwd[idx] = bool(np.all(mod <= 1 + tol)) and simple
        inv[idx] = n_zero == 0 and bool(np.all(mod >= 1 - tol)) and simple
    return fwd, inv
