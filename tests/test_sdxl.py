"""SDXL on a tiny StableDiffusionXLPipeline built from configs: the ε function with two text
encoders and added conditioning reproduces the stock pipeline; exact round trips in bitwise
mode with guidance; the stock pipeline driven by BELMScheduler; folder errors.
"""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from belm import OBELM, Schedule  # noqa: E402
from belm.adapters import BELMScheduler, StableDiffusion, StableDiffusionXL  # noqa: E402
from tiny_models import tiny_sdxl_folder  # noqa: E402,F401  (fixture)

PROMPT = "a photo of a cat"
_CACHE: dict = {}


def _noise(shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _sdxl(folder, dtype=torch.float32) -> StableDiffusionXL:
    key = (str(folder), dtype)
    if key not in _CACHE:
        _CACHE[key] = StableDiffusionXL.from_pretrained(folder, dtype=dtype)
    return _CACHE[key]


@contextlib.contextmanager
def _unet_batches(unet):
    batches: list[int] = []
    handle = unet.register_forward_pre_hook(lambda _m, args, kw: batches.append((args[0] if args else
                                                                                 kw["sample"]).shape[0]),
                                            with_kwargs=True)
    try:
        yield batches
    finally:
        handle.remove()


@pytest.mark.parametrize("negative_prompt", [None, "blurry"])
def test_sdxl_eps_reproduces_the_stock_pipeline(tiny_sdxl_folder, negative_prompt) -> None:
    """The pipeline's own DDIM loop on belm's ε function gives its latents bit for bit
    (None: zero unconditional embeddings, force_zeros_for_empty_prompt)."""
    sdxl, N = _sdxl(tiny_sdxl_folder), 4
    pipe = sdxl.pipeline
    xT = _noise((1, 4, 8, 8), seed=1)
    ref = pipe(PROMPT, negative_prompt=negative_prompt, num_inference_steps=N, guidance_scale=5.0,
               latents=xT.clone(), height=16, width=16, output_type="latent").images
    eps = sdxl.eps(PROMPT, guidance_scale=5.0, negative_prompt=negative_prompt)
    pipe.scheduler.set_timesteps(N)
    x = xT.clone()
    with _unet_batches(sdxl.unet) as batches:
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(eps(x, t), t, x).prev_sample
    assert batches == [2] * N  # CFG batched into one forward
    assert torch.equal(x, ref)


def test_sdxl_added_conditioning_is_used(tiny_sdxl_folder) -> None:
    """time_ids follow the latent size (pixels = latent × VAE factor) and the pooled embedding
    matters: another size or another prompt changes ε."""
    sdxl = _sdxl(tiny_sdxl_folder)
    eps = sdxl.eps(PROMPT, guidance_scale=1.0)
    x, t = _noise((1, 4, 8, 8), seed=2), torch.tensor(500)
    added = eps.model._added_cond(x)
    assert added["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]
    assert added["text_embeds"].shape == (1, sdxl.text_encoder_2.config.projection_dim)
    assert eps.model._added_cond(_noise((1, 4, 8, 12)))["time_ids"].tolist() == [[16.0, 24.0, 0.0, 0.0, 16.0, 24.0]]
    assert not torch.equal(eps(x, t), sdxl.eps("a dog", guidance_scale=1.0)(x, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdxl_bitwise_round_trip_with_guidance(tiny_sdxl_folder, dtype) -> None:
    sdxl = _sdxl(tiny_sdxl_folder, dtype)
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z0 = sdxl.encode(img).to(dtype)
    s = OBELM(sdxl.eps(PROMPT, guidance_scale=5.0), sdxl.schedule(10), exact="bitwise", progress=False)
    assert torch.equal(s.sample(s.invert(z0)), z0)


def test_stock_sdxl_pipeline_with_belm_scheduler(tiny_sdxl_folder) -> None:
    """A stock StableDiffusionXLPipeline with BELMScheduler: N UNet calls, ≤ 1e-4 from belm's sampler."""
    sdxl, N = _sdxl(tiny_sdxl_folder), 20
    pipe = sdxl.pipeline
    original = pipe.scheduler
    pipe.scheduler = BELMScheduler.from_config(original.config)
    try:
        xT = _noise((1, 4, 8, 8), seed=4)
        with _unet_batches(sdxl.unet) as batches:
            out = pipe(PROMPT, num_inference_steps=N, guidance_scale=5.0, latents=xT, height=16, width=16,
                       output_type="latent").images
        assert batches == [2] * N
        ref = OBELM(sdxl.eps(PROMPT, guidance_scale=5.0), Schedule.from_diffusers(pipe.scheduler, num_steps=N),
                    progress=False).sample(xT)
        assert _rel(out, ref) <= 1e-4
    finally:
        pipe.scheduler = original


def test_sdxl_folder_errors(tiny_sdxl_folder, tmp_path) -> None:
    from belm.adapters.auto import adapter_class

    sdxl = _sdxl(tiny_sdxl_folder)
    assert isinstance(sdxl, StableDiffusion) and adapter_class(tiny_sdxl_folder) is StableDiffusionXL
    copy = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl_folder, copy)
    shutil.rmtree(copy / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="tokenizer_2"):
        StableDiffusionXL.from_pretrained(copy)
    with pytest.raises(ValueError, match="text_encoder_2"):
        StableDiffusionXL.from_pretrained(_NoSecondEncoder(sdxl.pipeline))
    with pytest.raises(ValueError, match="negative_prompt has 3"):
        sdxl.eps([PROMPT, PROMPT], guidance_scale=5.0, negative_prompt=["a", "b", "c"])


class _NoSecondEncoder:
    def __init__(self, pipe) -> None:
        for name in ("vae", "unet", "text_encoder", "tokenizer", "tokenizer_2", "scheduler"):
            setattr(self, name, getattr(pipe, name))
        self.text_encoder_2 = None
