"""Acceptance 2: every method equals a plain float64 implementation of MATH.md."""

import numpy as np
import pytest
import torch

import reference as ref
from belm import BDIA, DDIM, EDICT, OBELM, Schedule
from belm.schedule import make_betas

BETAS = make_betas("scaled_linear", 1000, 0.00085, 0.012)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.fixture(params=["linspace", "leading", "trailing"])
def spacing(request):
    return request.param


@pytest.mark.parametrize("N", [2, 3, 10, 50])
def test_methods_match_plain_implementation(spacing, N):
    ts = ref.grid(1000, N, spacing)
    sched = Schedule.from_betas(BETAS, N, spacing)
    assert sched.timesteps.tolist() == ts
    gen = torch.Generator().manual_seed(N)
    xT = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen)
    x0 = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen)
    f = ref.nonlinear_eps
    kw = dict(progress=False)

    # DDIM
    s = DDIM(f, sched, **kw)
    assert rel_err(s.sample(xT), ref.ddim_sample(f, BETAS, ts, xT)) < 1e-10
    assert rel_err(s.invert(x0).x, ref.ddim_invert(f, BETAS, ts, x0)) < 1e-10

    # O-BELM
    s = OBELM(f, sched, **kw)
    assert rel_err(s.sample(xT), ref.obelm_sample(f, BETAS, ts, xT)) < 1e-10
    lat = s.invert(x0)
    r0, r1 = ref.obelm_invert(f, BETAS, ts, x0)
    assert rel_err(lat.states[0], r0) < 1e-10 and rel_err(lat.states[1], r1) < 1e-10
    assert rel_err(s.sample(lat), ref.obelm_sample(f, BETAS, ts, pair=(r0, r1))) < 1e-10

    # BDIA
    for gamma in (1.0, 0.5):
        s = BDIA(f, sched, gamma=gamma, **kw)
        assert rel_err(s.sample(xT), ref.bdia_sample(f, BETAS, ts, gamma, xT)) < 1e-10
        lat = s.invert(x0)
        r0, r1 = ref.bdia_invert(f, BETAS, ts, gamma, x0)
        assert rel_err(lat.states[0], r0) < 1e-10 and rel_err(lat.states[1], r1) < 1e-10
        if gamma == 1.0 or N <= 10:
            # With γ = 0.5 the inverted pair grows like γ^−N (~1e13 at N = 50 here), so two
            # correct implementations of sampling from it agree only to ~1e-3 there.
            assert rel_err(s.sample(lat), ref.bdia_sample(f, BETAS, ts, gamma, pair=(r0, r1))) < 1e-10

    # EDICT
    s = EDICT(f, sched, p=0.93, **kw)
    assert rel_err(s.sample(xT), ref.edict_sample(f, BETAS, ts, 0.93, xT)[0]) < 1e-10
    lat = s.invert(x0)
    rx, ry = ref.edict_invert(f, BETAS, ts, 0.93, x0)
    assert rel_err(lat.states[0], rx) < 1e-10 and rel_err(lat.states[1], ry) < 1e-10
    assert rel_err(s.sample(lat), ref.edict_sample(f, BETAS, ts, 0.93, pair=(rx, ry))[0]) < 1e-10


def test_obelm_is_bdia_with_step_dependent_gamma():
    """MATH.md: O-BELM is BDIA with γ_k = (H_k/H_{k−1})² · alpha_{k+1}/alpha_{k−1}."""
    from belm.solvers.methods import bdia_relation, obelm_relation
    sched = Schedule.from_betas(BETAS, 20, "linspace")
    ob = obelm_relation(sched)
    H, alpha = sched.H, sched.alpha
    for n in range(2, 21):
        gamma = float((H[n - 1] / H[n - 2]) ** 2 * alpha[n] / alpha[n - 2])
        bd = bdia_relation(sched, gamma)
        assert torch.allclose(bd.a[n], ob.a[n], rtol=1e-12) and torch.allclose(bd.c[n], ob.c[n], rtol=1e-12)


def test_schedule_grids_match_diffusers_rules():
    for spacing in ("linspace", "leading", "trailing"):
        for N in (1, 7, 50, 999):
            assert Schedule.from_betas(BETAS, N, spacing).timesteps.tolist() == ref.grid(1000, N, spacing)
    sched = Schedule.from_betas(BETAS, 10, "leading", steps_offset=1)
    assert sched.timesteps.tolist() == ref.grid(1000, 10, "leading", offset=1)
    abar = np.cumprod(1 - BETAS)
    assert torch.allclose(sched.alpha[:-1], torch.tensor(np.sqrt(abar[ref.grid(1000, 10, "leading", 1)])))
    assert sched.alpha[-1] == 1 and sched.sigma[-1] == 0 and (sched.H > 0).all()
