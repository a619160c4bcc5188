"""ε functions from diffusers pixel/latent UNets: prediction-type conversion and CFG.

An adapter turns a network into ``eps_fn(x, t) -> ε`` (see DESIGN.md): it converts
the network's prediction type to ε, batches classifier-free guidance into one
forward pass, broadcasts the conditioning, and runs the network in its own
dtype/device while the caller's state stays in its own (usually float64).
There is no sampler logic here.

diffusers is not imported by this module: models and schedulers are duck-typed
(a scheduler *config* without ``alphas_cumprod`` is turned into one through
diffusers' ``DDPMScheduler.from_config``, imported lazily).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch

from belm.errors import NonFiniteError

__all__ = ["PREDICTION_TYPES", "to_epsilon", "DiffusersEps"]

#: Prediction types understood by :func:`to_epsilon` (diffusers' names).
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")

TensorOrNumber = torch.Tensor | float | int


def to_epsilon(model_output: torch.Tensor, x: torch.Tensor, alpha: TensorOrNumber, sigma: TensorOrNumber,
               prediction_type: str) -> torch.Tensor:
    """Convert a network prediction at ``x = alpha·x0 + sigma·ε`` to ε.

    Args:
        model_output: the network's output, shape (B, C, ...) like ``x``.
        x: the noisy input, shape (B, C, ...).
        alpha, sigma: sqrt(ā_t) and sqrt(1 − ā_t) of the input's train timestep; floats or
            tensors broadcastable against ``x`` (e.g. shape (B, 1, 1, 1)).
        prediction_type: "epsilon" (returned as is), "v_prediction" (ε = alpha·v + sigma·x)
            or "sample" (x0-prediction: ε = (x − alpha·x̂0) / sigma; needs sigma > 0).

    Returns:
        ε with the shape of ``x``; computed in the promoted dtype of the inputs.

    Raises:
        ValueError: unknown ``prediction_type``; ``sigma`` = 0 for "sample"; shape mismatch.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
    if model_output.shape != x.shape:
        raise ValueError(f"model_output has shape {tuple(model_output.shape)} but x has shape "
                         f"{tuple(x.shape)}; they must match")
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * x
    # "sample"
    if (torch.as_tensor(sigma) == 0).any():
        raise ValueError("prediction_type='sample' cannot be converted to epsilon at sigma = 0 (the clean "
                         "level); evaluate the network at a train timestep with alphas_cumprod < 1")
    return (x - alpha * model_output) / sigma


def check_guidance_scale(guidance_scale: Any) -> float:
    """A classifier-free guidance scale w as a float: finite and >= 0 (1 = no guidance)."""
    try:
        w = float(guidance_scale)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"guidance_scale must be a number; got {guidance_scale!r}") from exc
    if not w >= 0 or w == float("inf"):
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance); got {guidance_scale!r}")
    return w


def _config_get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _alphas_cumprod_of(scheduler: Any) -> torch.Tensor:
    """ā_t (float64, CPU) from a diffusers scheduler, its config, or a plain mapping."""
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        config = getattr(scheduler, "config", scheduler)
        if not isinstance(config, Mapping):
            raise TypeError("scheduler must be a diffusers scheduler (with `alphas_cumprod`) or its config "
                            f"(a mapping with beta_schedule, beta_start, ...); got {type(scheduler).__name__}")
        from diffusers import DDPMScheduler  # lazy: only configs need diffusers here

        ac = DDPMScheduler.from_config(dict(config)).alphas_cumprod
    ac = torch.as_tensor(ac).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if ac.numel() < 2 or not torch.isfinite(ac).all() or (ac <= 0).any() or (ac > 1).any():
        raise ValueError("scheduler.alphas_cumprod must be a finite 1-D sequence in (0, 1] of length >= 2")
    return ac


def _model_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    dtype, device = getattr(model, "dtype", None), getattr(model, "device", None)
    if isinstance(dtype, torch.dtype) and isinstance(device, torch.device):
        return dtype, device
    for p in model.parameters():
        return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def _version_of(value: torch.Tensor | None) -> int | None:
    """The in-place write counter of a tensor (None for None; -1 for inference-mode tensors,
    which have none and cannot be written outside inference mode)."""
    if value is None:
        return None
    try:
        return value._version
    except RuntimeError:
        return -1


class DiffusersEps:
    """``eps_fn(x, t)`` from a diffusers UNet (``UNet2DModel`` or ``UNet2DConditionModel``).

    Example::

        eps = DiffusersEps(unet, scheduler)                                   # unconditional
        eps = DiffusersEps(unet, scheduler, class_labels=y, guidance_scale=3.0,
                           null_class_labels=y0)                              # class CFG
        eps = DiffusersEps(cond_unet, scheduler, encoder_hidden_states=c,
                           uncond_encoder_hidden_states=u, guidance_scale=7.5)  # text CFG
        e = eps(x, t)      # x: (B, C, H, W), t: int or 0-dim tensor -> ε: like x

    Args:
        model: the network; called as ``model(x, t, [class_labels=...],
            [encoder_hidden_states=...]).sample`` (or returning a tensor / tuple).
            It is put in eval mode. If it outputs 2·C channels (learned variance), the
            first C are used.
        scheduler: a diffusers scheduler, or its config, giving ``alphas_cumprod`` and
            ``prediction_type``.
        class_labels: int, shape () / (1,) (broadcast to B) or (B,) long tensor.
        null_class_labels: the unconditional labels for guidance (same broadcasting).
        encoder_hidden_states: (L, D), (1, L, D) (broadcast to B) or (B, L, D).
        uncond_encoder_hidden_states: the unconditional embeddings for guidance.
        guidance_scale: w >= 0; ε = ε_u + w·(ε_c − ε_u). With w = 1 the unconditional
            inputs are ignored and one forward of batch B is made; otherwise the
            unconditional and conditional halves run in ONE forward of batch 2B
            (order: unconditional first).
        prediction_type: override the scheduler's ``config.prediction_type``.
        check_finite: raise :class:`belm.errors.NonFiniteError` naming the timestep
            when ε has NaN/Inf (e.g. an fp16 overflow). Off by default: belm's samplers
            already check every ε and name the level too; turn it on for standalone calls.
        differentiable: run the model under the caller's grad mode instead of
            ``torch.no_grad()``, so that ``sample(..., grad="reversible" | "autograd")``
            differentiates through it (w.r.t. x, the model's weights and captured
            conditioning). Off by default: no graph is built for plain sampling.

    Determinism: exact inversion needs ``eps_fn`` to return identical bits for identical
    input bits. The model runs in eval mode (no dropout) under ``torch.no_grad()``, and
    the conversion to the model's dtype is a pure function of the input bits, so on CPU
    repeated calls agree bit for bit. On GPU also call
    ``torch.use_deterministic_algorithms(True)`` (and set
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8``), and keep ``torch.backends.cudnn.benchmark = False``;
    attention kernels chosen by input size are deterministic for fixed shapes. Keep the
    batch size the same in both directions (results can depend on the batch size).

    dtype/device: ``x`` (any dtype, e.g. float64) is cast to the model's dtype and
    device for the forward; the conversion to ε is done in ``x``'s dtype with the
    original ``x``, and ε is returned in ``x``'s dtype and on ``x``'s device.

    Per-call work is cached (the network's dtype/device, the timestep tensors, the
    conditioning as the network takes it). The conditioning attributes and
    ``guidance_scale`` may be reassigned, and the tensors edited in place, between calls:
    both are seen by the next call.
    """

    def __init__(self, model: torch.nn.Module, scheduler: Any, *,
                 class_labels: torch.Tensor | int | None = None,
                 encoder_hidden_states: torch.Tensor | None = None,
                 guidance_scale: float = 1.0,
                 null_class_labels: torch.Tensor | int | None = None,
                 uncond_encoder_hidden_states: torch.Tensor | None = None,
                 prediction_type: str | None = None,
                 check_finite: bool = False, differentiable: bool = False) -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable torch module; got {type(model).__name__}")
        self.model = model
        if isinstance(model, torch.nn.Module):
            model.eval()
        self.alphas_cumprod = _alphas_cumprod_of(scheduler)
        config = getattr(scheduler, "config", scheduler)
        if prediction_type is None:
            prediction_type = _config_get(config, "prediction_type", "epsilon") or "epsilon"
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
        self.prediction_type: str = prediction_type

        self.guidance_scale = w = check_guidance_scale(guidance_scale)

        self.class_labels = self._check_labels(class_labels, "class_labels")
        self.null_class_labels = self._check_labels(null_class_labels, "null_class_labels")
        self.encoder_hidden_states = self._check_states(encoder_hidden_states, "encoder_hidden_states")
        self.uncond_encoder_hidden_states = self._check_states(uncond_encoder_hidden_states,
                                                               "uncond_encoder_hidden_states")
        if self.guided:
            if self.class_labels is None and self.encoder_hidden_states is None:
                raise ValueError(f"guidance_scale={w} needs conditioning: pass class_labels or "
                                 "encoder_hidden_states (or use guidance_scale=1)")
            if self.class_labels is not None and self.null_class_labels is None:
                raise ValueError(f"guidance_scale={w} with class_labels needs null_class_labels (the "
                                 "unconditional label, e.g. the model's null class id)")
            if self.encoder_hidden_states is not None and self.uncond_encoder_hidden_states is None:
                raise ValueError(f"guidance_scale={w} with encoder_hidden_states needs "
                                 "uncond_encoder_hidden_states (e.g. the embedding of the empty prompt)")
            if self.encoder_hidden_states is not None and \
                    self.encoder_hidden_states.shape[-2:] != self.uncond_encoder_hidden_states.shape[-2:]:
                raise ValueError(
                    "uncond_encoder_hidden_states must have the same (L, D) as encoder_hidden_states; got "
                    f"{tuple(self.uncond_encoder_hidden_states.shape)} vs {tuple(self.encoder_hidden_states.shape)}")
        self.check_finite = check_finite
        # The model's dtype/device, cached: diffusers' ``.dtype``/``.device`` walk the module
        # tree (0.7–2 ms per call on SD UNets). One parameter is kept as a probe: ``module.to``
        # changes its dtype/device in place, so comparing them (O(1)) detects a move.
        self._probe: torch.Tensor | None = None
        self._probe_key: tuple[torch.dtype, torch.device] | None = None
        self._dtype_device_cache: tuple[torch.dtype, torch.device] | None = None
        # Per-call constants, built once: the timestep tensors handed to the network, keyed by
        # (train timestep, batch, device, guided) (a sampling run revisits the same few) and
        # by the time tensor itself (belm's samplers pass the same objects every run), and
        # sqrt(ā), sqrt(1 − ā), needed only to convert v / x0 predictions.
        self._t_cache: dict[tuple[int, int, torch.device, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self._t_by_object: dict[tuple[int, int, torch.device, bool], tuple[torch.Tensor, int, tuple]] = {}
        self._alpha = self.alphas_cumprod.sqrt()
        self._sigma = (1.0 - self.alphas_cumprod).sqrt()
        self.differentiable = bool(differentiable)
        in_channels = getattr(getattr(model, "config", None), "in_channels", None)
        self._in_channels: int | None = in_channels if isinstance(in_channels, int) else None
        # The conditioning as the network takes it, keyed by (batch, dtype, device, guided):
        # the broadcast, cast and guidance concatenation are the same on every call of a run.
        self._cond_cache: dict[tuple[int, torch.dtype, torch.device, bool], tuple[tuple, tuple, tuple]] = {}

    # -- validation helpers -------------------------------------------------------------
    @staticmethod
    def _check_labels(labels: torch.Tensor | int | None, name: str) -> torch.Tensor | None:
        if labels is None:
            return None
        if isinstance(labels, bool):
            raise TypeError(f"{name} must be an int or an integer tensor; got a bool")
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.ndim > 1:
            raise ValueError(f"{name} must be an int or a 1-D integer tensor of shape (B,) or (1,); got "
                             f"dtype {labels.dtype}, shape {tuple(labels.shape)}")
        return labels.reshape(-1).long()

    @staticmethod
    def _check_states(states: torch.Tensor | None, name: str) -> torch.Tensor | None:
        if states is None:
            return None
        if not isinstance(states, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of shape (B, L, D) or (1, L, D); got {type(states).__name__}")
        if states.ndim == 2:
            states = states.unsqueeze(0)
        if states.ndim != 3:
            raise ValueError(f"{name} must have shape (B, L, D), (1, L, D) or (L, D); got {tuple(states.shape)}")
        return states

    @staticmethod
    def _broadcast(value: torch.Tensor, batch: int, name: str) -> torch.Tensor:
        if value.shape[0] == batch:
            return value
        if value.shape[0] == 1:
            return value.expand(batch, *value.shape[1:])
        raise ValueError(f"{name} has batch size {value.shape[0]} but x has batch size {batch}; "
                         "pass batch 1 (broadcast) or the same batch size")

    @property
    def guided(self) -> bool:
        """True when classifier-free guidance is active (guidance_scale != 1)."""
        return self.guidance_scale != 1.0

    # -- the eps function ---------------------------------------------------------------
    def _model_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """The network's (dtype, device), recomputed only when the probe parameter has moved."""
        probe = self._probe
        if probe is not None and (probe.dtype, probe.device) == self._probe_key:
            return self._dtype_device_cache  # type: ignore[return-value]
        found = _model_dtype_device(self.model)
        params = getattr(self.model, "parameters", None)
        probe = next(iter(params()), None) if callable(params) else None
        self._probe = probe
        self._probe_key = None if probe is None else (probe.dtype, probe.device)
        self._dtype_device_cache = found
        return found

    def _conditioning(self, batch: int, dtype: torch.dtype, device: torch.device, guided: bool
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(class_labels, encoder_hidden_states) as the forward takes them: broadcast to
        ``batch``, on the network's device, embeddings in its dtype, and with guidance the
        unconditional half first (batch 2B); None where not given. Cached per (batch, dtype,
        device) unless gradients may flow into the embeddings (``differentiable``: a cached
        cast would detach them from later edits)."""
        sources = (self.class_labels, self.encoder_hidden_states, self.null_class_labels,
                   self.uncond_encoder_hidden_states)
        # Valid while the same tensors, unmodified in place, are attached (._version counts
        # in-place writes); the entry keeps the sources alive so `is` cannot see a recycled id.
        stamp = tuple(map(_version_of, sources))
        key = (batch, dtype, device, guided)
        hit = None if self.differentiable else self._cond_cache.get(key)
        if hit is not None and hit[2] == stamp and all(map(operator.is_, hit[0], sources)):
            return hit[1]

        def dev(v: torch.Tensor | None, name: str, float_cast: bool) -> torch.Tensor | None:
            if v is None:
                return None
            v = self._broadcast(v, batch, name)
            return v.to(device=device, dtype=dtype) if float_cast else v.to(device)

        labels = dev(self.class_labels, "class_labels", False)
        states = dev(self.encoder_hidden_states, "encoder_hidden_states", True)
        if guided:
            if labels is not None:
                labels = torch.cat([dev(self.null_class_labels, "null_class_labels", False), labels])
            if states is not None:
                states = torch.cat([dev(self.uncond_encoder_hidden_states, "uncond_encoder_hidden_states", True),
                                    states])
        found = (labels, states)
        if not self.differentiable:
            if len(self._cond_cache) > 64:
                self._cond_cache.clear()
            self._cond_cache[key] = (sources, found, stamp)
        return found

    def _timesteps_for(self, t: torch.Tensor | int, batch: int, device: torch.device,
                       guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(validated int64 CPU timesteps (B,), the network's timesteps on its device: (B,), or
        (2B,) with guidance). Cached for a scalar ``t``: an int, or a 0-dim integer CPU tensor
        (what belm's samplers pass, the same tensor object every run, so it is looked up by
        identity before its value is read)."""
        if isinstance(t, torch.Tensor):
            entry = self._t_by_object.get((id(t), batch, device, guided))
            if entry is not None and entry[0] is t and entry[1] == t._version:
                return entry[2]
        key = None
        if type(t) is int:
            key = t
        elif isinstance(t, torch.Tensor) and t.ndim == 0 and t.device.type == "cpu" \
                and t.dtype in (torch.int64, torch.int32, torch.int16):
            key = int(t)
        pair = None if key is None else self._t_cache.get((key, batch, device, guided))
        if pair is None:
            tt = self._timestep(t, batch)
            t_in = tt.to(device)
            pair = (tt, torch.cat([t_in, t_in]) if guided else t_in)
            if key is None:
                return pair
            if len(self._t_cache) > 4096:  # bounded: a few grids × batch sizes in practice
                self._t_cache.clear()
            self._t_cache[(key, batch, device, guided)] = pair
        if isinstance(t, torch.Tensor) and not t.is_inference():
            if len(self._t_by_object) > 4096:  # callers may pass a new tensor object per call
                self._t_by_object.clear()
            self._t_by_object[(id(t), batch, device, guided)] = (t, t._version, pair)
        return pair

    def _timestep(self, t: torch.Tensor | int, batch: int) -> torch.Tensor:
        """Validated integer train timestep(s): int64 CPU tensor of shape (B,)."""
        if isinstance(t, bool):
            raise TypeError("t must be an integer train timestep (int or 0-dim tensor); got a bool")
        tt = torch.as_tensor(t).detach().cpu()
        if tt.ndim > 1 or (tt.ndim == 1 and tt.numel() not in (1, batch)):
            raise ValueError(f"t must be a 0-dim tensor, an int or a (B,) tensor; got shape {tuple(tt.shape)}")
        if tt.is_floating_point():
            if not torch.equal(tt, tt.round()):
                raise ValueError(f"t must be an integer train timestep; got {tt.tolist()}")
        T = self.alphas_cumprod.numel()
        tt = tt.long().reshape(-1)
        if (tt < 0).any() or (tt >= T).any():
            raise ValueError(f"t must lie in [0, {T - 1}] (the scheduler's train timesteps); got {tt.tolist()}")
        return tt.expand(batch) if tt.numel() == 1 else tt

    def _forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None,
                 encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if class_labels is not None:
            kwargs["class_labels"] = class_labels
        if encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = encoder_hidden_states
        out = self.model(x, t, **kwargs)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
            out = out[:, : x.shape[1]]  # learned variance: keep the mean prediction
        return out

    def _epsilon(self, x: torch.Tensor, x_in: torch.Tensor, tt: torch.Tensor, t_in: torch.Tensor,
                 labels: torch.Tensor | None, states: torch.Tensor | None, guided: bool) -> torch.Tensor:
        """One forward (batch 2B with guidance) and the conversion to ε in x's dtype and device."""
        alpha = sigma = None
        if self.prediction_type != "epsilon":
            shape = (x.shape[0],) + (1,) * (x.ndim - 1)
            alpha = self._alpha[tt].to(device=x.device, dtype=x.dtype).reshape(shape)
            sigma = self._sigma[tt].to(device=x.device, dtype=x.dtype).reshape(shape)
        if not guided:
            out = self._forward(x_in, t_in, labels, states)
            if out.dtype != x.dtype or out.device != x.device:
                out = out.to(device=x.device, dtype=x.dtype)
            return to_epsilon(out, x, alpha, sigma, self.prediction_type)
        B = x.shape[0]
        out = self._forward(torch.cat([x_in, x_in]), t_in, labels, states).to(device=x.device, dtype=x.dtype)
        e_u = to_epsilon(out[:B], x, alpha, sigma, self.prediction_type)
        e_c = to_epsilon(out[B:], x, alpha, sigma, self.prediction_type)
        return e_u + self.guidance_scale * (e_c - e_u)

    def __call__(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """ε at ``x`` (shape (B, C, H, W), any float dtype/device) and train timestep ``t``.

        Returns ε with the shape, dtype and device of ``x``.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim < 2:
            raise ValueError(f"x must have a batch dimension, shape (B, C, ...); got {tuple(x.shape)}")
        in_channels = self._in_channels
        if in_channels is not None and x.shape[1] != in_channels:
            raise ValueError(f"x has {x.shape[1]} channels (shape {tuple(x.shape)}) but the model expects "
                             f"in_channels={in_channels}; pass a tensor of shape (B, {in_channels}, ...)")
        B = x.shape[0]
        guided = self.guidance_scale != 1.0
        dtype, device = self._model_dtype_device()
        tt, t_in = self._timesteps_for(t, B, device, guided)
        # contiguous: kernels may take stride-dependent paths, so identical values in a
        # different memory layout could otherwise give different bits
        x_in = x if x.dtype == dtype and x.device == device else x.to(device=device, dtype=dtype)
        if not x_in.is_contiguous():
            x_in = x_in.contiguous()
        labels, states = self._conditioning(B, dtype, device, guided)
        # Gradients only when asked: reversible or autograd sampling through the model.
        # (belm's samplers already run without grad; entering no_grad again costs µs per call.)
        if torch.is_grad_enabled() and not self.differentiable:
            with torch.no_grad():
                eps = self._epsilon(x, x_in, tt, t_in, labels, states, guided)
        else:
            eps = self._epsilon(x, x_in, tt, t_in, labels, states, guided)
        if self.check_finite and not torch.isfinite(eps.sum()) and not torch.isfinite(eps).all():
            ts = int(tt[0]) if bool((tt == tt[0]).all()) else None
            where = f"train timestep t={tt.tolist() if ts is None else ts}"
            if not torch.isfinite(x).all():
                raise NonFiniteError(f"the input x contains NaN/Inf at {where}; the state diverged before "
                                     "the model was called", timestep=ts)
            raise NonFiniteError(f"the model returned NaN/Inf at {where} (model dtype {dtype}); run the model "
                                 "in float32 or check its weights", timestep=ts)
        return eps

    def __repr__(self) -> str:
        cond = [n for n in ("class_labels", "encoder_hidden_states") if getattr(self, n) is not None]
        return (f"DiffusersEps(model={type(self.model).__name__}, prediction_type={self.prediction_type!r}, "
                f"guidance_scale={self.guidance_scale}, conditioning={cond or None})")
