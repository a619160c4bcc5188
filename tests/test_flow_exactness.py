"""Issue 13 acceptance, exactness on flow schedules that start at σ = 1 (pure noise, α = 0).

- O-BELM and BDIA(γ = 1) round trips ≤ 1e-12 in a float64 state, N = 10 … 1000;
- ``exact="bitwise"``: torch.equal for float32 and bfloat16 networks;
- EDICT, partial ranges, the callback and the latent on flow and Karras schedules.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from belm import BDIA, EDICT, OBELM, Schedule
from belm.analytic import FlowGaussianMixture, VEGaussianMixture

GM = FlowGaussianMixture.default(dim=2, std=0.5)


def flow_grid(N, shift=1.0, mu=None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(use_dynamic_shifting=True) if mu is not None else dict(shift=shift)
    return Schedule.from_diffusers(FlowMatchEulerDiscreteScheduler(**config), num_steps=N, mu=mu)


def velocity_in_dtype(x, t):
    # like a real network: computes and answers in its input's dtype
    return GM.velocity(x, t).to(x.dtype)


@pytest.mark.parametrize("N", [10, 100, 1000])
@pytest.mark.parametrize("shift", [1.0, 3.0])


@pytest.mark.parametrize("method", ["OBELM", "BDIA"])
def test_float64_round_trip_from_sigma_one(N, shift, method):
    sched = flow_grid(N, shift)
    assert sched.sigmas[0].item() == 1.0 and sched.alpha[0].item() == 0.0
    x0 = GM.sample_data(32, seed=N)
    s = OBELM(GM.fn(), sched, progress=False) if method == "OBELM" else \
        BDIA(GM.fn(), sched, gamma=1.0, progress=False)
    lat = s.invert(x0)
    assert lat.level == 0 and torch.isfinite(lat.x).all()
    # the latent is noise-like: a flow at σ = 1 has forgotten x0's modes (|x| ~ N(0, I))
    assert lat.x.std().item() > 0.5
    assert (s.sample(lat) - x0).abs().max().item() <= 1e-12


@given(N=st.integers(2, 120), shift=st.floats(0.5, 6.0), to_level=st.integers(0, 119),
       seed=st.integers(0, 2**31 - 1))


def test_float64_round_trip_partial_ranges(N, shift, to_level, seed):
    sched = flow_grid(N, shift)
    to_level = to_level % N
    x0 = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    s = OBELM(GM.fn(), sched, progress=False)
    lat = s.invert(x0, to_level=to_level)
    assert lat.level == to_level
    assert (s.sample(lat) - x0).abs().max().item() <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, method", [(10, "OBELM"), (10, "BDIA"), (200, "OBELM"), (200, "BDIA"), (1000, "OBELM")])


def test_bitwise_round_trip(dtype, N, method):
    sched = flow_grid(N, 3.0)
    x0 = GM.sample_data(16, seed=1).to(dtype)
    make = OBELM if method == "OBELM" else (lambda f, s, **k: BDIA(f, s, gamma=1.0, **k))
    s = make(velocity_in_dtype, sched, progress=False, exact="bitwise")
    lat = s.invert(x0)
    back = s.sample(lat)
    assert back.dtype == dtype and torch.equal(back, x0)
    if dtype == torch.float32:
        # the lattice chain is the float chain up to rounding: same latent, on the flow's σ grid
        ref = (OBELM if method == "OBELM" else (lambda f, s, **k: BDIA(f, s, gamma=1.0, **k)))(
            velocity_in_dtype, sched, progress=False).invert(x0)
        assert (lat.x - ref.x).abs().max().item() <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_round_trip_with_dynamic_shift_and_karras(dtype):
    x0 = GM.sample_data(8, seed=2).to(dtype)
    s = OBELM(velocity_in_dtype, flow_grid(28, mu=1.15), progress=False, exact="bitwise")
    assert torch.equal(s.sample(s.invert(x0)), x0)
    ve = VEGaussianMixture.default(dim=2, std=0.5)
    s = OBELM(lambda x, t: ve.eps_ve(x, t).to(x.dtype), Schedule.karras(30, 0.002, 80.0), progress=False,
              exact="bitwise")
    assert torch.equal(s.sample(s.invert(x0)), x0)


def test_edict_round_trip_on_a_flow():
    sched = flow_grid(50, 3.0)
    x0 = GM.sample_data(8, seed=3)
    s = EDICT(GM.fn(), sched, progress=False)
    assert (s.sample(s.invert(x0)) - x0).abs().max().item() <= 1e-9


def test_callback_and_network_time_on_a_flow():
    sched = flow_grid(6, 3.0)
    seen, events = [], []

    def velocity(x, t):
        seen.append(t)
        return GM.velocity(x, t)

    s = OBELM(velocity, sched, progress=False)
    x0 = GM.sample_data(3, seed=4)
    lat = s.invert(x0, callback=events.append)
    # inversion's first step evaluates at the clean level: σ = 0 for a flow
    assert seen[0].item() == 0.0 and seen[0].dtype == torch.float64 and seen[0].dim() == 0
    assert sorted({t.item() for t in seen}) == sorted(sched.sigmas[1:].tolist())
    assert [e["level"] for e in events] == [5, 4, 3, 2, 1, 0]
    assert [e["timestep"] for e in events] == [sched.timestep(k) for k in range(5, -1, -1)]
    assert len(seen) == 6                                  # one network call per step
    s.sample(lat)
    assert len(seen) == 6 + 5                              # sample(latent): N − 1 calls


@pytest.mark.parametrize("clean_sigma", [None, 0.0])
def test_karras_inversion_first_call_uses_clean_sigma(clean_sigma):
    ve = VEGaussianMixture.default(dim=2, std=0.5)
    sched = Schedule.karras(8, 0.002, 80.0, clean_sigma=clean_sigma)
    seen = []

    def eps(x, t):
        seen.append(t.item())
        return ve.eps_ve(x, t)

    s = OBELM(eps, sched, progress=False)
    x0 = ve.sample_data(4, seed=5)
    lat = s.invert(x0)
    # default: the last noisy level σ_{N−1} (EDM's c_noise = ln σ / 4 is −∞ at 0); or what was asked
    assert seen[0] == (sched.timesteps[-1].item() if clean_sigma is None else 0.0)
    assert (s.sample(lat) - x0).abs().max().item() <= 1e-12
