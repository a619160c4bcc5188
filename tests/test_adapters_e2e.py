"""End-to-end tests of the adapters on tiny diffusers models built from configs.

(a) exact round trips with DiffusersEps / StableDiffusion (float32 and bfloat16 models),
(c) a stock StableDiffusionPipeline driven by BELMScheduler, and exact reconstruction
through it with BELMInverseScheduler, (d) image editing, (e) bad input, (f) the core
(solvers, schedule, lte) imports without diffusers/transformers.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
PIL_Image = pytest.importorskip("PIL.Image")

from diffusers import StableDiffusionPipeline  # noqa: E402

from belm import OBELM, Latent, Schedule  # noqa: E402
from belm.adapters import BELMInverseScheduler, BELMScheduler, DiffusersEps, StableDiffusion  # noqa: E402
from tiny_models import tiny_sd_folder, tiny_sd_folder_v, tiny_unet  # noqa: E402,F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
PROMPT, TARGET = "a photo of a cat", "a photo of a dog"


def _noise(shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _rgb(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth random image (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + rng.uniform(0, 6)) + np.cos(5 * yy + rng.uniform(0, 6)) for _ in range(3)], -1)
    return np.clip(127.5 + 60 * base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return _max_abs(a, b) / float(b.double().abs().max())


@contextlib.contextmanager
def count_calls(module: torch.nn.Module):
    calls: list[tuple[int, ...]] = []
    handle = module.register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append(tuple((args[0] if args else kwargs["sample"]).shape)), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def folders(tiny_sd_folder: Path, tiny_sd_folder_v: Path) -> dict[str, Path]:
    return {"epsilon": tiny_sd_folder, "v_prediction": tiny_sd_folder_v}


_SD: dict = {}


def _sd(folders: dict[str, Path], prediction_type: str, dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """StableDiffusion reloaded from its saved folder (cached per prediction type and dtype)."""
    key = (str(folders[prediction_type]), dtype)
    if key not in _SD:
        _SD[key] = StableDiffusion.from_pretrained(folders[prediction_type], dtype=dtype)
    return _SD[key]


def _pipe(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------
# (a) exact round trips
# ---------------------------------------------------------------------------------------
SD_CASES = [(p, w, n, torch.float32) for n in (50, 200) for p in ("epsilon", "v_prediction") for w in (1.0, 7.5)]
SD_CASES += [("epsilon", 7.5, 50, torch.bfloat16), ("v_prediction", 1.0, 50, torch.bfloat16),
             ("v_prediction", 1.0, 200, torch.bfloat16)]


@pytest.mark.parametrize("prediction_type, guidance, num_steps, dtype", SD_CASES,
                         ids=[f"{p}-w{w}-N{n}-{str(d)[6:]}" for p, w, n, d in SD_CASES])
def test_sd_round_trip_is_exact(folders, prediction_type, guidance, num_steps, dtype) -> None:
    sd = _sd(folders, prediction_type, dtype)
    assert sd.dtype == dtype and sd.scheduler.config.prediction_type == prediction_type
    z0 = sd.encode([_rgb(16, 16, 0), _rgb(16, 16, 1)])
    assert z0.dtype == torch.float32
    sampler = OBELM(sd.eps(PROMPT, guidance_scale=guidance), sd.schedule(num_steps), progress=False)
    with count_calls(sd.unet) as calls:
        latent = sampler.invert(z0)
        rec = sampler.sample(latent)
    assert len(calls) == 2 * num_steps - 1   # invert N, sample(latent) N − 1
    assert calls[0] == ((4 if guidance != 1.0 else 2), 4, 8, 8)
    assert latent.states[0].dtype == torch.float64 and rec.dtype == torch.float32
    assert _max_abs(rec, z0) <= (1e-6 if dtype == torch.float32 else 1e-5)


PIXEL_CASES = [("epsilon", 1.0, 50, torch.float32), ("v_prediction", 7.5, 200, torch.float32),
               ("epsilon", 7.5, 50, torch.bfloat16), ("v_prediction", 1.0, 50, torch.bfloat16)]


@pytest.mark.parametrize("prediction_type, guidance, num_steps, dtype", PIXEL_CASES,
                         ids=[f"{p}-w{w}-N{n}-{str(d)[6:]}" for p, w, n, d in PIXEL_CASES])
def test_pixel_unet_round_trip_is_exact(prediction_type, guidance, num_steps, dtype) -> None:
    unet, sched = tiny_unet(prediction_type, class_conditional=True)
    unet.to(dtype)
    eps = DiffusersEps(unet, sched, class_labels=torch.tensor([3, 5]), null_class_labels=0, guidance_scale=guidance)
    sampler = OBELM(eps, Schedule.from_diffusers(sched, num_steps), progress=False)
    x0 = _noise((2, 3, 8, 8), seed=1).clamp(-1, 1)
    rec = sampler.sample(sampler.invert(x0))
    assert _max_abs(rec, x0) <= (1e-6 if dtype == torch.float32 else 1e-5)


# ---------------------------------------------------------------------------------------
# (c) stock pipelines with BELMScheduler
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type, guidance", [("epsilon", 1.0), ("epsilon", 7.5), ("v_prediction", 7.5)])
def test_stock_sd_pipeline_with_belm_scheduler(folders, prediction_type: str, guidance: float) -> None:
    N = 50
    pipe = _pipe(folders[prediction_type])
    pipe.scheduler = BELMScheduler.from_config(pipe.scheduler.config)
    sd = StableDiffusion.from_pretrained(pipe, dtype=None)
    xT = _noise((1, 4, 8, 8), seed=2)
    with count_calls(pipe.unet) as calls:
        out = pipe(PROMPT, num_inference_steps=N, guidance_scale=guidance, latents=xT, output_type="latent",
                   height=16, width=16).images
    assert len(calls) == N
    assert calls[0] == ((2 if guidance > 1 else 1), 4, 8, 8)
    ref = OBELM(sd.eps(PROMPT, guidance_scale=guidance), Schedule.from_diffusers(pipe.scheduler, num_steps=N),
                progress=False).sample(xT)
    assert _rel(out, ref) <= 1e-4


def test_pipeline_inversion_reconstructs_exactly(folders) -> None:
    """BELMInverseScheduler in a diffusers-style inversion loop, then a stock pipeline run."""
    N, w = 50, 7.5
    pipe = _pipe(folders["epsilon"])
    sd = StableDiffusion.from_pretrained(pipe, dtype=None)
    z0 = sd.encode(_rgb(16, 16, 3))
    cond, uncond = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, True)
    embeds = torch.cat([uncond, cond])
    inv = BELMInverseScheduler.from_config(pipe.scheduler.config)
    inv.set_timesteps(N)
    x = z0
    with count_calls(pipe.unet) as calls:
        for t in inv.timesteps:
            with torch.no_grad():
                e_u, e_c = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample.chunk(2)
            x = inv.step(e_u + w * (e_c - e_u), t, x).prev_sample
    assert len(calls) == N
    latent = inv.latent
    scheduler = BELMScheduler.from_config(pipe.scheduler.config)
    scheduler.start_from(latent)
    pipe.scheduler = scheduler
    out = pipe(PROMPT, num_inference_steps=N, guidance_scale=w, latents=latent.x, output_type="latent",
               height=16, width=16).images
    assert _max_abs(out, z0) <= 1e-6
    # the same latent through belm's own sampler
    rec = OBELM(sd.eps(PROMPT, guidance_scale=w), Schedule.from_diffusers(pipe.scheduler, N), progress=False)
    assert _max_abs(rec.sample(latent), z0) <= 1e-6
    # a wrongly shaped latents argument is caught at the first step
    scheduler.start_from(latent)
    with pytest.raises(ValueError, match="latents=latent.x"):
        pipe(PROMPT, num_inference_steps=N, guidance_scale=w, latents=_noise((1, 4, 8, 8)), output_type="latent",
             height=16, width=16)


# ---------------------------------------------------------------------------------------
# (d) image editing
# ---------------------------------------------------------------------------------------
def test_image_editing_non_square(folders) -> None:
    sd = _sd(folders, "epsilon")
    image = PIL_Image.fromarray(_rgb(48, 32, 4))             # width 48, height 32
    z0 = sd.encode(image)
    assert z0.shape == (1, 4, 16, 24)
    schedule, freeze = sd.schedule(20), 8
    source = OBELM(sd.eps(PROMPT, guidance_scale=7.5), schedule, progress=False)
    latent = source.invert(z0, to_level=freeze)
    assert latent.level == freeze and len(latent.states) == 2
    edited = OBELM(sd.eps(TARGET, guidance_scale=7.5), schedule, progress=False).sample(latent)
    assert edited.shape == z0.shape and torch.isfinite(edited).all()
    assert _max_abs(edited, z0) > 1e-3                        # the target prompt changed the latents
    assert _max_abs(source.sample(latent), z0) <= 1e-6        # same prompt: exact
    assert _max_abs(source.sample(source.invert(z0)), z0) <= 1e-6
    decoded = sd.decode(edited)
    assert len(decoded) == 1 and decoded[0].size == (48, 32) and decoded[0].mode == "RGB"


# ---------------------------------------------------------------------------------------
# (e) bad input
# ---------------------------------------------------------------------------------------
def test_bad_input_errors(folders, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found.*missing_model"):
        StableDiffusion.from_pretrained(tmp_path / "missing_model")
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(folders["epsilon"], no_tokenizer)
    shutil.rmtree(no_tokenizer / "tokenizer")
    with pytest.raises(FileNotFoundError, match="'tokenizer'"):
        StableDiffusion.from_pretrained(no_tokenizer)
    bad_pred = tmp_path / "bad_prediction_type"
    shutil.copytree(folders["epsilon"], bad_pred)
    config_file = bad_pred / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prediction_type": "flow"}))
    with pytest.raises((ValueError, RuntimeError), match="prediction_type.*flow"):
        StableDiffusion.from_pretrained(bad_pred)

    sd = _sd(folders, "epsilon")
    with pytest.raises(ValueError, match="guidance_scale"):
        sd.eps(PROMPT, guidance_scale=-2.0)
    unreadable = tmp_path / "photo.jpg"
    unreadable.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="cannot read image.*photo.jpg"):
        sd.encode(unreadable)
    sampler = OBELM(sd.eps(PROMPT, guidance_scale=1.0), sd.schedule(4), progress=False)
    with pytest.raises(ValueError, match="3 channels.*in_channels=4"):
        sampler.sample(_noise((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="latent_channels"):
        sd.decode(_noise((1, 3, 8, 8)))
    latent = sampler.invert(_noise((1, 4, 8, 8)))
    with pytest.raises(ValueError, match="all states of a latent must match"):
        latent.replace(states=(latent.states[0], latent.states[1][..., :4]))
    wrong_channels = latent.replace(states=tuple(s[:, :3] for s in latent.states))
    with pytest.raises(ValueError, match="in_channels=4"):
        sampler.sample(wrong_channels)
    assert isinstance(latent, Latent)


# ---------------------------------------------------------------------------------------
# (f) the core does not need diffusers / transformers
# ---------------------------------------------------------------------------------------
def test_core_imports_without_diffusers() -> None:
    code = textwrap.dedent("""
        import importlib, importlib.util, pkgutil, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("diffusers", "transformers"):
                    raise ImportError(f"{name} is blocked for this test")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        import belm, belm.schedule, belm.solvers
        names = ["belm.schedule"]
        for package in ("belm.solvers", "belm.lte"):
            if importlib.util.find_spec(package) is None:
                continue
            module = importlib.import_module(package)
            names.append(package)
            for info in pkgutil.walk_packages(module.__path__, package + "."):
                importlib.import_module(info.name)
                names.append(info.name)
        assert not any(m.split(".")[0] in ("diffusers", "transformers") for m in sys.modules), "imported"

        import belm.adapters                      # still importable: diffusers is lazy there
        try:
            belm.adapters.BELMScheduler
        except ImportError as exc:
            assert "pip install" in str(exc) and "diffusers" in str(exc), exc
        else:
            raise AssertionError("BELMScheduler imported without diffusers")

        ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
        sched = belm.Schedule(ac, list(range(999, 0, -100)))
        eps = lambda x, t: torch.tanh(x) * (1 + int(t) / 1000)
        s = belm.OBELM(eps, sched, progress=False)
        x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        err = (s.sample(s.invert(x0)) - x0).abs().max().item()
        assert err <= 1e-6, err
        print("ok", len(names), "modules")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")
