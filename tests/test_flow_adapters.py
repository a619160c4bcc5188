"""Flow-matching transformer adapters (SD3, FLUX) on tiny pipelines built from configs.

(a) the velocity functions reproduce the stock pipelines: a loop of the pipeline's own
``FlowMatchEulerDiscreteScheduler.step`` driven by belm's velocity function gives the
pipeline's latents bit for bit (SD3 with CFG, FLUX with the guidance embedding; FLUX true
CFG, batched into one pass here but two in the pipeline, to 1e-5); the helpers' grids are
the pipelines' σ exactly; (b) belm's samplers on those grids: exact round trips in bitwise
mode with guidance, DDIM = the pipeline's Euler loop; (c) latents, packing, bad input;
(d) the drop-in FlowBELMScheduler / FlowBELMInverseScheduler in the stock pipelines.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from belm import DDIM, OBELM, Schedule  # noqa: E402
from belm.adapters import Flux, FluxVelocity, SD3Velocity, StableDiffusion, StableDiffusion3  # noqa: E402
from belm.adapters.flow import calculate_shift, pack_latents, unpack_latents  # noqa: E402
from tiny_models import tiny_flux_folder, tiny_flux_pipeline, tiny_sd3_folder  # noqa: E402,F401  (fixtures)

PROMPT, NEGATIVE = "a photo of a cat", "blurry"
SEQ = 16  # T5 tokens per prompt (the pipelines' 256 / 512 would only slow the tiny models down)


def _noise(shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _image(seed: int = 0) -> torch.Tensor:
    """A smooth random image (1, 3, 16, 16) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    phase = torch.rand(3, 1, 1, generator=g) * 6
    return (0.6 * torch.sin(5 * xx + phase) * torch.cos(4 * yy - phase)).unsqueeze(0)


_CACHE: dict = {}


def _sd3(folder, dtype=torch.float32) -> StableDiffusion3:
    key = ("sd3", str(folder), dtype)
    if key not in _CACHE:
        _CACHE[key] = StableDiffusion3.from_pretrained(folder, dtype=dtype, max_sequence_length=SEQ)
    return _CACHE[key]


def _flux(folder, dtype=torch.float32) -> Flux:
    key = ("flux", str(folder), dtype)
    if key not in _CACHE:
        _CACHE[key] = Flux.from_pretrained(folder, dtype=dtype, max_sequence_length=SEQ)
    return _CACHE[key]


def _euler_loop(scheduler, v, x: torch.Tensor, **set_timesteps) -> torch.Tensor:
    """The pipelines' denoising loop: set_timesteps as the pipeline calls it, then scheduler.step on
    the velocity at each of scheduler.timesteps."""
    scheduler.set_timesteps(**set_timesteps)
    for t in scheduler.timesteps:
        x = scheduler.step(v(x, (t / 1000).double()), t, x, return_dict=False)[0]
    return x


def _flux_mu() -> float:
    """FluxPipeline's μ for a 16×16 image: (8/2)·(8/2) = 16 packed tokens."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_shift

    return diffusers_shift(16, 256, 4096, 0.5, 1.15)


# ---------------------------------------------------------------------------------------
# (a) the velocity functions are the stock pipelines' networks
# ---------------------------------------------------------------------------------------
def test_sd3_velocity_reproduces_the_stock_pipeline(tiny_sd3_folder) -> None:
    sd3, N = _sd3(tiny_sd3_folder), 5
    pipe = sd3.pipeline
    xT = _noise((1, 4, 8, 8), seed=1)
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=N, guidance_scale=4.0, latents=xT.clone(),
               height=16, width=16, output_type="latent", max_sequence_length=SEQ).images
    sigmas = pipe.scheduler.sigmas.clone()
    v = sd3.velocity(PROMPT, guidance_scale=4.0, negative_prompt=NEGATIVE)
    assert v.guided and v.dtype == torch.float32
    out = _euler_loop(pipe.scheduler, v, xT.clone(), num_inference_steps=N)
    assert torch.equal(out, ref)
    # the helper's grid is the pipeline's, to the bit
    sched = sd3.schedule(N)
    assert torch.equal(sched.sigmas, sigmas.double())
    assert sched.kind == "flow" and float(sched.sigmas[0]) == 1.0


def test_flux_velocity_reproduces_the_stock_pipeline(tiny_flux_folder) -> None:
    flux, N = _flux(tiny_flux_folder), 4
    pipe = flux.pipeline
    assert flux.guidance_embeds
    xT = _noise((1, 4, 8, 8), seed=2)
    ref = pipe(PROMPT, num_inference_steps=N, guidance_scale=3.5, latents=pack_latents(xT), height=16, width=16,
               output_type="latent", max_sequence_length=SEQ).images
    sigmas = pipe.scheduler.sigmas.clone()
    v = flux.velocity(PROMPT, guidance_scale=3.5)
    out = _euler_loop(pipe.scheduler, v, xT.clone(), sigmas=np.linspace(1.0, 1 / N, N), mu=_flux_mu())
    assert torch.equal(out, unpack_latents(ref, 8, 8))
    # FluxPipeline's grid: linspace(1, 1/N, N) shifted by μ(image tokens), to the bit
    assert torch.equal(flux.scheduler_sigmas(N, height=16, width=16), sigmas[:-1])
    sched = flux.schedule(N, height=16, width=16)
    assert torch.equal(sched.sigmas, sigmas.double())
    assert sched.kind == "flow"
    # a different guidance value changes the velocity (the embedding is used)
    x, t = _noise((1, 4, 8, 8), seed=3), torch.tensor(0.6, dtype=torch.float64)
    assert not torch.equal(v(x, t), flux.velocity(PROMPT, guidance_scale=1.0)(x, t))


def test_flux_true_cfg_is_batched_and_matches_the_pipeline(tiny_flux_folder) -> None:
    flux, N = _flux(tiny_flux_folder), 3
    pipe = flux.pipeline
    xT = _noise((1, 4, 8, 8), seed=4)
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=2.5, num_inference_steps=N, guidance_scale=3.5,
               latents=pack_latents(xT), height=16, width=16, output_type="latent",
               max_sequence_length=SEQ).images
    v = flux.velocity(PROMPT, guidance_scale=3.5, negative_prompt=NEGATIVE, true_cfg_scale=2.5)
    batches: list[int] = []
    hook = flux.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        out = _euler_loop(pipe.scheduler, v, xT.clone(), sigmas=np.linspace(1.0, 1 / N, N), mu=_flux_mu())
    finally:
        hook.remove()
    assert batches == [2] * N  # one forward of batch 2B per step
    # the pipeline makes two forwards of batch B: same maths, other float rounding
    assert _rel(out, unpack_latents(ref, 8, 8)) <= 1e-5


def test_velocity_dtype_device_and_determinism(tiny_sd3_folder, tiny_flux_folder) -> None:
    x = _noise((2, 4, 8, 8), seed=5).double()
    t = torch.tensor(0.75, dtype=torch.float64)
    for helper in (_sd3(tiny_sd3_folder, torch.bfloat16), _flux(tiny_flux_folder, torch.bfloat16)):
        v = helper.velocity(PROMPT, guidance_scale=3.0)
        out = v(x, t)
        assert out.dtype == torch.bfloat16 and out.shape == x.shape and out.device == x.device
        assert torch.isfinite(out).all()
        assert torch.equal(out, v(x.clone(), t.clone()))  # same bits in, same bits out
        # a prompt per image, the same prompt twice: both rows equal the broadcast result
        assert torch.equal(helper.velocity([PROMPT, PROMPT], guidance_scale=3.0)(x, t), out)


# ---------------------------------------------------------------------------------------
# (b) belm's samplers on the pipelines' flow grids
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sd3_bitwise_round_trip_with_guidance(tiny_sd3_folder, dtype) -> None:
    sd3 = _sd3(tiny_sd3_folder, dtype)
    z0 = sd3.encode(_image(0)).to(dtype)
    s = OBELM(sd3.velocity(PROMPT, guidance_scale=4.0), sd3.schedule(6), exact="bitwise", progress=False)
    assert torch.equal(s.sample(s.invert(z0)), z0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flux_bitwise_round_trip_with_guidance(tiny_flux_folder, dtype) -> None:
    flux = _flux(tiny_flux_folder, dtype)
    z0 = flux.encode(_image(1)).to(dtype)
    s = OBELM(flux.velocity(PROMPT, guidance_scale=3.5), flux.schedule(6, height=16, width=16), exact="bitwise",
              progress=False)
    assert torch.equal(s.sample(s.invert(z0)), z0)


def test_ddim_on_a_flow_grid_is_the_pipelines_euler_loop(tiny_sd3_folder) -> None:
    """DDIM on a flow schedule = diffusers' FlowMatchEulerDiscreteScheduler.step loop (inside the
    stock StableDiffusion3Pipeline) on the same tiny SD3 transformer, float32: ≤ 1e-5 relative.
    (diffusers casts the state to the model dtype every step; belm keeps it in float64.)"""
    sd3, N = _sd3(tiny_sd3_folder), 8
    xT = _noise((1, 4, 8, 8), seed=6)
    ref = sd3.pipeline(PROMPT, num_inference_steps=N, guidance_scale=4.0, latents=xT.clone(), height=16, width=16,
                       output_type="latent", max_sequence_length=SEQ).images
    out = DDIM(sd3.velocity(PROMPT, guidance_scale=4.0), sd3.schedule(N), progress=False).sample(xT)
    assert _rel(out, ref) <= 1e-5


# ---------------------------------------------------------------------------------------
# (c) latents, packing, bad input
# ---------------------------------------------------------------------------------------
def test_latents_use_the_vae_shift_and_scaling(tiny_sd3_folder, tiny_flux_folder) -> None:
    img = _image(2)
    for helper in (_sd3(tiny_sd3_folder), _flux(tiny_flux_folder)):
        assert isinstance(helper, StableDiffusion)
        cfg = helper.vae.config
        assert helper.shift_factor == cfg.shift_factor and helper.scaling_factor == cfg.scaling_factor
        with torch.no_grad():
            mean = helper.vae.encode(img).latent_dist.mean
        z = helper.encode(img)
        assert z.shape == (1, 4, 8, 8)
        assert torch.allclose(z, (mean - cfg.shift_factor) * cfg.scaling_factor, rtol=0, atol=1e-6)
        with torch.no_grad():
            ref = helper.vae.decode(z / cfg.scaling_factor + cfg.shift_factor).sample.clamp(-1, 1)
        assert torch.allclose(helper.decode_tensor(z), ref, rtol=0, atol=1e-6)


def test_images_are_cropped_to_whole_patches(tiny_sd3_folder, tiny_flux_folder) -> None:
    """FLUX packs 2×2 latent patches: a 22×30 image is cropped to 20×28 (multiples of 2·f = 4), a
    (10, 14) latent that packs; SD3 (patch side 1) keeps multiples of f = 2: a (11, 15) latent."""
    img = torch.rand(1, 3, 22, 30, generator=torch.Generator().manual_seed(9)) * 2 - 1
    flux, sd3 = _flux(tiny_flux_folder), _sd3(tiny_sd3_folder)
    assert flux.pixel_multiple == 4 and sd3.pixel_multiple == 2
    z = flux.encode(img)
    assert z.shape == (1, 4, 10, 14)
    assert flux.velocity(PROMPT)(z, torch.tensor(0.5, dtype=torch.float64)).shape == z.shape
    assert sd3.encode(img).shape == (1, 4, 11, 15)


def test_pack_unpack_are_exact_inverses() -> None:
    x = _noise((2, 3, 6, 4), seed=7)
    packed = pack_latents(x)
    assert packed.shape == (2, 6, 12)
    assert torch.equal(unpack_latents(packed, 6, 4), x)
    assert torch.equal(packed[0, 1, :4], torch.stack([x[0, 0, 0, 2], x[0, 0, 0, 3], x[0, 0, 1, 2], x[0, 0, 1, 3]]))
    with pytest.raises(ValueError, match="even"):
        pack_latents(_noise((1, 3, 5, 4)))


def test_calculate_shift_is_diffusers() -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_shift

    config = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    for n in (16, 256, 1000, 4096):
        assert calculate_shift(n, config) == diffusers_shift(n, 256, 4096, 0.5, 1.15)


def test_bad_input_errors(tiny_sd3_folder, tiny_flux_folder, tmp_path) -> None:
    sd3, flux = _sd3(tiny_sd3_folder), _flux(tiny_flux_folder)
    v = sd3.velocity(PROMPT, guidance_scale=1.0)
    x = _noise((1, 4, 8, 8))
    with pytest.raises(TypeError, match="flow schedule"):
        v(x, torch.tensor(500))  # an integer train timestep: a discrete schedule was used
    with pytest.raises(ValueError, match=r"σ in \[0, 1\]"):
        v(x, torch.tensor(1.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="in_channels=4"):
        v(_noise((1, 3, 8, 8)), torch.tensor(0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="in_channels=16"):
        flux.velocity(PROMPT)(_noise((1, 3, 8, 8)), torch.tensor(0.5, dtype=torch.float64))
    pe, pooled = flux.prompt_embeds(PROMPT)
    with pytest.raises(ValueError, match="guidance="):
        FluxVelocity(flux.transformer, pe, pooled)  # the model has a guidance embedding
    with pytest.raises(ValueError, match="unconditional"):
        SD3Velocity(sd3.transformer, *sd3.prompt_embeds(PROMPT), guidance_scale=3.0)
    with pytest.raises(ValueError, match="height=, width="):
        flux.schedule(4)  # dynamic shifting needs the image size
    with pytest.raises(ValueError, match="negative_prompt has 2"):
        sd3.velocity(PROMPT, guidance_scale=2.0, negative_prompt=["a", "b"])
    with pytest.raises(FileNotFoundError, match="not found"):
        StableDiffusion3.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        Flux.from_pretrained(_without(tiny_flux_folder, tmp_path, "text_encoder_2"))
    with pytest.raises(FileNotFoundError, match=r"\.safetensors"):
        Flux.from_pretrained(_without(tiny_flux_folder, tmp_path, "transformer/*.safetensors"))


def _without(folder, tmp_path, pattern: str):
    """A copy of ``folder`` with the files or folder matching ``pattern`` removed."""
    import shutil

    copy = tmp_path / f"copy_{pattern.replace('/', '_').replace('*', '')}"
    shutil.copytree(folder, copy)
    for path in copy.glob(pattern):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return copy


def test_flux_without_guidance_embedding(tmp_path) -> None:
    """FLUX.1-schnell style: no guidance embedding; guidance_scale is ignored as in FluxPipeline."""
    flux = Flux.from_pretrained(tiny_flux_pipeline(tmp_path, guidance_embeds=False), max_sequence_length=SEQ)
    assert not flux.guidance_embeds
    x, t = _noise((1, 4, 8, 8), seed=8), torch.tensor(0.5, dtype=torch.float64)
    assert torch.equal(flux.velocity(PROMPT, guidance_scale=3.5)(x, t), flux.velocity(PROMPT, guidance_scale=1.0)(x, t))
    pe, pooled = flux.prompt_embeds(PROMPT)
    with pytest.raises(ValueError, match="no guidance embedding"):
        FluxVelocity(flux.transformer, pe, pooled, guidance=3.5)


def test_from_folder_picks_the_helper(tiny_sd3_folder, tiny_flux_folder, tmp_path) -> None:
    from belm.adapters import from_folder
    from belm.adapters.auto import adapter_class

    assert adapter_class(tiny_sd3_folder) is StableDiffusion3
    assert adapter_class(tiny_flux_folder) is Flux
    flux = from_folder(tiny_flux_folder, max_sequence_length=SEQ)
    assert isinstance(flux, Flux) and flux.max_sequence_length == SEQ
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match="KandinskyPipeline.*FluxPipeline"):
        from_folder(odd)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        from_folder(tmp_path)


# ---------------------------------------------------------------------------------------
# (d) drop-in schedulers for the stock flow pipelines
# ---------------------------------------------------------------------------------------
def _count_calls(module):
    calls: list[int] = []
    handle = module.register_forward_pre_hook(lambda _m, _a, kw: calls.append(kw["hidden_states"].shape[0]),
                                              with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("method", ["obelm", "bdia", "ddim"])
def test_stock_sd3_pipeline_with_flow_belm_scheduler(tiny_sd3_folder, method) -> None:
    from belm import BDIA
    from belm.adapters import FlowBELMScheduler

    sd3, N, w = _sd3(tiny_sd3_folder), 12, 4.0
    pipe = sd3.pipeline
    original = pipe.scheduler
    pipe.scheduler = FlowBELMScheduler.from_config(original.config, method=method)
    xT = _noise((1, 4, 8, 8), seed=10)
    calls, handle = _count_calls(sd3.transformer)
    try:
        out = pipe(PROMPT, num_inference_steps=N, guidance_scale=w, latents=xT.clone(), height=16, width=16,
                   output_type="latent", max_sequence_length=SEQ).images
    finally:
        handle.remove()
        pipe.scheduler = original
    assert calls == [2] * N  # exactly N transformer calls, CFG batched
    sampler = {"obelm": OBELM, "bdia": BDIA, "ddim": DDIM}[method]
    ref = sampler(sd3.velocity(PROMPT, guidance_scale=w), sd3.schedule(N), progress=False).sample(xT)
    assert _rel(out, ref) <= 1e-4


def test_stock_flux_pipeline_with_flow_belm_scheduler(tiny_flux_folder) -> None:
    from belm.adapters import FlowBELMScheduler

    flux, N = _flux(tiny_flux_folder), 12
    pipe = flux.pipeline
    original = pipe.scheduler
    pipe.scheduler = FlowBELMScheduler.from_config(original.config)
    xT = _noise((1, 4, 8, 8), seed=11)
    calls, handle = _count_calls(flux.transformer)
    try:
        out = pipe(PROMPT, num_inference_steps=N, guidance_scale=3.5, latents=pack_latents(xT), height=16, width=16,
                   output_type="latent", max_sequence_length=SEQ).images
        # the pipeline handed the scheduler FluxPipeline's σ (linspace(1, 1/N, N) shifted by μ)
        assert torch.equal(pipe.scheduler.sigmas[:-1], flux.scheduler_sigmas(N, height=16, width=16))
    finally:
        handle.remove()
        pipe.scheduler = original
    assert calls == [1] * N
    ref = OBELM(flux.velocity(PROMPT, guidance_scale=3.5), flux.schedule(N, height=16, width=16),
                progress=False).sample(xT)
    assert _rel(unpack_latents(out, 8, 8), ref) <= 1e-4


def test_flow_pipeline_inversion_reconstructs_exactly(tiny_sd3_folder) -> None:
    """FlowBELMInverseScheduler in a pipeline-style inversion loop (the transformer called as
    StableDiffusion3Pipeline calls it), then a stock pipeline run seeded with the latent."""
    from belm.adapters import FlowBELMInverseScheduler

    sd3, N, w = _sd3(tiny_sd3_folder), 10, 4.0
    pipe = sd3.pipeline
    z0 = sd3.encode(_image(3))
    with torch.no_grad():  # as inside the pipeline's __call__ (autograd may pick other kernels)
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=True,
                                                      max_sequence_length=SEQ)
    embeds, pooled_all = torch.cat([npe, pe]), torch.cat([npooled, pooled])
    inv = FlowBELMInverseScheduler.from_config(pipe.scheduler.config)
    inv.set_timesteps(N)
    assert inv.timesteps[0] == 0.0 and len(inv.timesteps) == N
    x = z0
    for t in inv.timesteps:
        with torch.no_grad():
            v_u, v_c = sd3.transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(2),
                                       encoder_hidden_states=embeds, pooled_projections=pooled_all,
                                       return_dict=False)[0].chunk(2)
        x = inv.step(v_u + w * (v_c - v_u), t, x).prev_sample
    latent = inv.latent
    out = _stock_pipeline_from(pipe, latent, N, w)
    assert float((out - z0).abs().max()) <= 1e-6
    # the same latent through belm's own sampler and the velocity function
    rec = OBELM(sd3.velocity(PROMPT, guidance_scale=w), sd3.schedule(N), progress=False).sample(latent)
    assert float((rec - z0).abs().max()) <= 1e-6


def _stock_pipeline_from(pipe, latent, num_steps: int, guidance_scale: float) -> torch.Tensor:
    """The stock pipeline's output latents, run with a FlowBELMScheduler seeded with ``latent``
    (the pipeline's own scheduler is put back afterwards)."""
    from belm.adapters import FlowBELMScheduler

    original = pipe.scheduler
    scheduler = FlowBELMScheduler.from_config(original.config)
    scheduler.start_from(latent)
    pipe.scheduler = scheduler
    try:
        return pipe(PROMPT, num_inference_steps=num_steps, guidance_scale=guidance_scale, latents=latent.x,
                    height=16, width=16, output_type="latent", max_sequence_length=SEQ).images
    finally:
        pipe.scheduler = original


def test_flux_pipeline_inversion_reconstructs_exactly(tiny_flux_folder) -> None:
    """FLUX: FlowBELMInverseScheduler on FluxPipeline's grid (sigmas=, mu=) with the transformer
    called as the pipeline calls it (packed latents, ids, guidance embedding), then a stock
    FluxPipeline run seeded with the latent."""
    from belm.adapters import FlowBELMInverseScheduler

    flux, N, g = _flux(tiny_flux_folder), 8, 3.5
    pipe = flux.pipeline
    z0 = pack_latents(flux.encode(_image(4)))
    with torch.no_grad():
        pe, pooled, text_ids = pipe.encode_prompt(PROMPT, None, max_sequence_length=SEQ)
    img_ids = pipe._prepare_latent_image_ids(1, 4, 4, z0.device, z0.dtype)
    guidance = torch.full([1], g, dtype=torch.float32)
    inv = FlowBELMInverseScheduler.from_config(pipe.scheduler.config)
    inv.set_timesteps(sigmas=np.linspace(1.0, 1 / N, N), mu=_flux_mu())
    x = z0
    for t in inv.timesteps:
        with torch.no_grad():
            v = flux.transformer(hidden_states=x, timestep=t.expand(1) / 1000, guidance=guidance,
                                 pooled_projections=pooled, encoder_hidden_states=pe, txt_ids=text_ids,
                                 img_ids=img_ids, return_dict=False)[0]
        x = inv.step(v, t, x).prev_sample
    out = _stock_pipeline_from(pipe, inv.latent, N, g)
    assert float((out - z0).abs().max()) <= 1e-6


def test_flow_scheduler_config_errors() -> None:
    from belm.adapters import FlowBELMScheduler

    with pytest.raises(ValueError, match="stochastic_sampling"):
        FlowBELMScheduler(stochastic_sampling=True)
    with pytest.raises(ValueError, match="method must be one of"):
        FlowBELMScheduler(method="euler")
    s = FlowBELMScheduler(shift=3.0)
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="not in scheduler.timesteps"):
        s.step(torch.zeros(1, 2), s.timesteps[1] + 0.5, torch.zeros(1, 2))   # off the grid
    with pytest.raises(ValueError, match="sigmas="):
        s.set_timesteps(timesteps=[900.0, 500.0])
