"""BELMScheduler / BELMInverseScheduler (diffusers-compatible schedulers) on a tiny pixel UNet.

Also: belm's DDIM equals diffusers' DDIMScheduler where diffusers' ``t − T // N`` is on the
grid ("leading"), and differs where it is not ("linspace", "trailing" with T % N ≠ 0).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler  # noqa: E402

from belm import BDIA, DDIM, OBELM, Latent, Schedule  # noqa: E402
from belm.adapters import BELMInverseScheduler, BELMScheduler, DiffusersEps  # noqa: E402
from belm.errors import LatentMismatchError  # noqa: E402
from belm.schedule import grid_timesteps  # noqa: E402
from tiny_models import tiny_unet  # noqa: E402

N = 20
SAMPLERS = {"obelm": (OBELM, {}), "bdia": (BDIA, {"gamma": 0.9}), "ddim": (DDIM, {})}


def _noise(shape=(2, 3, 8, 8), seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _run(scheduler, unet, x, **unet_kwargs):
    """The DDPMPipeline-style loop: one network call and one step per timestep."""
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = unet(x, t, **unet_kwargs).sample
        x = scheduler.step(out, t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def pixel():
    return tiny_unet("epsilon")


def _belm(method: str, unet, sched, num_steps: int = N):
    cls, kwargs = SAMPLERS[method]
    return cls(DiffusersEps(unet, sched), Schedule.from_diffusers(sched, num_steps), progress=False, **kwargs)


# ---------------------------------------------------------------------------------------
# configuration and schedule
# ---------------------------------------------------------------------------------------
def test_from_config_schedule_and_save(pixel, tmp_path) -> None:
    _, ddim = pixel
    bs = BELMScheduler.from_config(ddim.config)
    assert bs.config.method == "obelm" and bs.config.timestep_spacing == "leading" and bs.config.steps_offset == 1
    assert torch.equal(bs.alphas_cumprod, ddim.alphas_cumprod)  # diffusers' own float32 values
    assert bs.init_noise_sigma == 1.0 and bs.order == 1 and len(bs) == 1000
    for spacing in ("leading", "linspace", "trailing"):
        s = BELMScheduler.from_config(ddim.config, timestep_spacing=spacing)
        s.set_timesteps(N)
        expected = Schedule.from_diffusers(s, N)
        assert s.schedule == expected and s.schedule.final_alpha_cumprod == 1.0  # clean final level
        assert s.schedule == Schedule.from_diffusers(DDIMScheduler.from_config(s.config), N)
        assert s.timesteps.tolist() == grid_timesteps(1000, N, spacing, 1).tolist()
    bs.save_config(tmp_path)
    again = BELMScheduler.from_pretrained(tmp_path)
    assert again.config.method == "obelm" and again.config.prediction_type == ddim.config.prediction_type
    x0, noise = _noise(seed=1), _noise(seed=2)
    ac = ddim.alphas_cumprod[500].double()
    torch.testing.assert_close(bs.add_noise(x0, noise, torch.tensor([500])),
                               (ac.sqrt() * x0 + (1 - ac).sqrt() * noise).float(), rtol=1e-6, atol=1e-6)
    assert bs.scale_model_input(x0, 3) is x0


def test_custom_timesteps(pixel) -> None:
    unet, ddim = pixel
    ts = [950, 700, 420, 300, 90, 10]
    bs = BELMScheduler.from_config(ddim.config)
    bs.set_timesteps(timesteps=ts)
    assert bs.timesteps.tolist() == ts and bs.num_inference_steps == 6
    xT = _noise()
    ref = OBELM(DiffusersEps(unet, ddim), Schedule(ddim.alphas_cumprod, ts), progress=False).sample(xT)
    assert torch.equal(_run(bs, unet, xT), ref)


# ---------------------------------------------------------------------------------------
# acceptance (c), pixel part: the scheduler loop equals the belm sampler
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(SAMPLERS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_scheduler_loop_equals_belm_sampler(method: str, prediction_type: str) -> None:
    unet, ddim = tiny_unet(prediction_type)
    kwargs = SAMPLERS[method][1]
    bs = BELMScheduler.from_config(ddim.config, method=method, **kwargs)
    bs.set_timesteps(N)
    xT = _noise()
    calls = []
    handle = unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        x = _run(bs, unet, xT)
    finally:
        handle.remove()
    assert len(calls) == N and x.dtype == torch.float32
    ref = _belm(method, unet, ddim).sample(xT)
    tol = 0 if prediction_type == "epsilon" else 1e-5  # v: converted in float64 here, float32 in DiffusersEps
    assert _rel(x, ref) <= tol


def test_begin_index_equals_from_level(pixel) -> None:
    unet, ddim = pixel
    bs = BELMScheduler.from_config(ddim.config)
    bs.set_timesteps(N)
    bs.set_begin_index(7)
    x = xk = _noise(seed=3)
    for t in bs.timesteps[7:]:
        with torch.no_grad():
            x = bs.step(unet(x, t).sample, t, x).prev_sample
    assert torch.equal(x, _belm("obelm", unet, ddim).sample(xk, from_level=7))


# ---------------------------------------------------------------------------------------
# the inverse scheduler
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["obelm", "bdia"])
def test_inverse_scheduler_matches_invert_and_reconstructs(pixel, method: str) -> None:
    unet, ddim = pixel
    kwargs = SAMPLERS[method][1]
    sampler = _belm(method, unet, ddim)
    z0 = sampler.sample(_noise(seed=4))
    inv = BELMInverseScheduler.from_config(ddim.config, method=method, **kwargs)
    inv.set_timesteps(N)
    ts = sampler.schedule.timesteps.tolist()
    assert inv.timesteps.tolist() == [1] + ts[::-1][:-1]  # clean-level call at 1, then t_{N-1} … t_1
    x = _run(inv, unet, z0)
    latent = inv.latent
    ref = sampler.invert(z0)
    assert latent.level == 0 and latent.method == ref.method and latent.schedule == ref.schedule
    assert all(torch.equal(a, b) for a, b in zip(latent.states, ref.states))
    assert torch.equal(x, ref.x) and latent.dtype == torch.float32
    assert torch.equal(sampler.sample(latent), z0)
    # Through the forward scheduler: seed it with the pair, feed latent.x, get z0 back.
    bs = BELMScheduler.from_config(ddim.config, method=method, **kwargs)
    bs.start_from(latent)
    bs.set_timesteps(N)
    assert torch.equal(_run(bs, unet, latent.x), z0)


def test_inverse_scheduler_partial(pixel) -> None:
    unet, ddim = pixel
    sampler = _belm("obelm", unet, ddim)
    z0 = _noise(seed=5) * 0.5
    inv = BELMInverseScheduler.from_config(ddim.config)
    inv.set_timesteps(N, to_level=12)
    assert len(inv.timesteps) == N - 12
    _run(inv, unet, z0)
    ref = sampler.invert(z0, to_level=12)
    assert inv.latent.level == 12
    assert all(torch.equal(a, b) for a, b in zip(inv.latent.states, ref.states))
    torch.testing.assert_close(sampler.sample(inv.latent), z0, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------
def test_scheduler_errors(pixel) -> None:
    unet, ddim = pixel
    x = _noise()
    out = torch.zeros_like(x)
    bs = BELMScheduler.from_config(ddim.config)
    with pytest.raises(RuntimeError, match="before set_timesteps"):
        bs.step(out, 981, x)
    bs.set_timesteps(N)
    t0, t1, t2 = bs.timesteps[:3].tolist()
    with pytest.raises(ValueError, match=f"got timestep {t0 + 1}, which is not in scheduler.timesteps"):
        bs.step(out, t0 + 1, x)             # off the grid (a first step may start at any grid timestep)
    x1 = bs.step(out, t0, x).prev_sample
    with pytest.raises(ValueError, match=f"got timestep {t0}.*step 1 .* timestep {t1}.*in order"):
        bs.step(out, t0, x1)  # repeated timestep: out of order
    with pytest.raises(ValueError, match="eta"):
        bs.step(out, t1, x1, eta=0.5)
    with pytest.raises(ValueError, match="model_output"):
        bs.step(out[:1], t1, x1)
    with pytest.raises(ValueError, match="shape"):
        bs.step(out[:1], t1, x1[:1])  # batch changed mid-run
    bs.set_timesteps(2)
    y = x
    for t in bs.timesteps:
        y = bs.step(out, t, y).prev_sample
    with pytest.raises(RuntimeError, match="all 2 steps are done"):
        bs.step(out, 1, y)
    for bad, match in [({"method": "edict"}, "method"), ({"prediction_type": "flow"}, "prediction_type"),
                       ({"timestep_spacing": "karras"}, "timestep_spacing"), ({"method": "bdia", "gamma": 0.0}, "gamma")]:
        with pytest.raises(ValueError, match=match):
            BELMScheduler.from_config(ddim.config, **bad)
    inv = BELMInverseScheduler.from_config(ddim.config)
    with pytest.raises(RuntimeError, match="before set_timesteps"):
        inv.step(out, 1, x)
    inv.set_timesteps(N)
    with pytest.raises(RuntimeError, match="not finished"):
        inv.latent
    with pytest.raises(ValueError, match="to_level"):
        inv.set_timesteps(N, to_level=N)


def test_start_from_errors(pixel) -> None:
    unet, ddim = pixel
    latent = _belm("obelm", unet, ddim).invert(_noise(seed=6))
    bs = BELMScheduler.from_config(ddim.config)
    with pytest.raises(TypeError, match="Latent"):
        bs.start_from(latent.x)
    bs.start_from(latent)
    with pytest.raises(LatentMismatchError, match="num_inference_steps"):
        bs.set_timesteps(N + 1)  # another schedule
    bs.set_timesteps(N)
    bs.start_from(latent)
    with pytest.raises(ValueError, match="latents=latent.x"):
        bs.step(torch.zeros(2, 3, 8, 8), bs.timesteps[0], latent.x + 1)
    bdia = BELMScheduler.from_config(ddim.config, method="bdia")
    bdia.set_timesteps(N)
    with pytest.raises(LatentMismatchError, match="OBELM"):
        bdia.start_from(latent)
    with pytest.raises(ValueError, match="level 0"):
        bs.start_from(latent.replace(level=3))
    with pytest.raises(ValueError, match="all states of a latent must match"):
        Latent((latent.states[0], latent.states[1][:1]), 0, "OBELM", latent.schedule, torch.float32)


# ---------------------------------------------------------------------------------------
# acceptance (b): belm DDIM vs diffusers' DDIMScheduler
# ---------------------------------------------------------------------------------------
def _ddim(spacing: str, steps_offset: int) -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=True, steps_offset=steps_offset,
                         timestep_spacing=spacing)


@pytest.fixture(scope="module")
def unet64():
    return tiny_unet("epsilon")[0].double()


def _diffusers_loop(sched: DDIMScheduler, unet, xT: torch.Tensor, num_steps: int) -> torch.Tensor:
    sched.set_timesteps(num_steps)
    return _run(sched, unet, xT)


def _per_level_ddim(unet, xT: torch.Tensor, alphas_cumprod: torch.Tensor, ts: list[int], next_t) -> torch.Tensor:
    """An independent DDIM: from timestep t to next_t(k, t) (None = clean, ā = 1), eps from the UNet."""
    x = xT
    for k, t in enumerate(ts):
        with torch.no_grad():
            eps = unet(x, t).sample
        a, t_next = float(alphas_cumprod[t]), next_t(k, t)
        a_next = 1.0 if t_next is None else float(alphas_cumprod[t_next])
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    return x


@pytest.mark.parametrize("steps_offset", [0, 1])
def test_belm_ddim_equals_diffusers_ddim_leading(unet64, steps_offset: int) -> None:
    sched = _ddim("leading", steps_offset)
    xT = _noise(dtype=torch.float64, seed=7)
    theirs = _diffusers_loop(sched, unet64, xT, 50)
    ours = DDIM(DiffusersEps(unet64, sched), Schedule.from_diffusers(sched, 50), progress=False).sample(xT)
    assert _rel(ours, theirs) <= 1e-4
    bs = BELMScheduler.from_config(sched.config, method="ddim")
    bs.set_timesteps(50)
    assert _rel(_run(bs, unet64, xT), theirs) <= 1e-4


@pytest.mark.parametrize("spacing, num_steps", [("linspace", 50), ("trailing", 30)])
def test_diffusers_ddim_steps_off_grid(unet64, spacing: str, num_steps: int) -> None:
    """diffusers' prev_t = t − T//N is not the next grid point for these grids; belm's DDIM is."""
    sched = _ddim(spacing, 0)
    sched.set_timesteps(num_steps)
    ts = sched.timesteps.tolist()
    T = 1000
    assert any(t - T // num_steps not in ts for t in ts[:-1])  # diffusers steps off the grid
    xT = _noise(dtype=torch.float64, seed=8)
    theirs = _diffusers_loop(sched, unet64, xT, num_steps)
    schedule = Schedule.from_diffusers(sched, num_steps)
    assert schedule.timesteps.tolist() == ts
    ours = DDIM(DiffusersEps(unet64, sched), schedule, progress=False).sample(xT)
    ac = sched.alphas_cumprod.double()
    on_grid = _per_level_ddim(unet64, xT, ac, ts, lambda k, t: ts[k + 1] if k + 1 < len(ts) else None)
    off_grid = _per_level_ddim(unet64, xT, ac, ts, lambda k, t: t - T // num_steps if t - T // num_steps >= 0 else None)
    assert _rel(ours, on_grid) <= 1e-10          # belm = the per-level computation
    assert _rel(theirs, off_grid) <= 1e-4        # diffusers = the same computation with t − T//N
    assert _rel(theirs, ours) > 1e-3             # ... which is a different result


def test_spacing_option_and_growth_warning(pixel) -> None:
    """config spacing by default (drop-in), 'trailing' on request; inverting on a blown-up grid warns with the fix."""
    import warnings

    from belm.errors import GrowthWarning
    unet, ddim = pixel
    leading = dict(ddim.config, timestep_spacing="leading", steps_offset=1)
    bs = BELMScheduler.from_config(leading)
    bs.set_timesteps(10)
    assert bs.schedule == Schedule.from_diffusers(DDIMScheduler.from_config(leading), 10)
    bt = BELMScheduler.from_config(leading, spacing="trailing")
    bt.set_timesteps(10)
    assert bt.schedule == Schedule.from_diffusers(DDIMScheduler.from_config(leading), 10, spacing="trailing")
    assert int(bt.timesteps[-1]) == 99
    with pytest.warns(GrowthWarning, match="spacing='trailing'"):
        BELMInverseScheduler.from_config(leading).set_timesteps(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GrowthWarning)
        BELMInverseScheduler.from_config(leading, spacing="trailing").set_timesteps(10)
    with pytest.raises(ValueError, match="spacing must be"):
        BELMScheduler.from_config(leading, spacing="sideways")
