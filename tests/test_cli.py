"""Issue 5 acceptance: the `belm` command on the bundled digits model and a tiny SD folder."""

import json
import math
import subprocess
import sys

import pytest
import torch

from belm.cli import main
from tiny_models import tiny_flux_folder, tiny_sd3_folder, tiny_sd_folder, tiny_sdxl_folder  # noqa: F401  (fixtures)


def run(args, tmp_path, name="out"):
    out = tmp_path / name
    code = main(args + ["--out", str(out), "--no-progress"])
    return code, out


def summary(out):
    return json.loads((out / "summary.json").read_text())


def test_reconstruct_obelm_is_exact_and_ddim_is_not(tmp_path):
    code, out = run(["reconstruct", "--model", "digits", "--sampler", "obelm", "--steps", "50", "--num", "16"],
                    tmp_path)
    assert code == 0
    s = summary(out)
    assert s["max_abs_error"] <= 1e-5 and s["num"] == 16
    assert s["ddim"]["max_abs_error"] > 1e-3            # reported beside it, and far from exact
    assert (out / "reconstruction.png").is_file()


def test_edit_three_to_eight_at_defaults(tmp_path):
    code, out = run(["edit", "--model", "digits", "--source", "3", "--target", "8", "--num", "16"], tmp_path)
    assert code == 0
    s = summary(out)
    assert s["success_rate"] >= 0.8, s
    assert len(list(out.glob("edited_*.png"))) == 16
    # issue 12: the change from the source and the latent's statistics beside the success rate
    assert 1.0 < s["change_l2"] < 16.0 and 0 < s["change_psnr"] < 40, s
    assert 0.5 < s["latent_std"] < 1.5 and s["latent_max_abs"] > s["latent_std"], s


def test_interpolation_endpoints_are_the_originals(tmp_path):
    from belm.apps import interpolate, load_model
    from belm.models import digits_dataset
    model = load_model("digits")
    images, _ = digits_dataset("heldout")
    strip = interpolate(model, images[:1], images[1:2], num=5, steps=50, progress=False)["frames"][:, 0]
    assert (strip[0] - images[0]).abs().max() <= 1e-5
    assert (strip[-1] - images[1]).abs().max() <= 1e-5
    assert (strip[2] - images[0]).abs().max() > 0.1      # the middle really is something else
    code, out = run(["interpolate", "--num", "5", "--steps", "20"], tmp_path)
    s = summary(out)
    assert code == 0 and s["endpoint_max_abs_error"] <= 1e-5
    # issue 12: the editing figures beside it (3 middle frames: FD-digits is defined)
    assert 0.5 < s["latent_std"] < 1.5 and s["latent_max_abs"] > s["latent_std"]
    assert 0.1 < s["middle_confidence"] <= 1 and s["middle_fd"] > 0


def test_sample_is_deterministic_per_seed(tmp_path):
    from safetensors.torch import load_file
    code, out1 = run(["sample", "--num", "4", "--steps", "5", "--seed", "7"], tmp_path, "a")
    code2, out2 = run(["sample", "--num", "4", "--steps", "5", "--seed", "7"], tmp_path, "b")
    assert code == code2 == 0
    a, b = load_file(out1 / "samples.safetensors")["images"], load_file(out2 / "samples.safetensors")["images"]
    assert a.shape == (4, 1, 16, 16) and torch.equal(a, b)
    assert (out1 / "sample_000007.png").is_file() and (out1 / "grid.png").is_file()


def test_fd_command_writes_its_figure(tmp_path):
    code, out = run(["fd", "--num", "65", "--steps", "5", "--guidance", "1"], tmp_path)
    assert code == 0 and summary(out)["fd"] > 0


def test_stable_diffusion_folder_edit(tmp_path, tiny_sd_folder):  # noqa: F811
    from PIL import Image
    img = tmp_path / "cat.png"
    Image.fromarray((torch.rand(32, 48, 3) * 255).to(torch.uint8).numpy()).save(img)
    code, out = run(["edit", "--model", str(tiny_sd_folder), "--image", str(img), "--source", "a cat",
                     "--target", "a dog", "--steps", "10", "--num", "1"], tmp_path)
    assert code == 0
    edited = Image.open(out / "edited_000.png")
    assert edited.size == (48, 32)
    code, out = run(["reconstruct", "--model", str(tiny_sd_folder), "--image", str(img), "--source", "a cat",
                     "--steps", "10", "--num", "1"], tmp_path, "rec")
    s = summary(out)
    assert code == 0 and s["max_abs_error"] <= 1e-5 and s["exactness"]["max_abs_error"] <= 1e-5
    # The end-to-end figure is against the input image, so the (random) VAE makes it large.
    assert s["end_to_end"]["max_abs_error"] > 0.1 and s["vae_round_trip"]["max_abs_error"] > 0.1
    from PIL import Image
    assert Image.open(out / "reconstruction.png").height < 4 * 3 * 32   # SD pictures are not upscaled


@pytest.mark.parametrize("args, message", [
    (["reconstruct", "--image", "/nonexistent.png"], "--image /nonexistent.png: no such file"),
    (["reconstruct", "--sampler", "nope"], "invalid choice"),
    (["edit", "--source", "3", "--target", "8", "--steps", "10", "--freeze", "10"], "--freeze must lie in [0, 9]"),
    (["edit", "--source", "3", "--target", "12"], "--target must be a class id in [0, 9]"),
    (["edit", "--source", "x", "--target", "1"], "--source must be a class id"),
    (["sample", "--steps", "0"], "--steps must be >= 1"),
    (["sample", "--guidance", "-1"], "--guidance must be >= 0"),
    (["reconstruct", "--model", "/no/such/folder"], "no such folder"),
])
def test_bad_cli_input_fails_with_one_line_and_no_output(tmp_path, capsys, args, message):
    code, out = run(args, tmp_path)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert message in err and "Traceback" not in err
    assert len(err.splitlines()) <= 2        # argparse adds its usage line; ours is one line
    assert not out.exists()
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())


def test_console_script_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "belm.cli", "edit", "--source", "3", "--target", "99",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("belm edit: error: --target")


# -- issue 15: what a new user trips over ------------------------------------------------------
def _one_line_error(capsys, code, *words):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def _copy_folder(src, dst, edit_json=None):
    import shutil
    shutil.copytree(src, dst)
    for name, changes in (edit_json or {}).items():
        path = dst / name
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))
    return dst


@pytest.fixture(scope="module")
def pixel_folders(tmp_path_factory):
    """Two pixel pipeline folders (unet/ + scheduler/): unconditional and class-conditional."""
    from tiny_models import tiny_unet
    root = tmp_path_factory.mktemp("pixel")
    folders = {}
    for name, conditional in (("uncond", False), ("cond", True)):
        unet, scheduler = tiny_unet(class_conditional=conditional)
        unet.save_pretrained(str(root / name / "unet"), safe_serialization=True)
        scheduler.save_pretrained(str(root / name / "scheduler"))
        folders[name] = root / name
    return folders


def _image(path, w, h, seed=0):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)
    return str(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    code, _ = run(["reconstruct", "--device", "cuda", "--num", "1"], tmp_path)
    _one_line_error(capsys, code, "--device cuda", "CUDA is not available", "--device cpu")


def test_device_gpu_is_one_line(tmp_path, capsys):
    code, _ = run(["sample", "--device", "gpu"], tmp_path)
    _one_line_error(capsys, code, "--device gpu", "not a torch device", "cpu, cuda")


@pytest.mark.parametrize("command", ["reconstruct", "interpolate"])
def test_sd_images_of_different_sizes_are_one_line(tmp_path, capsys, tiny_sd_folder, command):  # noqa: F811
    a, b = _image(tmp_path / "a.png", 32, 32), _image(tmp_path / "b.png", 48, 32)
    code, out = run([command, "--model", str(tiny_sd_folder), "--image", a, "--image", b, "--steps", "2"], tmp_path)
    _one_line_error(capsys, code, "--image", "same size", "a.png is 32x32", "b.png is 48x32", "resize")
    assert not out.exists()


def test_unet_subfolder_says_pass_the_pipeline_folder(tmp_path, capsys, tiny_sd_folder):  # noqa: F811
    code, _ = run(["reconstruct", "--model", str(tiny_sd_folder / "unet"), "--image", _image(tmp_path / "a.png", 16, 16)],
                  tmp_path)
    _one_line_error(capsys, code, "--model", "UNet2DConditionModel", "pass the pipeline folder", str(tiny_sd_folder))


@pytest.mark.parametrize("index, words", [
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder_2": ["transformers", "CLIPTextModel"]},
     ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPipeline", "refiner")),
    ({"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]},
     ("transformer pipeline", "PixArtAlphaPipeline", "StableDiffusion3Pipeline", "FluxPipeline")),
])
def test_unsupported_pipeline_folders_are_refused_by_name(tmp_path, capsys, tiny_sd_folder, index, words):  # noqa: F811
    folder = _copy_folder(tiny_sd_folder, tmp_path / "other", {"model_index.json": index})
    code, _ = run(["reconstruct", "--model", str(folder), "--image", _image(tmp_path / "a.png", 16, 16)], tmp_path)
    _one_line_error(capsys, code, "--model", *words)


def test_sdxl_folder_is_not_a_stable_diffusion_1_folder(tiny_sdxl_folder):  # noqa: F811
    from belm.adapters import StableDiffusion
    with pytest.raises(ValueError, match="SDXL pipeline folder.*from_folder"):
        StableDiffusion.from_pretrained(tiny_sdxl_folder)


@pytest.mark.parametrize("name", ["sd3", "flux", "sdxl"])
def test_sd3_flux_sdxl_folders_reconstruct_exactly(tmp_path, request, name):
    """Issue 13 item 5: `belm reconstruct --model FOLDER` on SD3, FLUX and SDXL folders."""
    folder = request.getfixturevalue(f"tiny_{name}_folder")
    img = _image(tmp_path / "a.png", 32, 32)
    code, out = run(["reconstruct", "--model", str(folder), "--image", img, "--source", "a cat", "--steps", "4"],
                    tmp_path)
    assert code == 0
    s = summary(out)
    assert s["exactness"]["max_abs_error"] <= 1e-5, s
    assert s["ddim"]["max_abs_error"] > 1e-3, s            # DDIM beside it on the same grid, not exact
    flow = name in ("sd3", "flux")
    assert s["settings"]["grid"].startswith("flow sigmas") == flow
    if flow:
        code, _ = run(["reconstruct", "--model", str(folder), "--image", img, "--steps", "2", "--spacing",
                       "trailing"], tmp_path, "bad")
        assert code == 2 and not (tmp_path / "bad").exists()


def test_flux_schedule_follows_the_image_size(tiny_flux_folder):  # noqa: F811
    from belm.apps import load_model
    model = load_model(str(tiny_flux_folder))
    small, large = model.schedule(4, size=(32, 32)), model.schedule(4, size=(256, 256))
    assert small.fingerprint != large.fingerprint
    assert small.fingerprint == model.sd.schedule(4, height=32, width=32).fingerprint


@pytest.mark.parametrize("cls, words", [
    ("FlowMatchEulerDiscreteScheduler", ("flow-matching", "FlowMatchEulerDiscreteScheduler")),
    ("MyOwnScheduler", ("unknown scheduler class", "MyOwnScheduler")),
])
def test_unsupported_scheduler_is_refused(tmp_path, capsys, tiny_sd_folder, pixel_folders, cls, words):  # noqa: F811
    sd = _copy_folder(tiny_sd_folder, tmp_path / "sd", {"scheduler/scheduler_config.json": {"_class_name": cls}})
    code, _ = run(["reconstruct", "--model", str(sd), "--image", _image(tmp_path / "a.png", 16, 16)], tmp_path)
    _one_line_error(capsys, code, "--model", *words)
    px = _copy_folder(pixel_folders["uncond"], tmp_path / "px",
                      {"scheduler/scheduler_config.json": {"_class_name": cls}})
    code, _ = run(["sample", "--model", str(px), "--guidance", "1"], tmp_path)
    _one_line_error(capsys, code, "--model", *words)


def test_edit_on_an_unconditional_pixel_model_says_what_to_do(tmp_path, capsys, pixel_folders):
    code, _ = run(["edit", "--model", str(pixel_folders["uncond"]), "--image", _image(tmp_path / "a.png", 8, 8)],
                  tmp_path)
    _one_line_error(capsys, code, "edit needs a conditional model", "reconstruct or interpolate")


def test_class_conditional_folder_guidance_needs_null_class(tmp_path, capsys, pixel_folders):
    folder = str(pixel_folders["cond"])
    code, _ = run(["sample", "--model", folder, "--num", "2", "--steps", "2"], tmp_path)
    _one_line_error(capsys, code, "--null-class")
    code, out = run(["sample", "--model", folder, "--num", "2", "--steps", "2", "--null-class", "0"], tmp_path)
    assert code == 0 and summary(out)["settings"]["null_class"] == 0


def test_sampler_options_apply_to_their_sampler_only(tmp_path, capsys):
    code, _ = run(["reconstruct", "--gamma", "0.5"], tmp_path)
    _one_line_error(capsys, code, "--gamma applies to --sampler bdia")
    code, out = run(["reconstruct", "--sampler", "bdia", "--gamma", "0.5", "--steps", "8", "--num", "2"], tmp_path)
    assert code == 0
    s = summary(out)
    assert s["settings"]["gamma"] == 0.5 and s["max_abs_error"] <= 1e-5
    code, out = run(["reconstruct", "--sampler", "edict", "--p", "0.9", "--steps", "4", "--num", "2"], tmp_path, "e")
    assert code == 0 and summary(out)["settings"]["p"] == 0.9


def test_summary_is_strict_json_with_the_runs_settings(tmp_path, tiny_sd_folder):  # noqa: F811
    import belm
    img = _image(tmp_path / "a.png", 16, 16)
    code, out = run(["reconstruct", "--model", str(tiny_sd_folder), "--image", img, "--steps", "3", "--seed", "4",
                     "--guidance", "2", "--spacing", "trailing", "--negative-prompt", "blurry"], tmp_path)
    assert code == 0
    text = (out / "summary.json").read_text()
    s = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert s["belm_version"] == belm.__version__ and s["command"].startswith("belm reconstruct")
    settings = s["settings"]
    for key, value in dict(model=str(tiny_sd_folder), sampler="obelm", steps=3, spacing="trailing", guidance=2.0,
                           seed=4, num=1, image=[img], dtype="float32", device="cpu", threads=1,
                           negative_prompt="blurry", grid="trailing (--spacing)").items():
        assert settings[key] == value, key


def test_exact_digits_psnr_is_null_not_infinity(tmp_path):
    from belm.apps.io import OutputDir
    with OutputDir(tmp_path / "o") as out:
        out.write_json("summary.json", {"psnr": math.inf, "nested": [math.nan, 1.5]})
    assert json.loads((tmp_path / "o" / "summary.json").read_text()) == {"psnr": None, "nested": [None, 1.5]}


def test_reusing_out_removes_stale_files_and_keeps_the_users(tmp_path, capsys):
    code, out = run(["sample", "--num", "3", "--steps", "2"], tmp_path)
    assert code == 0 and (out / "sample_000002.png").is_file()
    (out / "my_notes.txt").write_text("mine")
    code, out = run(["sample", "--num", "2", "--steps", "2"], tmp_path)
    assert code == 0
    assert not (out / "sample_000002.png").exists()                # stale: written by the first run only
    assert (out / "sample_000001.png").is_file() and (out / "my_notes.txt").read_text() == "mine"
    code, out = run(["reconstruct", "--num", "1", "--steps", "2"], tmp_path)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [".belm-outputs.json", "my_notes.txt", "reconstruction.png",
                                                     "summary.json"]


def test_no_progress_silences_library_bars_and_warnings(tmp_path, capfd, tiny_sd_folder):  # noqa: F811
    img = _image(tmp_path / "a.png", 16, 16)
    code, _ = run(["reconstruct", "--model", str(tiny_sd_folder), "--image", img, "--steps", "2"], tmp_path)
    captured = capfd.readouterr()
    assert code == 0
    assert captured.err.strip() == "", captured.err


def test_help_shows_every_default_and_version(capsys):
    from belm.cli import build_parser
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for name, p in sub.items():
        text = p.format_help()
        for action in p._actions:
            if action.default not in (None, False, argparse_SUPPRESS()) and action.option_strings:
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)
    with pytest.raises(SystemExit):
        parser.parse_args(["--version"])
    import belm
    assert capsys.readouterr().out.strip() == f"belm {belm.__version__}"


def argparse_SUPPRESS():
    import argparse
    return argparse.SUPPRESS


def test_threads_default_and_override(tmp_path, monkeypatch):
    from belm.cli import CLIError, resolve_threads
    for name in ("BELM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_threads(None) == 1 and resolve_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert resolve_threads(None) == 2
    monkeypatch.setenv("BELM_THREADS", "4")
    assert resolve_threads(None) == 4
    monkeypatch.setenv("BELM_THREADS", "many")
    with pytest.raises(CLIError, match=r"\$BELM_THREADS"):
        resolve_threads(None)
    monkeypatch.delenv("BELM_THREADS")
    try:
        code, out = run(["reconstruct", "--num", "1", "--steps", "2", "--threads", "2"], tmp_path)
        assert code == 0 and summary(out)["settings"]["threads"] == 2
    finally:
        torch.set_num_threads(1)


def test_spacing_is_printed_and_passed_through(tmp_path, capsys):
    from belm.schedule import default_spacing
    code, out = run(["reconstruct", "--num", "1", "--steps", "4", "--spacing", "trailing"], tmp_path)
    assert code == 0 and "grid: trailing (--spacing)" in capsys.readouterr().out
    code, out = run(["reconstruct", "--num", "1", "--steps", "4"], tmp_path, "b")
    assert code == 0 and f"(default for obelm)" in capsys.readouterr().out
    assert summary(out)["settings"]["grid"].startswith(default_spacing("obelm"))


def test_batch_size_keeps_reconstruction_exact_and_interpolation_endpoints(tmp_path):
    code, out = run(["reconstruct", "--num", "3", "--steps", "10", "--batch-size", "2"], tmp_path)
    assert code == 0 and summary(out)["max_abs_error"] <= 1e-12
    code, out = run(["interpolate", "--num", "3", "--steps", "50", "--seed", "0"], tmp_path, "i")  # --batch-size 1
    # Each end frame is sampled alone, as it was inverted: its error is exactly that image's own
    # round trip (a float32 network input may round differently in the two directions).
    from belm.apps import load_model, reconstruct
    from belm.models import digits_dataset
    images, _ = digits_dataset("heldout")
    pair = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:2]]
    own = reconstruct(load_model("digits"), pair, steps=50, batch_size=1, progress=False)["latent"]["max_abs_error"]
    assert code == 0 and summary(out)["endpoint_max_abs_error"] <= max(own) <= 1e-5
    code, out = run(["edit", "--source", "3", "--target", "8", "--num", "3", "--steps", "4", "--batch-size", "2"],
                    tmp_path, "e")
    assert code == 0 and len(list(out.glob("edited_*.png"))) == 3


def test_non_square_image_on_a_pixel_model_warns(tmp_path, capsys):
    img = _image(tmp_path / "wide.png", 32, 16)
    code, _ = run(["reconstruct", "--image", img, "--steps", "2"], tmp_path)
    err = capsys.readouterr().err
    assert code == 0 and "32x16" in err and "resized to the model's 16x16" in err and "aspect ratio" in err


def test_dtype_option_runs_the_network_in_that_dtype(tmp_path):
    code, out = run(["reconstruct", "--num", "1", "--steps", "3", "--dtype", "float64"], tmp_path)
    assert code == 0 and summary(out)["settings"]["dtype"] == "float64" and summary(out)["max_abs_error"] <= 1e-12


def test_threads_pin_the_blas_pools_too(tmp_path):
    from threadpoolctl import threadpool_info, threadpool_limits
    with threadpool_limits(limits=None):       # restore the pools after the test
        code, _ = run(["reconstruct", "--num", "1", "--steps", "2", "--threads", "1"], tmp_path)
        assert code == 0
        assert all(pool["num_threads"] == 1 for pool in threadpool_info()), threadpool_info()


# -- issue 13: the bundled rectified flow ------------------------------------------------------
def test_digits_flow_round_trip_via_the_cli(tmp_path, capsys):
    """Acceptance: digits-flow round trip max abs <= 1e-5 via the CLI."""
    code, out = run(["reconstruct", "--model", "digits-flow", "--steps", "10", "--num", "4"], tmp_path)
    assert code == 0 and summary(out)["max_abs_error"] <= 1e-5 and summary(out)["ddim"]["max_abs_error"] > 1e-3
    assert "grid: flow sigmas" in capsys.readouterr().out
    code, _ = run(["sample", "--model", "digits-flow", "--spacing", "leading", "--num", "1"], tmp_path, "bad")
    _one_line_error(capsys, code, "--spacing leading", "flow model digits-flow", "omit --spacing")


@pytest.mark.parametrize("command, key", [
    (["edit", "--source", "3", "--target", "8", "--num", "2", "--steps", "4"], "success_rate"),
    (["interpolate", "--num", "4", "--steps", "4"], "middle_fd"),
    (["sample", "--num", "2", "--steps", "3"], "seconds"),
    (["fd", "--num", "65", "--steps", "3", "--guidance", "1"], "fd"),
])
def test_digits_flow_commands(tmp_path, command, key):
    code, out = run(command + ["--model", "digits-flow"], tmp_path)
    assert code == 0 and summary(out)["settings"]["model"] == "digits-flow"
    assert summary(out)[key] is not None


# -- issue 11 item 3: latent files ----------------------------------------------------------------
@pytest.mark.parametrize("model", ["digits", "digits-flow"])
def test_saved_latent_samples_back_bit_for_bit(tmp_path, capsys, model):
    from safetensors.torch import load_file

    from belm import Latent
    from belm.apps import load_model, reconstruct
    lat = tmp_path / "lat.safetensors"
    code, out = run(["reconstruct", "--model", model, "--num", "3", "--steps", "10", "--source", "3",
                     "--save-latent", str(lat)], tmp_path, "rec")
    assert code == 0 and lat.is_file() and summary(out)["saved_latent"]["images"] == 3
    assert f"--latent {lat}" in capsys.readouterr().out          # says how to sample it back
    code, out = run(["sample", "--model", model, "--latent", str(lat), "--steps", "10", "--target", "3",
                     "--guidance", "1"], tmp_path, "back")
    assert code == 0
    back = load_file(out / "samples.safetensors")["images"]
    handle = load_model(model)
    images, labels = handle.reference_images("heldout")
    pick = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:3]]
    round_trip = reconstruct(handle, pick, steps=10, condition=3, progress=False)
    assert torch.equal(back, round_trip["reconstruction"].to(torch.float32))
    assert torch.equal(Latent.load(lat).states[0], round_trip["inverted"].states[0])
    # another sampler, another N: refused with both named, nothing written
    for args, words in ((["--sampler", "bdia", "--steps", "10"], ("OBELM", "BDIA")),
                        (["--steps", "12"], ("different schedule", "N=12"))):
        code, _ = run(["sample", "--model", model, "--latent", str(lat), "--target", "3", *args], tmp_path, "bad")
        _one_line_error(capsys, code, *words)
        assert not (tmp_path / "bad").exists()


def test_saved_latents_of_edit_and_interpolate(tmp_path, capsys):
    from belm import Latent
    lat = tmp_path / "edit.safetensors"
    code, out = run(["edit", "--source", "3", "--target", "8", "--num", "2", "--steps", "6", "--freeze", "2",
                     "--save-latent", str(lat)], tmp_path, "e")
    assert code == 0 and Latent.load(lat).level == 2 and Latent.load(lat).states[0].shape[0] == 2
    code, out = run(["sample", "--latent", str(lat), "--steps", "6", "--target", "8", "--guidance", "3"],
                    tmp_path, "s")
    assert code == 0 and len(list(out.glob("sample_*.png"))) == 2
    lat = tmp_path / "pair.safetensors"
    code, _ = run(["interpolate", "--num", "3", "--steps", "4", "--save-latent", str(lat)], tmp_path, "i")
    assert code == 0 and Latent.load(lat).states[0].shape[0] == 2


@pytest.mark.parametrize("args, words", [
    (["sample", "--latent", "/no/such.safetensors"], ("--latent /no/such.safetensors", "no such file")),
    (["reconstruct", "--num", "1", "--save-latent", "/no/such/dir/l.safetensors"], ("--save-latent", "does not exist")),
])
def test_latent_paths_are_checked_before_work(tmp_path, capsys, args, words):
    code, out = run(args, tmp_path)
    _one_line_error(capsys, code, *words)
    assert not out.exists()


def test_sample_latent_of_the_conditional_digits_needs_its_condition(tmp_path, capsys):
    lat = tmp_path / "lat.safetensors"
    assert run(["reconstruct", "--num", "2", "--steps", "3", "--save-latent", str(lat)], tmp_path, "r")[0] == 0
    assert "condition '" in capsys.readouterr().out                # the labels it was inverted with
    # a file written before latents recorded their condition (issue 20) needs --target
    from safetensors import safe_open
    from safetensors.torch import save_file
    old = tmp_path / "old.safetensors"
    with safe_open(str(lat), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if not k.startswith("info.") and k != "sha256"}
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(old), metadata=meta)
    code, _ = run(["sample", "--latent", str(old), "--steps", "3"], tmp_path)
    _one_line_error(capsys, code, "--latent", "needs --target")
    code, _ = run(["sample", "--latent", str(lat), "--steps", "3", "--target", "1,2,3"], tmp_path)
    _one_line_error(capsys, code, "--target lists 3 class ids", "2 images")
    code, _ = run(["sample", "--latent", str(lat), "--steps", "3", "--target", "1", "--num", "3"], tmp_path)
    _one_line_error(capsys, code, "--num 3", "holds 2 images")
    code, out = run(["sample", "--latent", str(lat), "--steps", "3", "--target", "1", "--num", "1"], tmp_path)
    assert code == 0 and sorted(p.name for p in out.glob("sample_*.png")) == ["sample_000000.png"]


# -- issue 14: belm optimize ---------------------------------------------------------------------
def test_optimize_reports_beside_edit_and_writes_pictures(tmp_path, capsys):
    code, out = run(["optimize", "--source", "3", "--target", "8", "--num", "2", "--steps", "4", "--iters", "3"],
                    tmp_path)
    assert code == 0
    s = summary(out)
    for key in ("success_rate", "mean_l2", "mean_psnr", "seconds", "edit_success_rate", "edit_mean_l2",
                "edit_mean_psnr", "edit_seconds"):
        assert s[key] is not None, key
    assert 0 < s["mean_l2"] < 32 and 0 < s["edit_mean_l2"] < 32 and s["iterations"] <= 3
    assert s["settings"]["iters"] == 3 and s["command"].startswith("belm optimize")
    assert (out / "optimize.png").is_file() and len(list(out.glob("optimized_*.png"))) == 2
    printed = capsys.readouterr().out
    assert "optimize" in printed and "edit" in printed and "mean_psnr" in printed


@pytest.mark.parametrize("args, words", [
    (["--source", "3", "--target", "3"], ("--target must differ from --source",)),
    (["--source", "3", "--target", "10"], ("--target must be a class id in [0, 9]",)),
    (["--source", "3", "--target", "8", "--sampler", "ddim"], ("invalid choice",)),
    (["--source", "3", "--target", "8", "--lr", "0"], ("--lr must be > 0",)),
])
def test_optimize_bad_input_is_one_line(tmp_path, capsys, args, words):
    code, out = run(["optimize", *args], tmp_path)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1 and not out.exists()
    for word in words:
        assert word in err, err
