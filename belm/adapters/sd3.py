"""Stable Diffusion 3 (rectified-flow transformer) adapter: images <-> latents, prompts -> velocity.

    sd3 = StableDiffusion3.from_pretrained("path/to/sd3-folder")   # offline, local folder
    z0 = sd3.encode("cat.png")                                     # (1, 16, H/8, W/8) latents
    v = sd3.velocity(prompt="a cat", guidance_scale=7.0)           # SD3Velocity (CFG batched)
    sched = sd3.schedule(num_steps=28)                             # a flow belm.Schedule
    images = sd3.decode(z0)

Latents follow diffusers' convention ``z = (mean(E(x)) − shift_factor)·scaling_factor``
(encode/decode are :class:`~belm.adapters.StableDiffusion`'s). Prompts are encoded by
the pipeline's own ``encode_prompt`` so the embeddings are exactly the stock pipeline's.
There is no sampler logic here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from belm.adapters.flow import SD3Velocity
from belm.adapters.folders import cast_pipeline, check_pipeline, load_pipeline_folder
from belm.adapters.images import ImageInput, to_tensor
from belm.adapters.stable_diffusion import StableDiffusion

__all__ = ["FlowPipelineAdapter", "StableDiffusion3"]


class FlowPipelineAdapter(StableDiffusion):
    """Shared part of the SD3 and FLUX helpers: a pipeline with a VAE, a flow transformer and
    a ``FlowMatchEulerDiscreteScheduler``.

    It is a :class:`StableDiffusion` (same ``encode`` / ``decode`` / ``preprocess``), whose
    network is the transformer (also reachable as ``unet`` so the inherited ``dtype`` /
    ``device`` work) and whose ``eps`` returns the velocity function (what belm's samplers
    take on flow schedules). Subclasses set the class attributes below.
    """

    #: diffusers pipeline class name, the folder's required subfolders, the family's name
    PIPELINE: str = ""
    COMPONENTS: tuple[str, ...] = ()
    LABEL: str = ""
    #: the pipeline's default ``max_sequence_length`` for the T5 encoder
    MAX_SEQUENCE_LENGTH: int = 256

    def __init__(self, pipeline: Any, *, max_sequence_length: int | None = None) -> None:
        check_pipeline(pipeline, self.COMPONENTS, self.LABEL)
        super().__init__(pipeline.vae, pipeline.transformer, pipeline.text_encoder, pipeline.tokenizer,
                         pipeline.scheduler, pipeline=pipeline)
        self.transformer = pipeline.transformer
        n = self.MAX_SEQUENCE_LENGTH if max_sequence_length is None else max_sequence_length
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 512:
            raise ValueError(f"max_sequence_length must be an integer in [1, 512] (T5 tokens); got {n!r}")
        self.max_sequence_length = n
        self.num_train_timesteps = int(getattr(pipeline.scheduler.config, "num_train_timesteps", 1000) or 1000)
        self._prompt_cache: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, folder_or_pipeline: str | os.PathLike | Any, dtype: torch.dtype | None = torch.float32,
                        device: str | torch.device | None = None, *,
                        max_sequence_length: int | None = None) -> "FlowPipelineAdapter":
        """Load from a LOCAL diffusers folder (offline, safetensors only) or wrap a pipeline.

        Args:
            folder_or_pipeline: a folder written by the pipeline's ``save_pretrained``, or an
                already built pipeline object.
            dtype: dtype of the networks (a given pipeline is cast in place); None keeps it.
            device: where to put the networks; None keeps them where they are.
            max_sequence_length: T5 tokens per prompt (the pipeline's default when None).

        Raises:
            FileNotFoundError: the folder, model_index.json, a component or its weights are missing.
            ValueError: a given pipeline lacks a component.
            RuntimeError: diffusers could not load the folder (message names the folder).
        """
        if isinstance(folder_or_pipeline, (str, os.PathLike)):
            pipe = load_pipeline_folder(Path(folder_or_pipeline), cls.PIPELINE, cls.COMPONENTS, cls.LABEL, dtype)
        else:
            pipe = folder_or_pipeline
            check_pipeline(pipe, cls.COMPONENTS, cls.LABEL)
        cast_pipeline(pipe, dtype, device)
        return cls(pipe, max_sequence_length=max_sequence_length)

    @property
    def pixel_multiple(self) -> int:
        """Image sides are cropped to multiples of this: VAE factor × the transformer's patch side."""
        return self.vae_factor * int(getattr(self.transformer.config, "patch_size", 1) or 1)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """Image input(s) -> (B, 3, H, W) float32 in [-1, 1], H and W center-cropped down to
        multiples of :attr:`pixel_multiple` (the latent must tile into the transformer's patches)."""
        return to_tensor(image, multiple=self.pixel_multiple)

    def velocity(self, prompt: str | list[str] = "", guidance_scale: float = 1.0,
                 negative_prompt: str | list[str] | None = "") -> Any:
        """The velocity function ``fn(x, σ) -> dx/dσ`` for ``prompt``; see the subclass."""
        raise NotImplementedError

    def eps(self, prompt: str | list[str] = "", guidance_scale: float = 1.0,  # type: ignore[override]
            negative_prompt: str | list[str] | None = "") -> Any:
        """Alias of :meth:`velocity`: on a flow schedule the samplers take the velocity function."""
        return self.velocity(prompt=prompt, guidance_scale=guidance_scale, negative_prompt=negative_prompt)

    def prompt_embeds(self, prompt: str | list[str]) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        """Per-prompt embeddings from the pipeline's ``encode_prompt``, concatenated over prompts.

        Each distinct prompt is encoded once and cached. Returns a tuple of tensors with the
        batch first (the subclass says which).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a non-empty list of strings; got {prompt!r}")
        for p in prompts:
            if p not in self._prompt_cache:
                with torch.no_grad():
                    self._prompt_cache[p] = tuple(t.detach() for t in self._encode_prompt(p))
        parts = [self._prompt_cache[p] for p in prompts]
        return tuple(torch.cat([part[i] for part in parts]) for i in range(len(parts[0])))

    def _encode_prompt(self, prompt: str) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _negative(self, cond: tuple[torch.Tensor, ...], negative_prompt: str | list[str] | None
                  ) -> tuple[torch.Tensor, ...]:
        uncond = self.prompt_embeds("" if negative_prompt is None else negative_prompt)
        B = cond[0].shape[0]
        if uncond[0].shape[0] != B:
            if uncond[0].shape[0] != 1:
                raise ValueError(f"negative_prompt has {uncond[0].shape[0]} entries but prompt has {B}; pass one "
                                 "negative prompt or one per prompt")
            uncond = tuple(u.expand(B, *u.shape[1:]) for u in uncond)
        return uncond

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(transformer={type(self.transformer).__name__}, dtype={self.dtype}, "
                f"device={self.device}, vae_factor={self.vae_factor}, latent_channels={self.latent_channels}, "
                f"scaling_factor={self.scaling_factor}, shift_factor={self.shift_factor})")


class StableDiffusion3(FlowPipelineAdapter):
    """The parts of a ``StableDiffusion3Pipeline`` belm needs, with image/latent I/O.

    ``text_encoder_3`` (T5) may be absent from the folder / None: the pipeline then uses
    zeros for the T5 part, and so does this adapter (it calls the pipeline's ``encode_prompt``).
    """

    PIPELINE = "StableDiffusion3Pipeline"
    COMPONENTS = ("vae", "transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
    LABEL = "Stable Diffusion 3"
    MAX_SEQUENCE_LENGTH = 256

    def _encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        pe, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=self.pipeline._execution_device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return pe, pooled

    def velocity(self, prompt: str | list[str] = "", guidance_scale: float = 7.0,
                 negative_prompt: str | list[str] | None = "") -> SD3Velocity:
        """:class:`SD3Velocity` of the transformer conditioned on ``prompt`` with CFG.

        Args:
            prompt: one prompt (broadcast over the batch) or B prompts (all three encoders).
            guidance_scale: w >= 0; 1 disables guidance (one forward of batch B), any other
                value batches the negative and the positive halves into one forward.
            negative_prompt: the unconditional prompt ("" as in the pipeline; None = "").
        """
        pe, pooled = self.prompt_embeds(prompt)
        npe = npooled = None
        if float(guidance_scale) != 1.0:
            npe, npooled = self._negative((pe, pooled), negative_prompt)
        return SD3Velocity(self.transformer, pe, pooled, uncond_encoder_hidden_states=npe,
                           uncond_pooled_projections=npooled, guidance_scale=guidance_scale,
                           num_train_timesteps=self.num_train_timesteps)

    def schedule(self, num_steps: int = 28, spacing: str | None = None, sampler: str | None = None, *,
                 mu: float | None = None, height: int | None = None, width: int | None = None) -> Any:
        """The pipeline's grid: ``Schedule.from_diffusers(self.scheduler, num_steps, mu=...)``.

        With dynamic shifting (``scheduler.config.use_dynamic_shifting``) μ is needed: pass it,
        or the image size in pixels (``height``, ``width``) and μ is computed as
        ``StableDiffusion3Pipeline`` does (image tokens = (h/patch)·(w/patch) latent patches).
        ``spacing`` and ``sampler`` are accepted for :meth:`StableDiffusion.schedule`'s interface
        and not used: a flow grid is spaced in σ by the scheduler's shift, not by train-timestep
        spacing.
        """
        from belm.adapters.flow import calculate_shift
        from belm.schedule import Schedule

        config = self.scheduler.config
        if config.get("use_dynamic_shifting", False) and mu is None:
            if height is None or width is None:
                raise ValueError("this scheduler uses dynamic shifting: pass mu= or the image size height=, width= "
                                 "(pixels) so that mu is computed as StableDiffusion3Pipeline does")
            patch = int(self.transformer.config.patch_size)
            seq_len = (int(height) // self.vae_factor // patch) * (int(width) // self.vae_factor // patch)
            mu = calculate_shift(seq_len, config, default_max_shift=1.16)
        return Schedule.from_diffusers(self.scheduler, num_steps, mu=mu) if mu is not None \
            else Schedule.from_diffusers(self.scheduler, num_steps)
