"""belm's samplers as drop-in schedulers for flow-matching pipelines (Stable Diffusion 3, FLUX).

    pipe.scheduler = FlowBELMScheduler.from_config(pipe.scheduler.config)      # O-BELM
    latents = pipe(prompt, num_inference_steps=28, output_type="latent").images

    inv = FlowBELMInverseScheduler.from_config(pipe.scheduler.config)
    inv.set_timesteps(28)                       # FLUX: also sigmas=/mu= as FluxPipeline passes them
    x = z0
    for t in inv.timesteps:                     # σ·1000, clean level first
        x = inv.step(velocity_at(x, t), t, x).prev_sample
    latent = inv.latent                         # exact; FlowBELMScheduler.start_from(latent) reproduces z0

Both classes are :class:`~belm.adapters.schedulers.BELMScheduler` /
:class:`~belm.adapters.schedulers.BELMInverseScheduler` (the same ``step``: the pipeline's
network output is supplied to the belm sampler's chain, which advances or retreats one
level) with a flow configuration: the config keys are ``FlowMatchEulerDiscreteScheduler``'s
plus ``method`` ("obelm", "bdia", "ddim") and ``gamma``; the grid is computed by a private
``FlowMatchEulerDiscreteScheduler`` with that config (``set_timesteps(N, sigmas=, mu=,
timesteps=)`` exactly as the stock one, so shift, dynamic shifting, shift_terminal and the
Karras/exponential/beta options give diffusers' own σ), and the belm schedule is
``Schedule.from_sigmas(σ, kind="flow")``. The model output is the velocity dx/dσ, used as
is; ``timesteps`` are σ·num_train_timesteps in float32, like diffusers'. One network call per
step. ``stochastic_sampling`` is refused (it would break exactness).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from belm.adapters.schedulers import METHODS, BELMInverseScheduler, BELMScheduler
from belm.schedule import Schedule

__all__ = ["FlowBELMScheduler", "FlowBELMInverseScheduler"]

try:
    from diffusers import FlowMatchEulerDiscreteScheduler
    # SchedulerMixin and ConfigMixin must be names of THIS module: DiffusionPipeline.from_pretrained
    # looks the loading mixins up in the module that defines a component's class
    # (diffusers.pipelines.pipeline_loading_utils.get_class_obj_and_candidates).
    from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: F401
    from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401
except ImportError as exc:  # pragma: no cover - belm.adapters.schedulers already needs diffusers
    raise ImportError(f"belm.adapters.flow_schedulers needs diffusers ({exc})") from exc


class _FlowConfig:
    """Flow configuration, grid and model-output handling shared by the two schedulers."""

    _compatibles = ["FlowMatchEulerDiscreteScheduler"]
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: Optional[float] = 0.5,
        max_shift: Optional[float] = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: Optional[float] = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        method: str = "obelm",
        gamma: float = 1.0,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}; got {method!r}")
        if method == "bdia" and (isinstance(gamma, bool) or not isinstance(gamma, (int, float))
                                 or not 0 < gamma <= 1):
            raise ValueError(f"gamma must lie in (0, 1]; got {gamma!r}. gamma = 1 is the usual choice")
        if stochastic_sampling:
            raise ValueError("stochastic_sampling=True re-noises every step, which no exact method can invert; "
                             "use stochastic_sampling=False")
        if invert_sigmas:
            raise ValueError("invert_sigmas=True (Mochi's reversed σ) is not supported: belm's flow schedules "
                             "run from σ = 1 (noise) down to σ = 0")
        # the stock scheduler computes the grid: every option gives diffusers' own σ
        self._grid = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=num_train_timesteps, shift=shift, use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift, max_shift=max_shift, base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len, shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas, time_shift_type=time_shift_type)
        self.sigmas = self._grid.sigmas.clone()
        self.timesteps = self._grid.timesteps.clone()
        self.num_inference_steps: Optional[int] = None
        self.schedule: Optional[Schedule] = None
        self.sampler = None
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None
        self._pending = None
        self._chain = None
        self._returned: Optional[torch.Tensor] = None
        self._returned_version: Optional[int] = None
        self._reset()

    # -- grid -------------------------------------------------------------------------------
    def _build_flow(self, num_inference_steps: Optional[int], sigmas: Optional[Sequence[float]],
                    mu: Optional[float], timesteps: Optional[Sequence[float]]) -> Schedule:
        """Set the private stock scheduler as the pipeline would, and build the belm flow schedule."""
        if num_inference_steps is None and sigmas is None and timesteps is None:
            raise ValueError("set_timesteps needs num_inference_steps (or sigmas= / timesteps=)")
        self._grid.set_timesteps(num_inference_steps, sigmas=None if sigmas is None else list(np.asarray(sigmas)),
                                 mu=mu, timesteps=None if timesteps is None else list(np.asarray(timesteps)))
        if timesteps is not None and sigmas is None:
            # diffusers uses the timesteps as given but shifts σ = t/T: unless the shift is the identity
            # (shift = 1, no dynamic shifting, terminal stretch or σ conversion) the network would be
            # evaluated at a time that is not its state's σ
            implied = self._grid.timesteps.double() / self.config.num_train_timesteps
            if not torch.allclose(self._grid.sigmas[:-1].double(), implied, rtol=1e-6, atol=0.0):
                raise ValueError(
                    "timesteps= alone on a flow scheduler that shifts σ (shift != 1, dynamic shifting, "
                    "shift_terminal or Karras/exponential/beta σ) gives σ that do not match the timesteps; pass "
                    "sigmas= (or sigmas= and timesteps=) instead")
        schedule = Schedule.from_sigmas(self._grid.sigmas[:-1].double(), kind="flow")
        self._make_sampler(schedule)
        self.sigmas = self._grid.sigmas.clone()
        return schedule

    def _model_times(self, levels: Sequence[int], device: Any) -> torch.Tensor:
        """σ·T at ``levels`` in float32, computed as diffusers computes ``timesteps`` (σ in float32 × T)."""
        sigmas = torch.tensor([self.schedule.timestep(level) for level in levels], dtype=torch.float32)
        return (sigmas * self.config.num_train_timesteps).to(device)

    # -- overrides of the DDPM-specific helpers ----------------------------------------------
    def _check_timestep(self, timestep: Any, index: int) -> int:
        total = len(self.timesteps)
        if index >= total:
            raise RuntimeError(f"{type(self).__name__}: all {total} steps are done; call set_timesteps() again "
                               "to start a new run")
        expected = self.timesteps[index].detach().cpu()
        given = torch.as_tensor(timestep).detach().reshape(-1).cpu()
        if given.numel() == 0 or not bool((given.to(expected.dtype) == expected).all()):
            shown = given.tolist() if given.numel() > 1 else (given.item() if given.numel() else "empty")
            raise ValueError(
                f"{type(self).__name__}.step() got timestep {shown}, but step {index} of {total} is at timestep "
                f"{float(expected)}: steps are tracked by position, so call step() once per entry of "
                "scheduler.timesteps, in order (call set_timesteps() to restart)")
        return index

    def _epsilon(self, model_output: torch.Tensor, x: torch.Tensor, timestep: int) -> torch.Tensor:
        """The velocity dx/dσ as the chain's f (flows: no conversion), in the state's dtype."""
        if not isinstance(model_output, torch.Tensor) or model_output.shape != x.shape:
            shape = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output)
            raise ValueError(f"model_output has shape {shape} but sample has shape {tuple(x.shape)}; "
                             "pass the (guided) velocity for this sample")
        return model_output.to(x)

    def _x0(self, x: torch.Tensor, v: torch.Tensor, level: int, dtype: torch.dtype) -> torch.Tensor:
        """x̂0 = x − σ·v (rectified flow x = (1 − σ)·x0 + σ·z, v = z − x0)."""
        return (x - float(self.schedule.sigmas[level]) * v).to(dtype)

    def scale_noise(self, sample: torch.Tensor, timestep: Any, noise: torch.Tensor) -> torch.Tensor:
        """The forward process x_σ = (1 − σ)·x0 + σ·noise at σ = timestep / T (diffusers' ``scale_noise``)."""
        sigma = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).cpu() / self.config.num_train_timesteps
        shape = (-1,) + (1,) * (sample.ndim - 1)
        sigma = sigma.to(sample.device).reshape(shape)
        return ((1.0 - sigma) * sample.double() + sigma * noise.double()).to(sample.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`scale_noise` (argument order of the DDPM schedulers)."""
        return self.scale_noise(original_samples, timesteps, noise)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class FlowBELMScheduler(_FlowConfig, BELMScheduler):
    """O-BELM / BDIA / DDIM sampling for flow pipelines (``StableDiffusion3Pipeline``, ``FluxPipeline``).

    ``set_timesteps(N, device, sigmas=, mu=, timesteps=)`` takes what the pipelines pass to
    ``FlowMatchEulerDiscreteScheduler``; :attr:`schedule` is then the flow schedule on the same
    σ, and a run equals ``METHOD(velocity_fn, schedule).sample(xT)`` (step 0 a DDIM/Euler step).
    ``step`` is :meth:`BELMScheduler.step` (float64 state kept between calls, ``start_from`` a latent).
    """

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: str | torch.device | None = None,
                      sigmas: Optional[Sequence[float]] = None, mu: Optional[float] = None,
                      timesteps: Optional[Sequence[float]] = None) -> None:
        """Build the flow schedule (σ as ``FlowMatchEulerDiscreteScheduler.set_timesteps``) and reset.
        ``self.timesteps``: σ_0·T > … > σ_{N−1}·T (float32); ``self.sigmas``: the σ with the final 0."""
        schedule = self._build_flow(num_inference_steps, sigmas, mu, timesteps)
        self.timesteps = self._grid.timesteps.to(device) if device is not None else self._grid.timesteps.clone()
        assert len(self.timesteps) == schedule.num_steps
        self._begin_index = None
        self._reset()
        if self._pending is not None:
            self._check_latent(self._pending)


class FlowBELMInverseScheduler(_FlowConfig, BELMInverseScheduler):
    """Exact inversion (clean → noise) for flow pipelines, one network call per step.

    ``set_timesteps(N, device, sigmas=, mu=, timesteps=, to_level=0)``: the schedule as in
    :class:`FlowBELMScheduler`; ``timesteps`` are where the network is evaluated, in order:
    the clean level (σ = 0, timestep 0.0), then σ_{N−1}·T, …, σ_{to_level+1}·T (float32),
    exactly the calls of ``METHOD(velocity_fn, schedule).invert(x0, to_level=to_level)``.
    After the last step :attr:`latent` is the exact inverted state.
    """

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: str | torch.device | None = None,
                      sigmas: Optional[Sequence[float]] = None, mu: Optional[float] = None,
                      timesteps: Optional[Sequence[float]] = None, to_level: int = 0) -> None:
        """Build the schedule and the inversion's evaluation timesteps (see the class docstring)."""
        schedule = self._build_flow(num_inference_steps, sigmas, mu, timesteps)
        self._refuse_inexact_inversion()
        N = schedule.num_steps
        if isinstance(to_level, bool) or not isinstance(to_level, int) or not 0 <= to_level < N:
            raise ValueError(f"to_level must be an integer level in [0, {N - 1}]; got {to_level!r}")
        self._reset()
        self.to_level = to_level
        # Step i evaluates the network at level N − i (the current, cleaner state).
        self.timesteps = self._model_times(range(N, to_level, -1), device)
