"""Stock diffusers pipelines on tiny components, each run with belm's scheduler.

The matrix: Stable Diffusion (txt2img and img2img), SDXL, SD3, FLUX, Kandinsky 2.2 img2img
and AnimateDiff video-to-video (the last two slice ``timesteps[t_start:]`` without
``set_begin_index``). For each: a run, a ``callback_on_step_end`` that edits the latents in
place (must equal the same edit done out of place, and change the result), a rerun at another
step count (and back: nothing leaks between runs), and ``save_pretrained`` ->
``DiffusionPipeline.from_pretrained`` with belm's forward and inverse schedulers. Where belm
must differ from DDIM (no ``eta``), the pipeline call raises a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DiffusionPipeline  # noqa: E402

from belm.adapters.flow_schedulers import FlowBELMInverseScheduler, FlowBELMScheduler  # noqa: E402
from belm.adapters.schedulers import BELMInverseScheduler, BELMScheduler  # noqa: E402
from tiny_models import (  # noqa: E402
    tiny_animatediff_video2video,
    tiny_flux_pipeline,
    tiny_kandinsky22_img2img,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)

pytestmark = pytest.mark.filterwarnings("ignore::belm.adapters.schedulers.IgnoredConfigWarning")

PROMPT = "a photo of a cat"
SEQ = 16          # T5 tokens per prompt: the tiny encoders need no more
N = 4


def _image(seed: int, size: int = 16):
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


def _load(folder: Path):
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd(base: Path):
    return _load(tiny_sd_pipeline(base)), dict(prompt=PROMPT, guidance_scale=3.0, height=16, width=16)


def _sd_img2img(base: Path):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**_load(tiny_sd_pipeline(base)).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(prompt=PROMPT, image=_image(1), strength=0.8, guidance_scale=3.0)


def _sdxl(base: Path):
    return _load(tiny_sdxl_pipeline(base)), dict(prompt=PROMPT, guidance_scale=5.0, height=16, width=16)


def _sd3(base: Path):
    return _load(tiny_sd3_pipeline(base)), dict(prompt=PROMPT, guidance_scale=4.0, height=16, width=16,
                                                max_sequence_length=SEQ)


def _flux(base: Path):
    return _load(tiny_flux_pipeline(base)), dict(prompt=PROMPT, guidance_scale=3.5, height=16, width=16,
                                                 max_sequence_length=SEQ)


def _kandinsky(base: Path):
    embeds = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    return tiny_kandinsky22_img2img(), dict(image=_image(3), image_embeds=embeds[:1], negative_image_embeds=embeds[1:],
                                            height=16, width=16, strength=0.6, guidance_scale=4.0)


def _animatediff(base: Path):
    return tiny_animatediff_video2video(base), dict(video=[_image(4), _image(5)], prompt=PROMPT, strength=0.6,
                                                    guidance_scale=2.0, height=16, width=16)


#: case -> (builder, flow pipeline?)
CASES: dict[str, tuple[Callable, bool]] = {
    "sd": (_sd, False), "sd-img2img": (_sd_img2img, False), "sdxl": (_sdxl, False), "sd3": (_sd3, True),
    "flux": (_flux, True), "kandinsky22-img2img": (_kandinsky, False), "animatediff-video2video": (_animatediff, False),
}
_BUILT: dict[str, tuple] = {}


@pytest.fixture(params=list(CASES))
def case(request, tmp_path_factory):
    """(name, pipeline with belm's scheduler, call kwargs, flow?) built once per session."""
    name = request.param
    if name not in _BUILT:
        builder, flow = CASES[name]
        pipe, kwargs = builder(tmp_path_factory.getbasetemp())
        pipe.scheduler = (FlowBELMScheduler if flow else BELMScheduler).from_config(pipe.scheduler.config)
        _BUILT[name] = (pipe, kwargs, flow)
    pipe, kwargs, flow = _BUILT[name]
    return name, pipe, kwargs, flow


def _run(pipe, kwargs: dict, num_steps: int = N, **extra) -> torch.Tensor:
    """The pipeline's output latents (frames for video) for a fixed generator."""
    out = pipe(**kwargs, num_inference_steps=num_steps, output_type="latent",
               generator=torch.Generator().manual_seed(0), **extra)
    return out.frames if hasattr(out, "frames") else out.images


def _halve_in_place(pipe, i, t, callback_kwargs):
    if i == 0:
        callback_kwargs["latents"].mul_(0.5)
    return callback_kwargs


def _halve_out_of_place(pipe, i, t, callback_kwargs):
    if i == 0:
        return {"latents": callback_kwargs["latents"] * 0.5}
    return callback_kwargs


def test_in_place_callback_edit_equals_the_out_of_place_edit(case) -> None:
    """Issue 19 (2), in stock pipelines; Kandinsky/AnimateDiff also (1): they start mid-grid."""
    name, pipe, kwargs, _ = case
    plain = _run(pipe, kwargs)
    in_place = _run(pipe, kwargs, callback_on_step_end=_halve_in_place)
    out_of_place = _run(pipe, kwargs, callback_on_step_end=_halve_out_of_place)
    assert torch.isfinite(plain).all()
    assert torch.equal(in_place, out_of_place)
    assert float((in_place - plain).abs().max()) > 1e-3 * float(plain.abs().max())   # the edit was taken


def test_rerun_at_another_step_count(case) -> None:
    name, pipe, kwargs, _ = case
    first = _run(pipe, kwargs)
    other = _run(pipe, kwargs, num_steps=N + 2)
    assert torch.isfinite(other).all() and not torch.equal(first, other)
    assert torch.equal(_run(pipe, kwargs), first)          # nothing leaks from one run into the next


def test_save_pretrained_and_reload(case, tmp_path) -> None:
    """Issue 19 (3): the flow schedulers must reload through DiffusionPipeline.from_pretrained."""
    name, pipe, kwargs, flow = case
    forward, inverse = (FlowBELMScheduler, FlowBELMInverseScheduler) if flow else (BELMScheduler, BELMInverseScheduler)
    expected = _run(pipe, kwargs, num_steps=2)
    original = pipe.scheduler
    try:
        for cls in (forward, inverse):
            pipe.scheduler = cls.from_config(original.config, method="bdia", gamma=0.5)
            pipe.save_pretrained(tmp_path / cls.__name__, safe_serialization=True)
            again = DiffusionPipeline.from_pretrained(tmp_path / cls.__name__, local_files_only=True)
            assert type(again.scheduler) is cls and again.scheduler.config.gamma == 0.5
        pipe.scheduler = original
        pipe.save_pretrained(tmp_path / "forward", safe_serialization=True)
        again = DiffusionPipeline.from_pretrained(tmp_path / "forward", local_files_only=True)
        again.set_progress_bar_config(disable=True)
        assert type(again.scheduler) is forward
        assert type(again) is type(pipe)
        # (Kandinsky's reloaded VQ model rounds differently in the last bits: a close match, not equal)
        torch.testing.assert_close(_run(again, kwargs, num_steps=2), expected, rtol=1e-5, atol=1e-5)
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("name", ["sd", "flux"])
@pytest.mark.parametrize("method", ["obelm", "bdia"])
def test_one_step_runs(name, method, tmp_path_factory) -> None:
    """Issue 19 (4): turbo/schnell-style one-step runs with the exact methods."""
    builder, flow = CASES[name]
    pipe, kwargs = builder(tmp_path_factory.getbasetemp())
    pipe.scheduler = (FlowBELMScheduler if flow else BELMScheduler).from_config(pipe.scheduler.config, method=method)
    out = _run(pipe, kwargs, num_steps=1)
    assert torch.isfinite(out).all() and len(pipe.scheduler.timesteps) == 1


def test_eta_is_refused_by_the_pipeline_call(tmp_path_factory) -> None:
    """Where belm must differ from DDIM: no stochastic eta (the step would not be invertible)."""
    pipe, kwargs = _sd(tmp_path_factory.getbasetemp())
    pipe.scheduler = BELMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="deterministic .*eta=0.5"):
        _run(pipe, kwargs, eta=0.5)
