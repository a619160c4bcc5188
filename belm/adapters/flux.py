"""FLUX (rectified-flow transformer) adapter: images <-> latents, prompts -> velocity.

    flux = Flux.from_pretrained("path/to/flux-folder")              # offline, local folder
    z0 = flux.encode("cat.png")                                     # (1, 16, H/8, W/8) latents, unpacked
    v = flux.velocity(prompt="a cat", guidance_scale=3.5)           # FluxVelocity (guidance embedding)
    sched = flux.schedule(28, height=1024, width=1024)              # FluxPipeline's grid (dynamic shift μ)
    images = flux.decode(z0)

belm keeps FLUX latents unpacked, (B, C, h, w), like every other latent; the velocity
function packs them into 2×2 patches for the transformer and unpacks its output (pure
permutations). Prompts are encoded by the pipeline's own ``encode_prompt``. There is no
sampler logic here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from belm.adapters.flow import FluxVelocity, calculate_shift
from belm.adapters.sd3 import FlowPipelineAdapter

__all__ = ["Flux"]


class Flux(FlowPipelineAdapter):
    """The parts of a ``FluxPipeline`` belm needs, with image/latent I/O (see :class:`FlowPipelineAdapter`).

    Attributes:
        guidance_embeds: whether the transformer has the distilled guidance embedding
            (FLUX.1-dev: True; FLUX.1-schnell: False).
    """

    PIPELINE = "FluxPipeline"
    COMPONENTS = ("vae", "transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
    LABEL = "FLUX"
    MAX_SEQUENCE_LENGTH = 512

    def __init__(self, pipeline: Any, *, max_sequence_length: int | None = None) -> None:
        super().__init__(pipeline, max_sequence_length=max_sequence_length)
        self.guidance_embeds = bool(getattr(self.transformer.config, "guidance_embeds", False))

    @property
    def pixel_multiple(self) -> int:
        """Image sides are cropped to multiples of 2 × VAE factor (latents are packed in 2×2 patches)."""
        return 2 * self.vae_factor

    def _encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        pe, pooled, _text_ids = self.pipeline.encode_prompt(
            prompt=prompt, prompt_2=None, device=self.pipeline._execution_device,
            max_sequence_length=self.max_sequence_length)
        return pe, pooled

    def velocity(self, prompt: str | list[str] = "", guidance_scale: float = 3.5,
                 negative_prompt: str | list[str] | None = None, true_cfg_scale: float = 1.0) -> FluxVelocity:
        """:class:`FluxVelocity` of the transformer conditioned on ``prompt``.

        Args:
            prompt: one prompt (broadcast over the batch) or B prompts.
            guidance_scale: the distilled guidance fed to the guidance embedding (as in
                FluxPipeline, ignored when the transformer has none).
            negative_prompt, true_cfg_scale: true classifier-free guidance (FluxPipeline's);
                active when ``true_cfg_scale != 1`` (negative prompt None = ""), batched into
                one forward pass.
        """
        pe, pooled = self.prompt_embeds(prompt)
        npe = npooled = None
        if float(true_cfg_scale) != 1.0:
            npe, npooled = self._negative((pe, pooled), negative_prompt)
        return FluxVelocity(self.transformer, pe, pooled,
                            guidance=float(guidance_scale) if self.guidance_embeds else None,
                            uncond_encoder_hidden_states=npe, uncond_pooled_projections=npooled,
                            true_cfg_scale=true_cfg_scale, num_train_timesteps=self.num_train_timesteps)

    def scheduler_sigmas(self, num_steps: int, *, height: int | None = None, width: int | None = None,
                         mu: float | None = None) -> torch.Tensor:
        """The N noisy σ FluxPipeline samples on, float32 (the scheduler's ``sigmas[:-1]``).

        As the pipeline: ``sigmas = linspace(1, 1/N, N)`` handed to ``set_timesteps`` with
        μ = calculate_shift((h/2)·(w/2)) for an (h, w) latent (``height``, ``width`` in
        pixels), unless ``mu`` is given. The scheduler itself is left untouched (a copy is set).
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
        config = self.scheduler.config
        if mu is None:
            if height is None or width is None:
                if config.get("use_dynamic_shifting", False):
                    raise ValueError("FLUX's scheduler shifts its grid by the image size: pass height=, width= "
                                     "(pixels) or mu=")
            else:
                h = 2 * (int(height) // (self.vae_factor * 2))
                w = 2 * (int(width) // (self.vae_factor * 2))
                mu = calculate_shift((h // 2) * (w // 2), config)
        scheduler = type(self.scheduler).from_config(config)
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        if sigmas is None:
            scheduler.set_timesteps(num_steps, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        return scheduler.sigmas[:-1].clone()

    def schedule(self, num_steps: int = 28, spacing: str | None = None, sampler: str | None = None, *,
                 height: int | None = None, width: int | None = None, mu: float | None = None) -> Any:
        """FluxPipeline's grid as a flow :class:`belm.Schedule` (see :meth:`scheduler_sigmas`).

        ``spacing`` and ``sampler`` are accepted for :meth:`StableDiffusion.schedule`'s interface
        and not used (the σ grid is FluxPipeline's)."""
        from belm.schedule import Schedule

        sigmas = self.scheduler_sigmas(num_steps, height=height, width=width, mu=mu)
        return Schedule.from_sigmas(sigmas.double(), kind="flow")
