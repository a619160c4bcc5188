"""What every sampler shares: the inverted latent, network evaluation and input checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from tqdm.auto import tqdm

from belm.errors import LatentMismatchError, NonFiniteError
from belm.schedule import Schedule

__all__ = ["Latent", "Sampler", "EpsFn", "Callback"]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]


@dataclass(frozen=True)
class Latent:
    """The exact state of an inverted chain at one level.

    Attributes:
        states: tensors in the sampler's state dtype, noisiest first. 2-step methods hold
            (x_level, x_{level+1}); k-step methods k states; EDICT its (x, y) branches;
            DDIM the single x_level.
        level: the level of ``states[0]`` (0 for a full inversion).
        method: identity of the method that produced it, e.g. ``"BDIA(gamma=0.5)"``.
        schedule: fingerprint of the schedule it belongs to.
        dtype: dtype of the original input; :attr:`x` and sampling outputs come back in it.
    """

    states: tuple[torch.Tensor, ...]
    level: int
    method: str
    schedule: str
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if not self.states or not all(isinstance(s, torch.Tensor) for s in self.states):
            raise TypeError("Latent.states must be a non-empty tuple of tensors")
        first = self.states[0]
        for i, s in enumerate(self.states[1:], start=1):
            if s.shape != first.shape or s.dtype != first.dtype or s.device != first.device:
                raise ValueError(
                    f"Latent.states[{i}] has shape {tuple(s.shape)}, dtype {s.dtype}, device {s.device}; "
                    f"states[0] has {tuple(first.shape)}, {first.dtype}, {first.device}: all states of a "
                    "latent must match (edit both tensors of a pair the same way)")

    @property
    def x(self) -> torch.Tensor:
        """The noisiest tensor, in the input's dtype."""
        return self.states[0].to(self.dtype)

    def replace(self, **changes: Any) -> "Latent":
        """A copy with some fields changed (e.g. ``states`` after a slerp of two latents)."""
        if "states" in changes:
            changes["states"] = tuple(changes["states"])
        return dataclasses.replace(self, **changes)


def check_tensor(x: Any, name: str) -> torch.Tensor:
    """Validate a user tensor: a finite floating-point torch.Tensor with a batch dimension."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (or a Latent for sampling); got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} has dtype {x.dtype}; pass a floating-point tensor, e.g. {name}.float()")
    if x.ndim < 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty tensor with a batch dimension; got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"{name} contains NaN or Inf; pass finite values")
    return x


class Sampler:
    """Base class: holds the network, the schedule and the numeric settings.

    Args:
        eps_fn: ``eps_fn(x, t) -> eps`` with x of shape (B, ...) and t a 0-dim int64 tensor
            holding the train timestep of x's level. Must be deterministic for exactness.
        schedule: the :class:`~belm.schedule.Schedule` to sample on.
        state_dtype: dtype of the state arithmetic (float64 by default); the network is
            called in the input's dtype (or ``model_dtype``).
        model_dtype: dtype in which eps_fn receives x; default: the input's dtype.
        progress: show a tqdm progress bar (``False`` to disable).
        check_finite: raise :class:`~belm.errors.NonFiniteError` as soon as the network
            returns NaN/Inf, naming the level and timestep. Costs one reduction per call.
    """

    #: number of states a latent of this method holds (at most)
    steps: int = 1

    def __init__(self, eps_fn: EpsFn, schedule: Schedule, *, state_dtype: torch.dtype = torch.float64,
                 model_dtype: Optional[torch.dtype] = None, progress: bool = True,
                 check_finite: bool = True) -> None:
        if not callable(eps_fn):
            raise TypeError(f"eps_fn must be callable as eps_fn(x, t); got {type(eps_fn).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError("schedule must be a belm.Schedule (build one with Schedule.from_betas or "
                            f"Schedule.from_diffusers); got {type(schedule).__name__}")
        for arg, value in (("state_dtype", state_dtype), ("model_dtype", model_dtype)):
            if value is not None and (not isinstance(value, torch.dtype) or not value.is_floating_point):
                raise TypeError(f"{arg} must be a floating torch.dtype such as torch.float64; got {value!r}")
        self.eps_fn = eps_fn
        self.schedule = schedule
        self.state_dtype = state_dtype
        self.model_dtype = model_dtype
        self.progress = progress
        self.check_finite = check_finite

    # -- identity ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Method identity recorded in latents, e.g. ``"OBELM"``."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.name} on {self.schedule!r}"

    def _make_latent(self, states: Iterable[torch.Tensor], level: int, dtype: torch.dtype) -> Latent:
        return Latent(tuple(states), level, self.name, self.schedule.fingerprint, dtype)

    def _check_latent(self, latent: Latent) -> None:
        if latent.method != self.name:
            raise LatentMismatchError(
                f"latent was produced by {latent.method}, but this sampler is {self.name}; sample it with "
                f"the same method (and parameters) that inverted it")
        if latent.schedule != self.schedule.fingerprint:
            raise LatentMismatchError(
                "latent was produced on a different schedule (timesteps or noise levels differ); "
                "sample it with the schedule used for inversion")
        if not 0 <= latent.level < self.schedule.num_steps + 1:
            raise ValueError(f"latent.level={latent.level} is outside [0, {self.schedule.num_steps}]")

    def _begin(self, x: "torch.Tensor | Latent", from_level: int, states_at: Callable[[int], int]
               ) -> tuple[list[torch.Tensor], int, torch.dtype, torch.device]:
        """Validate a sampling input: (states in state dtype, level, output dtype, device).

        ``states_at(level)`` is how many states a latent at ``level`` must hold; a tensor
        input gives a single state at ``from_level``.
        """
        if isinstance(x, Latent):
            self._check_latent(x)
            expected = states_at(x.level)
            if len(x.states) != expected:
                raise ValueError(f"latent holds {len(x.states)} states; {self.name} at level {x.level} needs "
                                 f"{expected}")
            return [s.to(self.state_dtype) for s in x.states], x.level, x.dtype, x.states[0].device
        check_tensor(x, "x")
        return [x.to(self.state_dtype)], self._level_arg(from_level, "from_level"), x.dtype, x.device

    def _level_arg(self, level: Any, name: str) -> int:
        N = self.schedule.num_steps
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < N:
            raise ValueError(f"{name} must be an integer level in [0, {N - 1}] (N = {N} steps); got {level!r}")
        return level

    # -- the network -------------------------------------------------------------------
    def _network(self, model_dtype: torch.dtype) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """``eps(x_state, level)``: calls eps_fn in the model dtype and validates its output.

        ε is returned as the network gave it (model dtype): the shears add it into the float64
        state with type promotion inside the kernel, which saves a full cast per step.
        """
        schedule, eps_fn = self.schedule, self.eps_fn
        timesteps: dict[int, torch.Tensor] = {}

        def eps(x: torch.Tensor, level: int) -> torch.Tensor:
            t = timesteps.get(level)
            if t is None:
                t = timesteps[level] = torch.tensor(schedule.timestep(level), dtype=torch.int64, device=x.device)
            x_model = x.to(model_dtype)
            out = eps_fn(x_model, t)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"eps_fn must return a torch.Tensor; got {type(out).__name__}")
            if out.shape != x_model.shape:
                raise ValueError(f"eps_fn returned shape {tuple(out.shape)} for input shape "
                                 f"{tuple(x_model.shape)} at level {level}; it must return eps of the same shape")
            if not out.is_floating_point():
                raise TypeError(f"eps_fn returned dtype {out.dtype}; it must return a floating-point tensor")
            # One reduction first: a sum is finite if every term is, and any NaN/Inf term makes
            # it non-finite; only then (or on overflow of a huge finite sum) the exact check.
            if self.check_finite and not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
                if not torch.isfinite(x).all():
                    raise NonFiniteError(
                        f"the state overflowed to NaN/Inf before level {level} (train timestep {int(t)}): "
                        f"{self.name}'s recursion amplifies rounding in this direction (BDIA with gamma < 1 "
                        "and EDICT divide by gamma or p every step); use fewer steps or O-BELM",
                        level=level, timestep=int(t))
                raise NonFiniteError(
                    f"eps_fn returned NaN/Inf at level {level} (train timestep {int(t)}); check the model "
                    "and its dtype (fp16 overflow?), or pass check_finite=False to skip this check",
                    level=level, timestep=int(t))
            return out

        return eps

    def _bar(self, iterable: Iterable[int], desc: str, total: int) -> Iterable[int]:
        return tqdm(iterable, desc=f"{self.name} {desc}", total=total, disable=not self.progress, leave=False)

    # -- public API (implemented by subclasses) --------------------------------------------
    def sample(self, x: torch.Tensor | Latent, *, from_level: int = 0,
               callback: Optional[Callback] = None) -> torch.Tensor:
        """Sample from a noisy tensor at ``from_level`` (or from a :class:`Latent`) to the clean level.

        Args:
            x: tensor of shape (B, ...) at level ``from_level``, or a latent returned by
                :meth:`invert` (then ``from_level`` is taken from it).
            from_level: the level of ``x`` (0 = noisiest); ignored for a latent.
            callback: called after every step with a dict (level, timestep, x, eps, direction).

        Returns:
            The clean tensor, in the input's dtype and on its device.
        """
        raise NotImplementedError

    def invert(self, x0: torch.Tensor, *, to_level: int = 0, callback: Optional[Callback] = None) -> Latent:
        """Invert a clean tensor up to ``to_level`` (0 = the noisiest level).

        Returns a :class:`Latent` from which :meth:`sample` reproduces ``x0``.
        """
        raise NotImplementedError
