"""Velocity functions ``fn(x, t) -> dx/dσ`` from diffusers flow-matching transformers.

A rectified-flow model (Stable Diffusion 3, FLUX) is trained on
``x_σ = (1 − σ)·x0 + σ·z`` (σ = 1: pure noise) and returns the velocity
``v = dx/dσ = z − x0``. belm's flow schedules hand the function the level's σ as a
0-dim float64 tensor; the adapter turns it into the network's timestep argument the way
the stock diffusers pipeline does:

- :class:`SD3Velocity` (``SD3Transformer2DModel``): ``timestep = σ·1000`` (float32),
  classifier-free guidance with the unconditional and conditional halves batched into
  ONE forward pass (``encoder_hidden_states`` and ``pooled_projections`` for each).
- :class:`FluxVelocity` (``FluxTransformer2DModel``): latents (B, C, h, w) are packed into
  2×2 patches (B, h/2·w/2, 4C) and back (pure permutations, exact); ``img_ids`` /
  ``txt_ids``; ``timestep = σ·1000 / 1000`` in the model dtype; the distilled guidance
  embedding when ``config.guidance_embeds``; optional true CFG (FluxPipeline's
  ``true_cfg_scale``), batched into one forward pass.

Adapters are thin: no sampler logic here, and diffusers is not imported (models are
duck-typed). The network runs in its own dtype/device (cached at construction: build the
function after moving the model); the velocity comes back in the network's dtype on
``x``'s device.
"""

from __future__ import annotations

from typing import Any

import torch

from belm.adapters.eps import _model_dtype_device, check_guidance_scale
from belm.errors import NonFiniteError

__all__ = ["FlowVelocity", "SD3Velocity", "FluxVelocity", "pack_latents", "unpack_latents", "calculate_shift"]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2·w/2, 4C): FLUX's 2×2 patch packing (``FluxPipeline._pack_latents``).

    Raises:
        ValueError: not 4-D, or h / w odd.
    """
    if latents.ndim != 4 or latents.shape[2] % 2 or latents.shape[3] % 2:
        raise ValueError(f"FLUX latents must have shape (B, C, h, w) with h and w even (2×2 packing); got "
                         f"{tuple(latents.shape)} (use an image size divisible by 2·vae_factor)")
    B, C, h, w = latents.shape
    return latents.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2·w/2, 4C) -> (B, C, h, w): the inverse of :func:`pack_latents` (h, w: latent size)."""
    B, n, c4 = packed.shape
    if n != (h // 2) * (w // 2) or c4 % 4:
        raise ValueError(f"packed latents of shape {tuple(packed.shape)} do not fit a ({h}, {w}) latent")
    return packed.view(B, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, c4 // 4, h, w)


def calculate_shift(image_seq_len: int, config: Any, *, default_max_shift: float = 1.15) -> float:
    """The resolution-dependent shift μ of dynamic shifting (diffusers' ``calculate_shift``).

    μ is linear in the number of image tokens: base_shift at base_image_seq_len, max_shift
    at max_image_seq_len.

    Args:
        image_seq_len: image tokens: (h/2)·(w/2) packed patches for FLUX, (h/p)·(w/p) for SD3.
        config: the flow scheduler's config (base_image_seq_len 256, max_image_seq_len 4096,
            base_shift 0.5 when absent).
        default_max_shift: max_shift when the config has none (FluxPipeline 1.15, SD3 1.16).
    """
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    base_len, max_len = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
    base_shift, max_shift = get("base_shift", 0.5), get("max_shift", default_max_shift)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def _check_states(value: torch.Tensor | None, name: str, ndim: int) -> torch.Tensor | None:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {type(value).__name__}")
    if value.ndim == ndim - 1:
        value = value.unsqueeze(0)
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims with the batch first (or {ndim - 1} without it); "
                         f"got shape {tuple(value.shape)}")
    return value.detach()


class FlowVelocity:
    """Base class: ``fn(x, t) -> v`` for a flow transformer, with batched classifier-free guidance.

    Subclasses say how the network is called (:meth:`_forward`, :meth:`_model_timestep`)
    and which conditioning tensors it takes (``cond`` / ``uncond``: dicts of tensors with
    the batch first, batch 1 broadcast to B).

    Args:
        model: the transformer (``model(hidden_states=..., timestep=..., ...)`` returning
            ``.sample`` or a tuple). Put in eval mode.
        cond: conditioning tensors by keyword argument name.
        uncond: the unconditional ones (same keys and trailing shapes), needed when
            ``guidance_scale != 1``.
        guidance_scale: w >= 0; v = v_u + w·(v_c − v_u). 1: one forward of batch B; otherwise
            one forward of batch 2B (unconditional half first).
        num_train_timesteps: the flow scheduler's ``num_train_timesteps`` (1000).
        check_finite: raise :class:`~belm.errors.NonFiniteError` naming σ on NaN/Inf output.
    """

    def __init__(self, model: Any, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None = None, *,
                 guidance_scale: float = 1.0, num_train_timesteps: int = 1000, check_finite: bool = False) -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable torch module; got {type(model).__name__}")
        if isinstance(model, torch.nn.Module):
            model.eval()
        self.model = model
        self.guidance_scale = w = check_guidance_scale(guidance_scale)
        if self.guided:
            if uncond is None or any(uncond.get(k) is None for k in cond):
                raise ValueError(f"guidance_scale={w} needs the unconditional inputs {sorted(cond)} "
                                 "(e.g. the embeddings of the empty prompt), or use guidance_scale=1")
            for k, v in cond.items():
                if v.shape[1:] != uncond[k].shape[1:]:
                    raise ValueError(f"the unconditional {k} has shape {tuple(uncond[k].shape)} but the conditional "
                                     f"one has {tuple(v.shape)}; all but the batch dimension must match")
        self.cond, self.uncond = cond, (uncond if self.guided else None)
        self.num_train_timesteps = int(num_train_timesteps)
        self.check_finite = check_finite
        # cached once: walking the module tree on every call costs more than a tiny forward
        self.dtype, self.device = _model_dtype_device(model)
        self._cache: dict[tuple[Any, ...], Any] = {}

    @property
    def guided(self) -> bool:
        """True when classifier-free guidance is active (guidance_scale != 1)."""
        return self.guidance_scale != 1.0

    # -- hooks ---------------------------------------------------------------------------
    def _model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """σ as float32, shape (B,), on the model's device -> the network's ``timestep``."""
        raise NotImplementedError

    def _forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """One network call on x (B', C, h, w) in the model dtype/device -> velocity like x."""
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------
    def _sigma(self, t: Any, batch: int) -> torch.Tensor:
        """Validated σ: float32 tensor of shape (B,) on the model's device (as the pipelines hold it)."""
        if isinstance(t, bool):
            raise TypeError("t must be the level's σ (a float in [0, 1]); got a bool")
        tt = torch.as_tensor(t).detach()
        if not tt.is_floating_point():
            if isinstance(t, torch.Tensor):
                raise TypeError(
                    f"t must be the level's σ as a floating-point tensor; got dtype {tt.dtype} (an integer train "
                    "timestep?). Use a flow schedule: Schedule.from_diffusers(flow_match_scheduler, N) or "
                    "Schedule.from_sigmas(sigmas, kind='flow')")
            tt = tt.double()
        if tt.ndim > 1 or (tt.ndim == 1 and tt.numel() not in (1, batch)):
            raise ValueError(f"t must be a 0-dim tensor, a float or a (B,) tensor; got shape {tuple(tt.shape)}")
        if not torch.isfinite(tt).all() or (tt < 0).any() or (tt > 1).any():
            raise ValueError(f"t must be σ in [0, 1] (1 = pure noise); got {tt.tolist()}")
        tt = tt.reshape(-1).to(device=self.device, dtype=torch.float32)
        return tt.expand(batch) if tt.numel() == 1 else tt

    def _conditioning(self, batch: int) -> dict[str, torch.Tensor]:
        """Conditioning for one forward pass (batch B, or 2B with the unconditional half first), cached."""
        key = ("cond", batch)
        if key not in self._cache:
            def fit(v: torch.Tensor, name: str) -> torch.Tensor:
                if v.shape[0] not in (1, batch):
                    raise ValueError(f"{name} has batch size {v.shape[0]} but x has batch size {batch}; pass "
                                     "batch 1 (broadcast) or the same batch size")
                # contiguous: a broadcast (stride-0) batch can take another kernel than B real rows
                return v.expand(batch, *v.shape[1:]).to(device=self.device, dtype=self.dtype).contiguous()

            out = {k: fit(v, k) for k, v in self.cond.items()}
            if self.guided:
                out = {k: torch.cat([fit(self.uncond[k], "unconditional " + k), v]) for k, v in out.items()}
            self._cache[key] = out
        return self._cache[key]

    def __call__(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        """Velocity dx/dσ at ``x`` (B, C, h, w), any float dtype/device, and σ = ``t``.

        Returns a tensor shaped like ``x`` in the network's dtype on ``x``'s device.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 4:
            raise ValueError(f"x must be a latent of shape (B, C, h, w); got {tuple(x.shape)}")
        B = x.shape[0]
        sigma = self._sigma(t, B)
        # contiguous: kernels may take stride-dependent paths (identical values, different bits)
        x_in = x.to(device=self.device, dtype=self.dtype).contiguous()
        with torch.no_grad():
            if not self.guided:
                v = self._forward(x_in, self._model_timestep(sigma), self._conditioning(B))
            else:
                out = self._forward(torch.cat([x_in, x_in]), self._model_timestep(torch.cat([sigma, sigma])),
                                    self._conditioning(B))
                v_u, v_c = out[:B], out[B:]
                v = v_u + self.guidance_scale * (v_c - v_u)  # in the model dtype, as the pipelines do
        if self.check_finite and not torch.isfinite(v.sum()) and not torch.isfinite(v).all():
            raise NonFiniteError(f"the transformer returned NaN/Inf at σ = {float(sigma[0])} (model dtype "
                                 f"{self.dtype}); run it in float32 or check its weights")
        return v.to(x.device)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={type(self.model).__name__}, dtype={self.dtype}, "
                f"device={self.device}, guidance_scale={self.guidance_scale})")


def _output(out: Any) -> torch.Tensor:
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, (tuple, list)) else out


def _prompt_conditioning(owner: str, encoder_hidden_states: Any, pooled_projections: Any,
                         uncond_encoder_hidden_states: Any, uncond_pooled_projections: Any
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checked (cond, uncond) keyword inputs of a text-conditioned flow transformer."""
    cond = {"encoder_hidden_states": _check_states(encoder_hidden_states, "encoder_hidden_states", 3),
            "pooled_projections": _check_states(pooled_projections, "pooled_projections", 2)}
    if cond["encoder_hidden_states"] is None or cond["pooled_projections"] is None:
        raise ValueError(f"{owner} needs encoder_hidden_states and pooled_projections (the prompt's)")
    uncond = {"encoder_hidden_states": _check_states(uncond_encoder_hidden_states, "uncond_encoder_hidden_states", 3),
              "pooled_projections": _check_states(uncond_pooled_projections, "uncond_pooled_projections", 2)}
    return cond, uncond


class SD3Velocity(FlowVelocity):
    """``fn(x, σ) -> dx/dσ`` from an ``SD3Transformer2DModel`` with batched CFG.

    Example::

        v = SD3Velocity(transformer, encoder_hidden_states=pe, pooled_projections=pp,
                        uncond_encoder_hidden_states=npe, uncond_pooled_projections=npp,
                        guidance_scale=7.0)
        dx = v(x, torch.tensor(0.8, dtype=torch.float64))   # x: (B, C, h, w)

    Args:
        transformer: the SD3 transformer (``hidden_states``, ``timestep``,
            ``encoder_hidden_states``, ``pooled_projections``).
        encoder_hidden_states: (B|1, L, D) prompt embeddings (CLIP ⊕ T5, as
            ``StableDiffusion3Pipeline.encode_prompt`` returns them).
        pooled_projections: (B|1, P) pooled CLIP embeddings.
        uncond_encoder_hidden_states, uncond_pooled_projections: the negative prompt's,
            needed when ``guidance_scale != 1``.
        guidance_scale: w (the pipeline's ``guidance_scale``; SD3's default is 7.0).
            Unlike the pipeline (guidance only when w > 1), any w != 1 is applied.
        num_train_timesteps: the scheduler's (1000); the network gets ``timestep = σ·1000``
            computed in float32 like the scheduler's ``timesteps``.
    """

    def __init__(self, transformer: Any, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor, *,
                 uncond_encoder_hidden_states: torch.Tensor | None = None,
                 uncond_pooled_projections: torch.Tensor | None = None, guidance_scale: float = 1.0,
                 num_train_timesteps: int = 1000, check_finite: bool = False) -> None:
        cond, uncond = _prompt_conditioning("SD3Velocity", encoder_hidden_states, pooled_projections,
                                            uncond_encoder_hidden_states, uncond_pooled_projections)
        super().__init__(transformer, cond, uncond, guidance_scale=guidance_scale,
                         num_train_timesteps=num_train_timesteps, check_finite=check_finite)
        config = getattr(transformer, "config", None)
        in_channels = getattr(config, "in_channels", None)
        self.in_channels: int | None = in_channels if isinstance(in_channels, int) else None
        patch = getattr(config, "patch_size", 1)
        self.patch_size: int = patch if isinstance(patch, int) and patch > 0 else 1

    def _model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.num_train_timesteps  # float32, as scheduler.timesteps

    def _forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels but the transformer expects in_channels="
                             f"{self.in_channels}; pass latents of shape (B, {self.in_channels}, h, w)")
        if x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(f"x has latent size {tuple(x.shape[2:])} but the transformer's patch side is "
                             f"{self.patch_size}; h and w must be multiples of it (crop the image to a "
                             "multiple of vae_factor × patch_size)")
        return _output(self.model(hidden_states=x, timestep=timestep, return_dict=False, **cond))


class FluxVelocity(FlowVelocity):
    """``fn(x, σ) -> dx/dσ`` from a ``FluxTransformer2DModel`` on unpacked latents (B, C, h, w).

    Example::

        v = FluxVelocity(transformer, encoder_hidden_states=pe, pooled_projections=pp,
                         guidance=3.5)                        # FLUX.1-dev: embedded guidance
        dx = v(x, torch.tensor(1.0, dtype=torch.float64))    # x: (B, C, h, w), h, w even

    Args:
        transformer: the FLUX transformer (``in_channels`` = 4·C: 2×2 packed latents).
        encoder_hidden_states: (B|1, L, D) T5 embeddings; ``pooled_projections``: (B|1, P)
            pooled CLIP embeddings (``FluxPipeline.encode_prompt``).
        txt_ids: (L, 3) text position ids; default zeros (what the pipeline uses).
        guidance: the distilled guidance value fed to the guidance embedding (the
            pipeline's ``guidance_scale``, 3.5 by default); required when
            ``transformer.config.guidance_embeds`` and ignored (must be None) otherwise.
        uncond_encoder_hidden_states, uncond_pooled_projections, true_cfg_scale: true
            classifier-free guidance (the pipeline's negative prompt and ``true_cfg_scale``);
            the two halves run in one forward pass of batch 2B (the pipeline makes two).
        num_train_timesteps: the scheduler's (1000). The network gets
            ``timestep = (σ·1000 in float32, cast to the model dtype) / 1000`` as in FluxPipeline.
    """

    def __init__(self, transformer: Any, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor, *,
                 txt_ids: torch.Tensor | None = None, guidance: float | None = None,
                 uncond_encoder_hidden_states: torch.Tensor | None = None,
                 uncond_pooled_projections: torch.Tensor | None = None, true_cfg_scale: float = 1.0,
                 num_train_timesteps: int = 1000, check_finite: bool = False) -> None:
        cond, uncond = _prompt_conditioning("FluxVelocity", encoder_hidden_states, pooled_projections,
                                            uncond_encoder_hidden_states, uncond_pooled_projections)
        super().__init__(transformer, cond, uncond, guidance_scale=true_cfg_scale,
                         num_train_timesteps=num_train_timesteps, check_finite=check_finite)
        config = getattr(transformer, "config", None)
        self.guidance_embeds = bool(getattr(config, "guidance_embeds", False))
        if self.guidance_embeds and guidance is None:
            raise ValueError("this FLUX transformer has a guidance embedding (config.guidance_embeds); pass "
                             "guidance= (the pipeline's guidance_scale, e.g. 3.5)")
        if not self.guidance_embeds and guidance is not None:
            raise ValueError(f"guidance={guidance} given but this FLUX transformer has no guidance embedding "
                             "(config.guidance_embeds is False); pass guidance=None, or true_cfg_scale= with a "
                             "negative prompt for classifier-free guidance")
        self.guidance = None if guidance is None else float(guidance)
        in_channels = getattr(config, "in_channels", None)
        self.in_channels: int | None = in_channels if isinstance(in_channels, int) else None
        L = cond["encoder_hidden_states"].shape[1]
        if txt_ids is None:
            txt_ids = torch.zeros(L, 3)
        if not isinstance(txt_ids, torch.Tensor) or txt_ids.shape != (L, 3):
            raise ValueError(f"txt_ids must be a tensor of shape ({L}, 3) (text length, 3 axes); got "
                             f"{getattr(txt_ids, 'shape', type(txt_ids).__name__)}")
        self.txt_ids = txt_ids.to(device=self.device, dtype=self.dtype)

    def _model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        # FluxPipeline: timestep = t.to(latents.dtype) / 1000 with t = scheduler.timesteps (σ·1000, float32)
        return (sigma * self.num_train_timesteps).to(self.dtype) / 1000

    def _img_ids(self, h: int, w: int) -> torch.Tensor:
        key = ("img_ids", h, w)
        if key not in self._cache:  # FluxPipeline._prepare_latent_image_ids: (row, col) of each 2×2 patch
            ids = torch.zeros(h // 2, w // 2, 3)
            ids[..., 1] = torch.arange(h // 2)[:, None]
            ids[..., 2] = torch.arange(w // 2)[None, :]
            self._cache[key] = ids.reshape(-1, 3).to(device=self.device, dtype=self.dtype)
        return self._cache[key]

    def _forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        B, C, h, w = x.shape
        if self.in_channels is not None and 4 * C != self.in_channels:
            raise ValueError(f"x has {C} channels but this FLUX transformer takes in_channels={self.in_channels} "
                             f"= 4 × {self.in_channels // 4} (2×2 packed); pass latents of shape "
                             f"(B, {self.in_channels // 4}, h, w)")
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((B,), self.guidance, device=self.device, dtype=torch.float32)
        out = _output(self.model(hidden_states=pack_latents(x), timestep=timestep, guidance=guidance,
                                 txt_ids=self.txt_ids, img_ids=self._img_ids(h, w), return_dict=False, **cond))
        return unpack_latents(out, h, w)
