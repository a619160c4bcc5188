"""Tests for belm.lte: symbolic derivation of variable-step k-step BELM rules.

Every fact pinned here is recomputed in the test (independently of the
derivation code where possible): closed forms by sympy simplification, the
LTE by series expansion of τ for x̄(σ̄) = exp(cσ̄), the order claim by exactness
on (shifted) monomials, stability by root/Vieta/Schur arguments.
"""

from __future__ import annotations

import hashlib
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import belm.lte as lte
from belm.lte import (
    BELMRule,
    bidirectional_candidates,
    derive_belm,
    named_rule,
    stability_report,
    zero_stability_scan,
)
from belm.lte import derive as derive_mod
from belm.lte import scaled as scaled_mod

ZETA = sp.Symbol("zeta")
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tau(rule_a, rule_b, h, x, dx):
    """Numeric LTE τ = x(0) - Σ a_j x(s_j) - Σ b_j h_j x'(s_j) and Σ|terms| (rounding scale)."""
    s = np.cumsum(h)
    terms = [x(0.0)] + [-rule_a[j] * x(s[j]) for j in range(len(rule_a))]
    terms += [-rule_b[j] * h[j] * dx(s[j]) for j in range(len(rule_b))]
    return math.fsum(terms), sum(abs(t) for t in terms)


# --------------------------------------------------------------------------- fact 1: O-BELM

def test_obelm_closed_form_and_lte():
    rule = derive_belm(2)
    h1, h2 = rule.h
    assert rule.k == 2 and rule.order == 2 and rule.free == () and len(rule.a) == 2 and len(rule.b) == 1
    assert all(x.is_positive for x in rule.h)
    expected_a = ((h2**2 - h1**2) / h2**2, h1**2 / h2**2)
    expected_b = (-(h1 + h2) / h2,)
    for got, exp in zip(rule.a + rule.b, expected_a + expected_b):
        assert sp.simplify(got - exp) == 0

    # Independent LTE: τ for x̄ = exp(cσ̄) with steps t·h_j, expanded in t.
    c, t = sp.symbols("c t", positive=True)
    s1, s2 = t * h1, t * (h1 + h2)
    a1, a2 = expected_a
    (b1,) = expected_b
    tau = 1 - a1 * sp.exp(c * s1) - a2 * sp.exp(c * s2) - b1 * t * h1 * c * sp.exp(c * s1)
    ser = sp.series(tau, t, 0, 4).removeO()
    for m in range(3):
        assert sp.simplify(ser.coeff(t, m)) == 0  # order 2: t^0..t^2 vanish
    leading = sp.simplify(ser.coeff(t, 3) / c**3)  # coefficient of x̄''' = c^3
    assert leading != 0
    assert sp.simplify(rule.lte_coefficient - leading) == 0
    X = rule.lte_symbol
    assert sp.simplify(rule.lte - leading * X) == 0
    assert sp.simplify(leading + h1**2 * (h1 + h2) / 6) == 0  # = -h_i^2 (h_i + h_{i+1}) / 6


def test_obelm_constant_step_roots():
    rule = derive_belm(2)
    assert sorted(z.real for z in rule.roots("forward")) == pytest.approx([-1.0, 1.0], abs=1e-15)
    assert all(abs(z.imag) < 1e-15 for z in rule.roots("forward"))
    assert sorted(z.real for z in rule.roots("inverse")) == pytest.approx([-1.0, 1.0], abs=1e-15)
    assert rule.zero_stable and rule.stability.forward_stable and rule.stability.inverse_stable
    assert rule.constant_step_a() == (0, 1) and rule.constant_step_b() == (-2,)  # leapfrog
    assert rule.key == "belm(k=2,order=2)" and named_rule("o-belm") is rule


@HYP
@given(st.lists(st.floats(1e-3, 1.0), min_size=2, max_size=2),
       st.lists(st.lists(st.floats(1e-3, 1.0), min_size=2, max_size=2), min_size=1, max_size=5))
def test_obelm_numeric_matches_closed_form(h_single, h_batch):
    f = derive_belm(2).numeric()
    H = np.array(h_batch)
    a, b = f(H)
    assert a.shape == (len(H), 2) and b.shape == (len(H), 1) and a.dtype == np.float64
    h1, h2 = H[:, 0], H[:, 1]
    # a_1 = 1 - (h_1/h_2)^2 may cancel: relative to the size of its two terms
    assert np.all(np.abs(a[:, 0] - (h2**2 - h1**2) / h2**2) <= 1e-12 * (1 + (h1 / h2) ** 2))
    np.testing.assert_allclose(a[:, 1], h1**2 / h2**2, rtol=1e-12)
    np.testing.assert_allclose(b[:, 0], -(h1 + h2) / h2, rtol=1e-12)
    a1, b1 = f(np.array(h_single))  # 1-D input -> 1-D output
    assert a1.shape == (2,) and b1.shape == (1,)


# --------------------------------------------------------------------------- fact 2: k = 3

def test_k3_max_order_is_zero_unstable():
    rule = derive_belm(3)
    assert rule.order == 4 and rule.free == ()
    rho = sp.factor(sp.expand(ZETA**3 - sum(c * ZETA ** (3 - j) for j, c in enumerate(rule.constant_step_a(), 1))))
    assert sp.expand(rho - (ZETA - 1) * (ZETA**2 + 10 * ZETA + 1)) == 0
    fwd = sorted(rule.roots("forward"), key=lambda z: z.real)
    np.testing.assert_allclose([z.real for z in fwd], [-5 - 2 * 6**0.5, -5 + 2 * 6**0.5, 1.0], rtol=1e-14)
    rep = rule.stability
    # -5-2√6 ≈ -9.899 leaves the disk forward; -5+2√6 ≈ -0.101 maps to -9.899 for inversion
    assert not rep.forward_stable and not rep.inverse_stable and not rule.zero_stable
    assert max(rep.forward_moduli) == pytest.approx(5 + 2 * 6**0.5)
    assert max(rep.inverse_moduli) == pytest.approx(5 + 2 * 6**0.5)
    assert any("9.89898" in v for v in rep.violations)


def test_k3_order3_family_has_no_zero_stable_member():
    fam = derive_belm(3, order=3)
    (a3,) = fam.free
    assert str(a3) == "a_3" and fam.order == 3
    ca = fam.constant_step_a()
    rho = sp.expand(ZETA**3 - ca[0] * ZETA**2 - ca[1] * ZETA - ca[2])
    # ρ(ζ) = (ζ - 1)(ζ² + 5(a_3+1)ζ + a_3)
    q = ZETA**2 + 5 * (a3 + 1) * ZETA + a3
    assert sp.expand(rho - (ZETA - 1) * q) == 0
    # Both directions stable => all roots unimodular => |product of roots| = |a_3| = 1 (Vieta).
    cands = bidirectional_candidates(fam)
    assert sorted(c[a3] for c in cands) == [-1, 1]
    for c in cands:
        member = fam.fix(a_3=c[a3])
        assert not member.zero_stable, member.key
    assert "multiplicity 2" in " ".join(fam.fix(a_3=-1).stability.violations)  # (ζ-1)²(ζ+1)
    # Stronger: not even one direction is stable.  Roots of z²+pz+q in the closed unit
    # disk imply |p| <= 1+q (real roots: (1±r1)(1±r2) = 1±p+q... >= 0; complex pair:
    # |p| = 2|Re r| <= 2|r| <= 1+|r|² = 1+q).  Forward: p = 5(a+1), q = a.  Inverse: the
    # reciprocal roots solve z² + 5(1+u)z + u with u = 1/a_3 -- the same form.  Both
    # inequalities force the parameter to -1, i.e. a_3 = -1: ρ = (ζ-1)²(ζ+1).
    a = sp.Symbol("a", real=True)
    assert sp.solve_univariate_inequality(sp.Abs(5 * (a + 1)) <= 1 + a, a, relational=False) == sp.FiniteSet(-1)
    u = sp.Symbol("u", real=True)  # reversed quadratic: ζ² + 5(1+u)ζ + u with u = 1/a_3
    assert sp.solve_univariate_inequality(sp.Abs(5 * (1 + u)) <= 1 + u, u, relational=False) == sp.FiniteSet(-1)
    # Dense numeric scan agrees.
    grid = np.concatenate([np.linspace(-20, 20, 4001), [-1.0, 1.0]])
    fwd, inv = zero_stability_scan(fam, a_3=grid)
    assert not fwd.any() and not inv.any()


def test_k3_order2_family_stable_region():
    fam = derive_belm(3, order=2)
    a2, a3 = fam.free
    assert (str(a2), str(a3)) == ("a_2", "a_3")
    cands = bidirectional_candidates(fam)
    assert {a3: 1} in cands and {a2: 1, a3: -1} in cands and len(cands) == 2
    assert not fam.fix(a_2=1, a_3=-1).zero_stable  # ρ = (ζ-1)²(ζ+1)
    # On a_3 = 1: ρ = (ζ-1)(ζ² + (1+a_2)ζ + 1): simple unimodular roots iff |1+a_2| < 2
    # (a_2 = -3: triple root at 1; a_2 = 1: double root at -1).
    ca = [x.subs(a3, 1) for x in fam.constant_step_a()]
    rho = sp.expand(ZETA**3 - ca[0] * ZETA**2 - ca[1] * ZETA - ca[2])
    assert sp.expand(rho - (ZETA - 1) * (ZETA**2 + (1 + a2) * ZETA + 1)) == 0
    for v in ["-2.99", "-5/2", -2, -1, 0, "1/2", "0.99"]:
        assert fam.fix(a_2=v, a_3=1).zero_stable, v
    for v in [-3, 1, "1.01", "-3.01", 5]:
        assert not fam.fix(a_2=v, a_3=1).zero_stable, v
    for a2v, a3v in [(0, "0.99"), (0, "1.01"), (0, "1/2"), (-1, -1)]:
        assert not fam.fix(a_2=a2v, a_3=a3v).zero_stable
    # numeric scan of the plane: stable points only on the line a_3 = 1, -3 < a_2 < 1
    A2, A3 = np.meshgrid(np.linspace(-4, 2, 121), np.linspace(-2, 2, 81))
    fwd, inv = zero_stability_scan(fam, a_2=A2, a_3=A3)
    both = fwd & inv
    expected = (A3 == 1.0) & (A2 > -3 + 1e-9) & (A2 < 1 - 1e-9)
    np.testing.assert_array_equal(both, expected)


def test_named_stable_three_step_member():
    rule = named_rule("leapfrog3")
    assert rule.key == "belm(k=3,order=2,a_2=0,a_3=1)" and rule.order == 2 and rule.free == ()
    assert rule.zero_stable
    zs = rule.roots("forward")
    np.testing.assert_allclose(sorted(abs(z**3 - 1) for z in zs), [0, 0, 0], atol=1e-14)  # cube roots of 1
    assert rule.constant_step_a() == (0, 0, 1) and rule.constant_step_b() == (-sp.Rational(3, 2),) * 2
    with pytest.raises(ValueError, match="unknown named rule"):
        named_rule("nope")


# --------------------------------------------------------------------------- fact 3: order claims

RULE_SPECS = [
    (2, None, {}),
    (2, 1, {"a_2": "1/2"}),
    (3, None, {}),
    (3, 3, {"a_3": "0.3"}),
    (3, 2, {"a_2": 0, "a_3": 1}),
    (3, 1, {"a_2": 0, "a_3": 1, "b_2": -1}),
    (4, None, {}),
]


def _check_polynomial_exactness(rule: BELMRule, h: np.ndarray, theta: float) -> None:
    p = rule.order
    a, b = rule.numeric()(h)
    s_k = float(np.sum(h))
    c = theta * s_k  # expansion centre off the grid: tests translation invariance too
    for m in range(p + 2):
        tau, scale = _tau(a, b, h, lambda x: (x - c) ** m, lambda x: m * (x - c) ** (m - 1) if m else 0.0)
        if m <= p:
            assert abs(tau) <= 1e-10 * scale, (rule.key, m, tau, scale)
        else:
            # (x-c)^{p+1} has constant (p+1)-th derivative: τ = (p+1)! T_{p+1} exactly
            want = math.factorial(p + 1) * rule.lte_constant(h)
            assert abs(tau - want) <= 1e-10 * scale + 1e-10 * abs(want), (rule.key, tau, want)
            if abs(want) > 1e-6 * scale:
                assert abs(tau) > 1e-7 * scale  # the order claim is not an understatement


def _T(m, a, b, h):
    """Test-side LTE coefficient T_m = (δ_m0 - Σ a_j s_j^m - m Σ b_j h_j s_j^(m-1)) / m!."""
    s = [sum(h[: j + 1]) for j in range(len(h))]
    v = (1 if m == 0 else 0) - sum(a[j] * s[j] ** m for j in range(len(a)))
    if m:
        v -= m * sum(b[j] * h[j] * s[j] ** (m - 1) for j in range(len(b)))
    return v / sp.factorial(m)


@pytest.mark.parametrize("k,order,fix", RULE_SPECS)
def test_derived_rules_satisfy_order_conditions_symbolically(k, order, fix):
    rule = derive_belm(k, order, **fix)
    names = [str(x) for x in sum(lte.unknown_symbols(k), ())]
    for name, value in fix.items():
        assert (rule.a + rule.b)[names.index(name)] == sp.Rational(value)
    if k <= 3:  # fully symbolic (k = 4 is too slow for cancel on 1 core; spot checks below)
        for m in range(rule.order + 1):
            assert sp.cancel(_T(m, rule.a, rule.b, rule.h)) == 0
        assert sp.cancel(_T(rule.order + 1, rule.a, rule.b, rule.h) - rule.lte_coefficient) == 0
    # exact spot checks at rational step sizes
    for pt in ([sp.Rational(3, 7), sp.Rational(5, 3), sp.Rational(2, 11), sp.Rational(9, 4)],
               [sp.Rational(1, 2), sp.Rational(1, 3), sp.Rational(7, 5), sp.Rational(13, 17)]):
        vals = dict(zip(rule.h, pt))
        a = [x.subs(vals) for x in rule.a]
        b = [x.subs(vals) for x in rule.b]
        hv = pt[:k]
        assert all(_T(m, a, b, hv) == 0 for m in range(rule.order + 1))
        lead = _T(rule.order + 1, a, b, hv)
        assert lead != 0 and lead == rule.lte_coefficient.subs(vals)


@HYP
@given(st.sampled_from(RULE_SPECS), st.lists(st.floats(1e-3, 1.0), min_size=4, max_size=4), st.floats(-1, 1))
def test_order_claim_on_polynomials(spec, hs, theta):
    k, order, fix = spec
    rule = derive_belm(k, order, **fix)
    _check_polynomial_exactness(rule, np.array(hs[:k]), theta)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_order_claim_random_families(data):
    k = data.draw(st.sampled_from([2, 3]))
    order = data.draw(st.integers(1, 2 * k - 2))
    fam = derive_belm(k, order)
    vals = {str(f): data.draw(st.sampled_from(["-1", "0", "1/2", "1", "2"])) for f in fam.free}
    rule = fam.fix(**vals) if vals else fam
    assert rule.order >= order and rule.free == ()
    hs = data.draw(st.lists(st.floats(1e-3, 1.0), min_size=k, max_size=k))
    _check_polynomial_exactness(rule, np.array(hs), data.draw(st.floats(-1, 1)))
    # family LTE with params == LTE of the fixed rule
    h = np.array(hs)
    params = {n: float(sp.Rational(v)) for n, v in vals.items()}
    assert fam.lte_constant(h, **params) == pytest.approx(rule.lte_constant(h), rel=1e-9, abs=1e-300)


# --------------------------------------------------------------------------- API details / errors

def test_free_parameter_convention_and_keys():
    r = derive_belm(2, 1)
    assert [str(f) for f in r.free] == ["a_2"] and r.key == "belm(k=2,order=1)"
    r2 = r.fix(a_2=0.25)
    assert r2.key == "belm(k=2,order=1,a_2=1/4)" and r2.free == ()
    assert derive_belm(2, 1, a_2=Fraction(1, 4)) is r2 and derive_belm(2, 1, a_2="1/4") is r2
    assert derive_belm(2) is derive_belm(2, order=2)
    assert [str(f) for f in derive_belm(3, 1).free] == ["a_2", "a_3", "b_2"]
    # fixing a determined coefficient is allowed; another one becomes free
    r3 = derive_belm(3, 3, a_1=0)
    assert r3.free == () and r3.a[0] == 0 and r3.key == "belm(k=3,order=3,a_1=0)"


def test_errors():
    for bad_k in (0, -1, 1, 2.0, True):
        with pytest.raises(ValueError, match="k"):
            derive_belm(bad_k)
    with pytest.raises(ValueError, match=r"order=3 is out of range for k=2"):
        derive_belm(2, order=3)
    with pytest.raises(ValueError, match="out of range"):
        derive_belm(3, order=0)
    with pytest.raises(ValueError, match=r"unknown parameter 'c_1'.*a_1, a_2, b_1"):
        derive_belm(2, c_1=1)
    with pytest.raises(ValueError, match="unknown parameter 'a_3'"):
        derive_belm(2, a_3=1)
    with pytest.raises(ValueError, match="rational"):
        derive_belm(2, 1, a_2=sp.sqrt(2))
    with pytest.raises(ValueError, match="contradict"):
        derive_belm(2, 2, a_2=1)  # O-BELM needs a_2 = h_1²/h_2²
    fam = derive_belm(3, 2)
    with pytest.raises(ValueError, match=r"free parameters a_2, a_3"):
        fam.numeric()
    with pytest.raises(ValueError, match="free parameters"):
        fam.roots()
    with pytest.raises(ValueError, match="free parameters"):
        stability_report(fam)
    with pytest.raises(ValueError, match="not a free parameter"):
        fam.fix(b_1=0)
    with pytest.raises(ValueError, match="missing"):
        fam.lte_constant(np.ones(3), a_2=0.0)
    with pytest.raises(ValueError, match="direction"):
        derive_belm(2).roots("sideways")
    f = derive_belm(2).numeric()
    with pytest.raises(ValueError, match="shape"):
        f(np.ones((4, 3)))
    with pytest.raises(ValueError, match="> 0"):
        f(np.array([[1.0, -1.0]]))


def test_not_invertible_rule_reported():
    r = derive_belm(2, 1, a_2=0)  # a_2 = 0: x̄_{i+1} never enters: cannot invert
    assert not r.invertible and not r.zero_stable
    assert math.isinf(max(r.stability.inverse_moduli))


# --------------------------------------------------------------------------- caching

def _cache_clear():
    derive_mod._derive_cached.cache_clear()
    scaled_mod._scaled_cached.cache_clear()


def test_in_process_cache_and_cold_derivation():
    """Derivations are cached per process; a cold one (cache cleared) gives an equal rule.

    (Its time is a benchmark figure, not a test: ``python -m benchmarks.lte_timing``.)"""
    for k in (2, 3):
        warm = derive_belm(k)
        assert derive_belm(k) is warm
        _cache_clear()
        cold = derive_belm(k)
        assert cold == warm and cold is not warm and cold.order == 2 * k - 2 and cold.free == ()
    _cache_clear()
    assert named_rule("leapfrog3-scaled") == scaled_mod.scaled_rule(3, 1, 2)


# The file names and format of the disk cache that belm.lte had until it was removed
# (belm/lte/_cache.py: $BELM_CACHE_DIR/lte or ~/.cache/belm/lte, JSON read back with
# sympify, which evaluates text).
def _old_cache_file(root, key):
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return root / "lte" / f"rule-v1-{digest}.json"


def test_planted_cache_entries_are_never_evaluated(tmp_path, monkeypatch):
    """Item 6 of issue 11: a file placed where a cache was read from cannot run code."""
    marker = tmp_path / "pwned_belm"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    assert not marker.exists()
    sp.sympify(payload)                     # the payload is live: sympify runs it ...
    assert marker.exists()
    marker.unlink()                         # ... so its absence below means "never evaluated"

    specs = {"belm(k=2,order=2)": (2, None, {}), "belm(k=3,order=2,a_3=1)": (3, 2, {"a_3": 1}),
             "belm(k=3,order=2)": (3, 2, {}), "belm(k=3,order=4)": (3, None, {})}
    expected = {key: derive_belm(k, order, **fix) for key, (k, order, fix) in specs.items()}
    home, env_dir = tmp_path / "home", tmp_path / "cache-env"
    planted = []
    for key, rule in expected.items():
        entry = {"version": 1, "key": key, "a": [payload] * rule.k, "b": [payload] * (rule.k - 1),
                 "free": [str(f) for f in rule.free], "order": rule.order, "lte": payload}
        for root in (env_dir, home / ".cache" / "belm"):
            f = _old_cache_file(root, key)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(entry))
            planted.append(f)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("BELM_CACHE_DIR", str(env_dir))
    _cache_clear()
    try:
        for key, (k, order, fix) in specs.items():
            got = derive_belm(k, order, **fix)
            assert got == expected[key] and got.key == key
        lf3s = named_rule("leapfrog3-scaled")
    finally:
        _cache_clear()
    assert not marker.exists(), "a planted cache entry was evaluated"
    # still correct: O-BELM's closed form, and the scaled rule's a_3 = (h_1/h_3)^2
    h1, h2 = expected["belm(k=2,order=2)"].h
    assert sp.simplify(expected["belm(k=2,order=2)"].a[1] - h1**2 / h2**2) == 0
    assert sp.simplify(lf3s.a[2] - lf3s.h[0] ** 2 / lf3s.h[2] ** 2) == 0
    # and nothing new was written next to the planted files
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(planted)
