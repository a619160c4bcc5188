"""Adapters: ε functions from models, and images to model space and back.

- :func:`to_epsilon`: convert "epsilon" / "v_prediction" / "sample" predictions to ε.
- :class:`DiffusersEps`: ``eps_fn(x, t)`` from a diffusers UNet, with classifier-free
  guidance batched into one forward pass.
- :class:`StableDiffusion`: a latent pipeline (VAE + text encoder + UNet + scheduler):
  ``encode`` / ``decode`` images, ``eps(prompt=...)``, ``schedule(num_steps)``.
- :class:`StableDiffusionXL`: the same for SDXL folders (two text encoders, added conditioning).
- :class:`SD3Velocity`, :class:`FluxVelocity`: ``fn(x, σ) -> dx/dσ`` from diffusers' flow
  transformers (SD3: CFG batched; FLUX: packed latents, ids, guidance embedding);
  :class:`StableDiffusion3`, :class:`Flux`: pipeline helpers (encode / decode,
  ``velocity(prompt=...)``, ``schedule(num_steps)`` on the pipeline's flow grid).
- :func:`from_folder`: the right helper for a local pipeline folder (by model_index.json).
- :class:`BELMScheduler`, :class:`BELMInverseScheduler`: O-BELM / BDIA / DDIM as diffusers
  schedulers for stock pipelines; :class:`FlowBELMScheduler`, :class:`FlowBELMInverseScheduler`:
  the same for flow pipelines (SD3, FLUX) (imported lazily; they need diffusers).

Adapters are thin: no sampler logic lives here. diffusers / transformers / PIL are
imported lazily (only when a folder is loaded or an image is read).
"""

from typing import Any

from belm.adapters.auto import from_folder
from belm.adapters.eps import PREDICTION_TYPES, DiffusersEps, to_epsilon
from belm.adapters.flow import FlowVelocity, FluxVelocity, SD3Velocity
from belm.adapters.flux import Flux
from belm.adapters.sd3 import StableDiffusion3
from belm.adapters.sdxl import StableDiffusionXL
from belm.adapters.stable_diffusion import StableDiffusion

__all__ = ["PREDICTION_TYPES", "DiffusersEps", "StableDiffusion", "to_epsilon",
           "StableDiffusionXL", "StableDiffusion3", "Flux", "FlowVelocity", "SD3Velocity", "FluxVelocity",
           "from_folder", "BELMScheduler", "BELMInverseScheduler", "FlowBELMScheduler",
           "FlowBELMInverseScheduler"]

#: names imported on first use (they need diffusers) -> their module
_LAZY = {"BELMScheduler": "schedulers", "BELMInverseScheduler": "schedulers",
         "FlowBELMScheduler": "flow_schedulers", "FlowBELMInverseScheduler": "flow_schedulers"}


def __getattr__(name: str) -> Any:
    """Import the diffusers scheduler classes on first use (diffusers is an optional dependency)."""
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(f"belm.adapters.{_LAZY[name]}")
        except ImportError as exc:
            raise ImportError(f"belm.adapters.{name} needs diffusers; install it with "
                              f"pip install 'belm[diffusers]' ({exc})") from exc
        return getattr(module, name)
    raise AttributeError(f"module 'belm.adapters' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
