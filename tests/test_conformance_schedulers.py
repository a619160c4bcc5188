"""diffusers' scheduler contract, checked on belm's four scheduler classes.

Written after reading diffusers' own scheduler tests (``SchedulerCommonTest`` and the DDIM,
DDIM-inverse and flow-match tests): what a stock pipeline relies on — config round trips and
``from_config`` across scheduler families, ``step`` outputs and ``return_dict=False``,
``scale_model_input``, ``add_noise``, dtypes, ``set_timesteps(device=)``, custom grids,
deepcopy/pickle mid-run, full loops, runs that start mid-schedule, one-step runs, and samples
edited in place by the caller — plus where belm must differ (no ``eta``, steps in grid order,
inexact one-step inversion), which must be clear errors.

The "network" is a cheap nonlinear function of (x, t), so every loop runs in milliseconds; the
references are belm's own samplers (``sample`` / ``invert``) on the scheduler's schedule.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)

from belm import BDIA, DDIM, Latent  # noqa: E402
from belm.adapters import schedulers as belm_schedulers  # noqa: E402
from belm.adapters.flow_schedulers import FlowBELMInverseScheduler, FlowBELMScheduler  # noqa: E402
from belm.adapters.schedulers import (  # noqa: E402
    BELMInverseScheduler,
    BELMScheduler,
    BELMSchedulerOutput,
    IgnoredConfigWarning,
)

FORWARD = {"ddpm": BELMScheduler, "flow": FlowBELMScheduler}
INVERSE = {"ddpm": BELMInverseScheduler, "flow": FlowBELMInverseScheduler}
ALL_CLASSES = [BELMScheduler, BELMInverseScheduler, FlowBELMScheduler, FlowBELMInverseScheduler]
#: SD's training schedule on belm's inversion grid ("trailing": no growth warning)
DDPM_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                   timestep_spacing="trailing")
FLOW_CONFIG = dict(shift=3.0)
N = 8
SHAPE = (2, 4, 8, 8)


def _make(cls, **config):
    """A scheduler of ``cls`` with SD's (DDPM classes) or SD3's (flow classes) configuration."""
    base = FLOW_CONFIG if cls in (FlowBELMScheduler, FlowBELMInverseScheduler) else DDPM_CONFIG
    return cls(**{**base, **config})


def _kind(cls) -> str:
    return "flow" if cls in (FlowBELMScheduler, FlowBELMInverseScheduler) else "ddpm"


def _model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic, nonlinear stand-in for the network (ε or velocity), in x's dtype."""
    return 0.4 * torch.tanh(x) + 1e-3 * float(t) * x.flip(-1) - 0.05


def _noise(seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _loop(scheduler, x: torch.Tensor, timesteps=None, edit=None) -> torch.Tensor:
    """The stock pipeline loop; ``edit(i, x)`` plays callback_on_step_end and returns the latents."""
    for i, t in enumerate(scheduler.timesteps if timesteps is None else timesteps):
        x = scheduler.step(_model(x, t), t, x).prev_sample
        if edit is not None:
            x = edit(i, x)
    return x


def _reference(scheduler, kind: str):
    """belm's own sampler of the scheduler's method on its schedule, calling _model as the pipeline does."""
    sampler = scheduler.sampler
    if kind == "flow":    # the sampler passes σ; the pipeline passes σ·T in float32, as diffusers computes it
        def fn(x, sigma):
            return _model(x, sigma.float() * 1000)
    else:
        fn = _model
    kwargs = {"gamma": sampler.gamma} if isinstance(sampler, BDIA) else {}
    return type(sampler)(fn, scheduler.schedule, progress=False, **kwargs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_config_round_trip_gives_the_same_scheduler(cls, tmp_path) -> None:
    s = _make(cls, method="bdia", gamma=0.75)
    s.save_config(tmp_path)
    again = cls.from_pretrained(tmp_path)
    public = {k: v for k, v in s.config.items() if not k.startswith("_")}
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == public
    s.set_timesteps(N)
    again.set_timesteps(N)
    assert s.schedule == again.schedule and torch.equal(s.timesteps, again.timesteps)
    assert type(again.sampler) is BDIA and again.sampler.gamma == 0.75


@pytest.mark.parametrize("stock", [DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize("cls", [BELMScheduler, BELMInverseScheduler], ids=lambda c: c.__name__)
def test_from_config_both_ways_with_stock_ddpm_schedulers(cls, stock) -> None:
    theirs = stock(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    ours = cls.from_config(theirs.config)
    assert ours.config.beta_schedule == "scaled_linear" and ours.config.prediction_type == "v_prediction"
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)        # diffusers' own float32 betas
    back = stock.from_config(ours.config)
    assert back.config.beta_end == 0.012 and back.config.prediction_type == "v_prediction"
    assert stock.__name__ in cls._compatibles


@pytest.mark.parametrize("cls", [FlowBELMScheduler, FlowBELMInverseScheduler], ids=lambda c: c.__name__)
def test_from_config_both_ways_with_the_stock_flow_scheduler(cls) -> None:
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    ours = cls.from_config(theirs.config)
    assert ours.config.use_dynamic_shifting and ours.config.max_shift == 1.15
    back = FlowMatchEulerDiscreteScheduler.from_config(ours.config)
    assert back.config.shift == 3.0
    ours.set_timesteps(N, mu=0.8)
    theirs.set_timesteps(N, mu=0.8)
    assert torch.equal(ours.sigmas, theirs.sigmas)


# ---------------------------------------------------------------------------------------
# step outputs, helpers, dtypes, devices
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_step_outputs_and_return_dict_false(cls) -> None:
    a, b = _make(cls), _make(cls)
    a.set_timesteps(N)
    b.set_timesteps(N)
    x = _noise()
    for t in a.timesteps[:3]:
        out = a.step(_model(x, t), t, x)
        tup = b.step(_model(x, t), t, x, return_dict=False)
        assert isinstance(out, BELMSchedulerOutput) and isinstance(tup, tuple) and len(tup) == 2
        assert torch.equal(out.prev_sample, tup[0]) and torch.equal(out.pred_original_sample, tup[1])
        assert out.prev_sample.shape == x.shape and not torch.equal(out.prev_sample, x)
        x = out.prev_sample


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_scale_model_input_and_add_noise(cls) -> None:
    s = _make(cls)
    s.set_timesteps(N)
    x0, noise = _noise(1), _noise(2)
    assert s.scale_model_input(x0, s.timesteps[0]) is x0 and s.init_noise_sigma == 1.0
    t = torch.tensor([s.timesteps[2].item()])
    if _kind(cls) == "flow":
        sigma = t.double() / 1000
        expected = (1 - sigma) * x0.double() + sigma * noise.double()
        torch.testing.assert_close(s.scale_noise(x0, t, noise), expected.float(), rtol=0, atol=1e-6)
    else:
        ac = s.alphas_cumprod[int(t)].double()
        expected = ac.sqrt() * x0.double() + (1 - ac).sqrt() * noise.double()
        stock = DDIMScheduler.from_config(s.config).add_noise(x0, noise, t)
        torch.testing.assert_close(stock, expected.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(s.add_noise(x0, noise, t), expected.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_outputs_keep_the_sample_dtype(cls, dtype) -> None:
    s = _make(cls)
    s.set_timesteps(4)
    x = _noise(dtype=dtype)
    for t in s.timesteps:
        out = s.step(_model(x, t), t, x)
        assert out.prev_sample.dtype == dtype and out.pred_original_sample.dtype == dtype
        x = out.prev_sample
    assert torch.isfinite(x.float()).all()


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_set_timesteps_device(cls) -> None:
    s = _make(cls)
    for device in ("cpu", torch.device("cpu")):
        s.set_timesteps(N, device=device)
        assert s.timesteps.device.type == "cpu" and len(s.timesteps) == N


# ---------------------------------------------------------------------------------------
# custom grids
# ---------------------------------------------------------------------------------------
def test_custom_ddpm_timesteps_sample_on_that_grid() -> None:
    s = _make(BELMScheduler)
    s.set_timesteps(timesteps=[999, 800, 500, 260, 90, 5])
    assert s.timesteps.tolist() == [999, 800, 500, 260, 90, 5] and s.num_inference_steps == 6
    x = _noise()
    assert torch.equal(_loop(s, x), _reference(s, "ddpm").sample(x))


@pytest.mark.parametrize("cls", [FlowBELMScheduler, FlowBELMInverseScheduler], ids=lambda c: c.__name__)
def test_flow_timesteps_alone_with_shift_one_like_the_stock_scheduler(cls) -> None:
    """Issue 19 (5): AuraFlow/Chroma/CogView4 pass timesteps= alone; with shift = 1 σ = t/T."""
    ts = [1000.0, 750.0, 420.0, 100.0]
    stock = FlowMatchEulerDiscreteScheduler(shift=1.0)
    stock.set_timesteps(timesteps=ts)
    s = cls(shift=1.0)
    s.set_timesteps(timesteps=ts)
    assert torch.equal(s.sigmas, stock.sigmas) and s.num_inference_steps == 4
    if cls is FlowBELMScheduler:
        assert torch.equal(s.timesteps, stock.timesteps)
        x = _noise()
        assert torch.equal(_loop(s, x), _reference(s, "flow").sample(x))
    with pytest.raises(ValueError, match="sigmas="):          # shifted σ would not match the timesteps
        cls(shift=3.0).set_timesteps(timesteps=ts)


def test_flow_custom_sigmas_match_the_stock_grid() -> None:
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s = _make(FlowBELMScheduler)
    sigmas = [1.0, 0.8, 0.5, 0.25, 0.1]
    stock.set_timesteps(sigmas=sigmas)
    s.set_timesteps(sigmas=sigmas)
    assert torch.equal(s.timesteps, stock.timesteps) and torch.equal(s.sigmas, stock.sigmas)


# ---------------------------------------------------------------------------------------
# full loops, copies mid-run
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["obelm", "bdia", "ddim"])
@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_full_loops_equal_belm_and_inversion_is_exact(kind, method) -> None:
    fwd, inv = _make(FORWARD[kind], method=method), _make(INVERSE[kind], method=method)
    fwd.set_timesteps(N)
    inv.set_timesteps(N)
    ref = _reference(fwd, kind)
    x = _noise()
    z0 = _loop(fwd, x)
    assert torch.equal(z0, ref.sample(x))
    noisy = _loop(inv, z0)
    latent = inv.latent
    assert torch.equal(noisy, latent.x)
    expected = ref.invert(z0)
    assert all(torch.equal(a, b) for a, b in zip(latent.states, expected.states))
    if method != "ddim":                     # the exact methods reconstruct, through the scheduler too
        fwd.start_from(latent)
        fwd.set_timesteps(N)
        assert _rel(_loop(fwd, latent.x), z0) < 1e-6


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_deepcopy_and_pickle_mid_run_continue_identically(cls) -> None:
    s = _make(cls)
    s.set_timesteps(N)
    x = _noise()
    half = _loop(s, x, s.timesteps[:4])
    copies = [copy.deepcopy(s), pickle.loads(pickle.dumps(s))]
    rest = s.timesteps[4:]
    expected = _loop(s, half, rest)
    for c in copies:
        assert torch.equal(_loop(c, half, rest), expected)


# ---------------------------------------------------------------------------------------
# issue 19 (1): starting mid-schedule without set_begin_index
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["obelm", "bdia"])
@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_mid_schedule_start_equals_sample_from_level(kind, method) -> None:
    s = _make(FORWARD[kind], method=method)
    s.set_timesteps(10)
    x = _noise(3)
    for start in (8, 3):                     # DDIM/DPM++/Euler accept timesteps[k:] loops; so must belm
        s.set_timesteps(10)
        assert torch.equal(_loop(s, x, s.timesteps[start:]), _reference(s, kind).sample(x, from_level=start))
    assert s.step_index == 10


def test_mid_schedule_start_of_the_issue() -> None:
    s = BELMScheduler()
    s.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    for t in s.timesteps[8:]:
        x = s.step(0.1 * x, t, x).prev_sample
    assert torch.isfinite(x).all() and s.step_index == 10


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_mid_schedule_inversion_runs_and_its_latent_says_where_it_began(kind) -> None:
    inv = _make(INVERSE[kind])
    inv.set_timesteps(N)
    start = 3                                # the sample sits at level N − 3
    noisy = _loop(inv, _noise(4) * 0.5, inv.timesteps[start:])
    assert torch.isfinite(noisy).all()
    with pytest.warns(UserWarning, match=f"started .* at level {N - start}"):
        latent = inv.latent
    assert latent.level == 0 and torch.equal(latent.x, noisy)


# ---------------------------------------------------------------------------------------
# issue 19 (2): in-place edits of the returned sample
# ---------------------------------------------------------------------------------------
def _in_place_half(i, x):
    if i == 2:
        x.mul_(0.5)
    return x


def _out_of_place_half(i, x):
    return x * 0.5 if i == 2 else x


_MASK = torch.zeros(SHAPE, dtype=torch.bool)
_MASK[..., :4] = True


def _in_place_masked(i, x):
    if i in (1, 4):
        x[_MASK] = 0.25
    return x


def _out_of_place_masked(i, x):
    return torch.where(_MASK, torch.full_like(x, 0.25), x) if i in (1, 4) else x


@pytest.mark.parametrize("edits", [(_in_place_half, _out_of_place_half), (_in_place_masked, _out_of_place_masked)],
                         ids=["mul_", "masked-write"])
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_in_place_edit_equals_the_same_edit_out_of_place(cls, edits) -> None:
    in_place, out_of_place = edits
    results = []
    for edit in (in_place, out_of_place, None):
        s = _make(cls)
        s.set_timesteps(N)
        results.append(_loop(s, _noise(5), edit=edit))
    assert torch.equal(results[0], results[1])
    assert _rel(results[0], results[2]) > 1e-3         # the edit was taken, not ignored


def test_an_edit_restarts_the_chain_from_the_edited_state() -> None:
    """The sample is the whole state: after an edit at level k the run equals sample(edited, from_level=k)."""
    s = _make(BELMScheduler)
    s.set_timesteps(N)
    x = _loop(s, _noise(6), s.timesteps[:3])
    x.mul_(0.5)
    out = _loop(s, x, s.timesteps[3:])
    assert torch.equal(out, _reference(s, "ddpm").sample(x, from_level=3))


def test_a_no_op_in_place_write_keeps_the_float64_state() -> None:
    plain, touched = _make(BELMScheduler), _make(BELMScheduler)
    for s in (plain, touched):
        s.set_timesteps(N)

    def rewrite(i, x):
        x[_MASK] = x[_MASK].clone()          # bumps the version, changes no value
        return x

    x = _noise(7, torch.float16)
    assert torch.equal(_loop(plain, x), _loop(touched, x, edit=rewrite))


def test_edits_under_inference_mode_are_seen_too() -> None:
    with torch.inference_mode():             # inference tensors have no version counter
        results = []
        for edit in (_in_place_half, _out_of_place_half):
            s = _make(BELMScheduler)
            s.set_timesteps(N)
            results.append(_loop(s, _noise(8), edit=edit))
    assert torch.equal(results[0], results[1])


# ---------------------------------------------------------------------------------------
# issue 19 (4): one step (N below the method's k)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["obelm", "bdia", "ddim"])
@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_one_step_samples_with_the_start_up_member(kind, method) -> None:
    s = _make(FORWARD[kind], method=method, **({"gamma": 0.5} if method == "bdia" else {}))
    s.set_timesteps(1)
    assert len(s.timesteps) == 1
    x = _noise(9)
    ddim = DDIM(_reference(s, kind).eps_fn, s.schedule, progress=False)
    assert torch.equal(_loop(s, x), ddim.sample(x))     # member 1 of every method is DDIM


@pytest.mark.parametrize("method", ["obelm", "bdia"])
@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_one_step_inversion_of_an_exact_method_is_refused_clearly(kind, method) -> None:
    inv = _make(INVERSE[kind], method=method)
    with pytest.raises(ValueError, match="num_inference_steps=1: .* num_inference_steps >= 2"):
        inv.set_timesteps(1)
    ddim = _make(INVERSE[kind], method="ddim")          # asked for by name: approximate, allowed
    ddim.set_timesteps(1)
    assert len(ddim.timesteps) == 1


# ---------------------------------------------------------------------------------------
# issue 19 (6): config keys honoured, or warned about once by name
# ---------------------------------------------------------------------------------------
@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(belm_schedulers, "_WARNED", set())


@pytest.mark.parametrize("key,value", [("set_alpha_to_one", False), ("clip_sample", True), ("thresholding", True)])
@pytest.mark.parametrize("cls", [BELMScheduler, BELMInverseScheduler], ids=lambda c: c.__name__)
def test_ignored_keys_warn_once_by_name(cls, key, value, fresh_warnings) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cls(**{key: value})
        cls(**{key: value})
        cls()
    named = [w for w in caught if issubclass(w.category, IgnoredConfigWarning)]
    assert len(named) == 1 and f"{key}={value!r} is ignored" in str(named[0].message)
    assert named[0].filename == __file__                # points at the caller, not at belm or diffusers


def test_from_config_warns_about_grid_keys_of_compatible_schedulers(fresh_warnings) -> None:
    euler = EulerDiscreteScheduler(use_karras_sigmas=True)
    with pytest.warns(IgnoredConfigWarning, match="use_karras_sigmas=True is ignored") as caught:
        BELMScheduler.from_config(euler.config)
    assert caught[0].filename == __file__


def test_set_alpha_to_one_false_is_named_and_the_last_step_differs_from_ddim(fresh_warnings) -> None:
    """SD 1.x configs have set_alpha_to_one=False: belm's clean final level is kept and said."""
    config = dict(DDPM_CONFIG, timestep_spacing="leading", clip_sample=False)
    stock_true, stock_false = (DDIMScheduler(**config, set_alpha_to_one=flag) for flag in (True, False))
    with pytest.warns(IgnoredConfigWarning, match="set_alpha_to_one=False"):
        ours = BELMScheduler.from_config(stock_false.config, method="ddim")
    results = []
    for s in (ours, stock_true, stock_false):
        s.set_timesteps(N)
        results.append(_loop(s, _noise(10)))
    assert _rel(results[0], results[1]) < 1e-5           # = DDIM with alpha = 1 at the end
    assert _rel(results[0], results[2]) > 1e-4           # ≠ DDIM stopping at alphas_cumprod[0]


@pytest.mark.filterwarnings("ignore::belm.errors.GrowthWarning")
@pytest.mark.parametrize("cls", [BELMScheduler, BELMInverseScheduler], ids=lambda c: c.__name__)
def test_zero_terminal_snr_uses_diffusers_clamp(cls) -> None:
    s = _make(cls, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    euler = EulerDiscreteScheduler(**{k: v for k, v in DDPM_CONFIG.items()}, rescale_betas_zero_snr=True)
    assert s.alphas_cumprod[-1] == 2.0 ** -24 and torch.equal(s.alphas_cumprod, euler.alphas_cumprod)
    s.set_timesteps(N)
    assert int(s.schedule.timesteps[0]) == 999 and torch.isfinite(s.schedule.alpha).all()


@pytest.mark.filterwarnings("ignore::belm.errors.GrowthWarning")   # σ/α = 4096 at t = 999: a large first step
@pytest.mark.parametrize("method", ["obelm", "bdia"])
def test_zero_terminal_snr_inversion_is_exact(method) -> None:
    config = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", method=method)
    fwd, inv = _make(BELMScheduler, **config), _make(BELMInverseScheduler, **config)
    inv.set_timesteps(N)
    z0 = _noise(11) * 0.5
    _loop(inv, z0)
    fwd.start_from(inv.latent)
    fwd.set_timesteps(N)
    assert _rel(_loop(fwd, inv.latent.x), z0) < 1e-6


# ---------------------------------------------------------------------------------------
# where belm must differ: clear errors
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_eta_and_out_of_order_steps_are_clear_errors(cls) -> None:
    s = _make(cls)
    s.set_timesteps(N)
    x = _noise()
    t0, t1, t2 = s.timesteps[:3]
    with pytest.raises(ValueError, match="deterministic .*eta=0.5"):
        s.step(_model(x, t0), t0, x, eta=0.5)
    x = s.step(_model(x, t0), t0, x).prev_sample
    with pytest.raises(ValueError, match="in order"):
        s.step(_model(x, t2), t2, x)                  # skipped t1
    with pytest.raises(ValueError, match="not in scheduler.timesteps"):
        fresh = _make(cls)
        fresh.set_timesteps(N)
        fresh.step(_model(x, t0), float(t0) + 0.5, x)


# ---------------------------------------------------------------------------------------
# README: latents=latent.x without start_from
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_latent_x_without_start_from_warns_and_start_from_is_exact(kind) -> None:
    fwd, inv = _make(FORWARD[kind]), _make(INVERSE[kind])
    inv.set_timesteps(N)
    z0 = _noise(12) * 0.5
    _loop(inv, z0)
    latent = inv.latent
    fwd.set_timesteps(N)
    with pytest.warns(UserWarning, match="start_from"):
        wrong = _loop(fwd, latent.x * 1.0)        # a pipeline copies latents (latents * init_noise_sigma)
    assert _rel(wrong, z0) > 1e-3                 # what the warning is about
    fwd.start_from(latent)
    fwd.set_timesteps(N)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        right = _loop(fwd, latent.x * 1.0)
    assert _rel(right, z0) < 1e-6
    fresh = _noise(13)                             # a tensor that is no latent's x: no warning
    fwd.set_timesteps(N)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loop(fwd, fresh)
    assert isinstance(latent, Latent)
