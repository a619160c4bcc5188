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
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["Schedule", "ContinuousSchedule", "CONTINUOUS_KINDS", "SPACINGS", "make_betas", "default_spacing",
           "EXACT_DEFAULT_SPACING"]

SPACINGS = ("linspace", "leading", "trailing")
#: belm's grid for every sampler when the caller does not choose one (model handles, apps).
#: "trailing" starts at the noisiest train timestep and ends one full step above the clean
#: level (t = T/N − 1), so the last σ̄-step is not tiny next to the previous ones: O-BELM's
#: parasitic mode then stays bounded under inversion (belm.solvers.growth, benchmarks/editing.py),
#: whereas "leading"/"linspace" grids ending at t = 0 or 1 amplify it by 10²…10⁴.
EXACT_DEFAULT_SPACING = "trailing"


def default_spacing(sampler_name: str) -> str:
    """The grid belm uses for ``sampler_name`` (a registry name: ddim, obelm, bdia, edict,
    leapfrog3, leapfrog3-scaled …) when the caller passes ``spacing=None`` to a model handle.

    Every sampler gets ``"trailing"``: the exact methods need it (their inversion stays
    near-neutral, see :data:`EXACT_DEFAULT_SPACING`), and DDIM gets the same grid so that
    default comparisons between methods are on one grid. ``Schedule.from_diffusers`` with
    ``spacing=None`` keeps the scheduler config's spacing instead (diffusers compatibility).
    """
    if not isinstance(sampler_name, str) or not sampler_name:
        raise ValueError(f"sampler_name must be a sampler name such as 'obelm'; got {sampler_name!r}")
    return EXACT_DEFAULT_SPACING


def _config_grid(config: Any, spacing: Any) -> tuple[str, int]:
    """(spacing, steps_offset) for from_diffusers: None or "config" reads the config."""
    get = config.get if hasattr(config, "get") else (lambda key, default=None: getattr(config, key, default))
    offset = int(get("steps_offset", 0) or 0)
    if spacing is None or spacing == "config":
        return get("timestep_spacing", "leading") or "leading", offset
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be None, 'config' or one of {SPACINGS}; got {spacing!r} "
                         "(use 'trailing' for exact inversion: see belm.schedule.default_spacing)")
    return spacing, offset


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
    def from_betas(cls, betas: Any, num_steps: int = 50, spacing: str = EXACT_DEFAULT_SPACING, *,
                   steps_offset: int = 0, final_alpha_cumprod: float = 1.0,
                   clean_timestep: int = 1) -> "Schedule":
        """Schedule from a beta sequence and a grid rule (see :func:`grid_timesteps`).

        ``spacing`` defaults to belm's grid for every sampler, ``"trailing"``
        (:data:`EXACT_DEFAULT_SPACING`): on "linspace"/"leading" grids exact inversion
        amplifies the parasitic mode by 10³–10⁴ on DDPM betas (a GrowthWarning says so).
        """
        b = _as_float64_array(betas, "betas")
        if np.any(b <= 0) or np.any(b >= 1):
            raise ValueError("betas must lie in (0, 1); got values outside that range")
        ac = np.cumprod(1.0 - b)
        ts = grid_timesteps(b.size, num_steps, spacing, steps_offset)
        return cls(ac, ts, final_alpha_cumprod=final_alpha_cumprod, clean_timestep=clean_timestep)

    @classmethod
    def from_diffusers(cls, scheduler: Any, num_steps: int = 50, *, spacing: Optional[str] = None,
                       final_alpha_cumprod: float = 1.0, clean_timestep: int = 1,
                       mu: Optional[float] = None) -> "Schedule":
        """Schedule from a diffusers scheduler object (duck-typed).

        Reads ``scheduler.alphas_cumprod`` and ``steps_offset``. ``spacing``: None or
        ``"config"`` use the config's ``timestep_spacing`` (default "leading"), as diffusers
        does; ``"linspace"``, ``"leading"`` or ``"trailing"`` override it. The model handles
        pass :func:`default_spacing` (``"trailing"``) instead: leading grids make exact
        inversion blow up the parasitic mode (see :mod:`belm.solvers.growth`).
        The clean level is alpha = 1 unless ``final_alpha_cumprod`` says otherwise (pass
        ``float(scheduler.alphas_cumprod[0])`` to follow Stable Diffusion's ``set_alpha_to_one=False``).

        A flow-matching scheduler (diffusers' ``FlowMatchEulerDiscreteScheduler``: no
        ``alphas_cumprod``, a ``shift``) gives a ``kind="flow"`` schedule whose σ equal the
        scheduler's own ``set_timesteps(num_steps, mu=mu).sigmas`` bit for bit; ``mu`` is
        required when its config has ``use_dynamic_shifting`` (see :func:`flow_match_sigmas`).
        Its σ grid has its own rule: ``spacing`` must then be None or "config".
        """
        if _is_flow_match_scheduler(scheduler):
            if spacing not in (None, "config"):
                raise ValueError(f"spacing={spacing!r} does not apply to a flow-matching scheduler (its sigmas follow "
                                 "its shift); leave spacing=None, or pass explicit sigmas to Schedule.from_sigmas")
            return ContinuousSchedule.from_flow_match_scheduler(scheduler, num_steps, mu=mu)
        if mu is not None:
            raise ValueError("mu (dynamic shifting) applies only to flow-matching schedulers "
                             f"(FlowMatchEulerDiscreteScheduler); {type(scheduler).__name__} has none")
        if not hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "config"):
            raise TypeError("scheduler must be a diffusers scheduler with `alphas_cumprod` and `config`; "
                            f"got {type(scheduler).__name__}")
        grid, offset = _config_grid(scheduler.config, spacing)
        ac = _as_float64_array(scheduler.alphas_cumprod, "scheduler.alphas_cumprod")
        ts = grid_timesteps(ac.size, num_steps, grid, offset)
        return cls(ac, ts, final_alpha_cumprod=final_alpha_cumprod, clean_timestep=clean_timestep)

    @classmethod
    def from_sigmas(cls, sigmas: Any, kind: str = "flow", *, clean_sigma: float | None = None) -> "ContinuousSchedule":
        """A continuous-σ schedule; see :class:`ContinuousSchedule` (the clean level σ = 0 is appended)."""
        return ContinuousSchedule(sigmas, kind, clean_sigma=clean_sigma)

    @classmethod
    def karras(cls, num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0, *,
               kind: str = "ve", clean_sigma: float | None = None) -> "ContinuousSchedule":
        """EDM's grid (Karras et al. 2022), kind "ve" by default; see :func:`karras_sigmas`."""
        return ContinuousSchedule(karras_sigmas(num_steps, sigma_min, sigma_max, rho), kind, clean_sigma=clean_sigma)

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



# -- continuous σ: flow matching, VE and VP ---------------------------------------------

CONTINUOUS_KINDS = ("flow", "ve", "vp")


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """EDM's noise levels (Karras et al. 2022, eq. 5), float64, without the trailing 0::

        σ_i = (σ_max^{1/ρ} + i/(N−1) · (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,   i = 0 … N−1

    (N = 1 gives [σ_max]).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
    lo, hi, r = float(sigma_min), float(sigma_max), float(rho)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise ValueError("need 0 < sigma_min < sigma_max (finite); "
                         f"got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"rho must be a positive number; got {rho!r}")
    if num_steps == 1:
        return np.array([hi])
    ramp = np.linspace(0.0, 1.0, int(num_steps))
    hi_r, lo_r = hi ** (1.0 / r), lo ** (1.0 / r)
    return (hi_r + ramp * (lo_r - hi_r)) ** r


def _config_getter(scheduler: Any):
    config = scheduler.config
    return config.get if hasattr(config, "get") else (lambda key, default=None: getattr(config, key, default))


def _is_flow_match_scheduler(scheduler: Any) -> bool:
    """Duck-typed: a diffusers flow-matching scheduler has a config with ``shift`` and no ``alphas_cumprod``."""
    if hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "config"):
        return False
    return _config_getter(scheduler)("shift", None) is not None


def flow_match_sigmas(scheduler: Any, num_steps: int, mu: float | None = None) -> np.ndarray:
    """The N noisy σ of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(N, mu=mu)``.

    Re-computes the scheduler's rule (diffusers 0.3x–0.42) with the same float64 numpy
    operations in the same order and rounds to float32 as diffusers does, so the result
    equals ``scheduler.sigmas[:-1]`` bit for bit (tests/test_continuous.py checks it) without
    touching the scheduler's state:

        σ̃ = linspace(σ_max·T, σ_min·T, N) / T;  σ = shift·σ̃ / (1 + (shift−1)·σ̃)  (static shift)
        or σ = e^μ / (e^μ + (1/σ̃ − 1))  (dynamic, time_shift_type "exponential"; "linear": μ / (μ + …)),

    then the optional ``shift_terminal`` stretch. σ_max, σ_min are the scheduler's own
    attributes (the static shift already applied to 1 and 1/T at construction). Returns a
    float64 array of shape (N,).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
    get = _config_getter(scheduler)
    for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
        if get(flag, False):
            raise ValueError(
                f"scheduler.config.{flag} is set; that grid rule is not re-implemented here. Call "
                "scheduler.set_timesteps(N) and pass Schedule.from_sigmas(scheduler.sigmas[:-1], kind='flow')")
    T = int(get("num_train_timesteps", 1000))
    sigma_max = float(getattr(scheduler, "sigma_max", 1.0))
    sigma_min = float(getattr(scheduler, "sigma_min", 1.0 / T))
    sigmas = np.linspace(sigma_max * T, sigma_min * T, int(num_steps)) / T
    if get("use_dynamic_shifting", False):
        if mu is None:
            raise ValueError("the scheduler uses dynamic shifting (config.use_dynamic_shifting=True): pass mu=, "
                             "e.g. diffusers' calculate_shift(image_seq_len, ...) as the pipelines do")
        mu = float(mu)
        if get("time_shift_type", "exponential") == "linear":
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    else:
        if mu is not None:
            raise ValueError("mu= is only used with config.use_dynamic_shifting=True; this scheduler has a static "
                             "shift (config.shift); drop mu")
        shift = float(getattr(scheduler, "shift", get("shift", 1.0)))
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    terminal = get("shift_terminal", None)
    if terminal:
        if num_steps < 2:
            raise ValueError("config.shift_terminal stretches the grid so that its last σ is shift_terminal; "
                             "that needs num_steps >= 2 (diffusers itself gives NaN for 1)")
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - terminal))
    return np.asarray(sigmas, dtype=np.float64).astype(np.float32).astype(np.float64)


class ContinuousSchedule(Schedule):
    """A schedule on continuous noise levels σ_0 > … > σ_{N−1} > 0, plus the clean level σ_N = 0.

    Built by :meth:`Schedule.from_sigmas`, :meth:`Schedule.karras` or
    :meth:`Schedule.from_diffusers` (flow-matching schedulers). ``kind``:

    - ``"flow"`` (rectified flow, SD3 / FLUX): x_σ = (1 − σ)·x0 + σ·z, σ ∈ (0, 1]
      (σ_0 = 1, pure noise, allowed). The network returns the velocity v = dx/dσ
      (``output = "velocity"``). Sampler coordinates y = x, τ = σ, f = v: scale = 1, tau = σ,
      finite at σ = 1 where α = 1 − σ = 0 (MATH.md, "Flow matching").
    - ``"ve"`` (EDM, k-diffusion): x = x0 + σ·z; scale = 1, tau = σ, f = ε.
    - ``"vp"`` in k-diffusion's σ: x = α·x0 + α·σ·z, α = 1/sqrt(1 + σ²); scale = α, tau = σ, f = ε.

    The network is called as ``fn(x, t)`` with ``t = model_time(level)``, that level's σ as a
    0-dim float64 tensor. At the clean level (only DDIM inversion's first step evaluates the
    network there) t = ``clean_sigma``: by default 0.0 for flows (v is finite at σ = 0 and
    flow models are trained on [0, 1]) and σ_{N−1}, the last noisy level, for "ve"/"vp":
    ε = (x − D(x; σ))/σ is 0/0 at σ = 0 for denoiser-parameterised (EDM) networks, whose
    c_noise = ln(σ)/4 is −∞ there. Pass ``clean_sigma=0.0`` for an ε-network defined at 0.

    Attributes (float64 CPU tensors of shape (N + 1,), indexed by level, unless noted):
        sigmas: σ per level (σ_N = 0). timesteps: shape (N,), σ_0 … σ_{N−1}.
        scale, tau: the samplers' coordinates y = x / scale, dy/dτ = f. H: shape (N,), tau steps > 0.
        alpha, sigma: the physical signal and noise scales of x = alpha·x0 + sigma·z
            (flow: 1 − σ and σ); alpha_bar = alpha², sigma_bar = sigma / alpha (inf at a flow's σ = 1).
        kind: "flow" | "ve" | "vp". output: "velocity" (flow) or "eps".
    """

    def __init__(self, sigmas: Any, kind: str = "flow", *, clean_sigma: float | None = None) -> None:
        if kind not in CONTINUOUS_KINDS:
            raise ValueError(f"kind must be one of {CONTINUOUS_KINDS}; got {kind!r}")
        s = _as_float64_array(sigmas, "sigmas")
        if np.any(s <= 0):
            bad = int(np.argmax(s <= 0))
            raise ValueError(f"sigmas must be > 0 (the clean level σ = 0 is appended for you; drop a trailing 0, "
                             f"e.g. pass scheduler.sigmas[:-1]); sigmas[{bad}] = {s[bad]!r}")
        if s.size > 1 and np.any(np.diff(s) >= 0):
            bad = int(np.argmax(np.diff(s) >= 0))
            raise ValueError(f"sigmas must be strictly decreasing (noisiest first, no repeats); "
                             f"sigmas[{bad}] = {s[bad]!r}, sigmas[{bad + 1}] = {s[bad + 1]!r}")
        if kind == "flow" and s[0] > 1:
            raise ValueError(f"flow sigmas must lie in (0, 1] (x = (1 − σ)·x0 + σ·z); sigmas[0] = {s[0]!r}. "
                             "For diffusers' flow schedulers pass scheduler.sigmas[:-1] (σ), not scheduler.timesteps")
        if clean_sigma is None:
            clean = 0.0 if kind == "flow" else float(s[-1])
        else:
            clean = float(clean_sigma)
            if not (math.isfinite(clean) and 0 <= clean <= s[-1]):
                raise ValueError(f"clean_sigma must lie in [0, sigmas[-1]] = [0, {s[-1]!r}]; got {clean_sigma!r}")

        full = np.concatenate([s, [0.0]])
        self.kind = kind
        self.output = "velocity" if kind == "flow" else "eps"
        self.clean_sigma = clean
        self.sigmas = torch.from_numpy(full)
        self.timesteps = torch.from_numpy(s.copy())
        if kind == "flow":
            alpha = 1.0 - full
            sigma = full.copy()
            scale = np.ones_like(full)
        elif kind == "ve":
            alpha = np.ones_like(full)
            sigma = full.copy()
            scale = alpha
        else:
            alpha = 1.0 / np.sqrt(1.0 + full * full)
            sigma = full * alpha
            scale = alpha
        with np.errstate(divide="ignore"):
            sigma_bar = np.where(alpha > 0, sigma / np.where(alpha > 0, alpha, 1.0), np.inf)
        if kind != "flow":
            sigma_bar = full.copy()  # σ̄ = σ exactly, not σα/α rounded
        self.alpha = torch.from_numpy(alpha)
        self.sigma = torch.from_numpy(sigma)
        self.alpha_bar = self.alpha**2
        self.sigma_bar = torch.from_numpy(sigma_bar)
        self.final_alpha_cumprod = 1.0
        self.scale = torch.from_numpy(np.array(scale, dtype=np.float64))
        self.tau = self.sigmas.clone()
        self.H = self.tau[:-1] - self.tau[1:]
        self.fingerprint = self._fingerprint()

    @classmethod
    def from_flow_match_scheduler(cls, scheduler: Any, num_steps: int = 50, *,
                                  mu: float | None = None) -> "ContinuousSchedule":
        """kind="flow" schedule on the σ of a diffusers flow-matching scheduler (:func:`flow_match_sigmas`)."""
        return cls(flow_match_sigmas(scheduler, num_steps, mu=mu), "flow")

    def timestep(self, level: int) -> float:
        """σ at ``level`` as a Python float (``clean_sigma`` at the clean level N)."""
        return self.clean_sigma if level == self.num_steps else float(self.timesteps[level])

    def model_time(self, level: int) -> torch.Tensor:
        """The ``t`` handed to the network at ``level``: σ as a 0-dim float64 tensor."""
        return torch.tensor(self.timestep(level), dtype=torch.float64)

    def _fingerprint(self) -> str:
        digest = hashlib.sha1()
        digest.update(self.kind.encode())
        digest.update(self.sigmas.numpy().tobytes())
        digest.update(np.float64(self.clean_sigma).tobytes())
        return digest.hexdigest()[:12]

    def __repr__(self) -> str:
        s = [f"{v:.6g}" for v in self.timesteps.tolist()]
        shown = s if len(s) <= 6 else s[:3] + ["…"] + s[-2:]
        return (f"Schedule(kind={self.kind!r}, N={self.num_steps}, sigmas=[{', '.join(shown)}], "
                f"clean_sigma={self.clean_sigma:g})")
