"""Tests of belm.adapters (phase 1): to_epsilon, DiffusersEps, StableDiffusion.

All models are tiny and built from configs (tests/tiny_models.py); no hub access.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
PIL_Image = pytest.importorskip("PIL.Image")

from belm.adapters import PREDICTION_TYPES, DiffusersEps, StableDiffusion, to_epsilon  # noqa: E402
from belm.errors import NonFiniteError  # noqa: E402
from tiny_models import tiny_sd_folder, tiny_unet  # noqa: E402,F401  (fixture import)

T_MID = 500


def _alpha_sigma(scheduler, t: int) -> tuple[float, float]:
    ac = float(scheduler.alphas_cumprod[t].double())
    return ac ** 0.5, (1.0 - ac) ** 0.5


@contextlib.contextmanager
def record_forwards(module: torch.nn.Module):
    """Record (shape, dtype) of the first positional input of every forward of ``module``."""
    calls: list[tuple[tuple[int, ...], torch.dtype]] = []

    def hook(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        calls.append((tuple(sample.shape), sample.dtype))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _x(batch: int = 2, channels: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------
# to_epsilon
# ---------------------------------------------------------------------------------------
class TestToEpsilon:
    def setup_method(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
        self.eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
        ac = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64).reshape(3, 1, 1, 1)
        self.alpha, self.sigma = ac.sqrt(), (1 - ac).sqrt()
        self.x = self.alpha * self.x0 + self.sigma * self.eps

    def test_epsilon_is_identity(self) -> None:
        assert to_epsilon(self.eps, self.x, self.alpha, self.sigma, "epsilon") is self.eps

    def test_v_prediction(self) -> None:
        v = self.alpha * self.eps - self.sigma * self.x0  # the definition of v (Salimans & Ho)
        out = to_epsilon(v, self.x, self.alpha, self.sigma, "v_prediction")
        torch.testing.assert_close(out, self.eps, rtol=0, atol=1e-12)

    def test_sample_prediction(self) -> None:
        out = to_epsilon(self.x0, self.x, self.alpha, self.sigma, "sample")
        torch.testing.assert_close(out, self.eps, rtol=0, atol=1e-12)

    def test_scalar_alpha_sigma(self) -> None:
        a, s = 0.8, 0.6
        x = a * self.x0 + s * self.eps
        torch.testing.assert_close(to_epsilon(self.x0, x, a, s, "sample"), self.eps, rtol=0, atol=1e-12)

    def test_unknown_prediction_type(self) -> None:
        with pytest.raises(ValueError, match="prediction_type.*epsilon.*v_prediction.*sample"):
            to_epsilon(self.eps, self.x, self.alpha, self.sigma, "flow")

    def test_sample_at_sigma_zero(self) -> None:
        with pytest.raises(ValueError, match="sigma"):
            to_epsilon(self.x0, self.x0, 1.0, 0.0, "sample")

    def test_shape_mismatch(self) -> None:
        with pytest.raises(ValueError, match="model_output"):
            to_epsilon(self.eps[:1], self.x, self.alpha, self.sigma, "epsilon")


# ---------------------------------------------------------------------------------------
# DiffusersEps with a pixel UNet2DModel
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prediction_type_conversion(prediction_type: str) -> None:
    unet, sched = tiny_unet(prediction_type)
    eps_fn = DiffusersEps(unet, sched)
    assert eps_fn.prediction_type == prediction_type
    x = _x()
    with torch.no_grad():
        raw = unet(x.float(), T_MID).sample.double()
    a, s = _alpha_sigma(sched, T_MID)
    expected = {"epsilon": raw, "v_prediction": a * raw + s * x, "sample": (x - a * raw) / s}[prediction_type]
    out = eps_fn(x, T_MID)
    assert out.dtype == torch.float64 and out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_scheduler_config_and_override() -> None:
    unet, sched = tiny_unet("v_prediction")
    from_config = DiffusersEps(unet, sched.config)
    assert from_config.prediction_type == "v_prediction"
    torch.testing.assert_close(from_config.alphas_cumprod, sched.alphas_cumprod.double(), rtol=1e-6, atol=0)
    assert DiffusersEps(unet, sched, prediction_type="epsilon").prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type.*epsilon"):
        DiffusersEps(unet, sched, prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersEps(unet, {**dict(sched.config), "prediction_type": "x0"})


def test_class_cfg_matches_manual_formula_in_one_forward() -> None:
    unet, sched = tiny_unet(class_conditional=True)
    y, y0, w = torch.tensor([3, 7]), torch.tensor([0]), 3.0
    eps_fn = DiffusersEps(unet, sched, class_labels=y, null_class_labels=y0, guidance_scale=w)
    x = _x()
    with record_forwards(unet) as calls:
        out = eps_fn(x, torch.tensor(T_MID))
    assert calls == [((4, 3, 8, 8), torch.float32)]  # ONE forward of batch 2B
    with torch.no_grad():
        e_c = unet(x.float(), T_MID, class_labels=y).sample.double()
        e_u = unet(x.float(), T_MID, class_labels=y0.expand(2)).sample.double()
    torch.testing.assert_close(out, e_u + w * (e_c - e_u), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_cfg_is_applied_to_epsilon(prediction_type: str) -> None:
    unet, sched = tiny_unet(prediction_type, class_conditional=True)
    w = 2.5
    out = DiffusersEps(unet, sched, class_labels=1, null_class_labels=0, guidance_scale=w)(_x(), T_MID)
    e_c = DiffusersEps(unet, sched, class_labels=1)(_x(), T_MID)
    e_u = DiffusersEps(unet, sched, class_labels=0)(_x(), T_MID)
    torch.testing.assert_close(out, e_u + w * (e_c - e_u), rtol=1e-4, atol=1e-5)


def test_guidance_one_is_a_single_conditional_forward() -> None:
    unet, sched = tiny_unet(class_conditional=True)
    eps_fn = DiffusersEps(unet, sched, class_labels=torch.tensor([5]), null_class_labels=0, guidance_scale=1.0)
    x = _x(batch=3)
    with record_forwards(unet) as calls:
        out = eps_fn(x, T_MID)
    assert calls == [((3, 3, 8, 8), torch.float32)]
    with torch.no_grad():
        expected = unet(x.float(), T_MID, class_labels=torch.tensor([5, 5, 5])).sample.double()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_guidance_errors() -> None:
    unet, sched = tiny_unet(class_conditional=True)
    with pytest.raises(ValueError, match="guidance_scale"):
        DiffusersEps(unet, sched, class_labels=1, null_class_labels=0, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        DiffusersEps(unet, sched, class_labels=1, null_class_labels=0, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="null_class_labels"):
        DiffusersEps(unet, sched, class_labels=1, guidance_scale=3.0)
    with pytest.raises(ValueError, match="conditioning"):
        DiffusersEps(unet, sched, guidance_scale=3.0)
    with pytest.raises(ValueError, match="class_labels"):
        DiffusersEps(unet, sched, class_labels=torch.tensor([0.5]))
    eps_fn = DiffusersEps(unet, sched, class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="class_labels"):
        eps_fn(_x(batch=3), T_MID)


def test_timestep_handling() -> None:
    unet, sched = tiny_unet()
    eps_fn = DiffusersEps(unet, sched)
    x = _x()
    assert torch.equal(eps_fn(x, 250), eps_fn(x, torch.tensor(250)))
    assert torch.equal(eps_fn(x, 250), eps_fn(x, torch.tensor(250.0)))
    for bad in (1000, -1, torch.tensor(2.5)):
        with pytest.raises(ValueError, match="t must"):
            eps_fn(x, bad)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_dtype_handling(model_dtype: torch.dtype) -> None:
    unet, sched = tiny_unet()
    ref = DiffusersEps(unet, sched)(_x(), T_MID)
    unet = unet.to(model_dtype)
    eps_fn = DiffusersEps(unet, sched)
    x = _x()
    with record_forwards(unet) as calls:
        out = eps_fn(x, T_MID)
    assert calls == [((2, 3, 8, 8), model_dtype)]  # the model runs in its own dtype
    assert out.dtype == torch.float64 and out.device == x.device
    assert unet.dtype == model_dtype
    tol = 0 if model_dtype == torch.float32 else 0.1
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert eps_fn(x.float(), T_MID).dtype == torch.float32


def test_determinism_eval_mode_and_no_grad() -> None:
    unet, sched = tiny_unet(class_conditional=True)
    unet.train()
    eps_fn = DiffusersEps(unet, sched, class_labels=2, null_class_labels=0, guidance_scale=4.0)
    assert not unet.training
    x = _x(seed=3)
    a, b = eps_fn(x, 10), eps_fn(x.clone(), 10)
    assert torch.equal(a, b)
    assert not a.requires_grad


def test_non_finite_output_names_timestep() -> None:
    unet, sched = tiny_unet()
    x = _x()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="input x.*t=7"):
        DiffusersEps(unet, sched, check_finite=True)(x, 7)
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="model returned NaN/Inf.*t=7") as info:
        DiffusersEps(unet, sched, check_finite=True)(_x(), 7)
    assert info.value.timestep == 7
    # Inside a sampler the sampler's own check reports it, with the level as well.
    from belm import OBELM, Schedule
    schedule = Schedule.from_diffusers(sched, 10)
    with pytest.raises(NonFiniteError, match=r"level 0 \(train timestep 901\)") as info:
        OBELM(DiffusersEps(unet, sched), schedule, progress=False).sample(_x())
    assert info.value.level == 0 and info.value.timestep == int(schedule.timesteps[0])


# ---------------------------------------------------------------------------------------
# StableDiffusion on the tiny pipeline
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd(tiny_sd_folder: Path) -> StableDiffusion:
    return StableDiffusion.from_pretrained(tiny_sd_folder)


def _rgb(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_load_from_folder(sd: StableDiffusion) -> None:
    assert sd.vae_factor == 2 and sd.latent_channels == 4
    assert sd.scaling_factor == pytest.approx(0.18215) and sd.shift_factor is None
    assert sd.dtype == torch.float32 and sd.device == torch.device("cpu")
    assert type(sd.unet).__name__ == "UNet2DConditionModel"


def test_from_pipeline_object(sd: StableDiffusion) -> None:
    again = StableDiffusion.from_pretrained(sd.pipeline, dtype=None)
    assert again.unet is sd.unet and again.vae is sd.vae

    class NoVae:
        unet, text_encoder, tokenizer, scheduler, vae = sd.unet, sd.text_encoder, sd.tokenizer, sd.scheduler, None

    with pytest.raises(ValueError, match="vae"):
        StableDiffusion.from_pretrained(NoVae())


def test_missing_folder_and_component(tmp_path: Path, tiny_sd_folder: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        StableDiffusion.from_pretrained(missing)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_folder, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="'vae'"):
        StableDiffusion.from_pretrained(broken)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_sd_folder, no_weights)
    for f in (no_weights / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="'unet'.*safetensors"):
        StableDiffusion.from_pretrained(no_weights)
    no_config = tmp_path / "no_config"
    shutil.copytree(tiny_sd_folder, no_config, ignore=shutil.ignore_patterns("scheduler_config.json"))
    with pytest.raises(FileNotFoundError, match="'scheduler'"):
        StableDiffusion.from_pretrained(no_config)


def test_encode_is_deterministic_latent_mean(sd: StableDiffusion) -> None:
    img = _rgb(16, 16)
    z1, z2 = sd.encode(img), sd.encode(PIL_Image.fromarray(img))
    assert z1.shape == (1, 4, 8, 8) and z1.dtype == torch.float32
    assert torch.equal(z1, z2)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        mean = sd.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(z1, mean * sd.scaling_factor, rtol=1e-6, atol=1e-6)
    assert torch.equal(sd.encode(x), z1)  # float tensor in [-1, 1]


def test_decode_round_trip_shapes(sd: StableDiffusion) -> None:
    z = sd.encode([_rgb(16, 16, 0), _rgb(16, 16, 1)])
    assert z.shape == (2, 4, 8, 8)
    images = sd.decode(z)
    assert len(images) == 2 and all(im.size == (16, 16) and im.mode == "RGB" for im in images)
    x = sd.decode_tensor(z)
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert sd.decode_tensor(z[0]).shape == (1, 3, 16, 16)


def test_non_square_and_center_crop(sd: StableDiffusion) -> None:
    z = sd.encode(PIL_Image.fromarray(_rgb(48, 32)))  # width 48, height 32
    assert z.shape == (1, 4, 16, 24)
    assert sd.decode(z)[0].size == (48, 32)
    odd = _rgb(47, 33)
    x = sd.preprocess(odd)
    assert x.shape == (1, 3, 32, 46)
    full = torch.from_numpy(odd).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert torch.equal(x, full[:, :, 0:32, 0:46])  # center crop: (33-32)//2 = 0, (47-46)//2 = 0
    x = sd.preprocess(_rgb(49, 36))
    full = torch.from_numpy(_rgb(49, 36)).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert torch.equal(x, full[:, :, :, 0:48])
    assert sd.encode(odd).shape == (1, 4, 16, 23)


def test_rgba_greyscale_palette_and_path(sd: StableDiffusion, tmp_path: Path) -> None:
    rgb = _rgb(16, 16)
    z_rgb = sd.encode(rgb)
    opaque = np.concatenate([rgb, np.full((16, 16, 1), 255, np.uint8)], axis=2)
    assert torch.equal(sd.encode(PIL_Image.fromarray(opaque)), z_rgb)
    transparent = opaque.copy()
    transparent[..., 3] = 0  # composited onto white
    assert torch.equal(sd.preprocess(PIL_Image.fromarray(transparent)), torch.ones(1, 3, 16, 16))
    grey = rgb[..., 0]
    z_grey = sd.encode(PIL_Image.fromarray(grey))
    assert torch.equal(z_grey, sd.encode(np.repeat(grey[..., None], 3, axis=2)))
    assert torch.equal(sd.encode(grey), z_grey)
    palette = PIL_Image.fromarray(rgb).convert("P")
    assert sd.encode(palette).shape == (1, 4, 8, 8)
    path = tmp_path / "img.png"
    PIL_Image.fromarray(rgb).save(path)
    assert torch.equal(sd.encode(path), z_rgb)
    assert torch.equal(sd.encode(str(path)), z_rgb)


def test_bad_images(sd: StableDiffusion, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        sd.encode(tmp_path / "nothere.png")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="garbage.png"):
        sd.encode(garbage)
    with pytest.raises(ValueError, match="zero size"):
        sd.encode(PIL_Image.new("RGB", (0, 0)))
    with pytest.raises(ValueError, match="zero size"):
        sd.encode(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 2"):
        sd.encode(np.zeros((1, 5, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        sd.encode(torch.rand(1, 3, 8, 8) * 255)
    with pytest.raises(ValueError, match="uint8"):
        sd.encode(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="same size"):
        sd.encode([_rgb(16, 16), _rgb(8, 8)])


def test_decode_wrong_latent_shape(sd: StableDiffusion) -> None:
    with pytest.raises(ValueError, match="4 channels|\\(B, 4, h, w\\)"):
        sd.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="latent_channels"):
        sd.decode_tensor(torch.zeros(8, 8))


def test_prompt_cache_and_eps(sd: StableDiffusion) -> None:
    sd._prompt_cache.clear()
    with record_forwards(sd.text_encoder) as text_calls:
        e1 = sd.eps(prompt="a dog", guidance_scale=7.5)
        e2 = sd.eps(prompt="a dog", guidance_scale=7.5, negative_prompt="")
        sd.eps(prompt=["a dog", "a cat"], guidance_scale=2.0)
    assert len(text_calls) == 3  # "a dog", "", "a cat": each encoded once
    assert set(sd._prompt_cache) == {"a dog", "", "a cat"}
    assert e1.encoder_hidden_states.shape == (1, 77, 32)
    assert torch.equal(e1.encoder_hidden_states, e2.encoder_hidden_states)

    z = _x(batch=2, channels=4, size=8, seed=5)
    with record_forwards(sd.unet) as calls:
        out = e1(z, 981)
    assert calls == [((4, 4, 8, 8), torch.float32)]  # CFG: one forward of 2B
    assert out.shape == z.shape and out.dtype == torch.float64
    assert torch.equal(out, e1(z, 981))
    # manual CFG with two separate forwards
    cond, uncond = sd.prompt_embeds("a dog"), sd.prompt_embeds("")
    with torch.no_grad():
        e_c = sd.unet(z.float(), 981, encoder_hidden_states=cond.expand(2, -1, -1)).sample.double()
        e_u = sd.unet(z.float(), 981, encoder_hidden_states=uncond.expand(2, -1, -1)).sample.double()
    torch.testing.assert_close(out, e_u + 7.5 * (e_c - e_u), rtol=1e-4, atol=1e-4)

    single = sd.eps(prompt="a dog", guidance_scale=1.0)
    assert single.uncond_encoder_hidden_states is None
    with record_forwards(sd.unet) as calls:
        single(z, 981)
    assert calls == [((2, 4, 8, 8), torch.float32)]
    with pytest.raises(ValueError, match="negative_prompt"):
        sd.eps(prompt=["a", "b"], negative_prompt=["x", "y", "z"])


def test_schedule(sd: StableDiffusion) -> None:
    sched = sd.schedule(num_steps=10)
    assert sched.num_steps == 10
    torch.testing.assert_close(sched.alphas_cumprod, sd.scheduler.alphas_cumprod.double())


def test_tiny_pipeline_reloads_with_diffusers(tiny_sd_folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    index = json.loads((tiny_sd_folder / "model_index.json").read_text())
    assert index["tokenizer"][1] == "CLIPTokenizer"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    ids = pipe.tokenizer("a dog").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id and len(ids) == 6
