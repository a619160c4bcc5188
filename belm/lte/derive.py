r"""Symbolic derivation of variable-step k-step BELM rules.

The relation (paper indexing, ``i`` counted from the clean end,
:math:`h_i = \bar\sigma_i - \bar\sigma_{i-1} > 0`)

.. math::

    \bar x_{i-1} = \sum_{j=1}^{k} a_j\,\bar x_{i-1+j}
                 + \sum_{j=1}^{k-1} b_j\,h_{i-1+j}\,\varepsilon(\bar x_{i-1+j}),
    \qquad \varepsilon = d\bar x / d\bar\sigma .

Symbols: ``h_1 .. h_k`` stand for :math:`h_i, h_{i+1}, \dots, h_{i+k-1}`
(``h_1`` is the step next to the new point :math:`\bar x_{i-1}`).  Relative to
the new point the grid is :math:`s_j = \bar\sigma_{i-1+j} - \bar\sigma_{i-1} =
h_1 + \dots + h_j`.

Local truncation error, Taylor-expanded about the new point:

.. math::

    \tau = \bar x(0) - \sum_j a_j \bar x(s_j) - \sum_j b_j h_j \bar x'(s_j)
         = \sum_{m\ge 0} T_m\,\bar x^{(m)}(0),\qquad
    m!\,T_m = \delta_{m0} - \sum_j a_j s_j^m - m\sum_j b_j h_j s_j^{m-1}.

Order ``p`` means :math:`T_0 = \dots = T_p = 0` (linear in the unknowns
``a_1..a_k, b_1..b_{k-1}``), so :math:`\tau = T_{p+1}\bar x^{(p+1)} +
O(h^{p+2})`; :math:`T_{p+1}` is homogeneous of degree ``p+1`` in the ``h`` and
does not depend on the expansion point once the lower conditions hold (the
rule is exact for polynomials of degree ≤ p, a translation-invariant space).
With ``2k-1`` unknowns the maximal order is ``2k-2`` (O-BELM: ``k=2``, order 2,
LTE O(h³)).  ``k = 1`` is rejected: the relation :math:`\bar x_{i-1} =
a_1\bar x_i` has no ε term and cannot even be consistent (order ≥ 1).

Free parameters.  With ``order < 2k-2`` (or after fixing some unknowns) the
linear system has ``n_free = #unknowns - rank`` free unknowns.  Convention: the
*determined* unknowns are picked greedily in the order
``a_1, b_1, ..., b_{k-1}, a_2, ..., a_k`` (pivot columns), so the free ones are
preferably the ``a_j`` with the largest ``j`` (``a_k`` first, then ``a_{k-1}``,
...), then ``b_{k-1}, ..., b_1``.  Every coefficient is affine in the free
parameters (they enter the right-hand side of a linear system), and is
printed as ``factor(c_0(h)) + Σ factor(c_f(h))·f``.

Implementation notes: the rank/pivot decisions are taken at a fixed generic
rational point of the ``h`` (exact arithmetic); the chosen square system is
then solved exactly over the fraction field ``QQ(h_1..h_k)`` with
``DomainMatrix`` (much faster than ``linsolve``), and rows left out are
checked to vanish identically (all further arithmetic also stays in that
field, where zero tests are exact).

Derived rules are cached in memory only (:func:`functools.lru_cache`, per
process); nothing is written to or read back from disk, so no file can inject
code into a derivation.  Cold derivation times: ``python -m benchmarks.lte_timing``
(figures in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Mapping, Union

import numpy as np
import sympy as sp
from sympy.polys.matrices import DomainMatrix

from .stability import StabilityReport, stability_report

RationalLike = Union[int, float, Fraction, str, sp.Rational]

__all__ = ["BELMRule", "derive_belm", "h_symbols", "unknown_symbols", "order_condition", "RationalLike"]


# --------------------------------------------------------------------------- symbols

def h_symbols(k: int) -> tuple[sp.Symbol, ...]:
    """``(h_1, ..., h_k)`` as positive sympy symbols (``h_1`` ≡ paper's ``h_i``)."""
    return tuple(sp.Symbol(f"h_{j}", positive=True) for j in range(1, k + 1))


def unknown_symbols(k: int) -> tuple[tuple[sp.Symbol, ...], tuple[sp.Symbol, ...]]:
    """``((a_1..a_k), (b_1..b_{k-1}))`` as plain (assumption-free) symbols."""
    return (
        tuple(sp.Symbol(f"a_{j}") for j in range(1, k + 1)),
        tuple(sp.Symbol(f"b_{j}") for j in range(1, k)),
    )


def _grid(h: tuple[sp.Expr, ...]) -> list[sp.Expr]:
    """``s_j = h_1 + ... + h_j``: distance of grid point ``i-1+j`` from the new point."""
    return [sp.Add(*h[:j]) for j in range(1, len(h) + 1)]


def order_condition(
    m: int, a: tuple[Any, ...], b: tuple[Any, ...], h: tuple[sp.Expr, ...]
) -> sp.Expr:
    r"""``T_m`` (coefficient of :math:`\bar x^{(m)}(0)` in the LTE) for given coefficients.

    ``T_m = (δ_{m0} - Σ a_j s_j^m - m Σ b_j h_j s_j^{m-1}) / m!``.
    """
    s = _grid(h)
    total = sp.Integer(1 if m == 0 else 0) - sp.Add(*[a[j] * s[j] ** m for j in range(len(a))])
    if m > 0:
        total -= m * sp.Add(*[b[j] * h[j] * s[j] ** (m - 1) for j in range(len(b))])
    return total / sp.factorial(m)


def _row(m: int, k: int, h: tuple[sp.Expr, ...]) -> list[sp.Expr]:
    """Coefficients of ``(a_1..a_k, b_1..b_{k-1})`` in ``δ_{m0} - m!·T_m`` (rhs ``δ_{m0}``)."""
    s = _grid(h)
    row = [s[j] ** m for j in range(k)]
    row += [m * h[j] * s[j] ** (m - 1) if m > 0 else sp.Integer(0) for j in range(k - 1)]
    return row


def _generic_point(k: int) -> tuple[sp.Rational, ...]:
    """Irregular positive rationals: rank decisions taken here hold for generic ``h``."""
    return tuple(sp.Rational(97 + 31 * j * j + 7 * j, 101 + 13 * j) for j in range(1, k + 1))


def _rank_qq(rows: list[list[sp.Expr]]) -> int:
    if not rows or not rows[0]:
        return 0
    return DomainMatrix.from_list_sympy(len(rows), len(rows[0]), rows).convert_to(sp.QQ).rank()


# --------------------------------------------------------------------------- value parsing

def _to_rational(name: str, value: Any) -> sp.Rational:
    """Exact rational for a fixed parameter value (floats via their shortest repr)."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected a rational number, got a bool")
    try:
        if isinstance(value, float):
            if not np.isfinite(value):
                raise ValueError
            q = sp.Rational(repr(value))
        elif isinstance(value, Fraction):
            q = sp.Rational(value.numerator, value.denominator)
        elif isinstance(value, (numbers.Integral, np.integer)):
            q = sp.Integer(int(value))
        elif isinstance(value, np.floating):
            return _to_rational(name, float(value))
        elif isinstance(value, str):
            q = sp.Rational(value.strip())
        else:
            q = sp.sympify(value)
    except (ValueError, TypeError, sp.SympifyError):
        raise ValueError(f"{name}={value!r}: expected a finite rational number (e.g. 1, 0.25, '1/3')") from None
    if not getattr(q, "is_Rational", False):
        raise ValueError(
            f"{name}={value!r}: only rational values can be fixed (exact stability analysis "
            "needs a rational characteristic polynomial)"
        )
    return q


def _normalise_fix(k: int, fix: Mapping[str, Any]) -> tuple[tuple[str, sp.Rational], ...]:
    a, b = unknown_symbols(k)
    names = [str(x) for x in a + b]
    out = []
    for name, value in fix.items():
        if name not in names:
            raise ValueError(
                f"unknown parameter {name!r} for a {k}-step BELM: fixable names are "
                f"{', '.join(names)}"
            )
        out.append((name, _to_rational(name, value)))
    # canonical order = unknown order (a_1..a_k, b_1..b_{k-1}): stable keys
    out.sort(key=lambda item: names.index(item[0]))
    return tuple(out)


def _key(k: int, order: int, fixed: tuple[tuple[str, sp.Rational], ...]) -> str:
    parts = [f"k={k}", f"order={order}"] + [f"{n}={v}" for n, v in fixed]
    return "belm(" + ",".join(parts) + ")"


# --------------------------------------------------------------------------- the rule

@dataclass(frozen=True, eq=True)
class BELMRule:
    r"""A (possibly parametric) variable-step k-step BELM rule.

    Attributes
    ----------
    k : number of steps.
    requested_order : the order asked for (part of :attr:`key`).
    order : true order ``p`` (LTE ``O(h^{p+1})``); larger than
        ``requested_order`` when the fixed values happen to satisfy further
        conditions identically in ``h`` (rare: e.g. ``derive_belm(3, order=3,
        a_3=1)`` coincides with the order-4 rule only for constant steps, so
        its order stays 3).
    h : ``(h_1, ..., h_k)``, positive symbols, ``h_1`` next to the new point.
    a, b : ``k`` and ``k-1`` simplified expressions in ``h`` and :attr:`free`.
    free : free parameter symbols (subset of ``a_j``/``b_j``), unknown order.
    fixed : ``((name, Rational), ...)`` values fixed at derivation.
    lte_coefficient : :math:`T_{p+1}`, homogeneous of degree ``p+1`` in ``h``;
        the LTE is ``lte_coefficient * x̄^{(p+1)} + O(h^{p+2})`` (:attr:`lte`).
    """

    k: int
    requested_order: int
    order: int
    h: tuple[sp.Symbol, ...]
    a: tuple[sp.Expr, ...]
    b: tuple[sp.Expr, ...]
    free: tuple[sp.Symbol, ...]
    fixed: tuple[tuple[str, sp.Rational], ...]
    lte_coefficient: sp.Expr
    _compiled: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    # -- identity ---------------------------------------------------------
    @property
    def key(self) -> str:
        """Stable identifier, e.g. ``"belm(k=3,order=2,a_3=1/4)"`` (for tagging latents)."""
        return _key(self.k, self.requested_order, self.fixed)

    @property
    def name(self) -> str:
        """Alias of :attr:`key`."""
        return self.key

    def __str__(self) -> str:
        return self.key

    # -- LTE ---------------------------------------------------------------
    @property
    def lte_symbol(self) -> sp.Symbol:
        """Symbol standing for :math:`\\bar x^{(p+1)}` in :attr:`lte`."""
        return sp.Symbol(f"xbar^({self.order + 1})")

    @property
    def lte(self) -> sp.Expr:
        """Leading LTE term ``lte_coefficient * x̄^{(p+1)}``."""
        return self.lte_coefficient * self.lte_symbol

    def lte_constant(self, h_values: Any, **params: Any) -> np.ndarray | float:
        """Numeric leading LTE coefficient :math:`T_{p+1}(h)`.

        ``h_values``: shape ``(M, k)`` (column ``j`` = ``h_{j+1}``) or ``(k,)``.
        ``params``: values (scalars or arrays broadcastable to ``(M,)``) for
        *every* free parameter, so that families can be searched without
        re-deriving.  Returns shape ``(M,)`` (or a float for 1-D input).
        """
        hs, one = _as_h_array(h_values, self.k)
        names = [str(f) for f in self.free]
        _check_params(names, params, "lte_constant")
        fn = self._compile("lte", self.lte_coefficient, with_free=True)
        val = fn(*[hs[:, j] for j in range(self.k)], *[np.asarray(params[n], dtype=np.float64) for n in names])
        out = np.broadcast_to(np.asarray(val, dtype=np.float64), (hs.shape[0],)).copy()
        return float(out[0]) if one else out

    # -- numerics ------------------------------------------------------------
    def numeric(self) -> Callable[[Any], tuple[np.ndarray, np.ndarray]]:
        """Compiled ``h -> (a, b)``: ``h`` float64 ``(M, k)`` -> ``a (M, k)``, ``b (M, k-1)``.

        A 1-D ``h`` of length ``k`` gives 1-D results.  Raises ``ValueError``
        if free parameters remain (fix them with :meth:`fix`).
        """
        if self.free:
            raise ValueError(
                f"{self.key} has free parameters {', '.join(map(str, self.free))}; "
                "fix them first, e.g. rule.fix("
                + ", ".join(f"{f}=..." for f in self.free) + ")"
            )
        fa = [self._compile(f"a{j}", x) for j, x in enumerate(self.a)]
        fb = [self._compile(f"b{j}", x) for j, x in enumerate(self.b)]
        k = self.k

        def coefficients(h: Any) -> tuple[np.ndarray, np.ndarray]:
            hs, one = _as_h_array(h, k)
            cols = [hs[:, j] for j in range(k)]
            m = hs.shape[0]
            # constant coefficients lambdify to scalars: broadcast them
            a = np.stack([np.broadcast_to(np.asarray(f(*cols), dtype=np.float64), (m,)) for f in fa], axis=1)
            b = (np.stack([np.broadcast_to(np.asarray(f(*cols), dtype=np.float64), (m,)) for f in fb], axis=1)
                 if fb else np.zeros((m, 0)))
            return (a[0], b[0]) if one else (a, b)

        return coefficients

    def _compile(self, tag: str, expr: sp.Expr, with_free: bool = False) -> Callable:
        fn = self._compiled.get(tag)
        if fn is None:
            args = list(self.h) + (list(self.free) if with_free else [])
            fn = sp.lambdify(args, expr, "numpy")
            self._compiled[tag] = fn
        return fn

    # -- parameters -------------------------------------------------------
    def fix(self, **values: RationalLike) -> "BELMRule":
        """New rule with some free parameters fixed to rational values (by name)."""
        free_names = [str(f) for f in self.free]
        for name in values:
            if name not in free_names:
                raise ValueError(
                    f"{name!r} is not a free parameter of {self.key} (free: "
                    f"{', '.join(free_names) or 'none'}); to fix a determined coefficient use "
                    f"derive_belm({self.k}, order=..., {name}=...)"
                )
        merged = dict(self.fixed)
        merged.update(values)
        return derive_belm(self.k, self.requested_order, **merged)

    # -- constant steps / stability --------------------------------------------
    def constant_step_a(self) -> tuple[sp.Expr, ...]:
        """``a_j`` for constant steps (all ``h_j = 1``; the ``a_j`` are scale-free)."""
        return tuple(sp.expand(x.subs({hh: 1 for hh in self.h})) for x in self.a)

    def constant_step_b(self) -> tuple[sp.Expr, ...]:
        """``b_j`` for constant steps (scale-free too: ``b_j h_j ε`` has the units of x̄)."""
        return tuple(sp.expand(x.subs({hh: 1 for hh in self.h})) for x in self.b)

    @property
    def stability(self) -> StabilityReport:
        """Constant-step :class:`~belm.lte.stability.StabilityReport` (no free params allowed)."""
        rep = self._compiled.get("stability")
        if rep is None:
            rep = stability_report(self)
            self._compiled["stability"] = rep
        return rep

    def roots(self, direction: str = "forward") -> tuple[complex, ...]:
        """Constant-step characteristic roots (with multiplicity).

        ``"forward"``: roots of ρ(ζ) = ζ^k − Σ a_j ζ^{k−j} (sampling);
        ``"inverse"``: roots of the reversed polynomial, i.e. ``1/ζ``
        (``inf`` for a forward root at 0).  Raises ``ValueError`` while free
        parameters remain.
        """
        if direction == "forward":
            return self.stability.forward_roots
        if direction == "inverse":
            return self.stability.inverse_roots
        raise ValueError(f"direction must be 'forward' or 'inverse', got {direction!r}")

    @property
    def zero_stable(self) -> bool:
        """True iff zero-stable (constant steps) for sampling AND inversion."""
        return self.stability.zero_stable

    @property
    def invertible(self) -> bool:
        """``a_k`` is not identically zero (the relation can be solved for x̄_{i-1+k})."""
        return sp.cancel(self.a[-1]) != 0


def _as_h_array(h: Any, k: int) -> tuple[np.ndarray, bool]:
    arr = np.asarray(h, dtype=np.float64)
    one = arr.ndim == 1
    if one:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != k:
        raise ValueError(f"step sizes must have shape (M, {k}) or ({k},), got {np.shape(h)}")
    if not np.all(np.isfinite(arr)) or not np.all(arr > 0):
        raise ValueError("step sizes h must be finite and > 0")
    return arr, one


def _check_params(names: list[str], params: Mapping[str, Any], what: str) -> None:
    missing = [n for n in names if n not in params]
    extra = [n for n in params if n not in names]
    if missing or extra:
        raise ValueError(
            f"{what}: values needed for exactly the free parameters {names or '[]'}; "
            f"missing {missing}, unexpected {extra}"
        )


# --------------------------------------------------------------------------- derivation

def derive_belm(k: int, order: int | None = None, **fix: RationalLike) -> BELMRule:
    """Derive the variable-step k-step BELM rule of the given order.

    Parameters
    ----------
    k : int ≥ 2 (``k = 1`` has no ε term, hence no consistent rule: ValueError).
    order : order conditions imposed, ``1 ≤ order ≤ 2k-2`` (default ``2k-2``).
    **fix : rational values for any of ``a_1..a_k, b_1..b_{k-1}`` (ints,
        floats via their repr, ``Fraction``, ``"1/3"``, sympy rationals).

    Unknowns not fixed and not determined by the conditions stay free
    (:attr:`BELMRule.free`; convention in the module docstring).  Raises
    ``ValueError`` for bad ``k``/``order``/names/values and when the fixed
    values contradict the order conditions.  Results are cached in memory
    (per process; nothing is written to or read from disk).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an int >= 2, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 2, got k={k}")
    if k == 1:
        raise ValueError(
            "k=1: the 1-step relation x̄_{i-1} = a_1 x̄_i has no ε term, so no consistent "
            "(order >= 1) BELM exists; use k >= 2 (k=2 with order=2 is O-BELM)"
        )
    max_order = 2 * k - 2
    if order is None:
        order = max_order
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)):
        raise ValueError(f"order must be an int in [1, {max_order}], got {order!r}")
    order = int(order)
    if not 1 <= order <= max_order:
        raise ValueError(
            f"order={order} is out of range for k={k}: 2k-1 = {2 * k - 1} unknowns allow "
            f"orders 1..{max_order} (order p imposes p+1 conditions)"
        )
    fixed = _normalise_fix(k, fix)
    return _derive_cached(k, order, fixed)


@functools.lru_cache(maxsize=256)
def _derive_cached(k: int, order: int, fixed: tuple[tuple[str, sp.Rational], ...]) -> BELMRule:
    return _derive(k, order, fixed)


def _derive(k: int, order: int, fixed: tuple[tuple[str, sp.Rational], ...]) -> BELMRule:
    h = h_symbols(k)
    a_sym, b_sym = unknown_symbols(k)
    unknowns = list(a_sym + b_sym)
    fixed_map = {sp.Symbol(n): v for n, v in fixed}
    # pivot priority: determined first -> a_1, b_1..b_{k-1}, a_2..a_k (so a_k is freed first)
    priority = [a_sym[0], *b_sym, *a_sym[1:]]
    rest = [u for u in priority if u not in fixed_map]
    col = {u: i for i, u in enumerate(unknowns)}

    rows = [_row(m, k, h) for m in range(order + 1)]
    rhs = [
        sp.Integer(1 if m == 0 else 0) - sp.Add(*[rows[m][col[u]] * v for u, v in fixed_map.items()])
        for m in range(order + 1)
    ]

    # ---- rank / pivots at a generic rational point (exact arithmetic)
    pt = dict(zip(h, _generic_point(k)))
    num = [[sp.sympify(rows[m][col[u]]).subs(pt) for u in rest] for m in range(order + 1)]
    num_rhs = [sp.sympify(r).subs(pt) for r in rhs]
    chosen: list[int] = []
    for i in range(len(rest)):
        trial = chosen + [i]
        if _rank_qq([[r[c] for c in trial] for r in num]) == len(trial):
            chosen = trial
    rank = len(chosen)
    aug_rank = _rank_qq([r + [num_rhs[m]] for m, r in enumerate(num)]) if rest else (
        0 if all(x == 0 for x in num_rhs) else 1)
    if aug_rank != rank:
        raise ValueError(
            f"fixed values {dict(fixed)} contradict the order-{order} conditions of the "
            f"{k}-step BELM (inconsistent linear system): drop or change a fixed value, or "
            "lower `order`"
        )
    det = [rest[i] for i in chosen]
    free = tuple(u for u in unknowns if u in rest and u not in det)
    sel_rows: list[int] = []
    for m in range(order + 1):
        trial = sel_rows + [m]
        if _rank_qq([[num[r][c] for c in chosen] for r in trial]) == len(trial):
            sel_rows = trial
    assert len(sel_rows) == rank

    # ---- exact solve over QQ(h): one rhs column for the constant part, one per free param
    # Work in the fraction field K = QQ(h_1..h_k): canonical (cancelled) elements make
    # zero tests exact and arithmetic far faster than sympy expression trees.
    K = sp.QQ.frac_field(*h)
    solK: dict[sp.Symbol, dict[Any, Any]] = {}
    if det:
        A = [[rows[m][col[u]] for u in det] for m in sel_rows]
        B = [[rhs[m]] + [-rows[m][col[f]] for f in free] for m in sel_rows]
        A_dm = DomainMatrix.from_list_sympy(rank, rank, A).convert_to(K)
        B_dm = DomainMatrix.from_list_sympy(rank, 1 + len(free), B).convert_to(K)
        X = A_dm.lu_solve(B_dm).to_list()
        for i, u in enumerate(det):
            solK[u] = {1: X[i][0], **{f: X[i][1 + j] for j, f in enumerate(free)}}
    # every unknown as an affine combination {1: c_0, f: c_f} with c in K
    affine: dict[sp.Symbol, dict[Any, Any]] = {}
    for u in unknowns:
        if u in fixed_map:
            affine[u] = {1: K.from_sympy(fixed_map[u])}
        elif u in solK:
            affine[u] = solK[u]
        else:
            affine[u] = {u: K.one}

    # ---- rows not used in the solve must vanish identically
    for m in range(order + 1):
        if m in sel_rows:
            continue
        if any(c != K.zero for c in _affine_parts(m, affine, a_sym, b_sym, h, K).values()):
            raise ValueError(
                f"fixed values {dict(fixed)} contradict order condition m={m} of the {k}-step "
                "BELM: drop or change a fixed value, or lower `order`"
            )

    # ---- leading LTE term: first T_m (m > requested order) not identically zero
    true_order = order
    for m in range(order + 1, 4 * k + 2):
        t = _affine_parts(m, affine, a_sym, b_sym, h, K)
        if any(c != K.zero for c in t.values()):
            break
        true_order = m
    else:  # pragma: no cover - impossible for a genuine k-step relation
        raise RuntimeError(f"{_key(k, order, fixed)}: LTE vanishes to all computed orders")

    def combine(parts: dict[Any, Any]) -> sp.Expr:
        """``factor(c_0) + Σ factor(c_f)·f`` as a sympy expression."""
        out = []
        for term, c in parts.items():
            if c == K.zero:
                continue
            e = sp.factor(K.to_sympy(c))
            out.append(e if term == 1 else e * term)
        return sp.Add(*out)

    a = tuple(combine(affine[u]) for u in a_sym)
    b = tuple(combine(affine[u]) for u in b_sym)
    return BELMRule(k=k, requested_order=order, order=true_order, h=h, a=a, b=b, free=free,
                    fixed=fixed, lte_coefficient=combine(t))


def _affine_parts(m: int, affine, a_sym, b_sym, h, K) -> dict[Any, Any]:
    """``T_m`` (see :func:`order_condition`) split into parts ``{1: c_0, f: c_f}`` in ``K``."""
    hK = [K.from_sympy(x) for x in h]
    sK = [sum(hK[:j], K.zero) for j in range(1, len(h) + 1)]
    k = len(a_sym)
    fact = K.from_sympy(sp.factorial(m))
    terms: dict[Any, Any] = {1: K.one if m == 0 else K.zero}
    weights = [(a_sym[j], sK[j] ** m) for j in range(k)]
    if m > 0:
        weights += [(b_sym[j], m * hK[j] * sK[j] ** (m - 1)) for j in range(k - 1)]
    for u, w in weights:
        for t, c in affine[u].items():
            terms[t] = terms.get(t, K.zero) - c * w
    return {t: v / fact for t, v in terms.items()}
