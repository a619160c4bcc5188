"""Stability per direction: how much a sampler's parasitic mode grows when sampling and inverting.

An exact 2-step method is a recursion on *pairs* of states. Besides the smooth solution
(the ODE's), the pair carries a second, *parasitic* mode (an odd, step-to-step alternating
component). Inversion runs the recursion backwards, so whatever seeds that mode at the
clean end (the DDIM start-up step, rounding, a change of condition) is multiplied by the
inverse of what sampling multiplies it by. Reconstruction stays exact either way, but a
latent whose parasitic mode has grown by 10⁴ is not noise-like and does not edit or
interpolate well. This module puts a number on it.

Definitions (rescaled coordinates x̄ = x / alpha, σ̄ = sigma / alpha; see MATH.md):

* **m-step relation** (O-BELM, BDIA, BELM(k)), row n: x̄_n = Σ_j a_j x̄_{n−j} + Σ_j c_j ε_{n−j}.
  With ε = 0 the consistency condition Σ_j a_j = 1 makes the constant the smooth mode of
  every step, and the differences D̄_n = x̄_n − x̄_{n−1} obey a closed (m−1)-step
  recursion: ρ_n(ζ) = ζ^m − Σ a_j ζ^{m−j} = (ζ − 1)·q_n(ζ). The parasitic modes are the
  roots of q_n (m = 2: the single root −a_2, exactly: D̄_n = −a_2·D̄_{n−1}). Over a
  pass, growth = the spectral norm of the product of the difference-space companion
  matrices Q_n (sampling) or of its inverse (inversion); for m = 2 that is
  |Π_n a_2[n]| and its reciprocal, exactly. For O-BELM, a_2 = (H_t/H_p)², so the
  product telescopes: sampling growth = (H_{N−1}/H_0)².
* **EDICT** (registers x, y, mixing p): with ε = 0 one step maps x̄ ↦ p x̄ + (1−p) ȳ,
  ȳ ↦ p(1−p) x̄ + (p + (1−p)²) ȳ. Its row sums are 1 (smooth mode x̄ = ȳ) and its
  determinant is p², so the parasitic eigenvalue is p², with left eigenvector (1, −1):
  the branch difference x̄ − ȳ is multiplied by exactly p² per step (sampling) and p^−2
  (inversion). Its right eigenvector is (1, −p), not (1, −1).

These numbers depend only on the coefficient rows (:class:`~belm.solvers.relation.Relation`
``a`` and ``c``, EDICT's p and the DDIM rows), never on a second copy of them.

**With a denoiser.** ε = 0 is the homogeneous recursion. A real network contracts the
smooth mode while sampling (x̄ shrinks from σ̄_0-sized noise to data), and for an m-step
BELM the determinant of one step (−a_m in x̄ for m = 2) does not depend on ε at all
(ε is never evaluated at the state the step drops), so the parasitic mode gets the
inverse of that contraction: it grows more while sampling and *less* while inverting.
``data_std=s`` models this with the exact ε of data ~ N(0, s²) (a linear ε,
ε = j(σ̄)·x̄ with j = σ̄/(s² + σ̄²)); per step the parasitic factor is then the
non-principal root of the frozen step matrix, and totals are products of those. This is
the figure that predicts the noisiness of real latents (see benchmarks/editing.py).

**Coordinates.** All factors above are in x̄. The network sees x = alpha·x̄: a latent's
parasitic amplitude in x is alpha_0·|D̄| at the noisy end against alpha_{N−m+1}·|D̄| at
the clean end, so ``inversion_x = inversion · alpha_0 / alpha_{N−m+1}``
(EDICT: alpha_0 / alpha_N). Note: MATH.md's "−A_2 = −a_2·alpha_n/alpha_{n−2} per step in
x" is the product of *both* roots of the x-space step (the determinant), not the
parasitic one: the smooth root in x is ≈ alpha_n/alpha_{n−1}, so the parasitic root in x
is ≈ −a_2·alpha_{n−1}/alpha_{n−2}, whose product telescopes to
(H_{N−1}/H_0)²·alpha_{N−1}/alpha_0 (not ·alpha_{N−1}/(alpha_0·alpha_1)).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from belm.errors import GrowthWarning
from belm.schedule import Schedule, grid_timesteps
from belm.solvers.relation import Relation, ddim_relation

__all__ = ["Growth", "growth", "parasitic_growth", "relation_of", "check_inversion_growth",
           "DEFAULT_THRESHOLD", "DEFAULT_DATA_STD"]

#: inversion growth (x coordinates, with a unit-variance data model) above which
#: :func:`check_inversion_growth` warns. Trailing grids stay at 1…3 for the three standard
#: beta schedules and N ≤ 100; leading/linspace grids ending at timestep 0 or 1 reach 10²…10⁴.
DEFAULT_THRESHOLD = 10.0
#: the data model of the warning: ε of data ~ N(0, 1) (images in [−1, 1], SD latents).
DEFAULT_DATA_STD = 1.0


@dataclass(frozen=True)
class Growth:
    """Growth of the parasitic mode(s) of one sampler on one schedule.

    Attributes:
        method: the sampler's name (e.g. ``"OBELM"``).
        num_steps: N.
        levels: the levels n whose step the factors belong to (sampling step producing level n).
        per_step: modulus of the largest parasitic factor of each sampling step (x̄
            coordinates; < 1: sampling damps it, inversion amplifies it by its reciprocal).
        sampling: growth over a full sampling pass from a latent (x̄ coordinates).
        inversion: growth over a full inversion, start-up steps excluded (x̄ coordinates).
        x_factor: alpha_0 / alpha at the clean end of the window (see module docstring).
        data_std: None (ε = 0, the homogeneous recursion) or the std of the Gaussian data
            model whose linear ε entered the factors.
        modes: number of parasitic modes (0 for DDIM, m − 1 for an m-step relation, 1 for EDICT).
    """

    method: str
    num_steps: int
    levels: tuple[int, ...]
    per_step: tuple[float, ...]
    sampling: float
    inversion: float
    x_factor: float
    data_std: Optional[float]
    modes: int

    @property
    def inversion_x(self) -> float:
        """Inversion growth of the parasitic amplitude in the network's coordinates x."""
        return self.inversion * self.x_factor

    @property
    def sampling_x(self) -> float:
        """Sampling growth of the parasitic amplitude in the network's coordinates x."""
        return self.sampling / self.x_factor

    def __str__(self) -> str:
        model = "ε = 0" if self.data_std is None else f"data std {self.data_std:g}"
        return (f"{self.method}, N = {self.num_steps} ({model}): parasitic mode ×{self.sampling:.3g} sampling, "
                f"×{self.inversion:.3g} inversion (×{self.inversion_x:.3g} in x)")


def relation_of(sampler: Any) -> Optional[Relation]:
    """The k-step relation a multistep sampler runs on its schedule (None for DDIM and EDICT).

    The sampler's own last member: the very coefficients its chain steps with.
    """
    members = getattr(sampler, "members", None)
    if not members or len(members) < 2:
        return None
    return members[-1]


def _slope(schedule: Schedule, data_std: Optional[float]) -> np.ndarray:
    """dε/dx̄ per level for data ~ N(0, s²): j = σ̄ / (s² + σ̄²); zeros when data_std is None."""
    sb = schedule.sigma_bar.numpy()
    if data_std is None:
        return np.zeros_like(sb)
    s2 = float(data_std) ** 2
    return sb / (s2 + sb**2)


def _relation_steps(rel: Relation, j: np.ndarray) -> list[np.ndarray]:
    """x̄-space step matrices (window x̄_{n−m} … x̄_{n−1} → x̄_{n−m+1} … x̄_n), n = m … N."""
    m, N = rel.m, rel.schedule.num_steps
    a, c = rel.a.numpy(), rel.c.numpy()
    out = []
    for n in range(m, N + 1):
        M = np.zeros((m, m))
        M[:-1, 1:] = np.eye(m - 1)
        for k in range(1, m + 1):                  # coefficient of x̄_{n−k}: column m − k
            M[-1, m - k] = a[n, k - 1] + c[n, k - 1] * j[n - k]
        out.append(M)
    return out


def _edict_steps(schedule: Schedule, p: float, j: np.ndarray) -> list[np.ndarray]:
    """x̄-space maps of EDICT's (x̄, ȳ) registers, steps n = 1 … N, from the DDIM rows.

    The second half-step evaluates ε(x', t_{n−1}) at x' = alpha_n·x̄', so its slope in x̄
    is j_{n−1}·alpha_n/alpha_{n−1}.
    """
    ddim = ddim_relation(schedule)
    a, c = ddim.a.numpy()[:, 0], ddim.c.numpy()[:, 0]
    alpha = schedule.alpha.numpy()
    q = 1.0 - p
    out = []
    for n in range(1, schedule.num_steps + 1):
        jx, jy = j[n - 1], j[n - 1] * alpha[n] / alpha[n - 1]
        ops = (np.array([[a[n], c[n] * jx], [0.0, 1.0]]),         # x ← a x + c ε(y)
               np.array([[1.0, 0.0], [c[n] * jy, a[n]]]),         # y ← a y + c ε(x)
               np.array([[p, q], [0.0, 1.0]]),                    # x ← p x + (1−p) y
               np.array([[1.0, 0.0], [q, p]]))                    # y ← p y + (1−p) x
        M = np.eye(2)
        for op in ops:
            M = op @ M
        out.append(M)
    return out


def _split_roots(M: np.ndarray) -> np.ndarray:
    """Eigenvalues of one step except the principal one (the one closest to 1)."""
    ev = np.linalg.eigvals(M)
    keep = np.ones(ev.size, bool)
    keep[int(np.argmin(np.abs(ev - 1.0)))] = False
    return ev[keep]


def _difference_product(mats: list[np.ndarray]) -> np.ndarray:
    """Product (later steps on the left) of the step maps induced on differences.

    Valid when every map has row sums 1 (ε = 0): the constant vector is then a common
    eigenvector, T·M·T⁺ is the exact map on D = T·v with T the first-difference operator.
    """
    d = mats[0].shape[0]
    T = np.diff(np.eye(d), axis=0)
    Tp = np.linalg.pinv(T)
    P = np.eye(d - 1)
    for M in mats:
        P = (T @ M @ Tp) @ P
    return P


def parasitic_growth(subject: Union[Relation, Any], *, data_std: Optional[float] = None,
                     p: Optional[float] = None) -> Growth:
    """Parasitic-mode growth of a sampler (or of a :class:`Relation`, or of EDICT's coupling).

    Args:
        subject: a sampler (DDIM, OBELM, BDIA, BELM, EDICT) or a Relation with m ≥ 2.
            A Schedule together with ``p`` means EDICT's p-coupling on that schedule.
        data_std: None for the homogeneous recursion (ε = 0; exact totals), or the std of
            a Gaussian data model whose linear ε is included (frozen-root products).
        p: EDICT's mixing weight when ``subject`` is a Schedule.

    Returns:
        A :class:`Growth`. DDIM has no parasitic mode: ``modes`` = 0, growth 1.
    """
    if data_std is not None and (isinstance(data_std, bool) or not float(data_std) > 0
                                 or not math.isfinite(float(data_std))):
        raise ValueError(f"data_std must be a positive number or None; got {data_std!r}")
    if isinstance(subject, Schedule):
        if p is None:
            raise ValueError("a Schedule alone means EDICT's coupling: pass p=... (e.g. 0.93)")
        schedule, name, rel = subject, f"EDICT(p={p:g})", None
    elif isinstance(subject, Relation):
        schedule, name, rel = subject.schedule, subject.name, subject
        if rel.m < 2:
            raise ValueError(f"{rel.name} is a 1-step relation: it has no parasitic mode")
    else:
        schedule = getattr(subject, "schedule", None)
        if not isinstance(schedule, Schedule):
            raise TypeError("subject must be a sampler, a Relation or a Schedule (with p=); "
                            f"got {type(subject).__name__}")
        name = getattr(subject, "name", type(subject).__name__)
        p = getattr(subject, "p", p)
        rel = relation_of(subject) if p is None else None
        if rel is None and p is None:
            N = schedule.num_steps
            return Growth(name, N, (), (), 1.0, 1.0, 1.0, data_std, 0)
    j = _slope(schedule, None if data_std is None else float(data_std))
    alpha = schedule.alpha.numpy()
    N = schedule.num_steps
    if rel is None:
        mats, first, modes = _edict_steps(schedule, float(p), j), 1, 1
        x_factor = alpha[0] / alpha[N]
    else:
        mats, first, modes = _relation_steps(rel, j), rel.m, rel.m - 1
        x_factor = alpha[0] / alpha[N - rel.m + 1]
    roots = [np.abs(_split_roots(M)) for M in mats]
    per_step = tuple(float(r.max()) for r in roots)
    if data_std is None:
        P = _difference_product(mats)
        sv = np.linalg.svd(P, compute_uv=False)
        sampling, inversion = float(sv.max()), float(1.0 / sv.min())
    else:
        sampling = float(np.prod([r.max() for r in roots]))
        inversion = float(np.prod([1.0 / r.min() for r in roots]))
    return Growth(name, N, tuple(range(first, N + 1)), per_step, sampling, inversion, float(x_factor),
                  None if data_std is None else float(data_std), modes)


def growth(sampler: Any, data_std: Optional[float] = None) -> Growth:
    """``parasitic_growth(sampler, data_std=data_std)``: the friendly name."""
    return parasitic_growth(sampler, data_std=data_std)


def check_inversion_growth(sampler: Any, threshold: float = DEFAULT_THRESHOLD, *,
                           data_std: float = DEFAULT_DATA_STD, stacklevel: int = 2,
                           reversible: bool = False) -> Optional[Growth]:
    """Warn (:class:`~belm.errors.GrowthWarning`) when inverting on this grid blows up the
    parasitic mode: ``growth(sampler, data_std).inversion_x > threshold``.

    The message names the growth and the fix (a trailing grid). ``reversible``: the warning
    is for sampling with ``grad="reversible"``, whose backward pass recovers the states by
    inverting the chain, so its gradients carry the same growth (e.g. O-BELM, N = 10, DDPM
    betas, float64: 3e-10 from autograd's on a linspace grid, 1e-12 on trailing). Returns
    the Growth (None on continuous-σ schedules, which this check does not cover).
    """
    if sampler.schedule.kind != "discrete":
        return None   # the data model and the grid fix below are those of discrete VP schedules
    g = parasitic_growth(sampler, data_std=data_std)
    if g.modes and g.inversion_x > threshold:
        sched = sampler.schedule
        trailing = Schedule(sched.alphas_cumprod, grid_timesteps(sched.num_train_timesteps, sched.num_steps, "trailing"),
                            final_alpha_cumprod=sched.final_alpha_cumprod, clean_timestep=sched.clean_timestep)
        if trailing != sched:
            alt = parasitic_growth(_on_schedule(sampler, trailing), data_std=data_std).inversion_x
            fix = (f"Use spacing='trailing' (growth {alt:.3g} there; e.g. Schedule.from_diffusers(scheduler, N, "
                   "spacing='trailing'), or model.schedule(N) which defaults to it)") if alt < g.inversion_x else \
                (f"The trailing grid does not help here (growth {alt:.3g}): use more steps or BDIA(gamma=1)")
        else:
            fix = "This is already the trailing grid: use more steps, O-BELM or BDIA(gamma=1)"
        if hasattr(sampler, "p"):   # EDICT's mode is its p-coupling: more steps make it worse
            fix = (f"EDICT's register difference is divided by p^2 per inverted step (p^-2N = "
                   f"10^{2 * sampler.schedule.num_steps * math.log10(1 / sampler.p):.1f}): use fewer steps, p closer "
                   "to 1, or O-BELM / BDIA(gamma=1)")
        effect = ("grad='reversible' recovers the sampling chain's states by inverting it on the backward pass, so "
                  "its gradients carry that growth times float rounding (autograd's do not)") if reversible else \
            ("inverted latents will not be noise-like and edits/interpolations degrade (reconstruction stays "
             "exact)")
        warnings.warn(
            f"{g.method} on this grid (N = {g.num_steps}, last timestep {int(sched.timesteps[-1])}) multiplies the "
            f"parasitic mode by {g.inversion_x:.3g} when inverting (threshold {threshold:g}): {effect}. {fix}.",
            GrowthWarning, stacklevel=stacklevel)
    return g


def _on_schedule(sampler: Any, schedule: Schedule) -> Any:
    """A stand-in with the sampler's identity on another schedule (for growth only)."""
    clone = copy.copy(sampler)
    clone.schedule = schedule
    if getattr(sampler, "members", None):
        clone.members = [ddim_relation(schedule)] + [clone.relation(m) for m in range(2, len(sampler.members) + 1)]
    return clone
