"""Acceptance 6: network calls per method for sample, invert and sample(latent)."""

import pytest
import torch

import reference as ref
from belm import BDIA, DDIM, EDICT, OBELM, Schedule
from belm.schedule import make_betas
from conftest import CountingEps

BETAS = make_betas("linear", 1000, 1e-4, 0.02)


@pytest.mark.parametrize("N", [2, 3, 10, 25])
@pytest.mark.parametrize("make, expected", [
    (lambda f, s: DDIM(f, s, progress=False), lambda N: (N, N, N)),
    (lambda f, s: OBELM(f, s, progress=False), lambda N: (N, N, N - 1)),
    (lambda f, s: BDIA(f, s, gamma=0.7, progress=False), lambda N: (N, N, N - 1)),
    (lambda f, s: EDICT(f, s, progress=False), lambda N: (2 * N, 2 * N, 2 * N)),
])
def test_network_calls(N, make, expected):
    sched = Schedule.from_betas(BETAS, N)
    x = torch.randn(2, 3, dtype=torch.float64)
    counts = []
    f = CountingEps(ref.nonlinear_eps)
    s = make(f, sched)
    s.sample(x)
    counts.append(f.calls)
    f.calls = 0
    lat = s.invert(x)
    counts.append(f.calls)
    f.calls = 0
    s.sample(lat)
    counts.append(f.calls)
    assert tuple(counts) == expected(N)


def test_inversion_evaluates_clean_level_at_timestep_1():
    sched = Schedule.from_betas(BETAS, 10)
    f = CountingEps(ref.nonlinear_eps)
    OBELM(f, sched, progress=False).invert(torch.randn(1, 4, dtype=torch.float64))
    assert f.timesteps[0] == 1
    assert f.timesteps[1:] == sched.timesteps.tolist()[1:][::-1]
