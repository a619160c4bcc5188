"""Issue 20, "Devices and defaults": the state dtype per device, one default grid, and the
growth warning for reversible gradients."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

import belm.solvers.base
import reference as ref
from belm import DDIM, EDICT, OBELM, Schedule
from belm.errors import GrowthWarning
from belm.schedule import EXACT_DEFAULT_SPACING, default_spacing, grid_timesteps, make_betas

SD_BETAS = make_betas("scaled_linear", 1000, 0.00085, 0.012)
DDPM_BETAS = make_betas("linear", 1000, 1e-4, 0.02)
X0 = torch.rand(2, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1     # float32: as on MPS


def eps(x, t):
    return ref.nonlinear_eps(x, t).to(x.dtype)


class StateDtypes(TorchFunctionMode):
    """Records the dtype of every tensor of the input's shape that a torch op returns (the states)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.dtypes = shape, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.shape == self.shape:
                self.dtypes.add(o.dtype)
        return out


@pytest.fixture
def no_float64(monkeypatch):
    """This CPU plays a device without float64 (Apple MPS), as far as belm asks."""
    monkeypatch.setattr(belm.solvers.base, "device_supports_float64", lambda device: False)


SCHED = Schedule.from_betas(SD_BETAS, 10, "trailing")
MAKERS = {"obelm": lambda **kw: OBELM(eps, SCHED, progress=False, **kw),
          "edict": lambda **kw: EDICT(eps, SCHED, progress=False, **kw),
          "ddim": lambda **kw: DDIM(eps, SCHED, progress=False, **kw)}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_without_float64_the_state_is_float32_and_said_once(no_float64, name):
    # Before: the float64 default state (x.to(torch.float64)) crashed on MPS.
    s = MAKERS[name]()
    with pytest.warns(UserWarning, match=r"device cpu has no float64: .* state_dtype=float32") as caught, \
            StateDtypes(X0.shape) as seen:
        latent = s.invert(X0)
        back = s.sample(latent)
    assert torch.float64 not in seen.dtypes and latent.states[0].dtype == torch.float32
    assert sum("no float64" in str(w.message) for w in caught) == 1               # once per sampler
    if s.invertible:
        assert (back - X0).abs().max() <= 1e-5                                       # float32 rounding
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                              # said already
        s.sample(latent)


def test_without_float64_reversible_gradients_run_in_float32(no_float64):
    s = MAKERS["obelm"]()
    x = X0.clone().requires_grad_()
    with pytest.warns(UserWarning, match="no float64"), StateDtypes(X0.shape) as seen:
        s.sample(x, grad="reversible").square().sum().backward()
    assert torch.float64 not in seen.dtypes and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


def test_without_float64_bitwise_mode_stays_bit_exact_on_its_int64_lattice(no_float64):
    s = MAKERS["obelm"](exact="bitwise")
    with warnings.catch_warnings(), StateDtypes(X0.shape) as seen:
        warnings.simplefilter("error")                  # nothing to say: the lattice is int64
        latent = s.invert(X0)
        back = s.sample(latent)
    assert torch.float64 not in seen.dtypes and latent.states[0].dtype == torch.int64
    assert torch.equal(back, X0)


def test_an_explicit_float64_state_on_a_device_without_it_is_refused(no_float64):
    with pytest.raises(TypeError, match="state_dtype=torch.float64: device cpu has no float64"):
        MAKERS["obelm"](state_dtype=torch.float64).invert(X0)


def test_with_float64_the_default_state_stays_float64():
    s = MAKERS["obelm"]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        latent = s.invert(X0)
    assert latent.states[0].dtype == torch.float64 and s.state_dtype is None
    assert MAKERS["obelm"](state_dtype=torch.float32).invert(X0).states[0].dtype == torch.float32


def test_from_betas_defaults_to_belms_trailing_grid():
    # Before: "linspace", where exact inversion grows by 10^3-10^4 on DDPM betas.
    assert inspect.signature(Schedule.from_betas).parameters["spacing"].default == EXACT_DEFAULT_SPACING
    assert EXACT_DEFAULT_SPACING == default_spacing("obelm") == "trailing"
    sched = Schedule.from_betas(DDPM_BETAS, 10)
    assert sched.timesteps.tolist() == grid_timesteps(1000, 10, "trailing").tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GrowthWarning)
        OBELM(eps, sched, progress=False).invert(X0.double())


def _gradient_error(spacing):
    """max |reversible − autograd| / max |autograd| of d(sum x_N²)/dx_T, float64, O-BELM, N = 10."""
    s = OBELM(eps, Schedule.from_betas(DDPM_BETAS, 10, spacing), progress=False)
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = []
    for mode in ("autograd", "reversible"):
        leaf = x.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GrowthWarning)
            s.sample(leaf, grad=mode).square().sum().backward()
        grads.append(leaf.grad)
    return float((grads[0] - grads[1]).abs().max() / grads[0].abs().max())


def test_reversible_sampling_warns_where_inversion_grows():
    # Before: no warning; the recovered states carry the inversion's growth.
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    s = OBELM(eps, Schedule.from_betas(DDPM_BETAS, 10, "linspace"), progress=False)
    with pytest.warns(GrowthWarning, match=r"multiplies the parasitic mode by .*grad='reversible'.*"
                                           r"spacing='trailing'") as caught:
        s.sample(x, grad="reversible").sum().backward()
    assert [w.filename for w in caught if w.category is GrowthWarning] == [__file__]   # the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error", GrowthWarning)
        OBELM(eps, Schedule.from_betas(DDPM_BETAS, 10, "trailing"), progress=False).sample(x, grad="reversible")
        s.sample(x, grad="autograd")            # autograd never inverts: nothing to say
    # what the warning is about (measured 1.1e-10 against 7.9e-14)
    assert _gradient_error("linspace") > 100 * _gradient_error("trailing")


def test_a_float64_latent_file_loads_as_float32_on_a_device_without_float64(tmp_path, monkeypatch):
    path = tmp_path / "lat.safetensors"
    OBELM(eps, SCHED, progress=False).invert(X0).save(path)                     # float64 states
    # torch's "meta" device plays MPS: float64 tensors cannot go there
    monkeypatch.setattr(belm.solvers.base, "device_supports_float64", lambda d: torch.device(d).type != "meta")
    loaded = belm.solvers.base.Latent.load(path, device="meta")
    assert loaded.states[0].dtype == torch.float32 and loaded.states[0].device.type == "meta"
