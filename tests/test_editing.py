"""Issue 12: default grids per sampler, exactness on them, and the editing metrics of the apps."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from belm import Schedule
from belm.errors import GrowthWarning
from belm.schedule import default_spacing, grid_timesteps, make_betas
from belm.solvers.registry import make_sampler
from strategies import roundtrip_tolerance

EXACT = ["obelm", "bdia", "edict", "leapfrog3", "leapfrog3-scaled"]
SD_BETAS = make_betas("scaled_linear", 1000, 0.00085, 0.012)


class FakeScheduler:
    """What from_diffusers reads: SD 1.x's config (leading, offset 1)."""

    def __init__(self, betas, spacing="leading", offset=1):
        self.alphas_cumprod = torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)
        self.config = {"timestep_spacing": spacing, "steps_offset": offset}


@pytest.fixture(scope="module")
def digits():
    from belm.apps.models import load_model
    return load_model("digits")


def test_spacing_options_of_from_diffusers():
    sched = FakeScheduler(SD_BETAS)
    config = Schedule.from_diffusers(sched, 10)
    assert config.timesteps.tolist() == (grid_timesteps(1000, 10, "leading", 1)).tolist()     # None = config
    assert Schedule.from_diffusers(sched, 10, spacing="config") == config
    trailing = Schedule.from_diffusers(sched, 10, spacing="trailing")
    assert trailing.timesteps.tolist() == list(range(999, 0, -100))
    assert Schedule.from_diffusers(sched, 10, spacing="linspace").timesteps[-1] == 0
    with pytest.raises(ValueError, match="spacing must be None, 'config' or one of .*'trailing'"):
        Schedule.from_diffusers(sched, 10, spacing="uniform")
    for name in ["ddim"] + EXACT:
        assert default_spacing(name) == "trailing"
    with pytest.raises(ValueError, match="sampler_name"):
        default_spacing("")


def test_model_handle_schedule_defaults_per_sampler(digits):
    assert digits.scheduler.config.timestep_spacing == "leading"
    assert digits.schedule(10).timesteps.tolist() == list(range(999, 0, -100))
    assert digits.schedule(10, sampler="ddim") == digits.schedule(10, sampler="obelm")
    assert digits.schedule(10, "config").timesteps.tolist() == list(range(900, -1, -100))
    assert digits.schedule(10, "linspace").timesteps[-1] == 0


@pytest.mark.parametrize("name", EXACT)
@given(N=st.one_of(st.sampled_from([10, 20, 50]), st.integers(3, 200)),
       config=st.sampled_from(["digits", "sd"]), seed=st.integers(0, 2**31 - 1))
def test_round_trips_exact_on_the_default_grids(name, N, config, seed):
    if name == "edict":
        N = min(N, 111)      # EDICT's inversion multiplies rounding by p^-2 per step (test_exactness.py)
    if config == "digits":
        sched = Schedule.from_diffusers(FakeScheduler(make_betas("linear"), "leading", 0), N,
                                        spacing=default_spacing(name))
    else:
        sched = Schedule.from_diffusers(FakeScheduler(SD_BETAS), N, spacing=default_spacing(name))
    x0 = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    s = make_sampler(name, ref.nonlinear_eps, sched, progress=False)
    back = s.sample(s.invert(x0))
    assert (back - x0).abs().max().item() <= roundtrip_tolerance(x0, sched)


@pytest.mark.parametrize("name", ["obelm", "bdia"])
@pytest.mark.parametrize("N", [10, 20, 50])
def test_bitwise_round_trips_on_the_default_grid_with_the_digits_model(digits, name, N):
    sched = digits.schedule(N, sampler=name)
    x0 = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(N)) * 2 - 1
    s = make_sampler(name, digits.eps(3, 1.0), sched, progress=False, exact="bitwise")
    assert torch.equal(s.sample(s.invert(x0)), x0)


def test_edit_reports_success_change_and_latent_statistics(digits):
    from belm.apps import tasks
    from belm.models import digits_dataset
    images, labels = digits_dataset("heldout")
    threes = images[labels == 3][:8]
    out = tasks.edit(digits, threes, 3, 8, steps=10, progress=False)
    assert out["images"].shape == threes.shape
    assert out["success_rate"] >= 0.75 and out["predicted"].shape == (8,)
    assert 0.5 <= out["latent_std"] <= 1.5 and out["latent_max_abs"] < 8
    expected_l2 = (out["images"].double() - threes.double()).flatten(1).norm(dim=1).mean().item()
    assert out["change_l2"] == pytest.approx(expected_l2, rel=1e-12)
    assert 5 < out["change_psnr"] < 40
    # On the config's leading grid the exact latent is not noise-like, and belm says so.
    with pytest.warns(GrowthWarning, match="spacing='trailing'"):
        bad = tasks.edit(digits, threes, 3, 8, steps=10, spacing="config", progress=False)
    assert bad["latent_std"] > 10


def test_interpolate_reports_endpoints_confidence_fd_and_latent_statistics(digits):
    from belm.apps import tasks
    from belm.models import digits_dataset
    images, labels = digits_dataset("heldout")
    a, b = images[:3], images[10:13]
    with warnings.catch_warnings():
        warnings.simplefilter("error", GrowthWarning)          # the default grid does not warn
        out = tasks.interpolate(digits, a, b, steps=10, weights=[0.0, 0.25, 0.5, 0.75, 1.0], progress=False)
    frames = out["frames"]
    assert frames.shape == (5, 3, 1, 16, 16) and out["weights"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert out["endpoint_max_abs_error"] <= 1e-5
    assert max((frames[0] - a).abs().max(), (frames[-1] - b).abs().max()) <= 1e-5
    assert (frames[2] - a).abs().max() > 0.1
    assert 0.1 <= out["middle_confidence"] <= 1.0
    assert math.isfinite(out["middle_fd"]) and out["middle_fd"] > 0
    assert out["latent_std"] < 1.5
    only_middle = tasks.interpolate(digits, a[:1], b[:1], steps=10, weights=[0.5], progress=False)
    assert only_middle["endpoint_max_abs_error"] is None and "middle_fd" not in only_middle
    with pytest.raises(ValueError, match="weights must be"):
        tasks.interpolate(digits, a, b, steps=10, weights=[1.5], progress=False)
    with pytest.raises(ValueError, match="same shape"):
        tasks.interpolate(digits, a, b[:2], steps=10, progress=False)
