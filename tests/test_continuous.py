"""Continuous-σ schedules: Schedule.from_sigmas (flow / VE / VP), Schedule.karras and
Schedule.from_diffusers on diffusers' FlowMatchEulerDiscreteScheduler."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from belm import Schedule
from belm.schedule import ContinuousSchedule, karras_sigmas

FLOW = [1.0, 0.75, 0.5, 0.2, 0.05]


def test_flow_coordinates_are_x_and_sigma():
    s = Schedule.from_sigmas(FLOW, kind="flow")
    assert isinstance(s, Schedule) and s.kind == "flow" and s.output == "velocity"
    assert s.num_steps == 5
    assert s.sigmas.tolist() == FLOW + [0.0]
    assert torch.equal(s.scale, torch.ones(6, dtype=torch.float64))
    assert torch.equal(s.tau, s.sigmas)
    assert torch.equal(s.H, s.tau[:-1] - s.tau[1:]) and bool((s.H > 0).all())
    # physical path x = (1 − σ)·x0 + σ·z, what adapters use to convert v into ε or x0
    assert torch.equal(s.alpha, 1.0 - s.sigmas) and torch.equal(s.sigma, s.sigmas)
    assert s.sigma_bar[0] == math.inf and s.sigma_bar[1].item() == 0.75 / 0.25
    t = s.model_time(1)
    assert t.dtype == torch.float64 and t.dim() == 0 and t.item() == 0.75
    assert s.model_time(0).item() == 1.0 and s.model_time(5).item() == 0.0  # clean level: σ = 0
    assert s.timestep(2) == 0.5 and s.timestep(5) == 0.0


def test_ve_and_vp_coordinates():
    sig = [80.0, 10.0, 1.0, 0.1]
    ve = Schedule.from_sigmas(sig, kind="ve")
    assert ve.output == "eps" and torch.equal(ve.scale, torch.ones(5, dtype=torch.float64))
    assert torch.equal(ve.tau, torch.tensor(sig + [0.0], dtype=torch.float64))
    assert torch.equal(ve.sigma_bar, ve.tau) and torch.equal(ve.alpha, ve.scale)
    vp = Schedule.from_sigmas(sig, kind="vp")
    alpha = 1 / torch.sqrt(1 + torch.tensor(sig + [0.0], dtype=torch.float64) ** 2)
    assert torch.equal(vp.scale, alpha) and torch.equal(vp.alpha, alpha)
    assert torch.equal(vp.tau, ve.tau) and torch.equal(vp.sigma_bar, ve.tau)
    assert torch.allclose(vp.alpha**2 + vp.sigma**2, torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-15)
    # Default clean_sigma for VE/VP: the last noisy level (ε of an EDM denoiser is 0/0 at σ = 0).
    assert ve.model_time(4).item() == 0.1 and vp.timestep(4) == 0.1
    assert Schedule.from_sigmas(sig, kind="ve", clean_sigma=0.0).model_time(4).item() == 0.0


@pytest.mark.parametrize("sigmas, kind, match", [
    ([1.0, 0.5, 0.5], "flow", "strictly decreasing"),
    ([0.5, 0.7], "flow", "strictly decreasing"),
    ([1.0, 0.5, 0.0], "flow", "drop a trailing 0"),
    ([1.5, 0.5], "flow", r"\(0, 1\]"),
    ([2.0, -1.0], "ve", "> 0"),
    ([1.0, float("nan")], "ve", "NaN"),
    ([[1.0, 0.5]], "ve", "1-D"),
    ([1.0, 0.5], "edm", "kind must be one of"),
])
def test_bad_sigmas_are_named(sigmas, kind, match):
    with pytest.raises(ValueError, match=match):
        Schedule.from_sigmas(sigmas, kind=kind)


def test_bad_clean_sigma_is_named():
    with pytest.raises(ValueError, match="clean_sigma"):
        Schedule.from_sigmas([1.0, 0.5], kind="ve", clean_sigma=0.6)
    with pytest.raises(ValueError, match="clean_sigma"):
        Schedule.from_sigmas([1.0, 0.5], kind="flow", clean_sigma=-1e-3)


@given(st.lists(st.floats(1e-4, 1.0), min_size=2, max_size=30, unique=True), st.data())
def test_fingerprint_changes_with_one_bit_of_any_sigma(values, data):
    sig = sorted(values, reverse=True)
    base = Schedule.from_sigmas(sig, kind="flow")
    i = data.draw(st.integers(0, len(sig) - 1))
    nudged = list(sig)
    nudged[i] = float(np.nextafter(sig[i], 0.0))
    if (i + 1 < len(sig) and nudged[i] <= sig[i + 1]):
        return  # the nudge would break strict decrease; nothing to compare
    other = Schedule.from_sigmas(nudged, kind="flow")
    assert other.fingerprint != base.fingerprint and other != base
    assert Schedule.from_sigmas(sig, kind="flow") == base
    assert Schedule.from_sigmas(sig, kind="ve").fingerprint != Schedule.from_sigmas(sig, kind="vp").fingerprint


def test_karras_grid_is_edm_formula():
    s = Schedule.karras(18, 0.002, 80.0)
    assert s.kind == "ve" and s.num_steps == 18
    i = np.arange(18)
    expect = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s.timesteps.numpy(), expect, rtol=1e-14, atol=0)
    assert s.timesteps[0].item() == 80.0 and s.sigmas[-1].item() == 0.0
    assert math.isclose(s.timesteps[-1].item(), 0.002, rel_tol=1e-12)
    assert karras_sigmas(1, 0.1, 5.0).tolist() == [5.0]
    assert Schedule.karras(4, 0.1, 5.0, kind="vp").kind == "vp"
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        Schedule.karras(10, 1.0, 0.5)
    with pytest.raises(ValueError, match="num_steps"):
        Schedule.karras(0, 0.1, 1.0)


FLOW_CONFIGS = [
    (dict(), None),
    (dict(shift=3.0), None),
    (dict(use_dynamic_shifting=True), 0.8),
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), 1.7),
    (dict(shift=3.0, shift_terminal=0.02), None),
    (dict(num_train_timesteps=500, shift=1.5), None),
]


@pytest.mark.parametrize("config, mu", FLOW_CONFIGS)
@pytest.mark.parametrize("N", [2, 7, 28, 160, 1000])
def test_from_diffusers_flow_matches_set_timesteps_bitwise(config, mu, N):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(**config)
    ours = Schedule.from_diffusers(sched, num_steps=N, mu=mu)
    sched.set_timesteps(N, mu=mu)
    assert ours.kind == "flow" and ours.num_steps == N
    assert torch.equal(ours.sigmas, sched.sigmas.to(torch.float64))
    # the network timestep diffusers uses is σ·T; ours is σ itself
    assert torch.equal((ours.timesteps.float() * sched.config.num_train_timesteps), sched.timesteps)


def test_from_diffusers_flow_errors_name_the_fix():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="pass mu="):
        Schedule.from_diffusers(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), num_steps=10)
    with pytest.raises(ValueError, match="drop mu"):
        Schedule.from_diffusers(FlowMatchEulerDiscreteScheduler(shift=3.0), num_steps=10, mu=0.5)
    with pytest.raises(ValueError, match="from_sigmas"):
        Schedule.from_diffusers(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), num_steps=10)
    with pytest.raises(ValueError, match="flow-matching"):
        Schedule.from_diffusers(DDIMScheduler(), num_steps=10, mu=0.5)
    # the discrete path is untouched
    assert Schedule.from_diffusers(DDIMScheduler(), num_steps=10).kind == "discrete"


def test_continuous_schedule_is_a_schedule_with_its_own_repr():
    s = ContinuousSchedule(FLOW, "flow")
    assert s == Schedule.from_sigmas(FLOW) and hash(s) == hash(Schedule.from_sigmas(FLOW))
    assert "kind='flow'" in repr(s) and "N=5" in repr(s)
