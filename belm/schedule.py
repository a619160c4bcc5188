"""Noise schedules and sampling grids.

A :class:`Schedule` pairs the training noise levels of a discrete VP diffusion model
(``alphas_cumprod``, written ā_t, t = 0 … T−1) with a sampling grid: a strictly
decreasing list of train timesteps t_0 > t_1 > … > t_{N−1}. Grid entries are called
*levels* 0 … N−1; level N is the clean level (alpha = 1, sigma = 0 by default).

Everything a sampler needs is exposed per level as float64 tensors of length N + 1::

    alpha[k] = sqrt(ā_{t_k})     sigma[k] = sqrt(1 − ā_{t_k})     sigma_bar[k] = sigma[k] / alpha[k]

and the positive step sizes H[k] = sigma_bar[k] − sigma_bar[k+1] (length N).

This module deliberately does not import diffusers: :meth:`Schedule.from_diffusers`
duck-types any object with ``alphas_cumprod`` and ``config``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch

__all__ = ["Schedule", "SPACINGS", "make_betas", "default_spacing"]

SPACINGS = ("linspace", "leading", "trailing")


def default_spacing(sampler_name: str) -> str:
    """TEMP stub (dropped on merge): belm's default grid for a sampler; "config" = the model's own."""
    return "config"


def _as_float64_array(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a 1-D sequence of numbers; got {type(values).__name__}") from exc
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"{name} is empty; pass at least one value")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or Inf; pass finite values")
    return array


def make_betas(kind: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> np.ndarray:
    """Standard beta schedules, as in diffusers (float64).

    ``kind``: "linear" (DDPM), "scaled_linear" (Stable Diffusion: linear in sqrt(beta))
    or "squaredcos_cap_v2" (cosine, Nichol & Dhariwal; beta_start/end ignored).
    """
    T = int(num_train_timesteps)
    if T < 2:
        raise ValueError(f"num_train_timesteps must be >= 2; got {num_train_timesteps}")
    if kind == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if kind in ("squaredcos_cap_v2", "cosine"):
        def f(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=np.float64)
    raise ValueError(f"kind must be one of 'linear', 'scaled_linear', 'squaredcos_cap_v2'; got {kind!r}")


def grid_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "linspace",
                   steps_offset: int = 0) -> np.ndarray:
    """Descending train timesteps of a sampling grid, with diffusers' spacing rules.

    - "linspace": round(linspace(0, T−1, N)) reversed (includes T−1 and 0),
    - "leading": (arange(N) · (T // N)) reversed, plus ``steps_offset``,
    - "trailing": round(arange(T, 0, −T/N)) − 1 (includes T−1).
    """
    T, N = int(num_train_timesteps), int(num_steps)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or N < 1:
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
    if N > T:
        raise ValueError(f"num_steps={N} exceeds the {T} train timesteps; use num_steps <= {T}")
    if spacing == "linspace":
        steps = np.linspace(0, T - 1, N).round()[::-1]
    elif spacing == "leading":
        steps = (np.arange(0, N) * (T // N)).round()[::-1] + int(steps_offset)
    elif spacing == "trailing":
        # T − i·T/N for i < N, as diffusers' arange(T, 0, −T/N), without arange's float
        # length rounding that can append an N+1-th entry of −1 (e.g. T = 39, N = 37).
        steps = np.round(T - np.arange(N) * (T / N)) - 1
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}; got {spacing!r}")
    if steps.max() >= T:
        raise ValueError(f"steps_offset={steps_offset} with spacing='leading' and num_steps={N} puts a timestep "
                         f"at {int(steps.max())} > T-1 = {T - 1}; use fewer steps or spacing='trailing'")
    return steps.astype(np.int64).copy()


class Schedule:
    """Training noise levels plus a sampling grid.

    Args:
        alphas_cumprod: ā_t for t = 0 … T−1, strictly decreasing, in (0, 1].
        timesteps: strictly decreasing train timesteps of the grid (levels 0 … N−1),
            each in [0, T−1].
        final_alpha_cumprod: ā of the clean level N. 1.0 (the default, the paper's
            convention) makes level N exactly clean; Stable Diffusion's
            ``set_alpha_to_one=False`` corresponds to ``alphas_cumprod[0]``.
        clean_timestep: the train timestep at which the network is evaluated at the
            clean level (DDIM inversion's first step). The reference code uses 1.

    Attributes (all float64 CPU tensors):
        alpha_bar, alpha, sigma, sigma_bar: shape (N + 1,), indexed by level.
        H: shape (N,), H[k] = sigma_bar[k] − sigma_bar[k+1] > 0.
        timesteps: int64 tensor of shape (N,).
    """

    def __init__(self, alphas_cumprod: Any, timesteps: Any, *, final_alpha_cumprod: float = 1.0,
                 clean_timestep: int = 1) -> None:
        ac = _as_float64_array(alphas_cumprod, "alphas_cumprod")
        if np.any(ac <= 0) or np.any(ac > 1):
            bad = int(np.argmax((ac <= 0) | (ac > 1)))
            raise ValueError(f"alphas_cumprod must lie in (0, 1]; alphas_cumprod[{bad}] = {ac[bad]!r}")
        if ac.size > 1 and np.any(np.diff(ac) >= 0):
            bad = int(np.argmax(np.diff(ac) >= 0))
            raise ValueError(
                "alphas_cumprod must be strictly decreasing (every beta > 0); "
                f"alphas_cumprod[{bad + 1}] = {ac[bad + 1]!r} >= alphas_cumprod[{bad}] = {ac[bad]!r}")
        T = ac.size
        ts_raw = timesteps.detach().cpu().numpy() if isinstance(timesteps, torch.Tensor) else timesteps
        ts_float = _as_float64_array(ts_raw, "timesteps")
        if np.any(ts_float != np.round(ts_float)):
            raise ValueError("timesteps must be integers (train timesteps); got non-integer values")
        ts = ts_float.astype(np.int64)
        if np.any(ts < 0) or np.any(ts >= T):
            bad = int(np.argmax((ts < 0) | (ts >= T)))
            raise ValueError(f"timesteps must lie in [0, {T - 1}] (len(alphas_cumprod) = {T}); "
                             f"timesteps[{bad}] = {ts[bad]}")
        if ts.size > 1 and np.any(np.diff(ts) >= 0):
            bad = int(np.argmax(np.diff(ts) >= 0))
            raise ValueError(
                "timesteps must be strictly decreasing (noisiest first, no repeats); "
                f"timesteps[{bad}] = {ts[bad]}, timesteps[{bad + 1}] = {ts[bad + 1]}. "
                "Sort them in descending order, e.g. sorted(set(ts), reverse=True)")
        final = float(final_alpha_cumprod)
        if not (0 < final <= 1) or not math.isfinite(final):
            raise ValueError(f"final_alpha_cumprod must lie in (0, 1]; got {final_alpha_cumprod!r}")
        if final <= ac[ts[-1]]:
            raise ValueError(
                f"final_alpha_cumprod={final} must exceed ā at the last grid timestep "
                f"({ac[ts[-1]]!r}) so that the clean level is cleaner than level N-1")
        if isinstance(clean_timestep, bool) or int(clean_timestep) != clean_timestep or not 0 <= clean_timestep < T:
            raise ValueError(f"clean_timestep must be an integer in [0, {T - 1}]; got {clean_timestep!r}")

        self.alphas_cumprod = torch.from_numpy(ac.copy())
        self.timesteps = torch.from_numpy(ts.copy())
        self.final_alpha_cumprod = final
        self.clean_timestep = int(clean_timestep)
        self.num_train_timesteps = T
        alpha_bar = np.concatenate([ac[ts], [final]])
        self.alpha_bar = torch.from_numpy(alpha_bar)
        self.alpha = self.alpha_bar.sqrt()
        self.sigma = (1.0 - self.alpha_bar).sqrt()
        self.sigma_bar = self.sigma / self.alpha
        self.kind = "discrete"
        self.output = "eps"
        # The samplers' ODE is dy/dτ = f(y, τ) with y = x / scale: for VP diffusion scale = alpha,
        # τ = σ̄ and f = ε. Continuous and flow schedules define their own scale and τ.
        self.scale = self.alpha
        self.tau = self.sigma_bar
        self.H = self.tau[:-1] - self.tau[1:]
        self.fingerprint = self._fingerprint()

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas: Any, num_steps: int = 50, spacing: str = "linspace", *,
                   steps_offset: int = 0, final_alpha_cumprod: float = 1.0,
                   clean_timestep: int = 1) -> "Schedule":
        """Schedule from a beta sequence and a grid rule (see :func:`grid_timesteps`)."""
        b = _as_float64_array(betas, "betas")
        if np.any(b <= 0) or np.any(b >= 1):
            raise ValueError("betas must lie in (0, 1); got values outside that range")
        ac = np.cumprod(1.0 - b)
        ts = grid_timesteps(b.size, num_steps, spacing, steps_offset)
        return cls(ac, ts, final_alpha_cumprod=final_alpha_cumprod, clean_timestep=clean_timestep)

    @classmethod
    def from_diffusers(cls, scheduler: Any, num_steps: int = 50, *, spacing: str | None = None,
                       final_alpha_cumprod: float = 1.0, clean_timestep: int = 1) -> "Schedule":
        """Schedule from a diffusers scheduler object (duck-typed).

        Reads ``scheduler.alphas_cumprod`` and ``scheduler.config.timestep_spacing``
        (default "leading") and ``steps_offset``. The clean level is alpha = 1 unless
        ``final_alpha_cumprod`` says otherwise (pass ``float(scheduler.alphas_cumprod[0])``
        to follow Stable Diffusion's ``set_alpha_to_one=False``).
        """
        if not hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "config"):
            raise TypeError("scheduler must be a diffusers scheduler with `alphas_cumprod` and `config`; "
                            f"got {type(scheduler).__name__}")
        config = scheduler.config
        get = config.get if hasattr(config, "get") else (lambda key, default=None: getattr(config, key, default))
        if spacing in (None, "config"):
            spacing = get("timestep_spacing", "leading") or "leading"
        ac = _as_float64_array(scheduler.alphas_cumprod, "scheduler.alphas_cumprod")
        ts = grid_timesteps(ac.size, num_steps, spacing, int(get("steps_offset", 0) or 0))
        return cls(ac, ts, final_alpha_cumprod=final_alpha_cumprod, clean_timestep=clean_timestep)

    # -- views -------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """N, the number of sampling steps (levels 0 … N−1 are noisy, level N is clean)."""
        return int(self.timesteps.numel())

    def timestep(self, level: int) -> int:
        """Train timestep at which the network is evaluated at ``level`` (clean level: ``clean_timestep``)."""
        return self.clean_timestep if level == self.num_steps else int(self.timesteps[level])

    def model_time(self, level: int) -> torch.Tensor:
        """The ``t`` handed to the network at ``level``: a 0-dim int64 tensor (train timestep)."""
        return torch.tensor(self.timestep(level), dtype=torch.int64)

    def _fingerprint(self) -> str:
        digest = hashlib.sha1()
        digest.update(self.alpha_bar.numpy().tobytes())
        digest.update(self.timesteps.numpy().tobytes())
        digest.update(str(self.clean_timestep).encode())
        return digest.hexdigest()[:12]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        ts = self.timesteps.tolist()
        shown = ts if len(ts) <= 6 else ts[:3] + ["…"] + ts[-2:]
        return (f"Schedule(N={self.num_steps}, T={self.num_train_timesteps}, timesteps={shown}, "
                f"final_alpha_cumprod={self.final_alpha_cumprod})")

