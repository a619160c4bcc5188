"""belm's samplers as diffusers schedulers: ``BELMScheduler`` and ``BELMInverseScheduler``.

Drop-in for stock diffusers pipelines::

    pipe.scheduler = BELMScheduler.from_config(pipe.scheduler.config)          # O-BELM
    pipe.scheduler = BELMScheduler.from_config(pipe.scheduler.config, method="bdia", gamma=0.96)
    latents = pipe(prompt, num_inference_steps=50, output_type="latent").images

These classes hold no formula and no stepping rule of their own: ``set_timesteps(N)`` builds
the belm :class:`~belm.schedule.Schedule` ``Schedule.from_diffusers(self, N)``, instantiates
the belm sampler of ``config.method`` on it (:class:`~belm.solvers.OBELM`,
:class:`~belm.solvers.BDIA` or :class:`~belm.solvers.DDIM`), and each ``step`` hands the
pipeline's network output to that sampler's :class:`~belm.solvers.chain.MultistepChain` and
advances (sampling) or retreats (inversion) it: the same chain its ``sample`` and ``invert``
loops drive. The model output is converted to ε with :func:`~belm.adapters.eps.to_epsilon`.

Which schedule: after ``set_timesteps(N)``, ``scheduler.schedule`` equals
``Schedule.from_diffusers(scheduler, N, spacing=S)`` where S is the config's ``spacing``: None
(the default, a drop-in replacement runs on the pipeline's own grid) or "config" use the
config's ``timestep_spacing``; a spacing name overrides it. For inversion and editing pass
``spacing="trailing"`` (belm's grid, ``belm.schedule.default_spacing``): SD 1.5's "leading"
grid ends with a tiny step before the clean level, and exact inversion then blows up the
2-step relation's parasitic mode (docs/math.md, "Stability per direction";
``belm.solvers.growth``); ``BELMInverseScheduler.set_timesteps`` warns
(:class:`~belm.errors.GrowthWarning`) with the growth and this fix when that happens. The
schedule is ``Schedule(scheduler.alphas_cumprod, grid_timesteps(T, N, S, config.steps_offset),
final_alpha_cumprod=1.0, clean_timestep=1)``. ``alphas_cumprod`` is computed by diffusers' own
code (float32, like ``DDIMScheduler``), so the schedule is identical (same fingerprint) to
``Schedule.from_diffusers(ddim_scheduler, N)`` for a ``DDIMScheduler`` with the same config,
and a belm :class:`~belm.solvers.base.Latent` moves freely between the two. The final level
is always clean (alpha = 1, belm's convention). Config keys that a deterministic exact sampler
cannot honour (``set_alpha_to_one=False``, ``clip_sample``, ``thresholding``, and the
Karras/exponential/beta σ options of compatible schedulers' configs) are ignored with one
:class:`IgnoredConfigWarning` per key and class, naming the key; ``eta`` > 0 and
``variance_noise`` are refused. ``rescale_betas_zero_snr=True`` is honoured with diffusers'
clamp ā_{T−1} = 2⁻²⁴ (``EulerDiscreteScheduler``'s), which keeps σ/α finite at t = T − 1.

diffusers' contract, kept: a run may start anywhere on the grid (the first ``step`` finds its
place from the timestep it is given, or from ``set_begin_index``) and then starts the chain
with its start-up member, as ``sample(x, from_level=k)`` does; a sample the caller changed
(a new tensor, or the returned one edited in place, detected by its version counter) is the
new state, and the chain restarts from it the same way; ``num_inference_steps`` below the
method's k samples with the start-up members alone (inversion there is not exact and is
refused).

Steps are tracked by POSITION in the grid (a step counter checked against the given
timestep), never by ``t − T // N``. diffusers' ``DDIMScheduler`` computes the previous
timestep as ``t − T // N``, which is the next grid point only for "leading" spacing (and for
"trailing" when N divides T). For "linspace" (and "trailing" with T % N ≠ 0) its steps land
*off* the grid: the sample is moved to noise level ``ā[t − T//N]`` while the network is then
evaluated at the grid timestep ``t_{k+1}``. belm steps from level k to level k+1 exactly.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

try:
    from diffusers import DDPMScheduler
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
    from diffusers.utils import BaseOutput
except ImportError as exc:  # pragma: no cover - exercised only without diffusers
    raise ImportError("belm.adapters.schedulers needs diffusers: pip install 'belm[diffusers]' "
                      f"(import failed: {exc})") from exc

from belm.adapters.eps import PREDICTION_TYPES, to_epsilon
from belm.errors import LatentMismatchError
from belm.schedule import SPACINGS, Schedule
from belm.solvers import BDIA, DDIM, OBELM, Latent, MultistepChain, MultistepSampler
from belm.solvers.base import device_supports_float64, latent_x_method
from belm.solvers.growth import check_inversion_growth

__all__ = ["BELMScheduler", "BELMInverseScheduler", "BELMSchedulerOutput", "METHODS", "IgnoredConfigWarning"]

#: config.method -> belm sampler class
METHODS: dict[str, type[MultistepSampler]] = {"obelm": OBELM, "bdia": BDIA, "ddim": DDIM}

#: ā at t = T − 1 under ``rescale_betas_zero_snr`` (diffusers' clamp: zero SNR would make σ/α infinite)
ZERO_SNR_ALPHA_CUMPROD = 2.0 ** -24


class IgnoredConfigWarning(UserWarning):
    """A config key a deterministic, exactly invertible scheduler accepts but cannot honour."""


#: config key -> (the value belm behaves as, why another value is ignored)
_IGNORED_KEYS: dict[str, tuple[Any, str]] = {
    "set_alpha_to_one": (True, "belm's final level is clean (alpha = 1), so that inversion starts from the "
                         "clean input and latents match belm's own samplers; the last step of method='ddim' "
                         "therefore goes to alpha = 1 where DDIMScheduler stops at alphas_cumprod[0]"),
    "clip_sample": (False, "clipping x0 is not invertible, so exact samplers never clip"),
    "thresholding": (False, "dynamic thresholding is not invertible, so exact samplers never threshold"),
    "use_karras_sigmas": (False, "the grid follows timestep_spacing; pass set_timesteps(timesteps=[...]) "
                          "for another grid"),
    "use_exponential_sigmas": (False, "the grid follows timestep_spacing; pass set_timesteps(timesteps=[...]) "
                               "for another grid"),
    "use_beta_sigmas": (False, "the grid follows timestep_spacing; pass set_timesteps(timesteps=[...]) "
                        "for another grid"),
    "use_lu_lambdas": (False, "the grid follows timestep_spacing; pass set_timesteps(timesteps=[...]) "
                       "for another grid"),
}
#: (class name, key) already warned about: one warning per key and class per process
_WARNED: set[tuple[str, str]] = set()


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning issued by our caller at the user's code, past the
    frames of belm's adapters and of diffusers' config machinery (from_config, register_to_config)."""
    frame, level = sys._getframe(2), 2      # stacklevel 2: the caller of the function that warns
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("belm.adapters", "diffusers")):
        frame, level = frame.f_back, level + 1
    return level


def _warn_ignored(cls_name: str, config: dict) -> None:
    """Warn once per (class, key) about each key of ``config`` that is set and ignored."""
    for key, (honoured, why) in _IGNORED_KEYS.items():
        value = config.get(key, honoured)
        if value is not None and value != honoured and (cls_name, key) not in _WARNED:
            _WARNED.add((cls_name, key))
            warnings.warn(f"{cls_name}: config {key}={value!r} is ignored ({key}={honoured!r} is used): {why}",
                          IgnoredConfigWarning, stacklevel=_user_stacklevel())


def _version(x: torch.Tensor) -> Optional[int]:
    """The tensor's in-place modification counter (None for inference-mode tensors, which have none)."""
    try:
        return x._version
    except RuntimeError:
        return None


@dataclass
class BELMSchedulerOutput(BaseOutput):
    """Output of ``step``.

    Attributes:
        prev_sample: the state at the next level (cleaner for BELMScheduler, noisier for
            BELMInverseScheduler), in the input sample's dtype.
        pred_original_sample: x̂0 = (x − sigma·ε) / alpha at the current level (sample's dtype).
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


def _unused_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("the scheduler's internal belm sampler never calls the network; the pipeline does")


def _no_network(x: torch.Tensor, level: int) -> torch.Tensor:
    raise RuntimeError(f"the chain needs the network output at level {level}, which the pipeline did not "
                       "give: call step() once per entry of scheduler.timesteps, in order")


class _BELMSchedulerBase(SchedulerMixin, ConfigMixin):
    """Config handling, the belm schedule/sampler and the shared step bookkeeping."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Sequence[float] | np.ndarray] = None,
        clip_sample: bool = False,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        method: str = "obelm",
        gamma: float = 1.0,
        spacing: Optional[str] = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}; got {method!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}; got {timestep_spacing!r}")
        if spacing not in (None, "config") + SPACINGS:
            raise ValueError(f"spacing must be None or 'config' (the config's timestep_spacing, as the pipeline's own "
                             f"scheduler) or one of {SPACINGS} ('trailing' is belm's grid for inversion); "
                             f"got {spacing!r}")
        if method == "bdia":  # validated here so that a bad config fails at construction
            if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
                raise ValueError(f"gamma must lie in (0, 1]; got {gamma!r}. gamma = 1 is the usual choice")
        _warn_ignored(type(self).__name__, {"set_alpha_to_one": set_alpha_to_one, "clip_sample": clip_sample,
                                            "thresholding": thresholding})
        # diffusers' own beta code (float32), so alphas_cumprod is bit-identical to DDIMScheduler's.
        try:
            ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                                 beta_schedule=beta_schedule, trained_betas=trained_betas,
                                 rescale_betas_zero_snr=rescale_betas_zero_snr)
        except NotImplementedError as exc:
            raise ValueError(f"beta_schedule {beta_schedule!r} is not supported (use 'linear', 'scaled_linear', "
                             "'squaredcos_cap_v2' or trained_betas)") from exc
        self.betas = ddpm.betas
        self.alphas = ddpm.alphas
        self.alphas_cumprod = ddpm.alphas_cumprod.clone()
        if rescale_betas_zero_snr:
            # zero terminal SNR: ā_{T−1} = 0 makes σ/α infinite at t = T − 1; clamp as diffusers' Euler does
            self.alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD
        self._alphas_cumprod64 = self.alphas_cumprod.to(torch.float64)
        self.num_inference_steps: Optional[int] = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        self.schedule: Optional[Schedule] = None
        self.sampler: Optional[MultistepSampler] = None
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None
        self._pending: Optional[Latent] = None
        self._chain: Optional[MultistepChain] = None
        self._returned: Optional[torch.Tensor] = None
        self._returned_version: Optional[int] = None
        self._reset()

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' ``from_config``; keys of compatible schedulers' configs that belm cannot honour
        (which diffusers would drop silently) are warned about once, by name."""
        given = {**(dict(config) if isinstance(config, dict) else {}), **kwargs}
        _warn_ignored(cls.__name__, {key: value for key, value in given.items()
                                     if key not in cls._get_init_keys(cls)})
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _reset(self) -> None:
        """Forget the run's state (called by __init__ and set_timesteps)."""
        raise NotImplementedError

    def _make_sampler(self, schedule: Schedule) -> None:
        """The belm sampler of ``config.method`` on ``schedule`` (the chain's members; never calls a network)."""
        cls = METHODS[self.config.method]
        kwargs = {"gamma": float(self.config.gamma)} if self.config.method == "bdia" else {}
        if schedule.num_steps < cls.num_states:
            # Fewer levels than the method couples: a chain started at level 0 uses only the start-up
            # members min(k, n) ≤ N. Every method here has k ≤ 2, so that is member 1: DDIM.
            cls, kwargs = DDIM, {}
        self.sampler = cls(_unused_eps, schedule, progress=False, **kwargs)
        self.schedule = schedule
        self.num_inference_steps = schedule.num_steps

    def _refuse_inexact_inversion(self) -> None:
        """Inversion with fewer levels than the method's k would be DDIM inversion: not exact, so refused."""
        k = METHODS[self.config.method].num_states
        if self.num_inference_steps < k:
            raise ValueError(
                f"num_inference_steps={self.num_inference_steps}: {self.config.method} inverts exactly only with "
                f"num_inference_steps >= {k} (with fewer levels only the start-up DDIM step runs, and DDIM "
                f"inversion is not exact); use num_inference_steps >= {k}, or method='ddim' for an approximate "
                "inversion")

    # -- belm objects ------------------------------------------------------------------
    def _build(self, num_inference_steps: Optional[int], timesteps: Optional[Sequence[int]]) -> Schedule:
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("pass either num_inference_steps or timesteps, not both")
            schedule = Schedule(self.alphas_cumprod, torch.as_tensor(timesteps).reshape(-1).cpu())
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps (or a descending list of timesteps)")
            schedule = Schedule.from_diffusers(self, num_inference_steps, spacing=self.config.spacing)
        self._make_sampler(schedule)
        return schedule

    @property
    def num_states(self) -> int:
        """k, the number of states the method couples (2 for O-BELM and BDIA, 1 for DDIM)."""
        return METHODS[self.config.method].num_states

    def _chain_dtype(self, sample: torch.Tensor) -> None:
        self.sampler.state_dtype = self._state_dtype(sample)

    @property
    def step_index(self) -> Optional[int]:
        """Position of the next step in ``timesteps`` (None before the first step)."""
        return self._step_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # -- helpers ------------------------------------------------------------------------
    def _require_timesteps(self) -> None:
        if self.schedule is None:
            raise RuntimeError(f"{type(self).__name__}.step() called before set_timesteps(); call "
                               "scheduler.set_timesteps(num_inference_steps) first")

    def _first_index(self, timestep: Any) -> int:
        """Position of ``timestep`` in ``timesteps``: where a run's first step is (mid-grid starts are normal)."""
        raw = torch.as_tensor(timestep).detach().reshape(-1).cpu()
        given, grid = raw.double(), self.timesteps.detach().cpu().double()
        if given.numel() and bool((given == given[0]).all()):
            hits = (grid == given[0]).nonzero().flatten()
            if len(hits):
                return int(hits[0])
        shown = raw.tolist() if raw.numel() != 1 else raw.item()
        raise ValueError(f"{type(self).__name__}.step() got timestep {shown}, which is not in scheduler.timesteps "
                         f"({self.timesteps.tolist()}); call step() with the entries of scheduler.timesteps, in order "
                         "(a run may start at any of them)")

    def _unchanged(self, sample: torch.Tensor, level: int) -> bool:
        """Whether ``sample`` is the state the chain holds at ``level``: the tensor we returned, not
        edited in place (same version counter), or any tensor with the same values in its dtype."""
        if sample is self._returned and self._returned_version is not None \
                and _version(sample) == self._returned_version:
            return True
        current = self._chain.x(level)
        if sample.shape != current.shape:
            raise ValueError(f"sample has shape {tuple(sample.shape)} but the previous state has "
                             f"{tuple(current.shape)}; the batch/latent shape cannot change in a run")
        return torch.equal(sample, current.to(sample.dtype))

    def _hand_out(self, prev_sample: torch.Tensor, x0: torch.Tensor, return_dict: bool
                  ) -> BELMSchedulerOutput | tuple:
        """Return ``prev_sample`` and remember it (and its version counter) to recognise it next step."""
        self._returned, self._returned_version = prev_sample, _version(prev_sample)
        if not return_dict:
            return (prev_sample, x0)
        return BELMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _check_timestep(self, timestep: Any, index: int) -> int:
        total = len(self.timesteps)
        if index >= total:
            raise RuntimeError(f"{type(self).__name__}: all {total} steps are done; call set_timesteps() again "
                               "to start a new run")
        expected = int(self.timesteps[index])
        given = torch.as_tensor(timestep).detach().reshape(-1).cpu()
        if given.numel() == 0 or not bool((given == expected).all()):
            shown = given.tolist() if given.numel() > 1 else (given.item() if given.numel() else "empty")
            raise ValueError(
                f"{type(self).__name__}.step() got timestep {shown}, but step {index} of {total} is at timestep "
                f"{expected}: steps are tracked by position, so call step() once per entry of "
                "scheduler.timesteps, in order (call set_timesteps() to restart)")
        return expected

    @staticmethod
    def _state_dtype(sample: torch.Tensor) -> torch.dtype:
        return torch.float64 if device_supports_float64(sample.device) else torch.float32

    def _epsilon(self, model_output: torch.Tensor, x: torch.Tensor, timestep: int) -> torch.Tensor:
        if not isinstance(model_output, torch.Tensor) or model_output.shape != x.shape:
            shape = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output)
            raise ValueError(f"model_output has shape {shape} but sample has shape {tuple(x.shape)}; "
                             "pass the (guided) network output for this sample")
        ac = float(self._alphas_cumprod64[timestep])
        # The network saw train timestep `timestep`: convert with its alpha, sigma.
        return to_epsilon(model_output.to(x), x, ac ** 0.5, (1.0 - ac) ** 0.5, self.config.prediction_type)

    def _x0(self, x: torch.Tensor, eps: torch.Tensor, level: int, dtype: torch.dtype) -> torch.Tensor:
        alpha, sigma = float(self.schedule.alpha[level]), float(self.schedule.sigma[level])
        return ((x - sigma * eps) / alpha).to(dtype)

    @staticmethod
    def _check_sample(sample: Any) -> None:
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            raise TypeError(f"sample must be a floating-point tensor; got {getattr(sample, 'dtype', type(sample))}")

    @staticmethod
    def _check_eta(eta: float, variance_noise: Any) -> None:
        if eta not in (0, 0.0, None) or variance_noise is not None:
            raise ValueError(f"BELM schedulers are deterministic (eta = 0, no variance_noise); got eta={eta!r}")

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """Identity (the network takes x as is)."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process x_t = sqrt(ā_t)·x0 + sqrt(1 − ā_t)·noise (in the samples' dtype)."""
        ac = self._alphas_cumprod64.to(original_samples.device)[torch.as_tensor(timesteps).long().reshape(-1).cpu()]
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        x = ac.sqrt().reshape(shape) * original_samples.to(ac) + (1 - ac).sqrt().reshape(shape) * noise.to(ac)
        return x.to(original_samples.dtype)


class BELMScheduler(_BELMSchedulerBase):
    """O-BELM / BDIA / DDIM sampling as a diffusers scheduler (noisy → clean), one network call per step.

    Config: the usual DDIM keys (``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule``, ``trained_betas``, ``prediction_type`` ("epsilon", "v_prediction",
    "sample"), ``timestep_spacing`` ("leading", "linspace", "trailing"), ``steps_offset``)
    plus ``method`` ("obelm" (default), "bdia", "ddim") and ``gamma`` (BDIA's γ ∈ (0, 1]).
    ``set_alpha_to_one=False``, ``clip_sample`` and ``thresholding`` are accepted and ignored, with one
    :class:`IgnoredConfigWarning` naming the key; ``rescale_betas_zero_snr`` is honoured (ā_{T−1} = 2⁻²⁴).

    Schedule: after ``set_timesteps(N)``, :attr:`schedule` is ``Schedule.from_diffusers(self, N)``
    (grid from ``timestep_spacing`` and ``steps_offset``, clean final level alpha = 1,
    clean timestep 1), and a full run equals ``METHOD(eps_fn, schedule).sample(xT)`` of the belm
    sampler (:attr:`sampler`) with the same network: step 0 is a DDIM step, later steps use the
    two-step relation with the previous state, which this scheduler keeps (in float64) between
    calls. Output dtype: the sample's.

    State: the scheduler keeps the exact float64 state it returned last. When the pipeline hands
    that tensor back (the usual loop), the float64 state is used, so nothing is lost to the
    pipeline's dtype; a modified sample (e.g. by a callback, out of place or in place: the returned
    tensor's version counter tells) is taken as the new state, and the chain restarts from it with
    the start-up (DDIM) step, as does a run whose first timestep is not ``timesteps[0]``.

    Exact reconstruction: :meth:`start_from` seeds the next run with a belm
    :class:`~belm.solvers.base.Latent` (e.g. :attr:`BELMInverseScheduler.latent` or
    ``OBELM(...).invert(z0)``); pass ``latents=latent.x`` to the pipeline.

    diffusers' DDIM off-grid bug (which this class does not have): ``DDIMScheduler.step`` takes
    the previous timestep as ``t − T // N``. That is the next grid point only for "leading"
    spacing; for "linspace" (e.g. N = 50, T = 1000: 999 → 979 instead of 978) and "trailing"
    with T % N ≠ 0 every step lands off the grid, so the next network call is made at a
    timestep that does not match the sample's noise level. BELMScheduler indexes the grid by
    position: each step goes from level k to level k+1 of ``schedule`` (the measured difference is in
    benchmarks/RESULTS.md, "diffusers' off-grid DDIM step"; tests/test_schedulers.py checks it).
    """

    def _reset(self) -> None:
        self._step_index = None
        self._chain = None
        self._returned = None

    @property
    def begin_index(self) -> Optional[int]:
        """Level of the first step (set by :meth:`set_begin_index`; None means 0)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at level ``begin_index`` (img2img pipelines): like ``sample(x, from_level=k)``."""
        self._require_timesteps()
        if isinstance(begin_index, bool) or not 0 <= int(begin_index) < self.num_inference_steps:
            raise ValueError(f"begin_index must lie in [0, {self.num_inference_steps - 1}]; got {begin_index!r}")
        self._begin_index = int(begin_index)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: str | torch.device | None = None,
                      timesteps: Optional[Sequence[int]] = None) -> None:
        """Build the belm schedule of ``num_inference_steps`` levels (or of explicit descending
        ``timesteps``) and reset the step counter. ``self.timesteps``: the grid t_0 > … > t_{N−1}."""
        schedule = self._build(num_inference_steps, timesteps)
        self.timesteps = schedule.timesteps.to(device) if device is not None else schedule.timesteps.clone()
        self._begin_index = None
        self._reset()
        if self._pending is not None:
            self._check_latent(self._pending)

    def start_from(self, latent: Latent) -> None:
        """Seed the NEXT run with an exactly inverted state (one-shot).

        ``latent`` (level 0) comes from :attr:`BELMInverseScheduler.latent` or from
        ``belm.OBELM(eps_fn, schedule).invert(z0)`` on this scheduler's schedule and method. Then::

            scheduler.start_from(latent)
            pipe(prompt, latents=latent.x, num_inference_steps=N, output_type="latent")

        reproduces the inverted z0 exactly. The pipeline still makes N network calls; the first
        one's output is not needed (the second state of the pair replaces it).
        """
        if not isinstance(latent, Latent):
            raise TypeError(f"start_from needs a belm Latent (from an inversion); got {type(latent).__name__}")
        if latent.level != 0:
            raise ValueError(f"start_from needs a latent at level 0 (a full inversion); got level {latent.level}. "
                             "For a partial inversion use the belm sampler's sample(latent)")
        if self.schedule is not None:
            self._check_latent(latent)
        self._pending = latent

    def _check_latent(self, latent: Latent) -> None:
        try:
            self.sampler.check_latent(latent)
        except LatentMismatchError as exc:
            self._pending = None
            raise LatentMismatchError(f"{exc}. Use the same method, config and num_inference_steps as the "
                                      "inversion") from None

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             eta: float = 0.0, use_clipped_model_output: bool = False, generator: Any = None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True,
             **kwargs: Any) -> BELMSchedulerOutput | tuple:
        """One step from level k (``timestep`` = ``self.timesteps[k]``) to level k + 1.

        Args:
            model_output: the (guided) network output at ``sample``, of ``config.prediction_type``.
            timestep: must equal ``self.timesteps[k]`` for the k-th call since ``set_timesteps``.
            sample: the current state x_k.
            eta, use_clipped_model_output, generator, variance_noise: accepted for pipeline
                compatibility; eta must be 0 (deterministic).

        Returns:
            :class:`BELMSchedulerOutput` (``prev_sample`` = x_{k+1} in the sample's dtype) or a tuple.
        """
        self._require_timesteps()
        self._check_sample(sample)
        self._check_eta(eta, variance_noise)
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self._first_index(timestep)
        level = self._step_index
        t = self._check_timestep(timestep, level)
        self._chain_dtype(sample)
        if self._pending is not None:
            latent, self._pending = self._pending, None
            if level != 0:
                raise ValueError(f"start_from: the seeded latent is at level 0 but this run begins at level {level} "
                                 "(set_begin_index, or a first timestep after timesteps[0]); do not combine them")
            expected = latent.x.to(sample.dtype)
            if expected.shape != sample.shape or not torch.equal(expected.to(sample.device), sample):
                raise ValueError(f"start_from: the run's first sample (shape {tuple(sample.shape)}) is not the "
                                 f"seeded latent's x (shape {tuple(latent.states[0].shape)}); pass "
                                 "latents=latent.x to the pipeline")
            moved = latent.replace(states=[s.to(sample.device) for s in latent.states])
            self._chain = self.sampler.chain_from_latent(moved, _no_network)
        elif self._chain is None or not self._unchanged(sample, level):
            # A run's first step, or a state the caller changed (e.g. a callback, in place or not):
            # the sample is the whole state, so the chain (re)starts from it with the start-up member.
            if self._chain is None and level == 0:
                self._warn_if_latent_x(sample)
            self._chain = self.sampler.chain_from_noise(sample, level, _no_network)
        chain = self._chain
        x = chain.x(level)
        eps = self._epsilon(model_output, x, t)
        x0 = self._x0(x, eps, level, sample.dtype)
        if chain.hi == level:               # a seeded latent already holds level 1
            chain.supply(level, eps)
            chain.advance()
        self._step_index = level + 1
        return self._hand_out(chain.x(level + 1).to(sample.dtype, copy=True), x0, return_dict)

    def _warn_if_latent_x(self, sample: torch.Tensor) -> None:
        """``latents=latent.x`` without :meth:`start_from` restarts an inverted pair from its noisy half
        alone: the run does not reproduce the inverted input, so say so."""
        if self.sampler.num_states < 2:
            return
        method = latent_x_method(sample)
        if method is not None:
            warnings.warn(
                f"{type(self).__name__}: the first sample equals latent.x of a {method} latent, but no "
                "start_from(latent) was called: the run restarts from x alone with a DDIM step and does not "
                "reproduce the inverted input. Call scheduler.start_from(latent) before the pipeline",
                UserWarning, stacklevel=3)


class BELMInverseScheduler(_BELMSchedulerBase):
    """Exact inversion (clean → noisy) as a diffusers-style scheduler, one network call per step.

    Same config as :class:`BELMScheduler`. ``set_timesteps(N, to_level=0)`` builds
    ``Schedule.from_diffusers(self, N)`` and sets ``timesteps`` to the train timesteps at which
    the network is evaluated, in order: the clean-level evaluation timestep 1, then
    t_{N−1}, t_{N−2}, …, t_{to_level+1} (N − to_level entries), exactly the calls of
    ``METHOD(eps_fn, schedule).invert(x0, to_level=to_level)``. The usual inversion loop::

        inv = BELMInverseScheduler.from_config(pipe.scheduler.config)
        inv.set_timesteps(N)
        x = z0
        for t in inv.timesteps:
            x = inv.step(guided_model_output(x, t), t, x).prev_sample
        latent = inv.latent             # belm Latent: the exact pair (x_0, x_1), float64

    ``prev_sample`` after the last step is x_{to_level} (the noisiest state) in the input's dtype.
    Reconstruction needs the whole pair: ``OBELM(eps_fn, Schedule.from_diffusers(sched, N))
    .sample(latent)`` or ``BELMScheduler.start_from(latent)`` followed by a pipeline run with
    ``latents=latent.x``.
    """

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: str | torch.device | None = None,
                      timesteps: Optional[Sequence[int]] = None, to_level: int = 0) -> None:
        """Build the schedule and the inversion's evaluation timesteps (see the class docstring)."""
        schedule = self._build(num_inference_steps, timesteps)
        self._refuse_inexact_inversion()
        if self.sampler.invertible:
            check_inversion_growth(self.sampler, stacklevel=3)
        N = schedule.num_steps
        if isinstance(to_level, bool) or not isinstance(to_level, int) or not 0 <= to_level < N:
            raise ValueError(f"to_level must be an integer level in [0, {N - 1}]; got {to_level!r}")
        self._reset()
        self.to_level = to_level
        # Step i evaluates the network at level N − i (the current, cleaner state).
        evaluated = [schedule.timestep(level) for level in range(N, to_level, -1)]
        self.timesteps = torch.tensor(evaluated, dtype=torch.int64, device=device)

    def _reset(self) -> None:
        self._step_index = None
        self._chain = None
        self._returned = None
        self._input_dtype: Optional[torch.dtype] = None
        self._origin: Optional[int] = None
        self.to_level = 0

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             eta: float = 0.0, use_clipped_model_output: bool = False, generator: Any = None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True,
             **kwargs: Any) -> BELMSchedulerOutput | tuple:
        """One inversion step from level L + 1 (the current ``sample``) to the noisier level L."""
        self._require_timesteps()
        self._check_sample(sample)
        self._check_eta(eta, variance_noise)
        N = self.num_inference_steps
        if self._step_index is None:
            self._step_index = self._first_index(timestep)
            self._input_dtype = sample.dtype
        i = self._step_index
        t = self._check_timestep(timestep, i)
        current = N - i                    # level of `sample`
        if self._chain is None or not self._unchanged(sample, current):
            # The first step (from the clean level, or mid-grid), or a state the caller changed:
            # inversion (re)starts from this sample with the start-up member.
            self._chain_dtype(sample)
            self._chain = self.sampler.chain_from_clean(sample, _no_network, level=current)
            self._origin = current
        chain = self._chain
        eps = self._epsilon(model_output, chain.x(current), t)
        x0 = self._x0(chain.x(current), eps, current, sample.dtype)
        chain.supply(current, eps)
        chain.retreat()
        self._step_index = i + 1
        return self._hand_out(chain.x(current - 1).to(sample.dtype, copy=True), x0, return_dict)

    @property
    def latent(self) -> Latent:
        """The exact inverted state: a belm Latent at level ``to_level`` holding (x_L, x_{L+1})
        (one state for DDIM), accepted by ``METHOD(eps_fn, schedule).sample(latent)`` and by
        :meth:`BELMScheduler.start_from`."""
        total = len(self.timesteps) if self.schedule is not None else 0
        if self.schedule is None or self._step_index != total:
            done = self._step_index or 0
            raise RuntimeError(f"the inversion is not finished ({done} of {total} steps); run step() for every "
                               "entry of scheduler.timesteps first")
        if self._origin != self.num_inference_steps:
            warnings.warn(
                f"{type(self).__name__}: this inversion started (or, after an edited sample, restarted) at level "
                f"{self._origin}, not at the clean level {self.num_inference_steps}: sampling its latent "
                f"reproduces the state at level {self._origin}, not a clean input", UserWarning, stacklevel=2)
        return self.sampler.to_latent(self._chain, self._input_dtype)
