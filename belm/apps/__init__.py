"""Applications: reconstruction, editing, interpolation, sampling, Fréchet distance.

Each is a thin composition of a model handle (:mod:`belm.apps.models`), a sampler and
tensors (:mod:`belm.apps.tasks`); the ``belm`` command (:mod:`belm.cli`) adds file I/O.
"""

from belm.apps.metrics import frechet_distance, reconstruction_errors
from belm.apps.models import ModelHandle, load_model
from belm.apps.tasks import classify, edit, fd_to_reference, generate, interpolate, reconstruct, seeded_noise, slerp

__all__ = ["ModelHandle", "load_model", "reconstruct", "edit", "interpolate", "slerp", "generate",
           "seeded_noise", "classify", "fd_to_reference", "frechet_distance", "reconstruction_errors"]
