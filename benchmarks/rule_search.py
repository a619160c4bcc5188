r"""Research code: search the bidirectionally zero-stable 2- and 3-step BELM families on real VP grids.

Not part of the library (``belm`` never imports ``benchmarks``): it drives samplers
(:class:`belm.BELM`, :class:`belm.OBELM`) to measure members of the step-ratio-scaled
families of :mod:`belm.lte.scaled`, whose docstring has the theory.  Used by
notebooks/lte_order.ipynb, by tests/test_lte_order.py and by
``python -m benchmarks.lte_timing``.

* :func:`scaled_rule` (library) builds a member symbolically; here
  :class:`NumericMember` evaluates one numerically (float ``c``/``q``, no symbolic work
  per candidate), :func:`evaluate` measures it on the analytic Gaussian mixture and
  :func:`search` scans ``(c, q)`` and ranks the members against O-BELM.
* Constant-step theory (exact): for ``k = 3`` the error constant is
  ``C = T_3/ρ'(1) = (c − 10) / (12 (2 + c))`` (:func:`constant_step_error_constant`),
  and ``|C| > 1/6`` (O-BELM's) for every stable ``c``; it tends to 1/6 only at the
  unstable boundary ``c → 2`` (double root −1).

Run ``python -m benchmarks.rule_search`` for the full table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import sympy as sp
import torch

from belm.analytic import GaussianMixture
from belm.lte import BELMRule, derive_belm, scaled_rule
from belm.lte.scaled import scaled_family, scaled_parameters
from belm.schedule import Schedule, make_betas
from belm.solvers.belm import BELM
from belm.solvers.methods import OBELM

__all__ = [
    "constant_step_error_constant",
    "NumericMember",
    "Candidate",
    "AnalyticBench",
    "real_grids",
    "propagator_growth",
    "lte_proxy",
    "evaluate",
    "search",
    "summary_table",
    "DEFAULT_SPACE",
]


def constant_step_error_constant(k: int, c: Any = 1) -> sp.Rational:
    r"""Error constant ``C = T_{p+1} / ρ'(1)`` at constant steps (the global error is
    ≈ ``C · h^p · ∫ x̄^{(p+1)}``).  ``k=2``: O-BELM's −1/6 (``c`` ignored);
    ``k=3``: ``(c − 10)/(12 (2 + c))`` (order 2)."""
    # q = 0: the constant-coefficient member a_3 = 1, a_2 = c − 1 (c parsed exactly)
    rule = derive_belm(2) if k == 2 else scaled_rule(3, c, 0)
    zeta = sp.Symbol("zeta")
    ca = rule.constant_step_a()
    rho = zeta**k - sum(ca[j - 1] * zeta ** (k - j) for j in range(1, k + 1))
    t = rule.lte_coefficient.subs({hh: 1 for hh in rule.h})
    return sp.nsimplify(t / sp.diff(rho, zeta).subs(zeta, 1))


# --------------------------------------------------------------------------- fast numeric members

@functools.lru_cache(maxsize=4)
def _family_functions(k: int) -> list[Callable]:
    fam = scaled_family(k)
    args = list(fam.h) + list(fam.free)
    return [sp.lambdify(args, x, "numpy") for x in fam.a + fam.b]


class NumericMember:
    """A rule for :class:`belm.BELM` through :class:`belm.lte.RuleLike`: the scaled
    member ``(k, c, q)`` evaluated numerically (no symbolic work per candidate; float
    ``c``/``q`` allowed)."""

    free: tuple = ()

    def __init__(self, k: int, c: float, q: float, zero_stable: bool, order: int) -> None:
        self.k, self.c, self.q = k, float(c), float(q)
        self.zero_stable = zero_stable
        self.order = order
        # repr, not :g -- the key must tell members apart to the last bit (RuleLike)
        self.key = f"belm(k={k},scaled,numeric,c={self.c!r},q={self.q!r})"

    def roots(self, direction: str = "forward"):  # only used in BELM's error message
        z = np.roots([1.0, self.c, 1.0]) if self.k == 3 else np.array([-1.0])
        z = np.concatenate([[1.0], z])
        return tuple(z if direction == "forward" else 1 / z)

    def numeric(self) -> Callable[[Any], tuple[np.ndarray, np.ndarray]]:
        fns = _family_functions(self.k)
        k, c, q = self.k, self.c, self.q

        def coefficients(h: Any) -> tuple[np.ndarray, np.ndarray]:
            hs = np.atleast_2d(np.asarray(h, dtype=np.float64))
            m = hs.shape[0]
            cols = [hs[:, j] for j in range(k)]
            params = scaled_parameters(k, cols, c, q)
            vals = [np.broadcast_to(np.asarray(f(*cols, *params), dtype=np.float64), (m,)) for f in fns]
            a, b = np.stack(vals[:k], axis=1), np.stack(vals[k:], axis=1)
            return (a[0], b[0]) if np.ndim(h) == 1 else (a, b)

        return coefficients


# --------------------------------------------------------------------------- grids and the bench

def real_grids(schedules: Iterable[str] = ("ddpm-linear", "sd-scaled-linear", "cosine"),
               spacings: Iterable[str] = ("linspace", "leading"),
               steps: Iterable[int] = (10, 20)) -> list[tuple[str, Any]]:
    """``[(label, Schedule), ...]`` for the real VP schedules of the search.

    ``"ddpm-linear"``: betas 1e-4 … 0.02; ``"sd-scaled-linear"``: 0.00085 … 0.012;
    ``"cosine"``: squaredcos_cap_v2 (T = 1000).
    """
    betas = {
        "ddpm-linear": lambda: make_betas("linear", 1000, 1e-4, 0.02),
        "sd-scaled-linear": lambda: make_betas("scaled_linear", 1000, 0.00085, 0.012),
        "cosine": lambda: make_betas("squaredcos_cap_v2", 1000),
    }
    out = []
    for name in schedules:
        if name not in betas:
            raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(betas)}")
        b = betas[name]()
        for spacing in spacings:
            for n in steps:
                out.append((f"{name}/{spacing}/N={n}", Schedule.from_betas(b, int(n), spacing)))
    return out


class AnalyticBench:
    """RMS error of a sampler against the exact probability-flow ODE endpoint of the
    analytic Gaussian mixture (:class:`belm.analytic.GaussianMixture`), per grid.

    Exact endpoints are computed once per starting noise level and cached.
    """

    def __init__(self, samples: int = 64, seed: int = 0, std: float = 0.5) -> None:
        self.gm = GaussianMixture.default(dim=2, std=std)
        self.xT = torch.randn(samples, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        self._exact: dict[float, Any] = {}

    def exact(self, schedule) -> Any:
        sb0 = float(schedule.sigma_bar[0])
        if sb0 not in self._exact:
            self._exact[sb0] = self.gm.ode_solution(self.xT, sb0)
        return self._exact[sb0]

    def rms_error(self, make: Callable[[Any, Any], Any], schedule) -> float:
        """``make(eps_fn, schedule)`` returns a sampler; its RMS endpoint error."""
        sampler = make(self.gm.eps_fn(schedule.alphas_cumprod), schedule)
        out = sampler.sample(self.xT)
        return float(((out - self.exact(schedule)) ** 2).mean().sqrt())


# --------------------------------------------------------------------------- diagnostics

def _a_table(coefficients: Callable, k: int, schedule) -> np.ndarray:
    """``a`` rows (n = k … N, x̄ coordinates) of a rule on ``schedule``."""
    H = schedule.H.numpy()
    n = np.arange(k, schedule.num_steps + 1)
    h = np.stack([H[n - j] for j in range(1, k + 1)], axis=1)
    a, _ = coefficients(h)
    return np.atleast_2d(a)


def propagator_growth(coefficients: Callable, k: int, schedule) -> tuple[float, float]:
    """Variable-step zero-stability, measured: ``max ‖M_n ⋯ M_m‖_∞`` over all windows
    ``m ≤ n`` of the homogeneous companion matrices of the relation (x̄ coordinates,
    the method's own) for sampling, and the same for their inverses (inversion).  This
    is the variable-step zero-stability constant on one grid: bounded independently of N
    for a bidirectionally zero-stable rule (constant ``a_j`` with simple unimodular
    roots: a small number; the step-ratio-scaled members, O-BELM included: up to
    ``(h_max/h_min)^q`` in the inverse direction, a nominal bound -- a round trip
    retraces the same path, so the measured rounding error stays far smaller).
    ``inf`` if ``a_k = 0`` somewhere (not invertible).  ``coefficients``: ``h -> (a, b)``
    as returned by :meth:`BELMRule.numeric`."""
    a = _a_table(coefficients, k, schedule)
    mats, invs = [], []
    for row in a:
        if row[-1] == 0 or not np.all(np.isfinite(row)):
            return float("nan"), float("inf")
        M = np.zeros((k, k))
        M[0, :] = row
        M[1:, :-1] = np.eye(k - 1)
        mats.append(M)
        invs.append(np.linalg.inv(M))

    def worst(seq: list[np.ndarray]) -> float:
        best = 0.0
        for m in range(len(seq)):
            P = np.eye(k)
            for M in seq[m:]:
                P = M @ P
                best = max(best, float(np.abs(P).sum(axis=1).max()))
        return best

    return worst(mats), worst(invs[::-1])


def lte_proxy(coefficients: Callable, k: int, schedule, std: float = 0.5) -> float:
    r"""Σ_n |τ_n| · s / g(σ̄_n) / |ρ'(1)|: the exact local truncation error of the rule on
    the trajectory ``g(σ̄) = sqrt(s² + σ̄²)`` (the x̄-path of a Gaussian datum of std s:
    "typical x̄^{(m)}" for every m at once), propagated to σ̄ = 0 by the Gaussian flow
    (factor s/g) and divided by the constant-step ρ'(1) (error constant normalisation).
    A cheap, sampling-free stand-in for the measured error; steps of the start-up members
    are left out."""
    sb = schedule.sigma_bar.numpy()
    H = schedule.H.numpy()
    n = np.arange(k, schedule.num_steps + 1)
    h = np.stack([H[n - j] for j in range(1, k + 1)], axis=1)
    a, b = coefficients(h)
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    g = lambda x: np.sqrt(std**2 + x**2)           # noqa: E731
    dg = lambda x: x / np.sqrt(std**2 + x**2)      # noqa: E731
    tau = g(sb[n]).copy()
    for j in range(1, k + 1):
        tau -= a[:, j - 1] * g(sb[n - j])
        if j < k:
            tau -= b[:, j - 1] * h[:, j - 1] * dg(sb[n - j])
    const = np.ones((1, k))
    a1, _ = coefficients(const)
    a1 = np.ravel(a1)
    rho_prime = k - sum((k - j) * a1[j - 1] for j in range(1, k + 1))
    return float(np.sum(np.abs(tau) * std / g(sb[n])) / abs(rho_prime))


# --------------------------------------------------------------------------- search

@dataclass
class Candidate:
    """One evaluated member of a stable family.

    ``errors[i]`` is the RMS error on ``labels[i]``; ``objective`` their geometric mean;
    ``ratio`` = errors / O-BELM's errors on the same grids (< 1: better than O-BELM).
    ``growth`` = worst (sampling, inversion) :func:`propagator_growth` over the grids.
    """

    k: int
    c: float
    q: float
    order: int
    zero_stable: bool
    constant_roots: tuple[complex, ...]
    labels: list[str] = field(default_factory=list)
    errors: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ratio: np.ndarray = field(default_factory=lambda: np.zeros(0))
    growth: tuple[float, float] = (float("nan"), float("nan"))
    lte_proxy: float = float("nan")

    @property
    def objective(self) -> float:
        return float(np.exp(np.mean(np.log(self.errors)))) if len(self.errors) else float("nan")

    @property
    def geo_mean_ratio(self) -> float:
        return float(np.exp(np.mean(np.log(self.ratio)))) if len(self.ratio) else float("nan")

    @property
    def max_ratio(self) -> float:
        return float(np.max(self.ratio)) if len(self.ratio) else float("nan")

    @property
    def is_obelm(self) -> bool:
        return self.k == 2 and self.q == 2

    @property
    def label(self) -> str:
        if self.is_obelm:
            return "O-BELM (k=2, q=2)"
        base = f"k={self.k}, c={self.c:g}, q={self.q:g}"
        names = {(3, 1.0, 0.0): "leapfrog3", (3, 1.0, 2.0): "leapfrog3-scaled", (2, 1.0, 0.0): "a_2 = 1"}
        name = names.get((self.k, self.c, self.q))
        return f"{name} ({base})" if name else base

    def rule(self) -> BELMRule:
        """The exact symbolic rule (:func:`scaled_rule`) of this candidate."""
        return scaled_rule(self.k, sp.nsimplify(self.c, rational=True), sp.nsimplify(self.q, rational=True))


def _constant_check(k: int, c: float) -> tuple[bool, tuple[complex, ...]]:
    """Exact constant-step root check of the member (its q = 0 sibling has the same ρ)."""
    rep = scaled_rule(k, c, 0).stability
    return rep.zero_stable, rep.forward_roots


def evaluate(k: int, c: float, q: float, grids: Sequence[tuple[str, Any]],
             bench: Optional[AnalyticBench] = None, reference: Optional[np.ndarray] = None) -> Candidate:
    """Evaluate the scaled member ``(k, c, q)`` on ``grids`` (see :class:`Candidate`).

    Unstable members (constant-step roots off the circle or repeated) are returned with
    ``zero_stable=False`` and no measurements.
    """
    if k == 2 and c != 1:
        raise ValueError("k=2 members need c = 1 (bidirectional zero-stability)")
    stable, roots = _constant_check(k, c)
    order = 2 if (k == 3 or q == 2) else 1
    cand = Candidate(k=k, c=float(c), q=float(q), order=order, zero_stable=stable, constant_roots=roots)
    if not stable:
        return cand
    bench = bench or AnalyticBench()
    member = NumericMember(k, c, q, stable, order)
    coeffs = member.numeric()
    errors, fwd, inv, proxy = [], 0.0, 0.0, 0.0
    for label, sched in grids:
        errors.append(bench.rms_error(lambda f, s: BELM(f, s, rule=member, progress=False), sched))
        gf, gi = propagator_growth(coeffs, k, sched)
        fwd, inv = max(fwd, gf), max(inv, gi)
        proxy += lte_proxy(coeffs, k, sched)
    cand.labels = [g[0] for g in grids]
    cand.errors = np.array(errors)
    cand.growth = (fwd, inv)
    cand.lte_proxy = proxy
    if reference is not None:
        cand.ratio = cand.errors / reference
    return cand


DEFAULT_SPACE: dict[int, dict[str, tuple]] = {
    2: {"c": (1,), "q": (0, 0.5, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 4)},
    3: {"c": (-1, 0, 0.5, 1, 1.5, 1.75, 1.9, 2, 2.5), "q": (0, 1, 2, 2.5, 3, 4)},
}


def search(space: Optional[dict[int, dict[str, Sequence[float]]]] = None,
           grids: Optional[Sequence[tuple[str, Any]]] = None,
           bench: Optional[AnalyticBench] = None,
           keep_unstable: bool = False) -> list[Candidate]:
    """Scan the scaled stable families and rank the members by measured error.

    ``space``: ``{k: {"c": values, "q": values}}`` (default :data:`DEFAULT_SPACE`, which
    also contains unstable ``c`` to show that they are rejected); ``grids``: default
    :func:`real_grids` (3 schedules × linspace/leading × N = 10, 20).  O-BELM's errors
    (computed with :class:`belm.OBELM`, independently of the family code) are the
    reference of :attr:`Candidate.ratio`.  Returns the bidirectionally zero-stable
    members sorted by :attr:`Candidate.objective` (plus the rejected ones at the end
    when ``keep_unstable``).
    """
    space = DEFAULT_SPACE if space is None else space
    grids = real_grids() if grids is None else list(grids)
    bench = bench or AnalyticBench()
    reference = np.array([bench.rms_error(lambda f, s: OBELM(f, s, progress=False), sched) for _, sched in grids])
    stable, unstable = [], []
    for k, axes in space.items():
        for c in axes.get("c", (1,)):
            for q in axes["q"]:
                cand = evaluate(int(k), c, q, grids, bench, reference)
                (stable if cand.zero_stable else unstable).append(cand)
    stable.sort(key=lambda cd: cd.objective)
    return stable + (unstable if keep_unstable else [])


def summary_table(cands: Sequence[Candidate]) -> str:
    """Markdown table of candidates (label, order, geo-mean error, ratios, growth, proxy)."""
    lines = ["| member | order | geo-mean RMS | geo-mean / O-BELM | worst / O-BELM | best / O-BELM "
             "| nominal inversion growth (x̄) | LTE proxy |", "|---|---|---|---|---|---|---|---|"]
    for cd in cands:
        if not cd.zero_stable:
            lines.append(f"| {cd.label} | {cd.order} | unstable (roots {', '.join(f'{z:.3g}' for z in cd.constant_roots)}) "
                         "| | | | | |")
            continue
        lines.append(f"| {cd.label} | {cd.order} | {cd.objective:.3e} | {cd.geo_mean_ratio:.3f} | "
                     f"{cd.max_ratio:.3g} | {float(np.min(cd.ratio)):.3g} | {cd.growth[1]:.2g} | {cd.lte_proxy:.3g} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    torch.set_num_threads(1)
    res = search(keep_unstable=True)
    print(summary_table(res))
