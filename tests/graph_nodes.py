"""Count autograd graph nodes still in memory (the memory a sampler keeps for backward).

``Tracked.apply(h)`` is an identity whose autograd node holds a token; ``Tracked.live`` is the
number of such nodes alive now and ``Tracked.peak`` the most seen since it was last reset.
Import from tests as ``from graph_nodes import Tracked`` (pytest puts tests/ on sys.path).
"""

import torch


class Tracked(torch.autograd.Function):
    """Identity whose autograd node holds a token: live tokens = graph nodes still in memory."""

    live = 0
    peak = 0

    class Token:
        def __init__(self):
            Tracked.live += 1
            Tracked.peak = max(Tracked.peak, Tracked.live)

        def __del__(self):
            Tracked.live -= 1

    @staticmethod
    def forward(ctx, h):
        ctx.token = Tracked.Token()
        return h.clone()

    @staticmethod
    def backward(ctx, g):
        return g
