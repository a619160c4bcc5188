"""Reversible backpropagation (grad="reversible"): the gradients of plain autograd at O(k) memory.

Every comparison is against grad="autograd" on the same sampler, input and loss: gradients
w.r.t. the input (tensor, latent states) and w.r.t. every parameter the network uses.
Tolerances (issue 14): ≤ 1e-10 relative in float64, ≤ 1e-4 relative in float32. The only
difference between the two is that reversible recovers the states by exact inversion
(float rounding of the inverse, amplified at most p^−2N for EDICT); a wrong adjoint
coefficient, a missed parameter or a skipped start-up step is an O(1) error.
"""

from __future__ import annotations

import pytest
import torch

from graph_nodes import Tracked
from hypothesis import given
from hypothesis import strategies as st

from belm import BDIA, BELM, DDIM, EDICT, OBELM, Schedule
from belm.adapters import DiffusersEps
from belm.schedule import make_betas
from belm.solvers.reversible import network_leaves
from strategies import beta_schedules, spacings
from tiny_models import tiny_unet

SD_BETAS = make_betas("scaled_linear", 1000, 0.00085, 0.012)
METHODS = {"OBELM": (OBELM, {}), "BDIA": (BDIA, {"gamma": 0.9}), "EDICT": (EDICT, {})}
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _flat(grads, like=None) -> torch.Tensor:
    """One float64 vector; a parameter the loss does not reach (grad None) counts as zeros."""
    like = like if like is not None else grads
    return torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1).double()
                      for g, t in zip(grads, like)])


class _MLP(torch.nn.Module):
    """A small nonlinear ε with a time dependence and a class embedding (a captured tensor)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.lin1 = torch.nn.Linear(4, 16, dtype=dtype)
        self.lin2 = torch.nn.Linear(16, 4, dtype=dtype)

    def forward(self, x, t):
        return self.lin2(torch.tanh(self.lin1(x) + t.to(x.dtype) / 1000))


def _grads(sampler, x, params, loss_fn, mode, *, invert=False, latent=None):
    """(output, d loss/d inputs, d loss/d params) with grad=mode."""
    for p in params:
        p.grad = None
    if latent is not None:
        inputs = [s.clone().requires_grad_(True) for s in latent.states]
        out = sampler.sample(latent.replace(states=inputs), grad=mode)
    else:
        inputs = [x.clone().requires_grad_(True)]
        out = sampler.invert(inputs[0], grad=mode) if invert else sampler.sample(inputs[0], grad=mode)
    outs = out.states if invert else (out,)
    loss = sum(loss_fn(o) for o in outs)
    loss.backward()
    return (torch.cat([o.detach().reshape(-1) for o in outs]), _flat([i.grad for i in inputs]),
            _flat([p.grad for p in params], params))


def _check(sampler, x, params, dtype, loss_fn=lambda o: (o.double().sin() * o.double()).sum(), **kw):
    out_a, gx_a, gp_a = _grads(sampler, x, params, loss_fn, "autograd", **kw)
    out_r, gx_r, gp_r = _grads(sampler, x, params, loss_fn, "reversible", **kw)
    assert torch.equal(out_a, out_r)
    assert _rel(gx_r, gx_a) <= TOL[dtype], _rel(gx_r, gx_a)
    assert _rel(gp_r, gp_a) <= TOL[dtype], _rel(gp_r, gp_a)
    assert float(gx_a.norm()) > 0 and float(gp_a.norm()) > 0


# -- small MLP: every entry point --------------------------------------------------------------
@pytest.mark.parametrize("name", ["OBELM", "BDIA", "EDICT", "BELM3"])
@pytest.mark.parametrize("entry", ["sample", "invert", "latent", "from_level"])
def test_gradients_equal_autograd_every_entry_point(name, entry):
    net = _MLP()
    cls, kw = (BELM, {"rule": "leapfrog3"}) if name == "BELM3" else METHODS[name]
    s = cls(net, Schedule.from_betas(SD_BETAS, 12), progress=False, **kw)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = list(net.parameters())
    if entry == "latent":
        _check(s, None, params, torch.float64, latent=s.invert(x, to_level=2))
    elif entry == "from_level":
        out_a = s.sample(x.clone().requires_grad_(True), from_level=4, grad="autograd")
        xr = x.clone().requires_grad_(True)
        out_r = s.sample(xr, from_level=4, grad="reversible")
        xa = x.clone().requires_grad_(True)
        s.sample(xa, from_level=4, grad="autograd").square().sum().backward()
        out_r.square().sum().backward()
        assert torch.equal(out_a.detach(), out_r.detach()) and _rel(xr.grad, xa.grad) <= 1e-10
    else:
        _check(s, x, params, torch.float64, invert=entry == "invert")


def test_bitwise_sampling_is_the_float_gradient_straight_through():
    """exact='bitwise': the float relation's gradient at the lattice states (bit for bit the
    forward ones), so it matches float autograd to the lattice resolution (2^-20 relative
    at worst by construction; here far finer)."""
    net = _MLP()
    sched = Schedule.from_betas(SD_BETAS, 10)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    params = list(net.parameters())
    loss_fn = lambda o: (o.sin() * o).sum()  # noqa: E731
    _, gx_a, gp_a = _grads(OBELM(net, sched, progress=False), x, params, loss_fn, "autograd")
    bitwise = OBELM(net, sched, progress=False, exact="bitwise")
    _, gx_r, gp_r = _grads(bitwise, x, params, loss_fn, "reversible")
    assert _rel(gx_r, gx_a) <= 2.0**-20 and _rel(gp_r, gp_a) <= 2.0**-20
    for level in (3, 9):                                          # start-up away from level 0, one step
        xa, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        OBELM(net, sched, progress=False).sample(xa, from_level=level, grad="autograd").sin().sum().backward()
        seen = []
        bitwise.sample(xr, from_level=level, grad="reversible", callback=lambda e: seen.append(e["level"])) \
            .sin().sum().backward()
        assert seen == list(range(level + 1, 11)) and _rel(xr.grad, xa.grad) <= 2.0**-20
    # A bitwise latent: parameters only (its states are integer registers).
    lat = bitwise.invert(x)
    for p in params:
        p.grad = None
    out = bitwise.sample(lat, grad="reversible")
    assert torch.equal(out.detach(), x)                          # still bit-exact
    out.square().sum().backward()
    assert all(p.grad is not None and float(p.grad.norm()) > 0 for p in params)
    with pytest.raises(ValueError, match="exact='bitwise'.*integer lattice registers"):
        bitwise.invert(x, grad="reversible")


def test_ddim_refuses_and_autograd_grad_sees_parameters():
    net = _MLP()
    sched = Schedule.from_betas(SD_BETAS, 8)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="grad='reversible' needs an exactly invertible method; DDIM"):
        DDIM(net, sched, progress=False).sample(x, grad="reversible")
    with pytest.raises(ValueError, match="grad='reversible' needs an exactly invertible method; DDIM"):
        DDIM(net, sched, progress=False).invert(x, grad="reversible")
    s = OBELM(net, sched, progress=False)
    w = net.lin1.weight
    ga = torch.autograd.grad(s.sample(x, grad="autograd").sum(), [x, w])
    gr = torch.autograd.grad(s.sample(x, grad="reversible").sum(), [x, w])
    assert all(_rel(r, a) <= 1e-10 for r, a in zip(gr, ga))
    out = s.sample(x, grad="reversible")
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already run"):
        out.sum().backward()


def test_captured_conditioning_tensor_gets_its_gradient():
    """A class embedding captured by eps_fn (a leaf, and a non-leaf computed from a table)."""
    net = _MLP()
    table = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    sched = Schedule.from_betas(SD_BETAS, 10)
    x = torch.randn(2, 4, dtype=torch.float64)
    grads = {}
    for mode in ("autograd", "reversible"):
        emb = table[3] * 2.0                                    # non-leaf, graph outside eps_fn
        s = EDICT(lambda x, t: net(x + emb, t), sched, progress=False)
        table.grad = None
        s.sample(x, grad=mode).square().sum().backward()
        grads[mode] = table.grad.clone()
    assert float(grads["autograd"].norm()) > 0 and _rel(grads["reversible"], grads["autograd"]) <= 1e-10


# -- the tiny diffusers UNet and the bundled digits model ----------------------------------------
def _unet_eps(dtype, class_conditional=False):
    unet, sched = tiny_unet()
    unet = unet.to(dtype)
    return unet, DiffusersEps(unet, sched, differentiable=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [10, pytest.param(50, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(METHODS))
def test_tiny_unet_gradients_equal_autograd(name, N, dtype):
    unet, eps = _unet_eps(dtype)
    cls, kw = METHODS[name]
    s = cls(eps, Schedule.from_betas(SD_BETAS, N), progress=False, **kw)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(N)).to(dtype)
    _check(s, x, list(unet.parameters()), dtype)


@pytest.fixture(scope="module")
def digits():
    from belm.models import load_digits_unet
    return load_digits_unet(dtype=torch.float32)


@pytest.mark.parametrize("dtype,N", [(torch.float32, 10), pytest.param(torch.float32, 50, marks=pytest.mark.slow),
                                     (torch.float64, 10)])
@pytest.mark.parametrize("name", list(METHODS))
def test_digits_model_gradients_equal_autograd(digits, name, N, dtype):
    unet, scheduler = digits
    unet = unet.to(dtype).requires_grad_(True)      # the loader freezes it
    try:
        eps = DiffusersEps(unet, scheduler, class_labels=3, differentiable=True)
        cls, kw = METHODS[name]
        s = cls(eps, Schedule.from_diffusers(scheduler, N), progress=False, **kw)
        x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(N)).to(dtype)
        # The loss a classifier-guidance user would write: a linear read-out of the image.
        weights = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        _check(s, x, list(unet.parameters()), dtype, loss_fn=lambda o: (o.double() * weights).sum())
    finally:
        unet.to(torch.float32).requires_grad_(False)


@given(betas=beta_schedules(), spacing=spacings, N=st.integers(2, 12), name=st.sampled_from(list(METHODS)),
       seed=st.integers(0, 2**16))
def test_random_schedules_gradients_equal_autograd(betas, spacing, N, name, seed):
    net = _MLP()
    cls, kw = METHODS[name]
    s = cls(net, Schedule.from_betas(betas, N, spacing), progress=False, **kw)
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    _check(s, x, list(net.parameters()), torch.float64)


# -- memory: O(k), not O(N) ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(METHODS))
def test_live_graph_nodes_do_not_grow_with_N(name):
    net = _MLP()

    def eps(x, t):
        return Tracked.apply(net(x, t))

    peaks = {}
    for mode in ("reversible", "autograd"):
        for N in (10, 40):
            cls, kw = METHODS[name]
            s = cls(eps, Schedule.from_betas(SD_BETAS, N), progress=False, **kw)
            Tracked.live = Tracked.peak = 0
            x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
            s.sample(x, grad=mode).square().sum().backward()
            peaks[mode, N] = Tracked.peak
            assert Tracked.live == 0 and x.grad is not None
    calls = 2 if name == "EDICT" else 1                          # network calls per step
    # reversible: the parameter probe, or one re-run step (plus the k−1 start-up steps).
    assert peaks["reversible", 10] == peaks["reversible", 40] <= calls * 2
    assert peaks["autograd", 10] == 10 * calls and peaks["autograd", 40] == 40 * calls


def test_network_leaves_finds_weights_and_captured_leaves_only():
    net = _MLP()
    emb = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    frozen = torch.ones(4, dtype=torch.float64)
    out = net(torch.randn(2, 4, dtype=torch.float64) + emb + frozen, torch.tensor(5))
    found = network_leaves(out)
    assert {id(t) for t in found} == {id(p) for p in net.parameters()} | {id(emb)}
    assert network_leaves(torch.ones(2)) == []
