"""BELM(k) built from belm.lte rules: equal to O-BELM for k = 2, exact, stability checked."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from belm import BELM, OBELM, Schedule, UnstableRuleError
from belm.lte import derive_belm
from belm.schedule import make_betas
from conftest import CountingEps
from strategies import beta_schedules, spacings


@given(betas=beta_schedules(), spacing=spacings, data=st.data())
def test_belm_k2_is_obelm(betas, spacing, data):
    N = data.draw(st.integers(2, min(len(betas), 80)))
    sched = Schedule.from_betas(betas, N, spacing)
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(N))
    b, o = BELM(ref.nonlinear_eps, sched, k=2, progress=False), OBELM(ref.nonlinear_eps, sched, progress=False)
    # Same coefficients up to rounding of two different formulas (derived vs hand-written).
    a_b, a_o = b.members[1].a[2:], o.members[1].a[2:]
    c_b, c_o = b.members[1].c[2:], o.members[1].c[2:]
    assert (a_b - a_o).abs().max() <= 1e-12 * a_o.abs().max()
    assert (c_b - c_o).abs().max() <= 1e-12 * c_o.abs().max()
    out_b, out_o = b.sample(x), o.sample(x)
    assert ((out_b - out_o).abs().max() / out_o.abs().max()).item() < 1e-10


@pytest.mark.parametrize("N", [3, 4, 10, 100])
def test_stable_three_step_rule_round_trips_exactly(N):
    sched = Schedule.from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012), N)
    x0 = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(N))
    f = CountingEps(ref.nonlinear_eps)
    s = BELM(f, sched, rule="leapfrog3", progress=False)
    lat = s.invert(x0)
    assert len(lat.states) == 3 and f.calls == N
    f.calls = 0
    assert (s.sample(lat) - x0).abs().max().item() <= 1e-9
    assert f.calls == N - 1   # ε at levels 1 … N−1
    for k in (0, N // 2, N - 1):
        lat = s.invert(x0, to_level=k)
        assert (s.sample(lat) - x0).abs().max().item() <= 1e-9


def test_unstable_rule_is_refused_with_its_roots():
    sched = Schedule.from_betas(make_betas(), 10)
    with pytest.raises(UnstableRuleError, match=r"not zero-stable.*-9\.89"):
        BELM(ref.nonlinear_eps, sched, k=3)
    s = BELM(ref.nonlinear_eps, sched, k=3, allow_unstable=True, progress=False)
    assert s.num_states == 3
    with pytest.raises(ValueError, match="free parameters"):
        BELM(ref.nonlinear_eps, sched, rule=derive_belm(3, order=2))
    with pytest.raises(ValueError, match="k must be an integer >= 2"):
        BELM(ref.nonlinear_eps, sched, k=1)
