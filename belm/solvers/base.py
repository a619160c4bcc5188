"""What every sampler shares: the latent, the two driver loops, network evaluation, input checks.

A sampler only says how to start a :class:`~belm.solvers.chain.Chain` (from noise, from a
clean input, from a latent) and how to turn a chain into a latent; :meth:`Sampler.sample`
and :meth:`Sampler.invert` are the only loops, and they drive the chain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import os
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from belm.errors import LatentMismatchError, NonFiniteError
from belm.schedule import Schedule
from belm.solvers.chain import Chain, Network
from belm.solvers.growth import check_inversion_growth

__all__ = ["Latent", "Sampler", "EpsFn", "Callback", "check_tensor", "GRAD_MODES"]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]

#: values of ``grad=`` accepted by :meth:`Sampler.sample` and :meth:`Sampler.invert`
GRAD_MODES = (None, "autograd", "reversible")

_FORMAT = "belm-latent/1"
_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}

# Tensors handed out by Latent.x, by id: sampling one of them alone loses the rest of the latent.
_LATENT_X: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class Latent:
    """The exact state of an inverted chain at one level.

    Attributes:
        states: tensors, noisiest first. 2-step methods hold (x_level, x_{level+1}); k-step
            methods k states; EDICT its (x, y) registers; DDIM the single x_level.
        level: the level of ``states[0]`` (0 for a full inversion).
        method: exact identity of the method that produced it, e.g. ``"BDIA(gamma=0.5)"``
            (parameters as ``repr`` of the float, which round-trips every bit).
        schedule: fingerprint of the schedule it belongs to.
        dtype: dtype of the original input; :attr:`x` and sampling outputs come back in it.
    """

    states: tuple[torch.Tensor, ...]
    level: int
    method: str
    schedule: str
    dtype: torch.dtype

    #: subclasses by ``kind``, for :meth:`load`
    _kinds: ClassVar[dict[str, type["Latent"]]] = {}
    kind: ClassVar[str] = "float"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Latent._kinds[cls.kind] = cls

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
        """The noisiest tensor, in the input's dtype.

        For methods that couple several states it does **not** regenerate the input alone:
        sample the latent itself (``sampler.sample(latent)``).
        """
        out = self._noisiest().to(self.dtype, copy=True)
        if len(self.states) > 1:
            _LATENT_X[id(out)] = out
        return out

    def _noisiest(self) -> torch.Tensor:
        return self.states[0]

    def replace(self, **changes: Any) -> "Latent":
        """A copy with some fields changed (e.g. ``states`` after a slerp of two latents)."""
        if "states" in changes:
            changes["states"] = tuple(changes["states"])
        return dataclasses.replace(self, **changes)

    # -- files -------------------------------------------------------------------------
    def _metadata(self) -> dict[str, str]:
        return {}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def save(self, path: str | os.PathLike) -> None:
        """Write the latent to ``path`` (safetensors; identity and dtype in its metadata).

        The file appears only when complete (written beside it, then renamed).
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"path {str(path)!r} is a folder; pass a file name such as latent.safetensors")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"path {str(path)!r}: folder {str(path.parent)!r} does not exist; create it first")
        tensors = {f"state_{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.states)}
        tensors.update({k: v.detach().cpu().contiguous() for k, v in self._tensors().items()})
        metadata = {"format": _FORMAT, "kind": self.kind, "method": self.method, "schedule": self.schedule,
                    "level": str(self.level), "dtype": str(self.dtype).replace("torch.", ""),
                    "num_states": str(len(self.states)), **self._metadata()}
        fd, tmp = tempfile.mkstemp(prefix=".belm-latent-", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> "Latent":
        """Read a latent written by :meth:`save` (no code is evaluated: safetensors + JSON-free strings)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latent file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{str(path)!r} is not a safetensors file written by Latent.save ({exc})") from None
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not a belm latent (metadata format {metadata.get('format')!r}, "
                             f"expected {_FORMAT!r})")
        kind = metadata.get("kind", "")
        if kind not in Latent._kinds:
            raise ValueError(f"{str(path)!r}: unknown latent kind {kind!r}; known: {sorted(Latent._kinds)}")
        try:
            count = int(metadata["num_states"])
            states = tuple(tensors.pop(f"state_{i}") for i in range(count))
            fields = dict(states=states, level=int(metadata["level"]), method=metadata["method"],
                          schedule=metadata["schedule"], dtype=_DTYPES[metadata["dtype"]])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{str(path)!r}: incomplete latent metadata ({exc!r})") from None
        return Latent._kinds[kind]._from_saved(fields, metadata, tensors)

    @classmethod
    def _from_saved(cls, fields: dict, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> "Latent":
        return cls(**fields)


Latent._kinds[Latent.kind] = Latent


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
    """Base class: holds the network, the schedule and the numeric settings; runs the loops.

    Args:
        eps_fn: ``eps_fn(x, t) -> f`` with x of shape (B, ...) and t = ``schedule.model_time(level)``
            (a 0-dim int64 train timestep for discrete schedules); f is ε, or the velocity
            dx/dσ on flow schedules. Must be deterministic for exactness.
        schedule: the :class:`~belm.schedule.Schedule` to sample on.
        exact: ``"float"`` (default: exact up to float rounding) or ``"bitwise"`` (2-step
            methods: an integer lattice makes round trips exact bit for bit).
        state_dtype: dtype of the state arithmetic (float64 by default); the network is
            called in the input's dtype (or ``model_dtype``).
        model_dtype: dtype in which eps_fn receives x; default: the input's dtype.
        progress: show a tqdm progress bar (``False`` to disable).
        check_finite: raise :class:`~belm.errors.NonFiniteError` as soon as the network
            returns NaN/Inf, naming the level and timestep. Costs one reduction per call.
    """

    #: number of states the method couples (k); a latent holds at most this many tensors
    num_states: int = 1

    def __init__(self, eps_fn: EpsFn, schedule: Schedule, *, exact: str = "float",
                 state_dtype: torch.dtype = torch.float64, model_dtype: Optional[torch.dtype] = None,
                 progress: bool = True, check_finite: bool = True) -> None:
        if not callable(eps_fn):
            raise TypeError(f"eps_fn must be callable as eps_fn(x, t); got {type(eps_fn).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError("schedule must be a belm.Schedule (build one with Schedule.from_betas or "
                            f"Schedule.from_diffusers); got {type(schedule).__name__}")
        for arg, value in (("state_dtype", state_dtype), ("model_dtype", model_dtype)):
            if value is not None and (not isinstance(value, torch.dtype) or not value.is_floating_point):
                raise TypeError(f"{arg} must be a floating torch.dtype such as torch.float64; got {value!r}")
        if exact not in ("float", "bitwise"):
            raise ValueError(f"exact must be 'float' (default) or 'bitwise'; got {exact!r}")
        if exact == "bitwise" and not self.supports_bitwise:
            raise ValueError(f"exact='bitwise' is defined for 2-step methods (OBELM, BDIA, BELM with k=2); "
                             f"{type(self).__name__} has no bitwise mode. Use exact='float' (the default)")
        self.eps_fn = eps_fn
        self.schedule = schedule
        self.exact = exact
        self.state_dtype = state_dtype
        self.model_dtype = model_dtype
        self.progress = progress
        self.check_finite = check_finite
        self._growth_checked = False
        self._model_times: dict[torch.device, list[torch.Tensor]] = {}

    supports_bitwise: bool = False

    # -- identity ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Method name with its exact parameters, e.g. ``"OBELM"`` or ``"BDIA(gamma=0.5)"``."""
        return type(self).__name__

    @property
    def identity(self) -> str:
        """What a latent records: the name, plus the mode when it is not plain float."""
        return self.name if self.exact == "float" else f"{self.name}[exact={self.exact}]"

    @property
    def invertible(self) -> bool:
        """Whether ``sample(invert(x))`` reproduces x (up to rounding, or bit for bit)."""
        return False

    def __repr__(self) -> str:
        return f"{self.identity} on {self.schedule!r}"

    def check_latent(self, latent: "Latent") -> None:
        """Raise :class:`LatentMismatchError` unless this sampler produced ``latent``."""
        if not isinstance(latent, Latent):
            raise TypeError(f"expected a belm Latent; got {type(latent).__name__}")
        if (latent.kind == "lattice") != (self.exact == "bitwise"):
            raise TypeError(f"exact={self.exact!r} samples only latents from exact={self.exact!r} inversion; this "
                            f"latent is of kind {latent.kind!r} ({latent.method}): invert with the same exact= setting")
        if latent.method != self.identity:
            raise LatentMismatchError(
                f"latent was produced by {latent.method}, but this sampler is {self.identity}; sample it with "
                "the same method and exactly the same parameters that inverted it")
        if latent.schedule != self.schedule.fingerprint:
            raise LatentMismatchError(
                f"latent was produced on a different schedule (fingerprint {latent.schedule}) than this sampler's "
                f"{self.schedule!r} (fingerprint {self.schedule.fingerprint}); sample it with the schedule used for "
                "inversion")
        if not 0 <= latent.level <= self.schedule.num_steps:
            raise ValueError(f"latent.level={latent.level} is outside [0, {self.schedule.num_steps}]")
        expected = min(self.num_states, self.schedule.num_steps - latent.level + 1)
        if len(latent.states) != expected:
            raise ValueError(f"latent holds {len(latent.states)} states; {self.identity} at level {latent.level} "
                             f"needs {expected}")

    def _level_arg(self, level: Any, name: str) -> int:
        N = self.schedule.num_steps
        try:
            value = operator.index(level)
        except TypeError:
            value = None
        if value is None or isinstance(level, bool) or not 0 <= value < N:
            raise ValueError(f"{name} must be an integer level in [0, {N - 1}] (N = {N} steps); got {level!r}")
        return int(value)

    # -- chains (what a method defines) --------------------------------------------------
    def chain_from_noise(self, x: torch.Tensor, level: int, network: Optional[Network] = None) -> Chain:
        """A chain holding ``x`` (owned copy) at ``level``, ready to :meth:`~Chain.advance`."""
        raise NotImplementedError

    def chain_from_clean(self, x0: torch.Tensor, network: Optional[Network] = None) -> Chain:
        """A chain holding ``x0`` at the clean level N, ready to :meth:`~Chain.retreat`."""
        raise NotImplementedError

    def chain_from_latent(self, latent: Latent, network: Optional[Network] = None) -> Chain:
        """A chain holding a (checked) latent's states; the latent itself is never modified."""
        raise NotImplementedError

    def to_latent(self, chain: Chain, dtype: torch.dtype) -> Latent:
        """The latent of a chain at its noisiest level (the chain's tensors, not copies)."""
        return Latent(chain.window(), chain.lo, self.identity, self.schedule.fingerprint, dtype)

    def _owned(self, x: torch.Tensor) -> torch.Tensor:
        """x in the state dtype, as a tensor nobody else holds (chains update in place)."""
        return x.to(self.state_dtype, copy=True)

    # -- the two loops -----------------------------------------------------------------
    def sample(self, x: torch.Tensor | Latent, *, from_level: int = 0, callback: Optional[Callback] = None,
               grad: Optional[str] = None) -> torch.Tensor:
        """Sample from a noisy tensor at ``from_level`` (or from a :class:`Latent`) to the clean level.

        Args:
            x: tensor of shape (B, ...) at level ``from_level``, or a latent returned by
                :meth:`invert` (then ``from_level`` is taken from it).
            from_level: the level of ``x`` (0 = noisiest); ignored for a latent.
            callback: called after every step with a dict (level, timestep, x, eps, direction);
                x is a copy, eps the network output the step evaluated (None if none).
            grad: None (default: no autograd graph is kept), ``"autograd"`` (plain autograd
                through every step) or ``"reversible"`` (exact gradients at O(k) memory).

        Returns:
            The clean tensor, in the input's dtype and on its device.
        """
        if grad == "reversible":
            return self._reversible_sample(x, from_level, callback)
        with self._grad_context(grad):
            chain, out_dtype, device = self._start_sampling(x, from_level)
            return self._run_sampling(chain, callback).to(device=device, dtype=out_dtype)

    def invert(self, x0: torch.Tensor, *, to_level: int = 0, callback: Optional[Callback] = None,
               grad: Optional[str] = None) -> Latent:
        """Invert a clean tensor up to ``to_level`` (0 = the noisiest level).

        Args:
            x0: clean tensor of shape (B, ...).
            to_level: the level to stop at (the "freeze step" of editing).
            callback, grad: as for :meth:`sample`.

        Returns:
            A :class:`Latent` from which :meth:`sample` reproduces ``x0``.
        """
        check_tensor(x0, "x0")
        to_level = self._level_arg(to_level, "to_level")
        if grad == "reversible":
            return self._reversible_invert(x0, to_level, callback)
        self._warn_about_growth()
        with self._grad_context(grad):
            chain = self._run_inversion(self.chain_from_clean(x0), to_level, callback)
            return self.to_latent(chain, x0.dtype)

    def _warn_about_growth(self) -> None:
        """Methods with a parasitic mode warn once when this grid makes inversion amplify it."""
        if not self._growth_checked:
            self._growth_checked = True
            check_inversion_growth(self, stacklevel=4)

    def _reversible_sample(self, x: torch.Tensor | Latent, from_level: int,
                           callback: Optional[Callback]) -> torch.Tensor:
        raise ValueError(f"grad='reversible' needs an exactly invertible method; {self.name} is not "
                         "(use grad='autograd', or an exact method such as OBELM)")

    def _reversible_invert(self, x0: torch.Tensor, to_level: int, callback: Optional[Callback]) -> Latent:
        return self._reversible_sample(x0, to_level, callback)  # type: ignore[return-value]

    def _start_sampling(self, x: torch.Tensor | Latent, from_level: int
                        ) -> tuple[Chain, torch.dtype, torch.device]:
        if isinstance(x, Latent):
            self.check_latent(x)
            return self.chain_from_latent(x), x.dtype, x.states[0].device
        check_tensor(x, "x")
        level = self._level_arg(from_level, "from_level")
        if self.num_states > 1 and _LATENT_X.get(id(x)) is x:
            warnings.warn(
                f"x is latent.x of a {self.num_states}-state latent: sampling it alone restarts the chain with a "
                "DDIM step and does not reproduce the inverted input; pass the latent itself, sample(latent)",
                UserWarning, stacklevel=3)
        return self.chain_from_noise(x, level), x.dtype, x.device

    def _run_sampling(self, chain: Chain, callback: Optional[Callback]) -> torch.Tensor:
        """Advance ``chain`` to the clean level (the one sampling loop); returns x at level N."""
        N = self.schedule.num_steps
        for _ in self._bar(range(chain.hi, N), "sample"):
            chain.advance()
            if callback is not None:
                self._report(callback, chain, "sample")
        out = chain.x(N)
        self._check_result(out, "sampling")
        return out

    def _run_inversion(self, chain: Chain, to_level: int, callback: Optional[Callback]) -> Chain:
        """Retreat ``chain`` to ``to_level`` (the one inversion loop); returns the chain."""
        for _ in self._bar(range(to_level, chain.lo), "invert"):
            chain.retreat()
            if callback is not None:
                self._report(callback, chain, "invert")
        self._check_result(chain.x(chain.lo), "inversion")
        return chain

    def _report(self, callback: Callback, chain: Chain, direction: str) -> None:
        event = chain.event(direction)
        event["timestep"] = self.schedule.timestep(event["level"])
        callback(event)

    @staticmethod
    def _grad_context(grad: Optional[str]) -> contextlib.AbstractContextManager:
        if grad not in GRAD_MODES:
            raise ValueError(f"grad must be one of {GRAD_MODES}; got {grad!r}. None (the default) keeps no "
                             "autograd graph; 'autograd' differentiates through every step")
        return torch.no_grad() if grad is None else contextlib.nullcontext()

    # -- the network -------------------------------------------------------------------
    def network(self, model_dtype: Optional[torch.dtype] = None) -> Network:
        """``f(x_state, level)``: calls eps_fn in the model dtype and validates its output.

        f is returned as the network gave it (model dtype): the chain adds it into the
        state with type promotion inside the kernel, which saves a full cast per step.
        """
        eps_fn, times = self.eps_fn, self._model_times

        def f(x: torch.Tensor, level: int) -> torch.Tensor:
            on_device = times.get(x.device)
            t = (on_device if on_device is not None else self._model_times_on(x.device))[level]
            x_model = x if model_dtype is None or model_dtype == x.dtype else x.to(model_dtype)
            out = eps_fn(x_model, t)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"eps_fn must return a torch.Tensor; got {type(out).__name__}")
            if out.shape != x_model.shape:
                raise ValueError(f"eps_fn returned shape {tuple(out.shape)} for input shape "
                                 f"{tuple(x_model.shape)} at level {level}; it must return eps of the same shape")
            if not out.is_floating_point():
                raise TypeError(f"eps_fn returned dtype {out.dtype}; it must return a floating-point tensor")
            if out.data_ptr() == x.data_ptr():
                out = out.clone()          # the chain may overwrite x's buffer while it still needs out
            # One reduction first: a sum is finite if every term is, and any NaN/Inf term makes
            # it non-finite; only then (or on overflow of a huge finite sum) the exact check.
            # math.isfinite on the Python float saves a tensor op per step.
            if self.check_finite and not math.isfinite(out.sum().item()) and not torch.isfinite(out).all():
                self._raise_non_finite(x, level)
            return out

        return f

    def _model_times_on(self, device: torch.device) -> list[torch.Tensor]:
        """The ``t`` handed to eps_fn at every level 0 … N on ``device`` (list index = level).

        Built once per sampler and device, all levels at once (a tensor per level costs
        ~40 µs, so never per step). All at once matters for memory too: small tensors
        created one per step, in between the large per-step buffers (network input and
        output), pin the allocator's heap, which then grows with N (8×4×64×64 on CPU:
        +60 MB peak at N = 200 over N = 10; see benchmarks/memory.py).
        """
        times = self._model_times.get(device)
        if times is None:
            levels = range(self.schedule.num_steps + 1)
            times = self._model_times[device] = [self.schedule.model_time(level).to(device) for level in levels]
        return times

    def _growth_hint(self) -> str:
        """Why this method's state may grow in one direction (for error messages); '' if it does not."""
        return ""

    def _check_result(self, x: torch.Tensor, direction: str) -> None:
        """A network bounded on huge inputs can let the state overflow without a NaN: never return it."""
        if self.check_finite and not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
            hint = self._growth_hint() or "the recursion amplified rounding in this direction"
            raise NonFiniteError(f"the state overflowed to NaN/Inf during {direction}: {hint}. Use fewer steps, "
                                 "or O-BELM")

    def _raise_non_finite(self, x: torch.Tensor, level: int) -> None:
        timestep = self.schedule.timestep(level)
        unit = "train timestep" if self.schedule.kind == "discrete" else "sigma"
        where = f"level {level} ({unit} {timestep})"
        size = float(x.detach().abs().max()) if torch.isfinite(x).all() else math.inf
        hint = self._growth_hint()
        if not math.isfinite(size) or (hint and size > 1e6):
            raise NonFiniteError(
                f"the state grew to {size:.3g} before {where} and the network returned NaN/Inf: "
                f"{hint or 'the recursion amplifies rounding in this direction'}. "
                "Use fewer steps, or O-BELM", level=level, timestep=timestep)
        raise NonFiniteError(
            f"eps_fn returned NaN/Inf at {where} with a finite state (max |x| = {size:.3g}); check the model "
            "and its dtype (fp16 overflow?), or pass check_finite=False to skip this check",
            level=level, timestep=timestep)

    def _bar(self, iterable: Iterable[int], desc: str) -> Iterator[int]:
        if not self.progress:
            return iter(iterable)   # a disabled tqdm still wraps every step in its generator
        items = list(iterable)
        return iter(tqdm(items, desc=f"{self.name} {desc}", total=len(items), leave=False))
