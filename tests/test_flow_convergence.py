"""Issue 13 acceptance, analytic part: samplers on flow and continuous-σ schedules.

- Flow Gaussian mixture on diffusers' flow grid (shift 1 and 3): O-BELM's global order
  ≥ 1.8 over N = 20…160 and its error at N = 20 ≤ 0.5× Euler's (DDIM = Euler on flows).
- VE Gaussian mixture on EDM's Karras grid: the same two targets against DDIM.
- DDIM on a flow schedule is diffusers' FlowMatchEulerDiscreteScheduler.step, step for step.
- The relations in (y, τ) = (x, σ): O-BELM's coefficients depend on H only; BDIA's g = γ.
"""
import numpy as np
import pytest
import torch

from belm import BDIA, DDIM, EDICT, OBELM, Schedule
from belm.analytic import FlowGaussianMixture, VEGaussianMixture
from belm.solvers.methods import bdia_relation, obelm_relation

NS = [20, 40, 80, 160]


def slope(ns, errs):
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


def flow_grid(N, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return Schedule.from_diffusers(FlowMatchEulerDiscreteScheduler(shift=shift), num_steps=N)


@pytest.fixture(scope="module")
def flow_problem():
    gm = FlowGaussianMixture.default(dim=2, std=0.5)
    z = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # every diffusers flow grid starts at σ = 1, so one exact solution serves every N and shift
    return gm, z, gm.ode_solution(z, 1.0)


def rms(out, exact):
    return ((out - exact) ** 2).mean().sqrt().item()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_obelm_is_second_order_and_beats_euler(flow_problem, shift):
    gm, z, exact = flow_problem
    euler, obelm, bdia = [], [], []
    for N in NS:
        sched = flow_grid(N, shift)
        euler.append(rms(DDIM(gm.fn(), sched, progress=False).sample(z), exact))
        obelm.append(rms(OBELM(gm.fn(), sched, progress=False).sample(z), exact))
        bdia.append(rms(BDIA(gm.fn(), sched, gamma=1.0, progress=False).sample(z), exact))
    assert slope(NS, obelm) >= 1.8, obelm
    assert obelm[0] <= 0.5 * euler[0], (obelm[0], euler[0])
    assert 0.8 <= slope(NS, euler) <= 1.2, euler           # Euler is first order: a sanity anchor
    assert slope(NS, bdia) >= 1.8, bdia
    assert np.all(np.diff(obelm) < 0) and np.all(np.diff(euler) < 0)


def test_flow_edict_converges(flow_problem):
    gm, z, exact = flow_problem
    errs = [rms(EDICT(gm.fn(), flow_grid(N, 1.0), progress=False).sample(z), exact) for N in (20, 80)]
    assert slope([20, 80], errs) >= 0.8 and errs[-1] < 2e-2, errs


def test_karras_ve_obelm_is_second_order_and_beats_ddim():
    gm = VEGaussianMixture.default(dim=2, std=0.5)
    x = 80.0 * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = gm.ode_solution(x, 80.0)
    ddim, obelm = [], []
    for N in NS:
        sched = Schedule.karras(N, 0.002, 80.0)
        ddim.append(rms(DDIM(gm.fn(), sched, progress=False).sample(x), exact))
        obelm.append(rms(OBELM(gm.fn(), sched, progress=False).sample(x), exact))
    assert slope(NS, obelm) >= 1.8, obelm
    assert obelm[0] <= 0.5 * ddim[0], (obelm[0], ddim[0])
    assert 0.8 <= slope(NS, ddim) <= 1.2, ddim


@pytest.mark.parametrize("config, mu", [(dict(shift=3.0), None), (dict(use_dynamic_shifting=True), 1.1)])
def test_ddim_on_a_flow_schedule_is_diffusers_euler(config, mu):
    from diffusers import FlowMatchEulerDiscreteScheduler

    gm = FlowGaussianMixture.default(dim=4, components=3, std=0.3)
    N = 12
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    sched = Schedule.from_diffusers(scheduler, num_steps=N, mu=mu)
    scheduler.set_timesteps(N, mu=mu)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    seen = []

    def velocity(x, t):
        seen.append(t)
        return gm.velocity(x, t)

    ours = DDIM(velocity, sched, progress=False).sample(x)
    ref = x.clone()
    for t in scheduler.timesteps:  # the network sees t / 1000 = σ
        ref = scheduler.step(gm.velocity(ref, t / scheduler.config.num_train_timesteps), t, ref).prev_sample
    assert ours.dtype == torch.float32
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-5
    assert len(seen) == N and all(t.dtype == torch.float64 and t.dim() == 0 for t in seen)
    assert [t.item() for t in seen] == sched.timesteps.tolist()


def test_relations_in_sigma_coordinates():
    """O-BELM's a, c are functions of H alone; BDIA's γ·scale ratio is γ when scale = 1."""
    sched = flow_grid(9, 3.0)
    H = sched.H
    Ht, Hp = H[1:], H[:-1]
    rel = obelm_relation(sched)
    torch.testing.assert_close(rel.a[2:, 0], (Hp**2 - Ht**2) / Hp**2, rtol=0, atol=0)
    torch.testing.assert_close(rel.a[2:, 1], Ht**2 / Hp**2, rtol=0, atol=0)
    torch.testing.assert_close(rel.c[2:, 0], -Ht * (Ht + Hp) / Hp, rtol=0, atol=0)
    # y = x on a flow: H are σ steps, so a σ-grid with the same steps has the same relation
    shifted = Schedule.from_sigmas((sched.sigmas[:-1] * 0.5).tolist(), kind="ve")
    assert torch.equal(obelm_relation(shifted).a[2:], obelm_relation(Schedule.from_sigmas(
        (sched.sigmas[:-1] * 0.5).tolist(), kind="flow")).a[2:])
    b = bdia_relation(sched, 0.7)
    torch.testing.assert_close(b.a[2:, 1], torch.full_like(Ht, 0.7), rtol=0, atol=1e-15)
    torch.testing.assert_close(b.c[2:, 0], -Ht - 0.7 * Hp, rtol=0, atol=1e-15)
