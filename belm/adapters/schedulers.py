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
``Schedule.from_diffusers(scheduler, N)``, i.e. ``Schedule(scheduler.alphas_cumprod,
grid_timesteps(T, N, config.timestep_spacing, config.steps_offset), final_alpha_cumprod=1.0,
clean_timestep=1)``. ``alphas_cumprod`` is computed by diffusers' own code (float32, like
``DDIMScheduler``), so the schedule is identical (same fingerprint) to
``Schedule.from_diffusers(ddim_scheduler, N)`` for a ``DDIMScheduler`` with the same config,
and a belm :class:`~belm.solvers.base.Latent` moves freely between the two. The final level
is always clean (alpha = 1, belm's convention): ``set_alpha_to_one`` is accepted for config
compatibility and ignored, as are ``clip_sample`` and ``thresholding`` (they would break exact
inversion).

Steps are tracked by POSITION in the grid (a step counter checked against the given
timestep), never by ``t − T // N``. diffusers' ``DDIMScheduler`` computes the previous
timestep as ``t − T // N``, which is the next grid point only for "leading" spacing (and for
"trailing" when N divides T). For "linspace" (and "trailing" with T % N ≠ 0) its steps land
*off* the grid: the sample is moved to noise level ``ā[t − T//N]`` while the network is then
evaluated at the grid timestep ``t_{k+1}``. belm steps from level k to level k+1 exactly.
"""

from __future__ import annotations

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

__all__ = ["BELMScheduler", "BELMInverseScheduler", "BELMSchedulerOutput", "METHODS"]

#: config.method -> belm sampler class
METHODS: dict[str, type[MultistepSampler]] = {"obelm": OBELM, "bdia": BDIA, "ddim": DDIM}


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


def _same(a: torch.Tensor, b: Optional[torch.Tensor]) -> bool:
    """Whether the caller handed back the tensor we returned (same values, dtype and shape)."""
    if b is None:
        return False
    if a is b:
        return True
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


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
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}; got {method!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}; got {timestep_spacing!r}")
        if method == "bdia":  # validated here so that a bad config fails at construction
            if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
                raise ValueError(f"gamma must lie in (0, 1]; got {gamma!r}. gamma = 1 is the usual choice")
        if rescale_betas_zero_snr:
            raise ValueError("rescale_betas_zero_snr=True is not supported: zero terminal SNR gives alpha = 0 at "
                             "t = T-1, where belm's rescaled coordinate sigma/alpha is infinite")
        # diffusers' own beta code (float32), so alphas_cumprod is bit-identical to DDIMScheduler's.
        try:
            ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                                 beta_schedule=beta_schedule, trained_betas=trained_betas)
        except NotImplementedError as exc:
            raise ValueError(f"beta_schedule {beta_schedule!r} is not supported (use 'linear', 'scaled_linear', "
                             "'squaredcos_cap_v2' or trained_betas)") from exc
        self.betas = ddpm.betas
        self.alphas = ddpm.alphas
        self.alphas_cumprod = ddpm.alphas_cumprod
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
        self._reset()

    def _reset(self) -> None:
        """Forget the run's state (called by __init__ and set_timesteps)."""
        raise NotImplementedError

    # -- belm objects ------------------------------------------------------------------
    def _build(self, num_inference_steps: Optional[int], timesteps: Optional[Sequence[int]]) -> Schedule:
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("pass either num_inference_steps or timesteps, not both")
            schedule = Schedule(self.alphas_cumprod, torch.as_tensor(timesteps).reshape(-1).cpu())
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps (or a descending list of timesteps)")
            schedule = Schedule.from_diffusers(self, num_inference_steps)
        kwargs = {"gamma": float(self.config.gamma)} if self.config.method == "bdia" else {}
        self.sampler = METHODS[self.config.method](_unused_eps, schedule, progress=False, **kwargs)
        self.schedule = schedule
        self.num_inference_steps = schedule.num_steps
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
        return torch.float32 if sample.device.type == "mps" else torch.float64  # MPS has no float64

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
    ``set_alpha_to_one``, ``clip_sample`` and ``thresholding`` are accepted and ignored.

    Schedule: after ``set_timesteps(N)``, :attr:`schedule` is ``Schedule.from_diffusers(self, N)``
    (grid from ``timestep_spacing`` and ``steps_offset``, clean final level alpha = 1,
    clean timestep 1), and a full run equals ``METHOD(eps_fn, schedule).sample(xT)`` of the belm
    sampler (:attr:`sampler`) with the same network: step 0 is a DDIM step, later steps use the
    two-step relation with the previous state, which this scheduler keeps (in float64) between
    calls. Output dtype: the sample's.

    State: the scheduler keeps the exact float64 state it returned last. When the pipeline hands
    that tensor back (the usual loop), the float64 state is used, so nothing is lost to the
    pipeline's dtype; a modified sample (e.g. by a callback) is taken as the new state.

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
            self._step_index = self._begin_index or 0
        level = self._step_index
        t = self._check_timestep(timestep, level)
        self._chain_dtype(sample)
        if self._pending is not None:
            latent, self._pending = self._pending, None
            if level != 0:
                raise ValueError(f"start_from: the seeded latent is at level 0 but this run begins at level {level} "
                                 "(set_begin_index); do not combine them")
            expected = latent.x.to(sample.dtype)
            if expected.shape != sample.shape or not torch.equal(expected.to(sample.device), sample):
                raise ValueError(f"start_from: the run's first sample (shape {tuple(sample.shape)}) is not the "
                                 f"seeded latent's x (shape {tuple(latent.states[0].shape)}); pass "
                                 "latents=latent.x to the pipeline")
            moved = latent.replace(states=[s.to(sample.device) for s in latent.states])
            self._chain = self.sampler.chain_from_latent(moved, _no_network)
        elif self._chain is None:
            self._chain = self.sampler.chain_from_noise(sample, level, _no_network)
        elif not _same(sample, self._returned):
            # Changed by the caller (e.g. a callback): continue from what we were given.
            current = self._chain.x(level)
            if sample.shape != current.shape:
                raise ValueError(f"sample has shape {tuple(sample.shape)} but the previous state has "
                                 f"{tuple(current.shape)}; the batch/latent shape cannot change in a run")
            self._chain.replace(level, sample.to(current.dtype))
        chain = self._chain
        x = chain.x(level)
        eps = self._epsilon(model_output, x, t)
        x0 = self._x0(x, eps, level, sample.dtype)
        if chain.hi == level:               # a seeded latent already holds level 1
            chain.supply(level, eps)
            chain.advance()
        self._step_index = level + 1
        prev_sample = chain.x(level + 1).to(sample.dtype, copy=True)
        self._returned = prev_sample
        if not return_dict:
            return (prev_sample, x0)
        return BELMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


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
            self._step_index = 0
            self._chain_dtype(sample)
            self._chain = self.sampler.chain_from_clean(sample, _no_network)
            self._input_dtype = sample.dtype
        i = self._step_index
        t = self._check_timestep(timestep, i)
        current = N - i                    # level of `sample`
        chain = self._chain
        if i > 0 and not _same(sample, self._returned):
            x_new = sample.to(chain.x(current))
            if x_new.shape != chain.x(current).shape:
                raise ValueError(f"sample has shape {tuple(sample.shape)} but the previous state has "
                                 f"{tuple(chain.x(current).shape)}; the shape cannot change in a run")
            chain.replace(current, x_new)   # modified by the caller: continue from what we were given
        eps = self._epsilon(model_output, chain.x(current), t)
        x0 = self._x0(chain.x(current), eps, current, sample.dtype)
        chain.supply(current, eps)
        chain.retreat()
        self._step_index = i + 1
        prev_sample = chain.x(current - 1).to(sample.dtype, copy=True)
        self._returned = prev_sample
        if not return_dict:
            return (prev_sample, x0)
        return BELMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

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
        return self.sampler.to_latent(self._chain, self._input_dtype)
