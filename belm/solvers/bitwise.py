"""Bit-exact inversion for 2-step methods: the velocity form on an integer lattice.

Any consistent 2-step relation y_{k+1} = g_k·y_{k−1} + (1 − g_k)·y_k + B_k·f_k (O-BELM,
BDIA, derived 2-step BELMs; y = x / scale) is rewritten with D_k = y_{k+1} − y_k,
w_k = g_k·w_{k−1} (w_0 = 1) and V_k = D_k / w_k as two shears (docs/math.md, "Exactness in
floating point")::

    V_k     = −V_{k−1} + (B_k / w_k) · f(scale_k · y_k)
    y_{k+1} = y_k + w_k · V_k

y and V are stored as int64 on fixed-point lattices (y = Y · 2^−x_bits, V = Vi · 2^−v_bits)
and each increment is rounded to its lattice. An increment depends only on the *other*
integer register, so inversion subtracts exactly the same integer: sample(invert(x0))
returns x0 bit for bit, whatever the network's dtype, provided the network returns
identical bits for identical inputs (same batch composition; on GPU,
``torch.use_deterministic_algorithms(True)``).

The chain's state is (Y_n, V_n): the position at level n and the velocity of the step
n → n+1 (at the clean level N, V_{N−1}, or none before an inversion). The first step of a
sampling chain is DDIM, the same shear with g = 0 (V_{s−1} = 0); inversion's start at the
clean level sets V_{N−1} from DDIM inversion's f(x_N), which any deterministic choice would
do: the bijection covers the whole chain. The input's bits below the y lattice are carried
in the latent (``residual``), so every finite input comes back exactly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch

from belm.errors import LatentMismatchError, LatticeOverflowError, NonFiniteError
from belm.solvers import base
from belm.solvers.base import Latent, _LatentFile
from belm.solvers.chain import Network, SingleLevelChain
from belm.solvers.relation import Relation

__all__ = ["Lattice", "LatticeLatent", "LatticeRule", "LatticeChain"]

# Registers are kept below 2^60 so that one increment (also < 2^60) can never wrap int64.
_REGISTER_BITS = 60
_LIMIT = float(2**61)
# Generous bound on |f| used to size the lattice; a network exceeding it trips the
# overflow check with a clear error instead of wrapping.
_F_BOUND = 16.0
# The y increments must be resolved to this many bits below the chain's magnitude, so that
# bitwise sampling stays the same method as float sampling (agreement to ~1e-6).
_ACCURACY_BITS = 20
# |register| must stay below this (checked after every step, and in files).
_REGISTER_LIMIT = 2**62
# A residual holds the input's bits below the lattice: float64 (float32 on devices without it).
_RESIDUAL_DTYPES = (torch.float64, torch.float32)
# The lattice's fractional bits: 60 − ceil(log2(bound)) with 2 ≤ bound < 2^1024 (float64).
_MIN_BITS, _MAX_BITS = _REGISTER_BITS - 1024, _REGISTER_BITS - 1


@dataclass(frozen=True)
class Lattice:
    """Fixed-point formats: y = Y · 2^−x_bits, V = Vi · 2^−v_bits (Y, Vi int64)."""

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
    """Latent of a bitwise chain: ``states = (Y_s, Vi_s)`` (int64) plus the lattice, the
    float64 residual of the clean input below the lattice (``None`` for sampled chains) and
    the scale of level s.

    :attr:`x` is the noisiest tensor x_s = scale_s · Y_s · 2^−x_bits in the input's dtype.

    Checked on construction: the lattice's bits in [``_MIN_BITS``, ``_MAX_BITS``], scale
    finite and > 0, the residual float64 of the states' shape; on load also the registers
    (|Y|, |Vi| < 2^62), the residual's finiteness and size (|r| ≤ 2^−x_bits / 2: it is
    what rounding to the lattice left); when sampling (:meth:`LatticeRule.check_latent`) the
    scale and v_bits against the schedule, x_bits against its largest possible value.
    Only x_bits below that bound can be checked by nothing but the file's sha256.
    """

    kind = "lattice"
    state_dtypes = (torch.int64,)
    _extra_tensors = ("residual",)
    _method_suffix = "[exact=bitwise]"

    lattice: Lattice = Lattice(0, 0)
    residual: Optional[torch.Tensor] = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("x_bits", "v_bits"):
            bits = getattr(self.lattice, name, None)
            if isinstance(bits, bool) or not isinstance(bits, int) or not _MIN_BITS <= bits <= _MAX_BITS:
                raise ValueError(f"LatticeLatent.lattice.{name} must be an integer in [{_MIN_BITS}, {_MAX_BITS}]; "
                                 f"got {bits!r}")
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"LatticeLatent.scale must be a finite number > 0; got {self.scale!r}")
        r, first = self.residual, self.states[0]
        if r is not None and (not isinstance(r, torch.Tensor) or r.dtype not in _RESIDUAL_DTYPES
                              or r.shape != first.shape or r.device != first.device):
            raise ValueError(f"LatticeLatent.residual must be None or a float64 (float32 where the device has no "
                             f"float64) tensor of the states' shape "
                             f"{tuple(first.shape)} on {first.device}; got "
                             f"{tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__}"
                             f"{', ' + str(r.dtype) if isinstance(r, torch.Tensor) else ''}")

    def check_finite(self) -> None:
        if self.residual is not None and not torch.isfinite(self.residual).all():
            raise NonFiniteError("latent.residual contains NaN or Inf; a latent from invert() is finite")

    def _noisiest(self) -> torch.Tensor:
        return self.states[0].to(_work_dtype(self.states[0].device)) * (self.scale * self.lattice.x_scale)

    def _metadata(self) -> dict[str, str]:
        return {"x_bits": str(self.lattice.x_bits), "v_bits": str(self.lattice.v_bits),
                "scale": float(self.scale).hex()}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.residual is None else {"residual": self.residual}

    @classmethod
    def _from_saved(cls, fields: dict, file: "_LatentFile") -> "Latent":
        lattice = Lattice(file.integer("x_bits", _MIN_BITS, _MAX_BITS), file.integer("v_bits", _MIN_BITS, _MAX_BITS))
        raw = file.text("scale")
        # float.hex form only ("0x1.179cf3606e827p-4"): fromhex alone also takes "0.5" as 5/16.
        scale = float.fromhex(raw) if re.fullmatch(r"0x[01]\.[0-9a-f]{1,13}p[+-][0-9]{1,4}", raw) else math.nan
        if not math.isfinite(scale) or scale <= 0:
            file.bad("scale", f"{raw!r} is not a finite number > 0 in float.hex form")
        for i, register in enumerate(fields["states"]):
            if int(register.abs().max()) >= _REGISTER_LIMIT:
                file.bad(f"state_{i}", f"a register reaches {int(register.abs().max())}, beyond the lattice's 2^62")
        residual = file.tensor("residual", required=False)
        if residual is not None:
            shape = tuple(fields["states"][0].shape)
            if residual.dtype not in _RESIDUAL_DTYPES or tuple(residual.shape) != shape:
                file.bad("residual", f"shape {tuple(residual.shape)}, dtype {residual.dtype}; it must be float64 of "
                                     f"the states' shape {shape}")
            if not torch.isfinite(residual).all():
                file.bad("residual", "contains NaN or Inf")
            if float(residual.abs().max()) > lattice.x_scale / 2:
                file.bad("residual", f"|residual| reaches {float(residual.abs().max()):.3g}, more than half the "
                                     f"lattice step 2^-{lattice.x_bits} that rounding can leave")
        return cls(**fields, lattice=lattice, residual=residual, scale=scale)


class LatticeRule:
    """The velocity form of one 2-step relation on one schedule: weights w_k and β_k.

    Args:
        ddim: member 1 (the start-up step).
        two_step: the method's bidirectional 2-step relation.
        name: method name, for error messages.
    """

    def __init__(self, ddim: Relation, two_step: Relation, name: str) -> None:
        schedule = two_step.schedule
        if float(schedule.scale[-1]) != 1.0:
            raise ValueError("exact='bitwise' needs the clean level to have scale 1 (alpha = 1): build the "
                             "schedule with final_alpha_cumprod=1.0 (the default)")
        self.name = name
        self.N = N = schedule.num_steps
        g = [0.0] + [float(two_step.a[k + 1, 1]) for k in range(1, N)]
        w = [1.0]
        for k in range(1, N):
            w.append(g[k] * w[k - 1])
        self.w = w
        # β for the first step of a chain (DDIM, g = 0) and for the 2-step relation.
        self.beta_ddim = [float(ddim.c[k + 1, 0]) / w[k] for k in range(N)]
        self.beta = [math.nan] + [float(two_step.c[k + 1, 0]) / w[k] for k in range(1, N)]
        self.scale = [float(a) for a in schedule.scale]
        self.tau = [float(s) for s in schedule.tau]

        self._size_velocity()

    def _size_velocity(self) -> None:
        """The velocity bounds, which depend on the rule alone (see :meth:`lattice_for`)."""
        N = self.N
        # |V_k| ≤ f_max · (what the recursion can have accumulated by step k), sampling from
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
        v_bound = [_F_BOUND * max(f, b) for f, b in zip(forward, backward)]
        self.v_max = 2.0 * max(v_bound)
        self.v_bits = _REGISTER_BITS - math.ceil(math.log2(self.v_max))
        # y moves by D_k = w_k · V_k per step: at most this far in all.
        self.y_travel = sum(abs(w) * v for w, v in zip(self.w, v_bound))

    def _x_bits(self, y_magnitude: float) -> int:
        y_max = 2.0 * (y_magnitude + 1.0 + self.y_travel)
        if not math.isfinite(y_max):
            raise LatticeOverflowError(
                f"exact='bitwise': an input of magnitude {y_magnitude:.3g} (in the chain's coordinates x / scale) "
                "leaves no room for the chain's bound in float64; scale the input down (|x| below ~1e300) or use "
                "exact='float'")
        return _REGISTER_BITS - math.ceil(math.log2(y_max))

    def lattice_for(self, y_magnitude: float) -> Lattice:
        """The fixed-point formats for a chain whose input has |y| ≤ y_magnitude.

        Rigorous bounds, given |f| ≤ _F_BOUND (a larger network output is caught by the
        overflow checks): the recursion V_k = ±V_{k∓1} + β_k f gives
        |V| ≤ V_max = f_max · (Σ_k |β_k| + max |β_ddim|) in either direction, and then
        |y_k − y_input| ≤ Σ_k |w_k| · V_max. Each register gets as many fractional bits as
        keep it below 2^60 (the V lattice may be coarser than 1: exactness never depends on
        resolution, only agreement with float sampling does).

        Raises:
            LatticeOverflowError: the input is too large for float64 bounds (|y| ≳ 9e307),
                or the weights span more than an int64 lattice resolves.
        """
        x_bits, v_bits = self._x_bits(y_magnitude), self.v_bits
        # Each y increment must be resolved to _ACCURACY_BITS below the state's own scale
        # (input plus τ_k), or bitwise sampling would no longer be the same method as float.
        scale = y_magnitude + 1.0
        v_resolution = max(abs(w) / (scale + t) for w, t in zip(self.w, self.tau))
        if max(v_resolution * math.ldexp(1.0, -v_bits), math.ldexp(1.0, -x_bits) / scale) > 2.0**-_ACCURACY_BITS:
            raise LatticeOverflowError(
                f"exact='bitwise': {self.name} with N = {self.N} steps needs a velocity range of "
                f"~2^{math.log2(self.v_max):.0f} at a resolution an int64 lattice cannot give (the weights "
                "w_k = prod g_j span too many orders of magnitude; with gamma < 1 they shrink like gamma^k). "
                "Use fewer steps, gamma closer to 1, or O-BELM")
        return Lattice(x_bits, v_bits)

    def check_latent(self, latent: LatticeLatent) -> None:
        """Raise :class:`LatentMismatchError` naming the field of ``latent`` that this rule
        contradicts: the scale of its level, v_bits (a function of the rule alone) and
        x_bits (at most that of an input of magnitude 0)."""
        expected_scale = self.scale[latent.level]
        if latent.scale != expected_scale:
            raise LatentMismatchError(
                f"latent.scale = {latent.scale!r}, but level {latent.level} of this schedule has scale "
                f"{expected_scale!r}: the latent's lattice fields were changed, or it belongs to another schedule")
        if latent.lattice.v_bits != self.v_bits:
            raise LatentMismatchError(
                f"latent.lattice.v_bits = {latent.lattice.v_bits}, but {self.name} on this schedule sizes the "
                f"velocity lattice with v_bits = {self.v_bits}: the latent's lattice was changed")
        if latent.lattice.x_bits > self._x_bits(0.0):
            raise LatentMismatchError(
                f"latent.lattice.x_bits = {latent.lattice.x_bits} is finer than any input allows on this schedule "
                f"(at most {self._x_bits(0.0)}): the latent's lattice was changed")


def _work_dtype(device: torch.device) -> torch.dtype:
    """float64 for the lattice's float arithmetic, float32 on a device without float64."""
    return torch.float64 if base.device_supports_float64(device) else torch.float32


def _to_lattice(value: torch.Tensor, scale: float, what: str, level: int) -> torch.Tensor:
    scaled = value / scale
    if not bool(torch.isfinite(scaled).all()) or float(scaled.abs().max()) >= _LIMIT:
        raise LatticeOverflowError(
            f"exact='bitwise': the {what} increment at level {level} does not fit the int64 lattice "
            f"(|value| = {float(value.abs().max()):.3g}): the chain grew beyond the bound its lattice was "
            "sized for (BDIA with gamma < 1 grows like gamma^-N when inverted; a network output far "
            "above 16 does too). Use fewer steps, gamma closer to 1, or O-BELM")
    return torch.round(scaled).to(torch.int64)


def _check_register(register: torch.Tensor, what: str, level: int) -> None:
    if int(register.abs().max()) >= _REGISTER_LIMIT:
        raise LatticeOverflowError(f"exact='bitwise': the {what} register overflowed at level {level}; "
                                   "the lattice cannot hold this chain (use fewer steps)")


class LatticeChain(SingleLevelChain):
    """A 2-step chain on the integer lattice; state (Y_n, V_n), one level at a time."""

    def __init__(self, rule: LatticeRule, network: Network, lattice: Lattice, level: int, Y: torch.Tensor,
                 V: Optional[torch.Tensor], residual: Optional[torch.Tensor] = None) -> None:
        self.rule, self.network, self.lattice = rule, network, lattice
        self.level, self.Y, self.V, self.residual = level, Y, V, residual
        # The float side of each shear: any deterministic rounding keeps the chain a bijection,
        # so float32 where the device has no float64 (MPS) stays bit for bit.
        self.work = _work_dtype(Y.device)
        self.last_f = None

    # -- seeds -------------------------------------------------------------------------
    @classmethod
    def from_noise(cls, rule: LatticeRule, network: Network, x: torch.Tensor, level: int) -> "LatticeChain":
        y = x.detach().to(_work_dtype(x.device)) / rule.scale[level]
        lattice = rule.lattice_for(float(y.abs().max()))
        chain = cls(rule, network, lattice, level, torch.round(y / lattice.x_scale).to(torch.int64), None)
        # The chain's first step is DDIM: the same shear with V_{s−1} = 0.
        chain.V = chain._v_increment(rule.beta_ddim[level], chain._f(level), level)
        return chain

    @classmethod
    def from_clean(cls, rule: LatticeRule, network: Network, x0: torch.Tensor) -> "LatticeChain":
        x0_w = x0.detach().to(_work_dtype(x0.device))
        lattice = rule.lattice_for(float(x0_w.abs().max()))
        Y = torch.round(x0_w / lattice.x_scale).to(torch.int64)
        # Exact: x0's bits below 2^−x_bits fit in the work dtype (float64, or float32 where the
        # input cannot be wider) and add back without rounding.
        residual = x0_w - Y.to(x0_w.dtype) * lattice.x_scale
        return cls(rule, network, lattice, rule.N, Y, None, residual)

    @classmethod
    def from_latent(cls, rule: LatticeRule, network: Network, latent: LatticeLatent) -> "LatticeChain":
        rule.check_latent(latent)
        Y, V = latent.states                 # never modified in place: the latent stays intact
        return cls(rule, network, latent.lattice, latent.level, Y, V, latent.residual)

    def to_latent(self, method: str, fingerprint: str, dtype: torch.dtype) -> LatticeLatent:
        return LatticeLatent((self.Y, self.V), self.level, method, fingerprint, dtype, lattice=self.lattice,
                             residual=self.residual, scale=self.rule.scale[self.level])

    # -- the chain ---------------------------------------------------------------------
    def x(self, level: int) -> torch.Tensor:
        self._check_level(level)
        out = self.Y.to(self.work) * (self.rule.scale[level] * self.lattice.x_scale)
        if level == self.rule.N and self.residual is not None:
            out = out + self.residual
        return out

    def window(self) -> tuple[torch.Tensor, ...]:
        return (self.Y, self.V)

    def _f(self, level: int) -> torch.Tensor:
        """f at x_level = scale · y: the network's input, identical in both directions."""
        self.last_f = self.network(self.Y.to(self.work) * (self.rule.scale[level] * self.lattice.x_scale), level)
        return self.last_f

    def _v_increment(self, beta: float, f: torch.Tensor, level: int) -> torch.Tensor:
        """round(β · f / v_scale): a function of the Y register only (through f)."""
        return _to_lattice(f.to(self.work) * beta, self.lattice.v_scale, "velocity", level)

    def _y_increment(self, k: int) -> torch.Tensor:
        """round(w_k · V_k / x_scale): a function of the V register only."""
        return _to_lattice(self.V.to(self.work) * (self.rule.w[k] * self.lattice.v_scale),
                           self.lattice.x_scale, "x", k)

    def advance(self) -> None:
        n, N = self.level, self.rule.N
        self.Y = self.Y + self._y_increment(n)
        self.level = n + 1
        _check_register(self.Y, "x", n + 1)
        if n + 1 < N:
            self.V = self._v_increment(self.rule.beta[n + 1], self._f(n + 1), n + 1) - self.V
            _check_register(self.V, "velocity", n + 1)
        else:
            self.last_f = None

    def retreat(self) -> None:
        n, N = self.level, self.rule.N
        if n == N:
            if self.V is None:      # inversion's start: one DDIM-inversion step
                self.V = self._v_increment(self.rule.beta_ddim[N - 1], self._f(N), N - 1)
            else:
                self.last_f = None
        else:
            self.V = self._v_increment(self.rule.beta[n], self._f(n), n) - self.V
            _check_register(self.V, "velocity", n - 1)
        self.Y = self.Y - self._y_increment(n - 1)
        self.level = n - 1
        _check_register(self.Y, "x", n - 1)
