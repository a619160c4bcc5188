"""Reversible backpropagation: exact gradients through a whole chain at O(k) memory.

``sample(x, grad="reversible")`` and ``invert(x0, grad="reversible")`` run the chain under
``no_grad`` and keep only its final window (k states). Backward walks the same chain the
other way with its exact inverse (:meth:`Chain.retreat` after sampling,
:meth:`Chain.advance` after inversion), and for each step re-runs that ONE step with autograd
on a temporary chain built from the recovered window: the very ``advance``/``retreat`` code
and coefficient rows the forward pass used, so the adjoint recurrence
g_{n−j} += A_j g_n + C_j J_f(x_{n−j})ᵀ g_n (MATH.md, "Reversible backpropagation") is
derived from the rows, with no hand-written adjoint per method.

What is differentiated:

- the input tensor (x, x0, or the float states of a :class:`~belm.solvers.base.Latent`);
- every leaf tensor requiring grad that the network uses (``nn.Module`` weights, a class or
  text embedding captured by ``eps_fn``). They are found once per call by evaluating the
  network at the input with autograd on and walking that graph to its leaves, and become
  inputs of the autograd Function: ``loss.backward()`` accumulates into their ``.grad``
  and ``torch.autograd.grad(loss, [param])`` works too. A captured *non-leaf* tensor (an
  embedding computed from a table outside ``eps_fn``) is differentiated through to its
  leaves; its outside graph must still exist when this backward runs (do not free it in
  an earlier backward, or compute it inside ``eps_fn``).

Start-up: the first k − 1 sampling steps from one noisy tensor (DDIM, then the lower
members) and the first k − 1 inversion steps from the clean input are not invertible; the
input tensor is kept (O(1)) and that part is recomputed forward with autograd.

Bitwise mode (``exact="bitwise"``): lattice rounding has no derivative. The gradient is
defined straight-through: that of the *float* relation (the same member rows) evaluated at
the lattice chain's states, which the backward walk recovers bit for bit. Inversion in
bitwise mode returns integer registers and cannot carry a gradient (refused); sampling a
lattice latent differentiates the network's parameters only.

Cost: forward N network calls plus one probe; backward per step one no-grad call to
recover the state and one call with autograd plus its vector–Jacobian product (k − 1 calls
for BELM(k ≥ 3), whose steps read f at k − 1 levels; EDICT two). Each result supports one
backward (the walk consumes the chain).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from belm.solvers.base import Callback, Latent, Sampler, check_tensor
from belm.solvers.bitwise import LatticeChain, LatticeLatent
from belm.solvers.chain import Chain, MultistepChain, Network

__all__ = ["ReversibleMixin", "network_leaves"]


def network_leaves(out: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors requiring grad that ``out``'s autograd graph reaches (in a fixed order)."""
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    stack = [out.grad_fn] if out.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)       # AccumulateGrad: a leaf
        if isinstance(variable, torch.Tensor):
            found.setdefault(id(variable), variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found.values())


# -- walks: the exact inverse direction, one window at a time --------------------------------
class _Walk:
    """Recovers the windows of a finished chain one step back, and re-runs one step with grad.

    ``pos`` is the chain's hi level after sampling, its lo level after inversion; ``window()``
    the differentiable state at ``pos`` (noisiest first); ``back()`` moves one step towards
    the start; ``step(leaves)`` maps the window at ``pos`` to the window one step forward.
    """

    def __init__(self, chain: Chain, direction: str, network: Network, rows: Optional[Sequence] = None) -> None:
        self.chain, self.direction, self.network, self.rows = chain, direction, network, rows

    @property
    def pos(self) -> int:
        return self.chain.hi if self.direction == "sample" else self.chain.lo

    def window(self) -> tuple[torch.Tensor, ...]:
        return self.chain.window()

    def back(self) -> None:
        if self.direction == "sample":
            self.chain.retreat()
        else:
            self.chain.advance()

    def _temp(self, leaves: Sequence[torch.Tensor], pos: int) -> Chain:
        chain = self.chain
        if isinstance(chain, MultistepChain):
            lo = pos - len(leaves) + 1 if self.direction == "sample" else pos
            # No start/end: the temporary chain steps with member k, as the walk inverted.
            return MultistepChain(chain.members, self.network, dict(zip(range(lo, lo + len(leaves)), leaves)))
        # EDICT's register pair (duck-typed: edict.py imports this module).
        return type(chain)(chain.shears, self.network, list(leaves), pos)

    def step(self, leaves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        temp = self._temp(leaves, self.pos)
        if self.direction == "sample":
            temp.advance()
        else:
            temp.retreat()
        return temp.window()


class _LatticeWalk(_Walk):
    """Sampling walk of a lattice chain: float windows (x_{n−1}, x_n) recovered bit for bit,
    stepped by the float member-2 rows (the straight-through gradient)."""

    def __init__(self, chain: LatticeChain, network: Network, rows: Sequence) -> None:
        super().__init__(chain, "sample", network, rows)
        self.hi_x = chain.x(chain.level)
        chain.retreat()
        self.lo_x = chain.x(chain.level)

    @property
    def pos(self) -> int:
        return self.chain.level + 1

    def window(self) -> tuple[torch.Tensor, ...]:
        return (self.lo_x, self.hi_x)

    def back(self) -> None:
        self.hi_x = self.lo_x
        self.chain.retreat()
        self.lo_x = self.chain.x(self.chain.level)

    def step(self, leaves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        n = self.pos
        temp = MultistepChain(self.rows, self.network, {n - 1: leaves[0], n: leaves[1]})
        temp.advance()
        return temp.window()


# -- the autograd Function ---------------------------------------------------------------------
class _Plan:
    """One reversible call: how to run the chain forward, and how to seed and walk it back."""

    def __init__(self, sampler: "ReversibleMixin", direction: str, level: int, callback: Optional[Callback],
                 latent: Optional[Latent], n_inputs: int, network: Network) -> None:
        self.sampler, self.direction, self.level, self.callback = sampler, direction, level, callback
        self.latent, self.n_inputs, self.network = latent, n_inputs, network
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.input_dtypes: list[torch.dtype] = []
        self.walk: Optional[_Walk] = None
        self.out_index = 0

    # forward ------------------------------------------------------------------------------
    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        s = self.sampler
        self.inputs = inputs
        self.input_dtypes = [t.dtype for t in inputs]
        if self.direction == "invert":
            chain = s._run_inversion(s.chain_from_clean(inputs[0], self.network), self.level, self.callback)
            outs = tuple(t.clone() for t in chain.window())
        else:
            if self.latent is not None:
                latent = self.latent if not inputs else self.latent.replace(states=inputs)
                chain = s.chain_from_latent(latent, self.network)
            else:
                chain = s.chain_from_noise(inputs[0], self.level, self.network)
            outs = (s._run_sampling(chain, self.callback).clone(),)
        rows = getattr(s, "rows", None)
        self.walk = _LatticeWalk(chain, self.network, rows) if isinstance(chain, LatticeChain) \
            else _Walk(chain, self.direction, self.network, rows)
        if self.direction == "sample":
            window = self.walk.window()
            # The output is the clean state: the window's last state, or EDICT's x register.
            self.out_index = 0 if not isinstance(chain, (MultistepChain, LatticeChain)) else len(window) - 1
        return outs

    # seeds: the non-invertible start, recomputed forward from the kept input ----------------
    def seed_pos(self) -> int:
        s, N, k = self.sampler, self.sampler.schedule.num_steps, self.sampler.num_states
        multistep = getattr(s, "rows", None) is not None
        if self.direction == "invert":
            return max(N - k + 1, self.level) if multistep else N
        if self.latent is not None:
            return self.latent.level + (1 if multistep else 0) if isinstance(self.latent, LatticeLatent) \
                else self.latent.level + (k - 1 if multistep else 0)
        return min(self.level + k - 1, N) if multistep else self.level

    def seed(self, leaves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The window at :meth:`seed_pos` as a differentiable function of the inputs."""
        s, N = self.sampler, self.sampler.schedule.num_steps
        rows = getattr(s, "rows", None)
        if self.latent is not None:
            return s.chain_from_latent(self.latent.replace(states=tuple(leaves)), self.network).window()
        if self.direction == "invert":
            chain = MultistepChain(rows, self.network, {N: s._owned(leaves[0])}, end=N) if rows is not None \
                else s.chain_from_clean(leaves[0], self.network)
            while chain.lo > self.seed_pos():
                chain.retreat()
            return chain.window()
        # A float chain even in bitwise mode: the straight-through start-up.
        chain = MultistepChain(rows, self.network, {self.level: s._owned(leaves[0])}, start=self.level) \
            if rows is not None else s.chain_from_noise(leaves[0], self.level, self.network)
        while chain.hi < self.seed_pos():
            chain.advance()
        return chain.window()

    # backward -------------------------------------------------------------------------------
    def backward(self, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
                 ) -> tuple[list[Optional[torch.Tensor]], list[Optional[torch.Tensor]]]:
        walk = self.walk
        if walk is None:
            raise RuntimeError("grad='reversible': backward through this result was already run (each result "
                               "supports one backward); sample again for another")
        self.walk = None
        window = walk.window()
        if self.direction == "sample":
            g = [torch.zeros_like(w, dtype=grads[0].dtype) for w in window]
            g[self.out_index] = grads[0]
        else:
            g = list(grads)
        param_grads: list[Optional[torch.Tensor]] = [None] * len(params)
        seed_pos = self.seed_pos()
        moving_back = (lambda: walk.pos > seed_pos) if self.direction == "sample" else (lambda: walk.pos < seed_pos)
        while moving_back():
            walk.back()
            leaves = [w.detach().clone().requires_grad_(True) for w in walk.window()]
            with torch.enable_grad():
                outs = walk.step(leaves)
            g = _vjp(outs, g, leaves, params, param_grads)
        input_grads: list[Optional[torch.Tensor]] = [None] * len(self.inputs)
        if self.inputs:
            leaves = [t.detach().requires_grad_(True) for t in self.inputs]
            with torch.enable_grad():
                outs = self.seed(leaves)
            input_grads = _vjp(outs, g, leaves, params, param_grads)
        self.inputs = ()
        return input_grads, param_grads


def _vjp(outs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], leaves: Sequence[torch.Tensor],
         params: Sequence[torch.Tensor], param_grads: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    """gᵀ ∂outs/∂(leaves, params): returns the leaves' gradients, adds the params' into param_grads.

    A state the step passes through unchanged (the same leaf object) takes its gradient
    directly: the A-part of the adjoint for the states that stay in the window.
    """
    leaf_grads: list[Optional[torch.Tensor]] = [None] * len(leaves)
    index = {id(leaf): i for i, leaf in enumerate(leaves)}
    graph_outs, graph_grads = [], []
    for out, g in zip(outs, grads):
        i = index.get(id(out))
        if i is not None:
            leaf_grads[i] = g.clone() if leaf_grads[i] is None else leaf_grads[i] + g
        elif out.requires_grad:
            graph_outs.append(out)
            graph_grads.append(g.to(out.dtype))
    if graph_outs:
        # retain_graph: a captured non-leaf conditioning tensor shares its outside graph with every step.
        found = torch.autograd.grad(graph_outs, list(leaves) + list(params), graph_grads, allow_unused=True,
                                    retain_graph=bool(params))
        for i, value in enumerate(found[:len(leaves)]):
            if value is not None:
                leaf_grads[i] = value if leaf_grads[i] is None else leaf_grads[i] + value
        for i, value in enumerate(found[len(leaves):]):
            if value is not None:
                param_grads[i] = value if param_grads[i] is None else param_grads[i] + value
    return [g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(leaf_grads, leaves)]


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, plan: _Plan, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.plan = plan
        ctx.params = tensors[plan.n_inputs:]
        return plan.forward(tuple(tensors[:plan.n_inputs]))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        plan, params = ctx.plan, ctx.params      # the plan drops its chain after one backward
        input_grads, param_grads = plan.backward(grads, params)
        return (None, *[None if g is None else g.to(dtype) for g, dtype in zip(input_grads, plan.input_dtypes)],
                *[None if g is None else g.to(p.dtype) for g, p in zip(param_grads, params)])


class ReversibleMixin:
    """``grad="reversible"`` for exactly invertible samplers (mixed into MultistepSampler and EDICT)."""

    def _reversible_sample(self: Any, x: torch.Tensor | Latent, from_level: int,
                           callback: Optional[Callback]) -> torch.Tensor:
        if not self.invertible:
            return Sampler._reversible_sample(self, x, from_level, callback)
        if isinstance(x, Latent):
            self.check_latent(x)
            inputs = () if isinstance(x, LatticeLatent) else tuple(x.states)
            level, latent, out_dtype, device = x.level, x, x.dtype, x.states[0].device
            probe_x = x.x
        else:
            check_tensor(x, "x")
            level, latent, out_dtype, device = self._level_arg(from_level, "from_level"), None, x.dtype, x.device
            inputs, probe_x = (x,), x
        out = self._reversible_apply("sample", level, callback, latent, inputs, probe_x, out_dtype)[0]
        return out.to(device=device, dtype=out_dtype)

    def _reversible_invert(self: Any, x0: torch.Tensor, to_level: int, callback: Optional[Callback]) -> Latent:
        if not self.invertible:
            return Sampler._reversible_sample(self, x0, to_level, callback)
        if self.exact == "bitwise":
            raise ValueError("grad='reversible' cannot differentiate invert() with exact='bitwise': its latent "
                             "holds integer lattice registers. Invert with exact='float' to optimize a latent "
                             "(sampling a bitwise latent with grad='reversible' differentiates the network's "
                             "parameters)")
        states = self._reversible_apply("invert", to_level, callback, None, (x0,), x0, x0.dtype)
        return Latent(tuple(states), to_level, self.identity, self.schedule.fingerprint, x0.dtype)

    def _reversible_apply(self: Any, direction: str, level: int, callback: Optional[Callback],
                          latent: Optional[Latent], inputs: tuple[torch.Tensor, ...], probe_x: torch.Tensor,
                          dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        # Sampling's backward pass inverts the chain (and an inversion is one): warn once when
        # this grid makes that amplify the parasitic mode. Stack: user → sample/invert → _reversible_* → here.
        self._warn_about_growth("reversible" if direction == "sample" else "invert", stacklevel=6)
        network = self.network(self.model_dtype or dtype)
        # One evaluation with autograd on finds the parameters the network uses.
        probe_level = self.schedule.num_steps if direction == "invert" else level
        with torch.enable_grad():
            params = [p for p in network_leaves(network(probe_x.detach().to(self.state_dtype_for(probe_x.device)), probe_level))
                      if p.is_floating_point()]
        plan = _Plan(self, direction, level, callback, latent, len(inputs), network)
        return _ReversibleFunction.apply(plan, *inputs, *params)
