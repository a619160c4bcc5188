"""Bit-exact inversion for 2-step methods: the velocity form on an integer lattice.

Any consistent 2-step relation x̄_{k+1} = g_k·x̄_{k−1} + (1 − g_k)·x̄_k + B_k·ε_k (O-BELM,
BDIA, derived 2-step BELMs) is rewritten with D_k = x̄_{k+1} − x̄_k, w_k = g_k·w_{k−1}
(w_0 = 1) and V_k = D_k / w_k as two shears (MATH.md, "Exactness in floating point")::

    V_k     = −V_{k−1} + (B_k / w_k) · ε(alpha_k · x̄_k)
    x̄_{k+1} = x̄_k + w_k · V_k

x̄ and V are stored as int64 on fixed-point lattices (x̄ = X · 2^−x_bits, V = Vi · 2^−v_bits)
and each increment is rounded to its lattice. An increment depends only on the *other*
integer register, so inversion subtracts exactly the same integer: sample(invert(x0))
returns x0 bit for bit, whatever the network's dtype, provided the network returns
identical bits for identical inputs (same batch composition; on GPU,
``torch.use_deterministic_algorithms(True)``).

The first step of a chain (DDIM) is the same shear with g = 0 (V_{−1} = 0); inversion's
bootstrap at the clean level sets V_{N−1} from DDIM inversion's ε(x_N), which any
deterministic choice would do: the bijection covers the whole chain. The input's bits
below the x̄ lattice are carried in the latent (``residual``), so every finite input
comes back exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from belm.errors import LatticeOverflowError
from belm.solvers.base import Callback, Latent, check_tensor

if TYPE_CHECKING:  # pragma: no cover
    from belm.solvers.multistep import MultistepSampler

__all__ = ["Lattice", "LatticeLatent", "LatticeEngine"]

# Registers are kept below 2^60 so that one increment (also < 2^60) can never wrap int64.
_REGISTER_BITS = 60
_LIMIT = float(2**61)
# Generous bound on |ε| used to size the lattice; a network exceeding it trips the
# overflow check with a clear error instead of wrapping.
_EPS_BOUND = 16.0
# The x̄ increments must be resolved to this many bits below the chain's magnitude, so that
# bitwise sampling stays the same method as float sampling (agreement to ~1e-6).
_ACCURACY_BITS = 20


@dataclass(frozen=True)
class Lattice:
    """Fixed-point formats: x̄ = X · 2^−x_bits, V = Vi · 2^−v_bits (X, Vi int64)."""

    x_bits: int
    v_bits: int

    @property
    def x_scale(self) -> float:
        return math.ldexp(1.0, -self.x_bits)

    @property
    def v_scale(self) -> float:
        return math.ldexp(1.0, -self.v_bits)


@dataclass(frozen=True)
class LatticeLatent(Latent):
    """Latent of a bitwise chain: ``states = (X_s, Vi_s)`` (int64) plus the lattice and the
    float64 residual of the clean input below the lattice (``None`` for sampled chains).

    :attr:`x` is the noisiest tensor x_s = alpha_s · X_s · 2^−x_bits in the input's dtype.
    """

    lattice: Lattice = Lattice(0, 0)
    residual: Optional[torch.Tensor] = None
    alpha: float = 1.0

    @property
    def x(self) -> torch.Tensor:
        return (self.states[0].to(torch.float64) * (self.alpha * self.lattice.x_scale)).to(self.dtype)


class LatticeEngine:
    """Runs a 2-step :class:`~belm.solvers.multistep.MultistepSampler` in velocity form."""

    def __init__(self, sampler: "MultistepSampler") -> None:
        if sampler.steps != 2:
            raise ValueError(f"exact='bitwise' is defined for 2-step methods; {sampler.name} has "
                             f"{sampler.steps} steps")
        schedule = sampler.schedule
        if schedule.final_alpha_cumprod != 1.0:
            raise ValueError("exact='bitwise' needs the clean level to have alpha = 1 "
                             "(Schedule(..., final_alpha_cumprod=1.0))")
        self.sampler = sampler
        N = schedule.num_steps
        ddim, two_step = sampler.members
        g = [0.0] + [float(two_step.a[k + 1, 1]) for k in range(1, N)]
        w = [1.0]
        for k in range(1, N):
            w.append(g[k] * w[k - 1])
        self.w = w
        # β for the first step of a chain (DDIM, g = 0) and for the 2-step relation.
        self.beta_ddim = [float(ddim.c[k + 1, 0]) / w[k] for k in range(N)]
        self.beta = [math.nan] + [float(two_step.c[k + 1, 0]) / w[k] for k in range(1, N)]
        self.alpha = [float(a) for a in schedule.alpha]
        self.sigma_bar = [float(s) for s in schedule.sigma_bar]

    # -- lattice ---------------------------------------------------------------------
    def lattice_for(self, x_bar_magnitude: float) -> Lattice:
        """Choose the fixed-point formats for a chain whose input has |x̄| ≤ x_bar_magnitude.

        Rigorous bounds, given |ε| ≤ _EPS_BOUND (a larger network output is caught by the
        overflow checks): the recursion V_k = ±V_{k∓1} + β_k ε gives
        |V| ≤ V_max = ε_max · (Σ_k |β_k| + max |β_ddim|) in either direction, and then
        |x̄_k − x̄_input| ≤ Σ_k |w_k| · V_max. Each register gets as many fractional bits as
        keep it below 2^60 (the V lattice may be coarser than 1: exactness never depends on
        resolution, only agreement with float sampling does).
        """
        N = len(self.w)
        # |V_k| ≤ ε_max · (what the recursion can have accumulated by step k), sampling from
        # level 0 (β_ddim_0, β_1 … β_k) or inverting from level N (β_ddim_{N−1}, β_{N−1} … β_{k+1}).
        forward, backward = [0.0] * N, [0.0] * N
        acc = max(abs(b) for b in self.beta_ddim)
        for k in range(N):
            acc += abs(self.beta[k]) if k else 0.0
            forward[k] = acc
        acc = max(abs(b) for b in self.beta_ddim)
        for k in range(N - 1, -1, -1):
            backward[k] = acc
            acc += abs(self.beta[k]) if k else 0.0
        v_bound = [_EPS_BOUND * max(f, b) for f, b in zip(forward, backward)]
        v_max = 2.0 * max(v_bound)
        # x̄ moves by D_k = w_k · V_k per step.
        x_max = 2.0 * (x_bar_magnitude + 1.0 + sum(abs(w) * v for w, v in zip(self.w, v_bound)))
        x_bits = _REGISTER_BITS - math.ceil(math.log2(x_max))
        v_bits = _REGISTER_BITS - math.ceil(math.log2(v_max))
        # Each x̄ increment must be resolved to _ACCURACY_BITS below the state's own scale
        # (input plus σ̄_k), or bitwise sampling would no longer be the same method as float.
        scale = x_bar_magnitude + 1.0
        v_resolution = max(abs(w) / (scale + sb) for w, sb in zip(self.w, self.sigma_bar))
        if max(v_resolution * math.ldexp(1.0, -v_bits), math.ldexp(1.0, -x_bits) / scale) > 2.0**-_ACCURACY_BITS:
            raise LatticeOverflowError(
                f"exact='bitwise': {self.sampler.name} with N = {self.sampler.schedule.num_steps} steps needs a "
                f"velocity range of ~2^{math.log2(v_max):.0f} at a resolution an int64 lattice cannot give "
                "(the weights w_k = prod g_j span too many orders of magnitude; with gamma < 1 they shrink "
                "like gamma^k). Use fewer steps, gamma closer to 1, or O-BELM")
        return Lattice(x_bits, v_bits)

    # -- shears on integers ------------------------------------------------------------
    @staticmethod
    def _to_lattice(value: torch.Tensor, scale: float, what: str, level: int) -> torch.Tensor:
        scaled = value / scale
        if not bool(torch.isfinite(scaled).all()) or float(scaled.abs().max()) >= _LIMIT:
            raise LatticeOverflowError(
                f"exact='bitwise': the {what} increment at level {level} does not fit the int64 lattice "
                f"(|value| = {float(value.abs().max()):.3g}): the chain grew beyond the bound its lattice was "
                "sized for (BDIA with gamma < 1 grows like gamma^-N when inverted; a network output far "
                "above 16 does too). Use fewer steps, gamma closer to 1, or O-BELM")
        return torch.round(scaled).to(torch.int64)

    @staticmethod
    def _check_register(register: torch.Tensor, what: str, level: int) -> None:
        if int(register.abs().max()) >= 2**62:
            raise LatticeOverflowError(f"exact='bitwise': the {what} register overflowed at level {level}; "
                                "the lattice cannot hold this chain (use fewer steps)")

    def _x_increment(self, k: int, Vi: torch.Tensor, lat: Lattice) -> torch.Tensor:
        """round(w_k · V_k / x_scale): a function of the V register only."""
        return self._to_lattice(Vi.to(torch.float64) * (self.w[k] * lat.v_scale), lat.x_scale, "x", k)

    def _v_increment(self, beta: float, eps: torch.Tensor, lat: Lattice, k: int) -> torch.Tensor:
        """round(β · ε / v_scale): a function of the X register only (through ε)."""
        return self._to_lattice(eps.to(torch.float64) * beta, lat.v_scale, "velocity", k)

    def _x_float(self, X: torch.Tensor, k: int, lat: Lattice) -> torch.Tensor:
        """x_k = alpha_k · x̄_k in float64: the network's input, identical in both directions."""
        return X.to(torch.float64) * (self.alpha[k] * lat.x_scale)

    # -- directions --------------------------------------------------------------------
    def sample(self, x: torch.Tensor | Latent, *, from_level: int = 0,
               callback: Optional[Callback] = None) -> torch.Tensor:
        s = self.sampler
        N = s.schedule.num_steps
        residual = None
        if isinstance(x, Latent):
            s._check_latent(x)
            if not isinstance(x, LatticeLatent):
                raise TypeError("exact='bitwise' samples only latents from exact='bitwise' inversion; "
                                "invert with the same exact= setting")
            lat, start, out_dtype, residual = x.lattice, x.level, x.dtype, x.residual
            X, Vi = x.states                 # never modified in place: the latent stays intact
            eps_of = s._network(s.model_dtype or out_dtype)
        else:
            check_tensor(x, "x")
            start = s._level_arg(from_level, "from_level")
            out_dtype = x.dtype
            x_bar = x.to(torch.float64) / self.alpha[start]
            lat = self.lattice_for(float(x_bar.abs().max()))
            X = torch.round(x_bar / lat.x_scale).to(torch.int64)
            eps_of = s._network(s.model_dtype or out_dtype)
            # The chain's first step is DDIM: the same shear with V_{start−1} = 0.
            Vi = self._v_increment(self.beta_ddim[start], eps_of(self._x_float(X, start, lat), start), lat, start)
        X = X + self._x_increment(start, Vi, lat)
        k0 = start + 1
        device = X.device
        for k in s._bar(range(k0, N), "sample (bitwise)", N - k0):
            eps = eps_of(self._x_float(X, k, lat), k)
            Vi = self._v_increment(self.beta[k], eps, lat, k) - Vi
            X = X + self._x_increment(k, Vi, lat)
            self._check_register(Vi, "velocity", k)
            self._check_register(X, "x", k + 1)
            if callback is not None:
                callback({"level": k + 1, "timestep": s.schedule.timestep(k + 1),
                          "x": self._x_float(X, k + 1, lat), "eps": eps, "direction": "sample"})
        out = X.to(torch.float64) * lat.x_scale
        if residual is not None:
            out = out + residual
        return out.to(device=device, dtype=out_dtype)

    def invert(self, x0: torch.Tensor, *, to_level: int = 0, callback: Optional[Callback] = None) -> Latent:
        s = self.sampler
        check_tensor(x0, "x0")
        N = s.schedule.num_steps
        to_level = s._level_arg(to_level, "to_level")
        x0_64 = x0.to(torch.float64)
        lat = self.lattice_for(float(x0_64.abs().max()))
        X = torch.round(x0_64 / lat.x_scale).to(torch.int64)
        # Exact: x0's bits below 2^−x_bits fit in float64 and add back without rounding.
        residual = x0_64 - X.to(torch.float64) * lat.x_scale
        eps_of = s._network(s.model_dtype or x0.dtype)
        Vi = self._v_increment(self.beta_ddim[N - 1], eps_of(x0_64, N), lat, N - 1)
        for k in s._bar(range(N - 1, to_level, -1), "invert (bitwise)", N - 1 - to_level):
            X = X - self._x_increment(k, Vi, lat)
            eps = eps_of(self._x_float(X, k, lat), k)
            Vi = self._v_increment(self.beta[k], eps, lat, k) - Vi
            self._check_register(Vi, "velocity", k)
            self._check_register(X, "x", k)
            if callback is not None:
                callback({"level": k, "timestep": s.schedule.timestep(k), "x": self._x_float(X, k, lat),
                          "eps": eps, "direction": "invert"})
        X = X - self._x_increment(to_level, Vi, lat)
        return LatticeLatent((X, Vi), to_level, s.name, s.schedule.fingerprint, x0.dtype,
                             lattice=lat, residual=residual, alpha=self.alpha[to_level])
