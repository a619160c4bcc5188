"""The samplers. Every method is a coefficient rule (or a shear sequence) driven by one chain."""

from belm.solvers.base import Latent, Sampler
from belm.solvers.belm import BELM
from belm.solvers.bitwise import LatticeLatent
from belm.solvers.chain import Chain, MultistepChain
from belm.solvers.edict import EDICT
from belm.solvers.methods import BDIA, DDIM, OBELM
from belm.solvers.multistep import MultistepSampler
from belm.solvers.relation import Relation

__all__ = ["Latent", "LatticeLatent", "Sampler", "Chain", "MultistepChain", "MultistepSampler", "Relation",
           "DDIM", "BDIA", "OBELM", "EDICT", "BELM"]
