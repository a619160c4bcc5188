"""belm: exact inversion of diffusion models (BELM, O-BELM, DDIM, BDIA, EDICT).

    >>> from belm import Schedule, OBELM
    >>> sched = Schedule.from_betas(betas, num_steps=50)
    >>> s = OBELM(eps_fn, sched)
    >>> x0 = s.sample(xT); lat = s.invert(x0); s.sample(lat)   # == x0 up to rounding
"""

from belm.errors import BELMError, LatentMismatchError, LatticeOverflowError, NonFiniteError, UnstableRuleError
from belm.schedule import Schedule
from belm.solvers import BDIA, BELM, DDIM, EDICT, OBELM, Latent, Sampler

from belm._version import __version__

__all__ = ["Schedule", "DDIM", "BDIA", "OBELM", "EDICT", "BELM", "Latent", "Sampler",
           "BELMError", "NonFiniteError", "LatticeOverflowError", "LatentMismatchError", "UnstableRuleError", "__version__"]
