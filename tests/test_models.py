"""Bundled offline models: the "digits" diffusion UNet and the digit classifier."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

import belm.models as bm  # noqa: E402
from belm.models import (  # noqa: E402
    DIGITS_PATH,
    NULL_CLASS,
    NUM_CLASSES,
    digits_dataset,
    load_digits_classifier,
    preprocess_digits,
)
from belm.models.data import load_raw_digits  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def heldout():
    return digits_dataset("heldout")


@pytest.fixture(scope="module")
def unet_and_scheduler():
    pytest.importorskip("diffusers")
    return bm.load_digits_unet()


def test_constants():
    assert NUM_CLASSES == 10 and NULL_CLASS == 10
    assert DIGITS_PATH.is_dir()


def test_preprocess_shapes_and_range():
    images, labels = load_raw_digits()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    x = preprocess_digits(images[:50])
    assert x.shape == (50, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x.min() == -1.0 and x.max() > 0.9
    # flat (M, 64) input gives the same result; constant images map to the ends of [-1, 1]
    assert torch.equal(preprocess_digits(images[:50].reshape(50, 64)), x)
    ends = preprocess_digits(np.stack([np.zeros((8, 8)), np.full((8, 8), 16.0)]))
    assert torch.allclose(ends[0], torch.full((1, 16, 16), -1.0)) and torch.allclose(ends[1], torch.ones(1, 16, 16))
    # downsampling back to 8x8 roughly recovers the raw image
    back = torch.nn.functional.interpolate(x, size=(8, 8), mode="area")
    raw = torch.as_tensor(images[:50], dtype=torch.float32)[:, None] / 8 - 1
    assert (back - raw).abs().mean() < 0.15


def test_split_and_dataset(heldout):
    split = bm.digits_split()
    tr, he = set(split["train"]), set(split["heldout"])
    assert not tr & he and len(tr) + len(he) == 1797 and len(he) == 297
    x, y = heldout
    assert x.shape == (297, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    assert set(y.tolist()) == set(range(10))
    xt, yt = digits_dataset("train")
    assert xt.shape == (1500, 1, 16, 16) and yt.shape == (1500,)
    _, raw_labels = load_raw_digits()
    assert torch.equal(y, torch.as_tensor(raw_labels[split["heldout"]]))
    with pytest.raises(ValueError):
        digits_dataset("test")


def test_shipped_files_safetensors_only_and_small():
    files = [p for p in DIGITS_PATH.rglob("*") if p.is_file()]
    names = {p.relative_to(DIGITS_PATH).as_posix() for p in files}
    for required in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                     "split.json", "classifier.safetensors", "classifier_config.json"):
        assert required in names
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    weights = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    assert weights <= 16 * 2**20
    assert sum(p.stat().st_size for p in files) <= 16 * 2**20


def test_unet_loader(unet_and_scheduler):
    unet, sched = unet_and_scheduler
    assert not unet.training
    assert sum(p.numel() for p in unet.parameters()) <= 2_000_000
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1 and unet.config.out_channels == 1
    assert unet.config.num_class_embeds == NULL_CLASS + 1
    assert sched.config.num_train_timesteps == 1000 and sched.config.prediction_type == "epsilon"
    assert sched.config.beta_schedule == "linear"
    assert sched.config.beta_start == pytest.approx(1e-4) and sched.config.beta_end == pytest.approx(0.02)
    u64, _ = bm.load_digits_unet(dtype=torch.float64)
    assert next(u64.parameters()).dtype == torch.float64


def _noised(sched, x0, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    a = sched.alphas_cumprod[t].float()
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, noise


def _eps_mse(unet, sched, x0, labels, t, seed=0):
    xt, noise = _noised(sched, x0, t, seed)
    with torch.no_grad():
        pred = unet(xt, torch.full((x0.shape[0],), t), class_labels=labels).sample
    return torch.mean((pred - noise) ** 2).item()


# Epsilon-prediction MSE on the first 128 held-out digits (noise seed 0), measured on the shipped
# weights (conditional / null class): t=50 0.103 / 0.105, t=200 0.048 / 0.053, t=500 0.0086 / 0.0125.
# Bounds leave ~2x margin. An untrained network gives ~1.0 at every t.
EPS_MSE_BOUNDS = {50: 0.2, 200: 0.1, 500: 0.025}


@pytest.mark.parametrize("conditional", [True, False])
def test_unet_is_trained(unet_and_scheduler, heldout, conditional):
    unet, sched = unet_and_scheduler
    x, y = heldout
    x, y = x[:128], y[:128]
    labels = y if conditional else torch.full_like(y, NULL_CLASS)
    for t, bound in EPS_MSE_BOUNDS.items():
        mse = _eps_mse(unet, sched, x, labels, t)
        # also far better than the trivial predictor eps_hat = x_t (which is good only at large t)
        xt, noise = _noised(sched, x, t)
        trivial = torch.mean((xt - noise) ** 2).item()
        assert mse < bound and mse < 0.5 * trivial, (t, conditional, mse, trivial)


def test_class_conditioning_matters(unet_and_scheduler, heldout):
    """At moderate noise the correct label explains the noise better than the null or a wrong label."""
    unet, sched = unet_and_scheduler
    x, y = heldout
    x, y = x[:128], y[:128]
    right = _eps_mse(unet, sched, x, y, 300)
    null = _eps_mse(unet, sched, x, torch.full_like(y, NULL_CLASS), 300)
    wrong = _eps_mse(unet, sched, x, (y + 5) % 10, 300)
    assert right < null < wrong, (right, null, wrong)


def test_classifier_heldout_accuracy(heldout):
    clf = load_digits_classifier()
    assert not clf.training
    x, y = heldout
    with torch.no_grad():
        logits = clf(x)
        feats = clf.features(x)
    assert logits.shape == (297, 10) and feats.shape == (297, 64)
    acc = (logits.argmax(-1) == y).float().mean().item()
    assert acc >= 0.97, acc


def test_missing_weights_error(monkeypatch, tmp_path):
    monkeypatch.setattr(bm, "DIGITS_PATH", tmp_path)
    with pytest.raises(FileNotFoundError, match="train_classifier.py"):
        load_digits_classifier()
    with pytest.raises(FileNotFoundError, match="train_digits.py"):
        bm.digits_dataset("heldout")
    pytest.importorskip("diffusers")
    with pytest.raises(FileNotFoundError, match="train_digits.py"):
        bm.load_digits_unet()


@pytest.mark.parametrize("script, loader, path_attr", [
    ("train_digits.py", "load_digits_unet", "DIGITS_PATH"),
    ("train_digits_flow.py", "load_digits_flow_unet", "DIGITS_FLOW_PATH"),
])
def test_training_scripts_write_what_the_loaders_read(script, loader, path_attr, tmp_path, monkeypatch):
    """Both training scripts (one shared loop, scripts/digits_training.py) run and write a
    folder that belm's own loader accepts; three steps, batch 8."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("diffusers")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "model"
    subprocess.run([sys.executable, str(root / "scripts" / script), "--steps", "3", "--warmup", "1",
                    "--batch-size", "8", "--log-every", "1", "--save-every", "0", "--out", str(out)],
                   check=True, cwd=tmp_path, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    info = json.loads((out / "train_info.json").read_text())
    assert info["stopped_after"] == 3 and np.isfinite(info["final_loss"]) and info["final_loss"] > 0
    shipped, _ = getattr(bm, loader)()
    monkeypatch.setattr(bm, path_attr, out)
    unet, scheduler = getattr(bm, loader)()
    # the scripts' architecture is the shipped one, and the fresh weights run
    assert {k: v.shape for k, v in unet.state_dict().items()} == {k: v.shape for k, v in shipped.state_dict().items()}
    with torch.no_grad():
        out_eps = unet(torch.zeros(2, 1, 16, 16), torch.tensor([10, 500]), class_labels=torch.tensor([3, 10])).sample
    assert out_eps.shape == (2, 1, 16, 16) and torch.isfinite(out_eps).all()
    assert type(scheduler).__name__ == ("DDPMScheduler" if script == "train_digits.py" else
                                        "FlowMatchEulerDiscreteScheduler")
