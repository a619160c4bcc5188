"""Issue 8: a battery of bad inputs, determinism, exactness at scale, security.

Every bad input must raise ValueError / TypeError / FileNotFoundError (or a belm subclass)
whose message names the argument and says what to do; the CLI exits non-zero with one line
and leaves no output behind.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref
from belm import BDIA, BELM, DDIM, EDICT, OBELM, Schedule
from belm.errors import BELMError
from belm.schedule import make_betas
from strategies import beta_schedules, roundtrip_tolerance, spacings
from tiny_models import tiny_sd_folder, tiny_unet  # noqa: F401

BETAS = make_betas("linear", 1000, 1e-4, 0.02)
AC = np.cumprod(1 - BETAS)
S10 = Schedule.from_betas(BETAS, 10)
X = torch.randn(2, 3)


def _obelm_latent():
    return OBELM(ref.nonlinear_eps, S10, progress=False).invert(X)


def _unet_eps(**kw):
    from belm.adapters import DiffusersEps
    unet, sched = tiny_unet()
    return DiffusersEps(unet, sched, **kw)


# (id, callable raising, expected exception type(s), words the message must contain)
PYTHON_CASES = [
    # schedules
    ("increasing timesteps", lambda: Schedule(AC, [1, 500, 999]), ValueError, ["timesteps", "decreasing"]),
    ("repeated timesteps", lambda: Schedule(AC, [999, 10, 10]), ValueError, ["timesteps", "no repeats"]),
    ("timestep out of range", lambda: Schedule(AC, [1000, 1]), ValueError, ["timesteps", "[0, 999]"]),
    ("negative timestep", lambda: Schedule(AC, [5, -3]), ValueError, ["timesteps", "[0, 999]"]),
    ("alphas_cumprod > 1", lambda: Schedule(np.r_[1.5, AC[1:]], [3]), ValueError, ["alphas_cumprod", "(0, 1]"]),
    ("alphas_cumprod == 0", lambda: Schedule(np.r_[AC[:-1], 0.0], [3]), ValueError, ["alphas_cumprod", "(0, 1]"]),
    ("alphas_cumprod increasing", lambda: Schedule(AC[::-1].copy(), [3]), ValueError,
     ["alphas_cumprod", "strictly decreasing"]),
    ("alphas_cumprod NaN", lambda: Schedule(np.r_[np.nan, AC[1:]], [3]), ValueError, ["alphas_cumprod", "NaN"]),
    ("empty alphas", lambda: Schedule([], [3]), ValueError, ["alphas_cumprod", "empty"]),
    ("empty timesteps", lambda: Schedule(AC, []), ValueError, ["timesteps", "empty"]),
    ("unknown spacing", lambda: Schedule.from_betas(BETAS, 10, "uniform"), ValueError, ["spacing", "linspace"]),
    ("zero steps", lambda: Schedule.from_betas(BETAS, 0), ValueError, ["num_steps", "positive"]),
    ("too many steps", lambda: Schedule.from_betas(BETAS, 5000), ValueError, ["num_steps", "<= 1000"]),
    ("betas out of range", lambda: Schedule.from_betas(np.full(10, 1.5), 5), ValueError, ["betas", "(0, 1)"]),
    ("not a scheduler", lambda: Schedule.from_diffusers("ddim", 10), TypeError, ["scheduler", "alphas_cumprod"]),
    # sampler parameters
    ("gamma 0", lambda: BDIA(ref.nonlinear_eps, S10, gamma=0), ValueError, ["gamma", "(0, 1]"]),
    ("gamma > 1", lambda: BDIA(ref.nonlinear_eps, S10, gamma=2), ValueError, ["gamma", "(0, 1]"]),
    ("p = 1", lambda: EDICT(ref.nonlinear_eps, S10, p=1.0), ValueError, ["p must", "0.93"]),
    ("p = 0", lambda: EDICT(ref.nonlinear_eps, S10, p=0.0), ValueError, ["p must", "0.93"]),
    ("unknown method", lambda: __import__("belm.solvers.registry", fromlist=["x"]).make_sampler(
        "dpm", ref.nonlinear_eps, S10), ValueError, ["unknown sampler", "obelm"]),
    ("k < 1", lambda: BELM(ref.nonlinear_eps, S10, k=0), ValueError, ["k must", ">= 2"]),
    ("unstable rule", lambda: BELM(ref.nonlinear_eps, S10, k=3), ValueError, ["zero-stable", "allow_unstable"]),
    ("unknown named rule", lambda: BELM(ref.nonlinear_eps, S10, rule="nope"), ValueError, ["nope", "leapfrog3"]),
    ("2-step with 1 step", lambda: OBELM(ref.nonlinear_eps, Schedule.from_betas(BETAS, 1)), ValueError,
     ["num_steps >= 2", "DDIM"]),
    ("unknown exact mode", lambda: OBELM(ref.nonlinear_eps, S10, exact="yes"), ValueError, ["exact", "bitwise"]),
    ("bad state dtype", lambda: OBELM(ref.nonlinear_eps, S10, state_dtype=torch.int32), TypeError,
     ["state_dtype", "float64"]),
    # eps_fn
    ("eps_fn not callable", lambda: OBELM(42, S10), TypeError, ["eps_fn", "callable"]),
    ("eps wrong shape", lambda: DDIM(lambda x, t: x[:1], S10, progress=False).sample(X), ValueError,
     ["eps_fn returned shape", "same shape"]),
    ("eps wrong dtype", lambda: DDIM(lambda x, t: (x > 0), S10, progress=False).sample(X), TypeError,
     ["eps_fn", "floating-point"]),
    ("eps NaN", lambda: OBELM(lambda x, t: x * np.nan, S10, progress=False).sample(X), ValueError,
     ["NaN", "level 0", "check_finite"]),
    ("eps Inf", lambda: OBELM(lambda x, t: x / 0, S10, progress=False).invert(X), ValueError,
     ["NaN/Inf", "level 10"]),
    # tensors
    ("non-tensor input", lambda: OBELM(ref.nonlinear_eps, S10).sample([[1.0]]), TypeError, ["x must be", "Tensor"]),
    ("integer input", lambda: OBELM(ref.nonlinear_eps, S10).invert(torch.ones(2, 2, dtype=torch.int32)), TypeError,
     ["x0", "floating-point"]),
    ("NaN input", lambda: OBELM(ref.nonlinear_eps, S10).sample(torch.full((1, 2), np.nan)), ValueError,
     ["x contains NaN"]),
    ("latent from another method", lambda: EDICT(ref.nonlinear_eps, S10).sample(_obelm_latent()), ValueError,
     ["produced by OBELM", "EDICT"]),
    ("latent from another schedule", lambda: OBELM(ref.nonlinear_eps, Schedule.from_betas(BETAS, 11)).sample(
        _obelm_latent()), ValueError, ["different schedule"]),
    ("pair with mismatched shapes", lambda: _obelm_latent().replace(states=(X, X[:1])), ValueError,
     ["states[1]", "must match"]),
    ("level out of range", lambda: OBELM(ref.nonlinear_eps, S10).invert(X, to_level=10), ValueError,
     ["to_level", "[0, 9]"]),
    # adapters
    ("missing SD folder", lambda: __import__("belm.adapters", fromlist=["x"]).StableDiffusion.from_pretrained(
        "/no/such/sd"), FileNotFoundError, ["/no/such/sd"]),
    ("unknown prediction type", lambda: __import__("belm.adapters", fromlist=["x"]).to_epsilon(
        X, X, 0.5, 0.5, "score"), ValueError, ["prediction_type", "epsilon"]),
    ("negative guidance", lambda: _unet_eps(class_labels=None, guidance_scale=-1.0), ValueError, ["guidance"]),
    ("missing image file", lambda: __import__("belm.adapters.images", fromlist=["x"]).load_image(
        "/no/such.png"), FileNotFoundError, ["/no/such.png"]),
]


@pytest.mark.parametrize("case", PYTHON_CASES, ids=[c[0] for c in PYTHON_CASES])
def test_python_api_bad_input(case):
    _, fn, exc, words = case
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


def test_adapters_folder_and_image_errors(tmp_path, tiny_sd_folder):  # noqa: F811
    import shutil
    from belm.adapters import StableDiffusion
    from belm.adapters.images import load_image
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="vae"):
        StableDiffusion.from_pretrained(broken)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(garbage)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png"):
        load_image(empty)


def test_huge_image_is_refused_before_allocation(tmp_path, monkeypatch):
    from PIL import Image
    from belm.adapters.images import load_image
    path = tmp_path / "big.png"
    Image.new("L", (400, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="decompression bomb"):      # PIL's guard, > 2x the limit
        load_image(path)
    path = tmp_path / "large.png"
    Image.new("L", (50, 30)).save(path)
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):        # belm's check, before decoding
        load_image(path)


def test_decompression_bomb_guard_stays_on():
    import belm.adapters.images  # noqa: F401
    import belm.apps  # noqa: F401
    import belm.cli  # noqa: F401
    from PIL import Image
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS >= 89_000_000


CLI_CASES = [
    (["frobnicate"], "invalid choice"),
    (["sample", "--sampler", "dpm"], "invalid choice"),
    (["edit", "--source", "1", "--target", "2", "--steps", "8", "--freeze", "8"], "--freeze"),
    (["edit", "--source", "1", "--target", "10"], "--target"),
    (["reconstruct", "--image", "/missing.png"], "--image"),
    (["reconstruct", "--num", "0"], "--num"),
    (["sample", "--out", "/proc/belm-not-writable"], "not writable"),
]


@pytest.mark.parametrize("args, word", CLI_CASES, ids=[" ".join(c[0][:2]) for c in CLI_CASES])
def test_cli_bad_input(tmp_path, capsys, args, word):
    from belm.cli import main
    if "--out" not in args:
        args = args + ["--out", str(tmp_path / "out")]
    assert main(args + ["--no-progress"] if args[0] != "frobnicate" else args) != 0
    err = capsys.readouterr().err.strip()
    assert word in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_cli_debug_shows_traceback(tmp_path):
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "belm.cli", "reconstruct", "--model", str(tmp_path), "--out", str(tmp_path / "o")]
    quiet = subprocess.run(cmd, capture_output=True, text=True)
    loud = subprocess.run(cmd + ["--debug"], capture_output=True, text=True)
    assert quiet.returncode != 0 and "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_failure_midway_leaves_no_partial_output(tmp_path):
    from belm.apps.io import OutputDir
    out = tmp_path / "result"
    with pytest.raises(RuntimeError):
        with OutputDir(out) as o:
            o.write_text("a.txt", "half")
            raise RuntimeError("network exploded")
    assert not out.exists() and list(tmp_path.iterdir()) == []


# -- determinism ----------------------------------------------------------------------------
def test_same_seed_same_bits_for_sampling_and_inversion():
    from belm.adapters import DiffusersEps
    unet, scheduler = tiny_unet()
    eps = DiffusersEps(unet, scheduler)
    sched = Schedule.from_diffusers(scheduler, 12)
    for make in (DDIM, OBELM, EDICT, lambda e, s, **k: BDIA(e, s, gamma=0.9, **k)):
        runs = []
        for _ in range(2):
            torch.manual_seed(123)
            xT = torch.randn(2, 3, 8, 8)
            s = make(eps, sched, progress=False)
            x0 = s.sample(xT)
            runs.append((x0, s.invert(x0).states))
        assert torch.equal(runs[0][0], runs[1][0])
        assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("command", [
    ["sample", "--num", "3", "--steps", "4"],
    ["reconstruct", "--num", "2", "--steps", "4"],
    ["edit", "--source", "1", "--target", "7", "--num", "2", "--steps", "4"],
    ["interpolate", "--num", "3", "--steps", "4"],
    ["fd", "--num", "65", "--steps", "3", "--guidance", "1"],
    ["edit", "--model", "digits-flow", "--source", "1", "--target", "7", "--num", "2", "--steps", "4"],
    ["interpolate", "--model", "digits-flow", "--num", "4", "--steps", "4"],
    ["optimize", "--source", "3", "--target", "8", "--num", "2", "--steps", "3", "--iters", "2"],
])
def test_every_cli_command_is_deterministic(tmp_path, command):
    from belm.cli import main
    outputs = []
    for name in ("one", "two"):
        assert main(command + ["--seed", "5", "--out", str(tmp_path / name), "--no-progress"]) == 0
        files = sorted(p for p in (tmp_path / name).iterdir() if p.suffix in (".png", ".safetensors"))
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        for key in [k for k in summary if k.endswith("seconds")]:   # wall-clock times (optimize: edit_seconds too)
            summary.pop(key)
        summary.pop("command")          # names the --out folder, which differs on purpose
        outputs.append(([p.read_bytes() for p in files], summary))
    assert outputs[0] == outputs[1]


# -- exactness at scale -----------------------------------------------------------------------
def _guided(w):
    def eps(x, t):
        e_u = ref.nonlinear_eps(x, t)
        e_c = torch.tanh(x - 0.3) * 0.9
        return (e_u + w * (e_c - e_u)).to(x.dtype)
    return eps


# Largest N per method: where rounding amplification (γ^−N for BDIA, p^−2N for EDICT) stays
# below ~1e3, so that a one-ulp flip of a float32 network input stays within the tolerance.
METHODS = {
    "obelm": (lambda f, s: OBELM(f, s, progress=False), 1000),
    "bdia1": (lambda f, s: BDIA(f, s, gamma=1.0, progress=False), 1000),
    "bdia0.9": (lambda f, s: BDIA(f, s, gamma=0.9, progress=False), 60),
    "edict": (lambda f, s: EDICT(f, s, progress=False), 50),
    "leapfrog3": (lambda f, s: BELM(f, s, rule="leapfrog3", progress=False), 200),
    "obelm-bitwise": (lambda f, s: OBELM(f, s, progress=False, exact="bitwise"), 1000),
}


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(betas=beta_schedules(), spacing=spacings, method=st.sampled_from(sorted(METHODS)),
       shape=st.sampled_from([(1, 2), (3, 4), (2, 1, 3, 3)]), dtype=st.sampled_from([torch.float32, torch.float64]),
       guidance=st.sampled_from([1.0, 3.0, 7.5]), data=st.data())
def test_exactness_at_scale(betas, spacing, method, shape, dtype, guidance, data):
    make, max_n = METHODS[method]
    upper = min(len(betas), max_n)
    N = data.draw(st.one_of(st.integers(3, min(upper, 25)), st.integers(3, upper)), label="N")
    sched = Schedule.from_betas(betas, N, spacing)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(N), dtype=dtype)
    s = make(_guided(guidance), sched)
    try:
        lat = s.invert(x0)
    except BELMError as err:
        # bitwise mode refuses schedules whose step sizes span too many octaves (documented)
        assert method == "obelm-bitwise" and "lattice" in str(err)
        return
    back = s.sample(lat)
    if method == "obelm-bitwise":
        assert torch.equal(back, x0)
    else:
        tol = roundtrip_tolerance(x0, sched, guidance)
        assert (back - x0).abs().max().item() <= tol


# -- security ----------------------------------------------------------------------------------
def test_no_unsafe_deserialisation_in_the_package():
    root = Path(__file__).resolve().parents[1] / "belm"
    pattern = re.compile(r"torch\.load\(|import pickle|pickle\.load|trust_remote_code\s*=\s*True|"
                         r"use_safetensors\s*=\s*False|weights_only\s*=\s*False")
    hits = [f"{p}:{i}" for p in root.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert hits == []
    # and weights are shipped only as safetensors
    assert not list(root.rglob("*.bin")) and not list(root.rglob("*.pt")) and not list(root.rglob("*.pkl"))


# -- DiffusersEps caches the network's dtype/device (issue 15) ---------------------------------
def test_diffusers_eps_reads_dtype_device_once_and_follows_a_move(monkeypatch):
    from belm.adapters import eps as eps_module
    from tiny_models import tiny_unet
    unet, scheduler = tiny_unet()
    walks = []
    real = eps_module._model_dtype_device
    monkeypatch.setattr(eps_module, "_model_dtype_device", lambda m: walks.append(1) or real(m))
    eps = eps_module.DiffusersEps(unet, scheduler)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = eps(x, 500)
    for t in (400, 300, 200):
        eps(x, t)
    assert len(walks) == 1                     # one module walk for four calls
    unet.to(torch.float64)                     # moved in place: the probe parameter sees it
    moved = eps(x, 500)
    assert len(walks) == 2 and eps._model_dtype_device()[0] == torch.float64
    expected = unet(x, torch.tensor([500, 500])).sample
    assert torch.equal(moved, expected)        # the float64 network ran, on the float64 input as is
    assert not torch.equal(moved, first)       # and not the cached float32 path


def test_diffusers_eps_conditioning_cache_follows_changes_to_the_embeddings():
    """The cast/broadcast conditioning is reused across calls, but never a stale copy: an
    in-place edit, a new tensor, a new guidance scale and a move of the model all show."""
    from belm.adapters import eps as eps_module
    from tiny_models import tiny_unet
    unet, scheduler = tiny_unet(class_conditional=True)
    unet.to(torch.float64)                     # the float64 network: the labels are not cast
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3])
    eps = eps_module.DiffusersEps(unet, scheduler, class_labels=labels, null_class_labels=0)

    def direct(y, w=1.0, y0=0):
        with torch.no_grad():
            t = torch.tensor([500, 500])
            e_c = unet(x, t, class_labels=torch.tensor(y).expand(2)).sample
            if w == 1.0:
                return e_c
            e_u = unet(x, t, class_labels=torch.tensor(y0).expand(2)).sample
            return e_u + w * (e_c - e_u)

    assert torch.equal(eps(x, 500), direct(3))
    labels.fill_(5)                            # edited in place
    assert torch.equal(eps(x, 500), direct(5))
    eps.class_labels = torch.tensor([7])       # replaced
    assert torch.equal(eps(x, 500), direct(7))
    eps.guidance_scale = 2.0                   # guidance switched on: 2B batch, unconditional first
    # (one batch of 2B against two of B: equal up to the kernels' batch-dependent rounding)
    torch.testing.assert_close(eps(x, 500), direct(7, 2.0), rtol=1e-12, atol=1e-12)
    eps.guidance_scale = 1.0
    assert torch.equal(eps(x, 500), direct(7))
    # a time tensor edited in place between calls is read again
    t = torch.tensor(500)
    first = eps(x, t)
    t.fill_(100)
    with torch.no_grad():
        expected = unet(x, torch.tensor([100, 100]), class_labels=torch.tensor([7, 7])).sample
    assert torch.equal(eps(x, t), expected) and not torch.equal(first, expected)


def test_diffusers_eps_text_embedding_cache_follows_in_place_edits_after_a_cast():
    """With a float32 network the float64 embedding is cast once and cached; editing the
    float64 tensor in place must reach the network (a stale cast would not)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from belm.adapters import eps as eps_module
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=2)
    scheduler = DDPMScheduler()
    cond = torch.randn(1, 7, unet.config.cross_attention_dim, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(2))
    eps = eps_module.DiffusersEps(unet, scheduler, encoder_hidden_states=cond)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    before = eps(x, 300)
    cond.mul_(-1.0)
    after = eps(x, 300)
    with torch.no_grad():
        expected = unet(x, torch.tensor([300]), encoder_hidden_states=cond.float()).sample
    assert torch.equal(after, expected) and not torch.equal(before, after)
