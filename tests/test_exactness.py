"""Acceptance 3 and 4: exact round trips (hypothesis) and DDIM's measured inexactness."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from belm import BDIA, DDIM, EDICT, OBELM, Schedule
from belm.schedule import make_betas
from strategies import batch_shapes, beta_schedules, roundtrip_tolerance, spacings


def max_steps_well_conditioned(amplification_per_step: float, budget: float = 1e7) -> int:
    """Largest N with amplification^N ≤ budget: rounding (~1e-16) then stays ≤ ~1e-9."""
    return int(math.log(budget) / math.log(amplification_per_step))


# Inversion divides by γ (BDIA) or by p twice (EDICT) every step.
WELL_CONDITIONED = {
    "OBELM": 1000, "BDIA(gamma=1)": 1000,
    "BDIA(gamma=0.5)": max_steps_well_conditioned(1 / 0.5),        # 23
    "EDICT(p=0.93)": max_steps_well_conditioned(1 / 0.93**2),      # 111
}
MAKERS = {
    "OBELM": lambda f, s: OBELM(f, s, progress=False),
    "BDIA(gamma=1)": lambda f, s: BDIA(f, s, gamma=1.0, progress=False),
    "BDIA(gamma=0.5)": lambda f, s: BDIA(f, s, gamma=0.5, progress=False),
    "EDICT(p=0.93)": lambda f, s: EDICT(f, s, p=0.93, progress=False),
}


@pytest.mark.parametrize("method", list(MAKERS))
@given(betas=beta_schedules(), spacing=spacings, shape=batch_shapes,
       dtype=st.sampled_from([torch.float64, torch.float32]), data=st.data())
def test_round_trip_is_exact(method, betas, spacing, shape, dtype, data):
    T = len(betas)
    upper = min(T, WELL_CONDITIONED[method])
    # Mostly moderate N, sometimes the largest well-conditioned N.
    N = data.draw(st.one_of(st.integers(2, min(upper, 60)), st.just(upper)), label="N")
    sched = Schedule.from_betas(betas, N, spacing)
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    scale = data.draw(st.sampled_from([1e-3, 1.0, 3.0]), label="scale")
    x0 = (scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)
    to_level = data.draw(st.integers(0, N - 1), label="to_level")
    sampler = MAKERS[method](ref.nonlinear_eps, sched)
    lat = sampler.invert(x0, to_level=to_level)
    assert lat.level == to_level and lat.x.dtype == dtype
    back = sampler.sample(lat)
    assert back.dtype == dtype and back.shape == x0.shape
    assert (back - x0).abs().max().item() <= roundtrip_tolerance(x0, sched)


@pytest.mark.parametrize("method", ["OBELM", "BDIA(gamma=1)"])
def test_round_trip_at_1000_steps(method):
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    sched = Schedule.from_betas(betas, 1000, "linspace")
    x0 = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sampler = MAKERS[method](ref.nonlinear_eps, sched)
    assert (sampler.sample(sampler.invert(x0)) - x0).abs().max().item() <= 1e-9


def test_ill_conditioning_of_bdia_and_edict_beyond_their_range():
    """The documented limits are real: past them the float round trip is no longer exact."""
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    x0 = torch.randn(2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for method, N in (("BDIA(gamma=0.5)", 100), ("EDICT(p=0.93)", 500)):
        s = MAKERS[method](ref.nonlinear_eps, Schedule.from_betas(betas, N))
        try:
            err = (s.sample(s.invert(x0)) - x0).abs().max().item()
        except ValueError:      # the state overflowed: reported as NonFiniteError
            err = math.inf
        assert err > 1e-6, (method, N, err)


def test_ddim_inversion_is_not_exact():
    """Acceptance 4: DDIM's round trip error is measured, and it is far from rounding."""
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    x0 = torch.randn(2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    errors = {}
    for N in (10, 50, 200):
        s = DDIM(ref.nonlinear_eps, Schedule.from_betas(betas, N), progress=False)
        errors[N] = (s.sample(s.invert(x0)) - x0).abs().max().item()
    assert not DDIM(ref.nonlinear_eps, Schedule.from_betas(betas, 10)).invertible
    assert OBELM(ref.nonlinear_eps, Schedule.from_betas(betas, 10)).invertible
    # First order: error shrinks roughly like 1/N but stays many orders above rounding.
    assert errors[10] > errors[50] > errors[200] > 1e-4
    assert 2.0 < errors[10] / errors[50] < 12.0


@pytest.mark.parametrize("method", list(MAKERS))
def test_partial_sampling_continues_a_partial_inversion(method):
    """Freeze-step editing: invert to level k, sample from level k; and sampling a tensor from k."""
    betas = make_betas("linear", 1000, 1e-4, 0.02)
    sched = Schedule.from_betas(betas, 20, "leading")
    x0 = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    s = MAKERS[method](ref.nonlinear_eps, sched)
    for k in (0, 7, 18, 19):
        lat = s.invert(x0, to_level=k)
        assert lat.level == k
        assert (s.sample(lat) - x0).abs().max() < 1e-9
    # A tensor at level k is sampled with the remaining N − k steps only.
    from conftest import CountingEps
    f = CountingEps(ref.nonlinear_eps)
    s = MAKERS[method](f, sched)
    s.sample(lat.x, from_level=15)
    assert f.calls == (5 if not method.startswith("EDICT") else 10)
    assert f.timesteps[0] == int(sched.timesteps[15])
