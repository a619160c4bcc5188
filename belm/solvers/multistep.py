"""Linear multistep samplers (DDIM, BDIA, O-BELM, BELM(k)): members as data, one chain.

A method coupling k states is given by its *members* m = 1 … k: relations producing level n
from the m previous levels (:class:`~belm.solvers.relation.Relation`). Member 1 is always
DDIM; member k is the method itself; members 1 … k−1 start the chain up (so sampling step 0
is a DDIM step, and inversion from the clean level first takes one DDIM-inversion step,
evaluating f at the known cleaner point). :class:`~belm.solvers.chain.MultistepChain` runs
them; ``exact="bitwise"`` runs a 2-step method on an integer lattice instead
(:mod:`belm.solvers.bitwise`). The latent holds the k states x_s … x_{s+k−1}, so sampling
it re-runs exactly the relations inversion solved: exact reconstruction.
Network calls: sample N, invert N, sample(latent) N − 1 (f at levels 1 … N−1) for k ≥ 2.
"""

from __future__ import annotations

from typing import Optional

import torch

from belm.solvers.base import Latent, Sampler
from belm.solvers.bitwise import LatticeChain, LatticeLatent, LatticeRule
from belm.solvers.chain import Chain, MultistepChain, Network
from belm.solvers.relation import Relation, ddim_relation
from belm.solvers.reversible import ReversibleMixin

__all__ = ["MultistepSampler"]


class MultistepSampler(ReversibleMixin, Sampler):
    """A k-step linear multistep sampler. Subclasses define :meth:`relation` for 2 ≤ m ≤ k."""

    num_states = 1

    def __init__(self, eps_fn, schedule, **kwargs) -> None:
        super().__init__(eps_fn, schedule, **kwargs)
        N, k = self.schedule.num_steps, self.num_states
        if N < k:
            raise ValueError(f"{self.name} couples {k} states and needs num_steps >= {k}; "
                             f"the schedule has {N}. Use more steps or DDIM")
        self.members = [ddim_relation(self.schedule)] + [self.relation(m) for m in range(2, k + 1)]
        for m, member in enumerate(self.members[1:], start=2):
            if member.m != m or not member.bidirectional:
                raise ValueError(f"{self.name}: member {m} must be a bidirectional {m}-step relation")
        # Converted once per (method, schedule): the chain only reads Python floats.
        self.rows = [member.in_x() for member in self.members]
        self.lattice_rule = LatticeRule(self.members[0], self.members[1], self.name) \
            if self.exact == "bitwise" else None

    @property
    def supports_bitwise(self) -> bool:  # type: ignore[override]
        return self.num_states == 2

    def relation(self, m: int) -> Relation:
        """The m-step member (2 ≤ m ≤ k) of this method on ``self.schedule``."""
        raise NotImplementedError

    @property
    def invertible(self) -> bool:
        return self.num_states > 1 and self.members[-1].bidirectional

    # -- chains ------------------------------------------------------------------------
    def chain_from_noise(self, x: torch.Tensor, level: int, network: Optional[Network] = None) -> Chain:
        network = network or self.network(self.model_dtype or x.dtype)
        if self.lattice_rule is not None:
            return LatticeChain.from_noise(self.lattice_rule, network, x, level)
        return MultistepChain(self.rows, network, {level: self._owned(x)}, start=level)

    def chain_from_clean(self, x0: torch.Tensor, network: Optional[Network] = None, *,
                         level: Optional[int] = None) -> Chain:
        """``level``: where x0 sits (default: the clean level N); inversion from there starts
        with the start-up members, as from N (a diffusers inversion loop begun mid-grid)."""
        network = network or self.network(self.model_dtype or x0.dtype)
        N = self.schedule.num_steps if level is None else level
        if self.lattice_rule is not None:
            if N != self.schedule.num_steps:
                raise ValueError("exact='bitwise' inverts from the clean level only; pass level=None")
            return LatticeChain.from_clean(self.lattice_rule, network, x0)
        return MultistepChain(self.rows, network, {N: self._owned(x0)}, end=N)

    def chain_from_latent(self, latent: Latent, network: Optional[Network] = None) -> Chain:
        network = network or self.network(self.model_dtype or latent.dtype)
        if self.lattice_rule is not None:
            if not isinstance(latent, LatticeLatent):
                raise TypeError("exact='bitwise' samples only latents from exact='bitwise' inversion; "
                                "invert with the same exact= setting")
            return LatticeChain.from_latent(self.lattice_rule, network, latent)
        s = latent.level
        states = {s + i: self._owned(state) for i, state in enumerate(latent.states)}
        # A full window needs no start-up member in either direction.
        return MultistepChain(self.rows, network, states)

    def to_latent(self, chain: Chain, dtype: torch.dtype) -> Latent:
        if isinstance(chain, LatticeChain):
            return chain.to_latent(self.identity, self.schedule.fingerprint, dtype)
        return super().to_latent(chain, dtype)
