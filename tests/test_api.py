"""Acceptance 1 (the contract's example runs as written), dtypes, callbacks, progress."""

import numpy as np
import torch

import reference as ref
from belm import BDIA, DDIM, EDICT, OBELM, Latent, Schedule
from belm.schedule import make_betas


class FakeDiffusersScheduler:
    def __init__(self, betas):
        self.alphas_cumprod = torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)
        self.config = {"timestep_spacing": "leading", "steps_offset": 1}


def test_contract_example_runs_as_written():
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    alphas_cumprod = np.cumprod(1 - betas)
    eps_fn = ref.nonlinear_eps
    xT = torch.randn(2, 4, 8, 8)

    sched = Schedule(alphas_cumprod, [999, 750, 500, 250, 1])
    sched = Schedule.from_betas(betas, num_steps=50, spacing="linspace")
    for spacing in ("leading", "trailing"):
        Schedule.from_betas(betas, num_steps=50, spacing=spacing)
    sched_d = Schedule.from_diffusers(FakeDiffusersScheduler(betas), num_steps=50)
    assert sched_d.timesteps[0] == 981 and sched_d.timesteps[-1] == 1

    s = OBELM(eps_fn, sched)
    for other in (DDIM(eps_fn, sched), BDIA(eps_fn, sched, gamma=1.0), EDICT(eps_fn, sched, p=0.93)):
        assert other.sample(xT).shape == xT.shape
    x0 = s.sample(xT)
    assert x0.dtype == xT.dtype and x0.device == xT.device and x0.shape == xT.shape
    lat = s.invert(x0)
    assert isinstance(lat, Latent) and torch.equal(lat.x, lat.states[0].to(x0.dtype))
    assert len(lat.states) == 2 and lat.states[0].dtype == torch.float64
    x0_again = s.sample(lat)
    assert (x0_again - x0).abs().max() <= 4 * torch.finfo(torch.float32).eps * x0.abs().max()


def test_eps_fn_sees_model_dtype_and_state_stays_float64():
    seen = []

    def eps_fn(x, t):
        seen.append((x.dtype, t.dtype, t.ndim))
        return ref.nonlinear_eps(x, t)

    sched = Schedule.from_betas(make_betas(), 5)
    OBELM(eps_fn, sched, progress=False).sample(torch.randn(1, 3, dtype=torch.bfloat16))
    assert set(seen) == {(torch.bfloat16, torch.int64, 0)}
    seen.clear()
    s = OBELM(eps_fn, sched, progress=False, model_dtype=torch.float32)
    assert s.sample(torch.randn(1, 3, dtype=torch.float64)).dtype == torch.float64
    assert set(seen) == {(torch.float32, torch.int64, 0)}
    # state_dtype is configurable
    s32 = OBELM(ref.nonlinear_eps, sched, progress=False, state_dtype=torch.float32)
    assert s32.invert(torch.randn(1, 3)).states[0].dtype == torch.float32


def test_callback_reports_every_step_in_both_directions():
    sched = Schedule.from_betas(make_betas(), 6)
    events = []
    s = OBELM(ref.nonlinear_eps, sched, progress=False)
    x = s.sample(torch.randn(1, 3), callback=events.append)
    assert [e["level"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[-1]["timestep"] == 1 and torch.equal(events[-1]["x"].float(), x)
    assert all(e["direction"] == "sample" and e["eps"] is not None for e in events)
    events.clear()
    s.invert(x, callback=events.append)
    assert [e["level"] for e in events] == [5, 4, 3, 2, 1, 0]
    assert all(e["direction"] == "invert" for e in events)


def test_progress_bar_can_be_disabled(capsys):
    sched = Schedule.from_betas(make_betas(), 5)
    OBELM(ref.nonlinear_eps, sched, progress=True).sample(torch.randn(1, 3))
    shown = capsys.readouterr().err
    OBELM(ref.nonlinear_eps, sched, progress=False).sample(torch.randn(1, 3))
    assert "OBELM sample" in shown and capsys.readouterr().err == ""


def test_coefficients_are_validated_data():
    from belm.solvers.relation import Relation
    sched = Schedule.from_betas(make_betas(), 5)
    s = OBELM(ref.nonlinear_eps, sched)
    rel = s.members[1]
    assert rel.bidirectional and not s.members[0].bidirectional
    bad_c = rel.c.clone()
    bad_c[3, 0] *= -1          # a sign error is caught on construction
    import pytest
    with pytest.raises(ValueError, match="not consistent"):
        Relation("broken", 2, rel.a, bad_c, sched)
