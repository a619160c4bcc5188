"""What every sampler shares: the latent, the two driver loops, network evaluation, input checks.

A sampler only says how to start a :class:`~belm.solvers.chain.Chain` (from noise, from a
clean input, from a latent) and how to turn a chain into a latent; :meth:`Sampler.sample`
and :meth:`Sampler.invert` are the only loops, and they drive the chain.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import math
import operator
import os
import re
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, NoReturn, Optional

import torch
from tqdm.auto import tqdm

from belm._files import write_atomically
from belm.errors import LatentFileError, LatentMismatchError, NonFiniteError
from belm.schedule import Schedule
from belm.solvers.chain import Chain, Network
from belm.solvers.growth import check_inversion_growth

__all__ = ["Latent", "Sampler", "EpsFn", "Callback", "check_tensor", "GRAD_MODES"]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]

#: values of ``grad=`` accepted by :meth:`Sampler.sample` and :meth:`Sampler.invert`
GRAD_MODES = (None, "autograd", "reversible")

_FORMAT = "belm-latent/1"
DIGEST_KEY = "sha256"       # metadata entry: "field=hex;..." over every other field (see Latent.load)
_INFO_PREFIX = "info."       # metadata entries of Latent.info
_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}

# Tensors handed out by Latent.x, by id: sampling one of them alone loses the rest of the latent.
_LATENT_X: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()
# The same tensors by value (digest -> method), the last _LATENT_X_KEPT of them: a diffusers
# pipeline copies latents=latent.x (latents * init_noise_sigma), so only the values survive.
_LATENT_X_DIGESTS: "collections.OrderedDict[bytes, str]" = collections.OrderedDict()
_LATENT_X_KEPT = 32


def _digest(x: torch.Tensor) -> bytes:
    """Digest of a tensor's shape, dtype and bytes (equal digests: equal tensors)."""
    return hashlib.blake2b(_tensor_bytes(x), digest_size=16).digest()


def latent_x_method(x: torch.Tensor) -> Optional[str]:
    """The method of a multi-state latent whose ``Latent.x`` equals ``x`` (same values, shape and
    dtype) among the last few handed out, else None: sampling such an x alone loses the pair."""
    return _LATENT_X_DIGESTS.get(_digest(x)) if _LATENT_X_DIGESTS else None


@dataclass(frozen=True)
class Latent:
    """The exact state of an inverted chain at one level.

    Attributes:
        states: tensors, noisiest first, all of one shape (B, ...) with B >= 1. 2-step
            methods hold (x_level, x_{level+1}); k-step methods k states; EDICT its (x, y)
            registers; DDIM the single x_level.
        level: the level of ``states[0]`` (0 for a full inversion).
        method: exact identity of the method that produced it, e.g. ``"BDIA(gamma=0.5)"``
            (parameters as ``repr`` of the float, which round-trips every bit).
        schedule: fingerprint of the schedule it belongs to.
        dtype: dtype of the original input; :attr:`x` and sampling outputs come back in it.
        info: free-form notes saved with the file, str -> str (the CLI records the guidance
            and condition of the inversion here); not part of the latent's identity.
    """

    states: tuple[torch.Tensor, ...]
    level: int
    method: str
    schedule: str
    dtype: torch.dtype
    info: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

    #: subclasses by ``kind``, for :meth:`load`
    _kinds: ClassVar[dict[str, type["Latent"]]] = {}
    kind: ClassVar[str] = "float"
    #: dtypes a state of this kind may have
    state_dtypes: ClassVar[tuple[torch.dtype, ...]] = tuple(_DTYPES.values())

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Latent._kinds[cls.kind] = cls

    def __post_init__(self) -> None:
        if isinstance(self.states, list):
            object.__setattr__(self, "states", tuple(self.states))
        if not isinstance(self.states, tuple) or not self.states \
                or not all(isinstance(s, torch.Tensor) for s in self.states):
            raise TypeError("Latent.states must be a non-empty tuple of tensors")
        first = self.states[0]
        if first.ndim < 1 or first.shape[0] < 1:
            raise ValueError(f"Latent.states[0] has shape {tuple(first.shape)}; a latent holds a batch (B, ...) "
                             "with B >= 1")
        if first.dtype not in self.state_dtypes:
            raise TypeError(f"Latent.states[0] has dtype {first.dtype}; a {self.kind!r} latent holds "
                            f"{', '.join(str(d) for d in self.state_dtypes)} states")
        for i, s in enumerate(self.states[1:], start=1):
            if s.shape != first.shape or s.dtype != first.dtype or s.device != first.device:
                raise ValueError(
                    f"Latent.states[{i}] has shape {tuple(s.shape)}, dtype {s.dtype}, device {s.device}; "
                    f"states[0] has {tuple(first.shape)}, {first.dtype}, {first.device}: all states of a "
                    "latent must match (edit both tensors of a pair the same way)")
        try:
            level = operator.index(self.level)
        except TypeError:
            level = -1
        if isinstance(self.level, bool) or level < 0:
            raise ValueError(f"Latent.level must be an integer >= 0; got {self.level!r}")
        object.__setattr__(self, "level", int(level))
        if self.dtype not in _DTYPES.values():
            raise TypeError(f"Latent.dtype must be one of {sorted(_DTYPES)}; got {self.dtype!r}")
        if not isinstance(self.info, Mapping) or not all(isinstance(k, str) and k and isinstance(v, str)
                                                         for k, v in self.info.items()):
            raise TypeError("Latent.info must map non-empty str keys to str values")
        object.__setattr__(self, "info", dict(self.info))   # a copy: the latent stays frozen

    @property
    def x(self) -> torch.Tensor:
        """The noisiest tensor, in the input's dtype.

        For methods that couple several states it does **not** regenerate the input alone:
        sample the latent itself (``sampler.sample(latent)``).
        """
        out = self._noisiest().to(self.dtype, copy=True)
        if len(self.states) > 1:
            _LATENT_X[id(out)] = out
            _LATENT_X_DIGESTS[_digest(out)] = self.method
            while len(_LATENT_X_DIGESTS) > _LATENT_X_KEPT:
                _LATENT_X_DIGESTS.popitem(last=False)
        return out

    def _noisiest(self) -> torch.Tensor:
        return self.states[0]

    def replace(self, **changes: Any) -> "Latent":
        """A copy with some fields changed (e.g. ``states`` after a slerp of two latents)."""
        if "states" in changes:
            changes["states"] = tuple(changes["states"])
        return dataclasses.replace(self, **changes)

    def batch_slice(self, index: slice) -> "Latent":
        """The latent of some of its images, ``index`` along the batch dimension (every
        batch tensor of the latent alike, e.g. a lattice latent's residual too)."""
        return self._map_tensors(lambda t: t[index])

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Latent":
        """A copy with ``fn`` applied to the states and to every other tensor field."""
        tensors = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, states=tuple(fn(s) for s in self.states), **tensors)

    def check_finite(self) -> None:
        """Raise :class:`~belm.errors.NonFiniteError` naming the first state holding NaN/Inf
        (a latent is a starting point: nothing downstream can tell its NaN from a blow-up)."""
        for i, s in enumerate(self.states):
            if s.is_floating_point() and not torch.isfinite(s).all():
                raise NonFiniteError(f"latent.states[{i}] contains NaN or Inf; a latent from invert() is finite: "
                                     "it was changed afterwards (e.g. an edit that divided by zero)")

    # -- files -------------------------------------------------------------------------
    def _metadata(self) -> dict[str, str]:
        return {}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def file_parts(self, extra: Optional[Mapping[str, str]] = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The named tensors (CPU, contiguous) and the string metadata that :meth:`save` writes and
        :meth:`load` reads back, with the sha256 record of every field. ``extra``: metadata of a
        writer's own (dataset shards), covered by that record too, so that load accepts it."""
        tensors = {f"state_{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.states)}
        tensors.update({k: v.detach().cpu().contiguous() for k, v in self._tensors().items()})
        metadata = {"format": _FORMAT, "kind": self.kind, "method": self.method, "schedule": self.schedule,
                    "level": str(self.level), "dtype": str(self.dtype).replace("torch.", ""),
                    "num_states": str(len(self.states)), **self._metadata(),
                    **{_INFO_PREFIX + k: v for k, v in self.info.items()}, **(extra or {})}
        metadata[DIGEST_KEY] = _format_digests(_field_digests(metadata, tensors))
        return tensors, metadata

    def save(self, path: str | os.PathLike) -> None:
        """Write the latent to ``path`` (safetensors; identity, dtype and :attr:`info` in its
        metadata, with a sha256 digest of every field that :meth:`load` checks).

        The file appears only when complete (written beside it, then renamed).
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"path {str(path)!r} is a folder; pass a file name such as latent.safetensors")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"path {str(path)!r}: folder {str(path.parent)!r} does not exist; create it first")
        tensors, metadata = self.file_parts()
        # Mode 0o666 less the umask, as a plain open() gives (mkstemp and save_file give 0600).
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), prefix=".belm-latent-")

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> "Latent":
        """Read a latent written by :meth:`save` (no code is evaluated: safetensors + plain strings).

        Every field is checked before use: the states' count, shape (B, ...) with B >= 1,
        dtype and finiteness; level, dtype, method (consistent with the kind) and schedule
        fingerprint; a lattice latent's formats, scale and residual (see
        :class:`~belm.solvers.bitwise.LatticeLatent`). Files written since the digest was
        introduced also carry a sha256 per field, which protects what no check can derive
        (e.g. a lattice's ``x_bits``): a field changed after writing is refused by name.
        Files without it load, checked field by field. What depends on the sampler (method,
        schedule, level range, number of states, the lattice's scale) is checked when sampling.

        Raises:
            FileNotFoundError: no such file.
            LatentFileError: anything else wrong with the file (one line naming the field).
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latent file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise LatentFileError(f"{str(path)!r} is not a safetensors file written by Latent.save ({exc})") from None
        file = _LatentFile(path, metadata, tensors)
        if metadata.get("format") != _FORMAT:
            raise LatentFileError(f"{str(path)!r} is not a belm latent (metadata format {metadata.get('format')!r}, "
                                  f"expected {_FORMAT!r})")
        kind = file.text("kind")
        if kind not in Latent._kinds:
            file.bad("kind", f"unknown latent kind {kind!r}; known: {sorted(Latent._kinds)}")
        latent_cls = Latent._kinds[kind]
        # First: a field changed after writing is named as such, whatever else it breaks.
        file.check_digests()
        count = file.integer("num_states", 1, _MAX_STATES)
        names = [f"state_{i}" for i in range(count)]
        expected = set(names) | set(latent_cls._extra_tensors)
        for name in sorted(tensors):
            if name not in expected:
                file.bad(name, f"unexpected tensor (num_states = {count}; a {kind!r} latent holds "
                               f"{', '.join(sorted(expected))})")
        states = tuple(file.tensor(name) for name in names)
        first = states[0]
        if first.ndim < 1 or first.shape[0] < 1:
            file.bad("state_0", f"shape {tuple(first.shape)}; a latent holds a batch (B, ...) with B >= 1")
        for name, s in zip(names, states):
            if s.dtype not in latent_cls.state_dtypes:
                file.bad(name, f"dtype {s.dtype}; a {kind!r} latent holds "
                               f"{', '.join(str(d) for d in latent_cls.state_dtypes)} states")
            if s.shape != first.shape or s.dtype != first.dtype:
                file.bad(name, f"shape {tuple(s.shape)}, dtype {s.dtype}; state_0 has {tuple(first.shape)}, "
                               f"{first.dtype}: all states must match")
            if s.is_floating_point() and not torch.isfinite(s).all():
                file.bad(name, "contains NaN or Inf; a latent written by belm is finite")
        dtype_name = file.text("dtype")
        if dtype_name not in _DTYPES:
            file.bad("dtype", f"{dtype_name!r} is not one of {sorted(_DTYPES)}")
        method = file.text("method")
        if not _METHOD.fullmatch(method):
            file.bad("method", f"{method!r} is not a method identity such as 'OBELM' or 'BDIA(gamma=0.5)'")
        suffix = latent_cls._method_suffix
        if (suffix and not method.endswith(suffix)) or (not suffix and "[exact=" in method):
            file.bad("method", f"{method!r} does not match the latent's kind {kind!r}")
        schedule = file.text("schedule")
        if not _FINGERPRINT.fullmatch(schedule):
            file.bad("schedule", f"{schedule!r} is not a schedule fingerprint (12 hex digits)")
        info = {k[len(_INFO_PREFIX):]: v for k, v in metadata.items() if k.startswith(_INFO_PREFIX)}
        fields = dict(states=states, level=file.integer("level", 0, _MAX_LEVEL), method=method,
                      schedule=schedule, dtype=_DTYPES[dtype_name], info=info)
        latent = latent_cls._from_saved(fields, file)
        if torch.device(device) == first.device:
            return latent
        # A device without float64 (MPS) gets float32, the state dtype its samplers use there.
        narrow = not device_supports_float64(device)
        return latent._map_tensors(lambda t: t.to(device=device, dtype=torch.float32 if narrow and
                                                  t.dtype == torch.float64 else t.dtype))

    #: tensors a file of this kind may hold besides state_i
    _extra_tensors: ClassVar[tuple[str, ...]] = ()
    #: what the method identity of this kind ends with ('' for plain float latents)
    _method_suffix: ClassVar[str] = ""

    @classmethod
    def _from_saved(cls, fields: dict, file: "_LatentFile") -> "Latent":
        """The latent of a file whose common fields are checked (``fields``); subclasses
        read and check their own fields from ``file``."""
        return cls(**fields)


Latent._kinds[Latent.kind] = Latent

# A bound for the integer fields of a file, far beyond any real grid: a file claiming more is corrupt.
_MAX_STATES = 64
_MAX_LEVEL = 10**7
_METHOD = re.compile(r"[A-Za-z_][^\x00-\x1f\x7f]{0,499}")   # a printable name, e.g. BELM[belm(k=3,order=2)]
_FINGERPRINT = re.compile(r"[0-9a-f]{12}")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """The exact bytes of a tensor with its dtype and shape (so a reshape changes the digest)."""
    header = f"{str(t.dtype)}{tuple(t.shape)}".encode()
    return header + t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _field_digests(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """sha256 of every metadata entry (but the digest record) and every tensor, by field name."""
    out = {}
    for key, value in metadata.items():
        if key != DIGEST_KEY:
            out[key] = hashlib.sha256(b"metadata\0" + key.encode() + b"\0" + value.encode()).hexdigest()
    for key, t in tensors.items():
        out[key] = hashlib.sha256(b"tensor\0" + key.encode() + b"\0" + _tensor_bytes(t)).hexdigest()
    return out


def _format_digests(digests: Mapping[str, str]) -> str:
    return ";".join(f"{k}={v}" for k, v in sorted(digests.items()))


class _LatentFile:
    """The raw fields of a latent file; every accessor checks one field and names it when bad."""

    def __init__(self, path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        self.path, self.metadata, self.tensors = path, metadata, tensors

    def bad(self, field: str, message: str) -> "NoReturn":
        raise LatentFileError(f"latent file {str(self.path)!r}: field {field!r}: {message}. The file is not as "
                              "Latent.save wrote it; invert the input again")

    def text(self, key: str) -> str:
        if key not in self.metadata:
            self.bad(key, "missing from the metadata")
        return self.metadata[key]

    def integer(self, key: str, lo: int, hi: int) -> int:
        raw = self.text(key)
        if not re.fullmatch(r"-?[0-9]{1,12}", raw) or not lo <= int(raw) <= hi:
            self.bad(key, f"{raw!r} is not an integer in [{lo}, {hi}]")
        return int(raw)

    def tensor(self, name: str, required: bool = True) -> Optional[torch.Tensor]:
        if name not in self.tensors:
            if required:
                self.bad(name, "tensor missing")
            return None
        return self.tensors[name]

    def check_digests(self) -> None:
        """Compare each field with the sha256 recorded when it was written (if the file has them)."""
        record = self.metadata.get(DIGEST_KEY)
        if record is None:
            return      # written before digests: checked field by field only
        recorded: dict[str, str] = {}
        for entry in record.split(";"):
            name, sep, value = entry.partition("=")
            if not sep or not re.fullmatch(r"[0-9a-f]{64}", value):
                self.bad(DIGEST_KEY, f"malformed entry {entry[:40]!r}")
            recorded[name] = value
        actual = _field_digests(self.metadata, self.tensors)
        for name in sorted(set(recorded) | set(actual)):
            if name not in actual:
                self.bad(name, "missing, but the file's sha256 record lists it")
            if name not in recorded:
                self.bad(name, "added after the file was written (not in its sha256 record)")
            if recorded[name] != actual[name]:
                self.bad(name, "changed after the file was written (its sha256 does not match)")


def device_supports_float64(device: torch.device | str) -> bool:
    """Whether tensors on ``device`` can be float64 (Apple's MPS backend has none)."""
    return torch.device(device).type != "mps"


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
        state_dtype: dtype of the state arithmetic; default (None): float64 where the input's
            device has it, else float32 (Apple MPS; a warning says so once per sampler, and
            ``exact="bitwise"`` keeps its int64 lattice there, still bit for bit); the network is
            called in the input's dtype (or ``model_dtype``).
        model_dtype: dtype in which eps_fn receives x; default: the input's dtype.
        progress: show a tqdm progress bar (``False`` to disable).
        check_finite: raise :class:`~belm.errors.NonFiniteError` as soon as the network
            returns NaN/Inf, naming the level and timestep. Costs one reduction per call.
    """

    #: number of states the method couples (k); a latent holds at most this many tensors
    num_states: int = 1

    def __init__(self, eps_fn: EpsFn, schedule: Schedule, *, exact: str = "float",
                 state_dtype: Optional[torch.dtype] = None, model_dtype: Optional[torch.dtype] = None,
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
        self._growth_checked: set[str] = set()     # the GrowthWarnings given: once each
        self._float32_noted = False                # the float32 fallback said (state_dtype_for)
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
        latent.check_finite()
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
        return x.to(self.state_dtype_for(x.device), copy=True)

    def state_dtype_for(self, device: torch.device) -> torch.dtype:
        """The state dtype on ``device``: ``state_dtype`` if given, else float64 where the
        device supports it and float32 where it does not (said once per sampler).

        Raises:
            TypeError: ``state_dtype=torch.float64`` on a device without float64.
        """
        if self.state_dtype is not None:
            if self.state_dtype == torch.float64 and not device_supports_float64(device):
                raise TypeError(f"state_dtype=torch.float64: device {device} has no float64; pass "
                                "state_dtype=torch.float32 (or leave it out: belm then chooses float32 there), or "
                                "exact='bitwise' for bit-exact round trips")
            return self.state_dtype
        if device_supports_float64(device):
            return torch.float64
        if not self._float32_noted:
            self._float32_noted = True
            warnings.warn(f"device {device} has no float64: {self.name} keeps its state in state_dtype=float32 "
                          "(round trips exact to float32 rounding, ~1e-6, not ~1e-14); pass state_dtype= to choose, or "
                          "exact='bitwise' (int64 lattice) for bit-exact round trips", UserWarning, stacklevel=5)
        return torch.float32

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

    def _warn_about_growth(self, why: str = "invert", stacklevel: int = 4) -> None:
        """Methods with a parasitic mode warn once when this grid makes inversion amplify it.

        ``why``: "invert" (an inversion), or "reversible" (sampling with grad="reversible",
        whose backward pass recovers the states by inverting the chain); ``stacklevel``: that
        of the user's call, counted from here.
        """
        if why not in self._growth_checked:
            self._growth_checked.add(why)
            check_inversion_growth(self, stacklevel=stacklevel, reversible=why == "reversible")

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
