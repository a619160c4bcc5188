"""Bad input to Schedule and the samplers: clear errors that name the argument."""

import numpy as np
import pytest
import torch

import reference as ref
from belm import BDIA, DDIM, EDICT, OBELM, LatentMismatchError, NonFiniteError, Schedule
from belm.schedule import make_betas

BETAS = make_betas("linear", 1000, 1e-4, 0.02)
AC = np.cumprod(1 - BETAS)


def sched(N=10, spacing="linspace"):
    return Schedule.from_betas(BETAS, N, spacing)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alphas_cumprod=AC, timesteps=[10, 500, 999]), "strictly decreasing"),
    (dict(alphas_cumprod=AC, timesteps=[999, 500, 500]), "strictly decreasing"),
    (dict(alphas_cumprod=AC, timesteps=[1000, 500]), r"timesteps must lie in \[0, 999\]"),
    (dict(alphas_cumprod=AC, timesteps=[500, -1]), r"timesteps must lie in"),
    (dict(alphas_cumprod=AC, timesteps=[500.5, 3]), "integers"),
    (dict(alphas_cumprod=AC, timesteps=[]), "timesteps is empty"),
    (dict(alphas_cumprod=np.r_[AC[:5], 1.2], timesteps=[3]), r"alphas_cumprod must lie in \(0, 1\]"),
    (dict(alphas_cumprod=np.r_[AC[:5], 0.0], timesteps=[3]), r"alphas_cumprod must lie in \(0, 1\]"),
    (dict(alphas_cumprod=AC[::-1], timesteps=[3]), "alphas_cumprod must be strictly decreasing"),
    (dict(alphas_cumprod=np.r_[AC[:5], np.nan], timesteps=[3]), "NaN"),
    (dict(alphas_cumprod=[], timesteps=[3]), "alphas_cumprod is empty"),
])
def test_schedule_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


def test_schedule_constructor_errors():
    with pytest.raises(ValueError, match="spacing must be one of"):
        Schedule.from_betas(BETAS, 10, "cosine")
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        Schedule.from_betas(BETAS, 0)
    with pytest.raises(ValueError, match="num_steps=1001 exceeds"):
        Schedule.from_betas(BETAS, 1001)
    with pytest.raises(ValueError, match="betas must lie in"):
        Schedule.from_betas(-BETAS, 10)
    with pytest.raises(TypeError, match="diffusers scheduler"):
        Schedule.from_diffusers(object(), 10)
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        Schedule(AC, [999, 0], final_alpha_cumprod=AC[0] / 2)


def test_sampler_parameter_errors():
    s = sched()
    with pytest.raises(ValueError, match=r"gamma must lie in \(0, 1\]"):
        BDIA(ref.nonlinear_eps, s, gamma=0.0)
    with pytest.raises(ValueError, match=r"gamma must lie in \(0, 1\]"):
        BDIA(ref.nonlinear_eps, s, gamma=1.5)
    with pytest.raises(ValueError, match=r"p must lie in \(0, 1\)"):
        EDICT(ref.nonlinear_eps, s, p=1.0)
    with pytest.raises(TypeError, match="eps_fn must be callable"):
        OBELM("not a function", s)
    with pytest.raises(TypeError, match="schedule must be a belm.Schedule"):
        OBELM(ref.nonlinear_eps, [999, 0])
    with pytest.raises(ValueError, match="needs num_steps >= 2"):
        OBELM(ref.nonlinear_eps, sched(1))
    with pytest.raises(TypeError, match="state_dtype"):
        OBELM(ref.nonlinear_eps, s, state_dtype=torch.int64)


def test_tensor_errors():
    s = OBELM(ref.nonlinear_eps, sched(), progress=False)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        s.sample(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="dtype torch.int64; pass a floating-point tensor"):
        s.sample(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(NonFiniteError, match="x0 contains NaN"):
        s.invert(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match=r"to_level must be an integer level in \[0, 9\]"):
        s.invert(torch.zeros(1, 2), to_level=10)
    with pytest.raises(ValueError, match="from_level must be an integer level"):
        s.sample(torch.zeros(1, 2), from_level=-1)


def test_latent_errors():
    x0 = torch.randn(2, 3, dtype=torch.float64)
    lat = OBELM(ref.nonlinear_eps, sched(), progress=False).invert(x0)
    with pytest.raises(LatentMismatchError, match="produced by OBELM, but this sampler is BDIA"):
        BDIA(ref.nonlinear_eps, sched(), gamma=0.5).sample(lat)
    with pytest.raises(LatentMismatchError, match="different schedule"):
        OBELM(ref.nonlinear_eps, sched(12)).sample(lat)
    with pytest.raises(ValueError, match="all states of a latent must match"):
        lat.replace(states=(lat.states[0], lat.states[1][:1]))
    bdia_lat = BDIA(ref.nonlinear_eps, sched(), gamma=0.5, progress=False).invert(x0)
    with pytest.raises(LatentMismatchError, match="gamma=0.5"):
        BDIA(ref.nonlinear_eps, sched(), gamma=0.6).sample(bdia_lat)


def test_eps_fn_output_errors():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"eps_fn returned shape \(2, 2\)"):
        DDIM(lambda x, t: x[:, :2], sched(), progress=False).sample(x)
    with pytest.raises(TypeError, match="eps_fn must return a torch.Tensor"):
        DDIM(lambda x, t: x.numpy(), sched(), progress=False).sample(x)
    with pytest.raises(TypeError, match="floating-point"):
        DDIM(lambda x, t: x.long(), sched(), progress=False).sample(x)


def test_non_finite_model_output_names_the_level():
    s = sched(10)
    bad_t = int(s.timesteps[4])

    def eps_fn(x, t):
        out = ref.nonlinear_eps(x, t)
        return out * float("nan") if int(t) == bad_t else out

    for make in (OBELM, DDIM, EDICT):
        with pytest.raises(NonFiniteError, match=f"level 4 \\(train timestep {bad_t}\\)") as info:
            make(eps_fn, s, progress=False).sample(torch.randn(1, 3))
        assert info.value.level == 4 and info.value.timestep == bad_t
    # The check can be turned off: then NaN propagates (the user asked for it).
    out = OBELM(eps_fn, s, progress=False, check_finite=False).sample(torch.randn(1, 3))
    assert torch.isnan(out).all()


def test_trailing_grid_has_exactly_n_levels_for_awkward_ratios():
    # np.arange(T, 0, -T/N) returns N + 1 entries for some T, N (the last being −1).
    for T, N in [(39, 37), (1000, 999), (97, 91), (10, 3)]:
        ts = Schedule.from_betas(make_betas("linear", T), N, "trailing").timesteps
        assert len(ts) == N and int(ts[0]) == T - 1 and int(ts[-1]) >= 0
