"""The samplers. Every method is a coefficient rule on one shared engine."""

from belm.solvers.base import Latent, Sampler
from belm.solvers.belm import BELM
from belm.solvers.edict import EDICT
from belm.solvers.methods import BDIA, DDIM, OBELM
from belm.solvers.multistep import MultistepSampler
from belm.solvers.relation import Relation

__all__ = ["Latent", "Sampler", "MultistepSampler", "Relation", "DDIM", "BDIA", "OBELM", "EDICT", "BELM"]
