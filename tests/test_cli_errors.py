"""Issue 20, "crashes with tracebacks or misleading lines": every bad input to `belm` is one
line on stderr and exit status 2, before any model load where the argument (or the folder's
files) alone decides; whatever else goes wrong is one line too."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import belm.apps.models
from belm.cli import main
from test_cli import _copy_folder, _image, _one_line_error, pixel_folders, run  # noqa: F401  (fixture)
from tiny_models import tiny_sd3_folder, tiny_sd_folder  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parent.parent


class ModelLoaded(BaseException):
    """Raised instead of loading a model: a check that should have come first did not.
    (A BaseException, so that the CLI's own error handling cannot turn it into a line.)"""


@pytest.fixture
def no_load(monkeypatch):
    """Every model load raises ModelLoaded: the checks under test must refuse before it."""
    def load_model(*args, **kwargs):
        raise ModelLoaded(args)
    monkeypatch.setattr(belm.apps.models, "load_model", load_model)


def _refused_before_load(capsys, tmp_path, args, *words):
    code, out = run(args, tmp_path)
    err = _one_line_error(capsys, code, *words)
    assert not out.exists()
    return err


def _accepted(tmp_path, args):
    """The checks let ``args`` through: the run gets as far as loading the model."""
    with pytest.raises(ModelLoaded):
        run(args, tmp_path)


# -- item 1: fp16-variant-only folders -------------------------------------------------------------
def test_fp16_variant_only_folder_is_one_line_before_loading(tmp_path, capsys, no_load, tiny_sd_folder):  # noqa: F811
    folder = _copy_folder(tiny_sd_folder, tmp_path / "fp16")
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    _refused_before_load(capsys, tmp_path, ["reconstruct", "--model", str(folder), "--image",
                                            _image(tmp_path / "a.png", 16, 16)],
                         "--model", str(folder), "fp16", "variant", "rename")


# -- item 2: custom code and decoy weights ----------------------------------------------------------
def _pickle_as_safetensors(folder):
    torch.save({"w": torch.zeros(2)}, folder / "unet" / "diffusion_pytorch_model.safetensors")


def _custom_library(folder):
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["my_unet", "MyUNet"]
    (folder / "model_index.json").write_text(json.dumps(index))


def _code_file(folder):
    (folder / "unet" / "my_unet.py").write_text("import os\n")


def _auto_map(folder):
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "my_unet.MyUNet"}
    (folder / "unet" / "config.json").write_text(json.dumps(config))


def _pickled_instead(folder):
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))


@pytest.mark.parametrize("damage, words", [
    (_pickle_as_safetensors, ("diffusion_pytorch_model.safetensors", "not a safetensors file")),
    (_custom_library, ("'unet'", "my_unet", "custom code")),
    (_code_file, ("my_unet.py", "code")),
    (_auto_map, ("auto_map", "custom code")),
    (_pickled_instead, ("no .safetensors weights", "pickled", "safe_serialization=True")),
])
@pytest.mark.parametrize("kind", ["sd", "pixel"])
def test_custom_code_and_decoy_weights_are_one_line_before_loading(tmp_path, capsys, no_load, tiny_sd_folder,  # noqa: F811
                                                                   pixel_folders, kind, damage, words):
    if kind == "pixel" and damage is _custom_library:
        pytest.skip("a pixel folder without model_index.json names no libraries")
    source = tiny_sd_folder if kind == "sd" else pixel_folders["uncond"]
    folder = _copy_folder(source, tmp_path / "model")
    damage(folder)
    _refused_before_load(capsys, tmp_path, ["reconstruct", "--model", str(folder), "--image",
                                            _image(tmp_path / "a.png", 16, 16)], "--model", *words)


def test_pickled_weights_beside_safetensors_are_ignored_not_loaded(tmp_path, no_load, tiny_sd_folder):  # noqa: F811
    """Hub downloads often hold both; belm reads only the .safetensors (use_safetensors=True)."""
    folder = _copy_folder(tiny_sd_folder, tmp_path / "both")
    torch.save({"w": torch.zeros(2)}, folder / "unet" / "diffusion_pytorch_model.bin")
    _accepted(tmp_path, ["reconstruct", "--model", str(folder), "--image", _image(tmp_path / "a.png", 16, 16)])


# -- item 6: model_index.json with a list _class_name (a custom pipeline) --------------------------
def test_model_index_list_class_name_is_one_line(tmp_path, capsys, no_load, tiny_sd_folder):  # noqa: F811
    folder = _copy_folder(tiny_sd_folder, tmp_path / "custom",
                          {"model_index.json": {"_class_name": ["pipeline", "MyPipeline"]}})
    _refused_before_load(capsys, tmp_path, ["sample", "--model", str(folder), "--num", "1"],
                         "--model", "model_index.json", "_class_name", "custom pipeline code")


# -- item 7: truncated weights and invalid configs in SD / SD3 folders -----------------------------
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])


@pytest.mark.parametrize("family, relative, damage, words", [
    ("sd", "unet/diffusion_pytorch_model.safetensors", _truncate, ("truncated", "unet")),
    ("sd3", "transformer/diffusion_pytorch_model.safetensors", _truncate, ("truncated", "transformer")),
    ("sd", "unet/config.json", lambda p: p.write_text('{"in_channels": '), ("config.json", "not valid JSON")),
    ("sd3", "vae/config.json", lambda p: p.write_text("[1, 2]"), ("config.json", "not a JSON object")),
])
def test_broken_pipeline_files_are_one_line_before_loading(tmp_path, capsys, no_load, request, family, relative,
                                                           damage, words):
    folder = _copy_folder(request.getfixturevalue(f"tiny_{family}_folder"), tmp_path / family)
    damage(folder / relative)
    _refused_before_load(capsys, tmp_path, ["reconstruct", "--model", str(folder), "--image",
                                            _image(tmp_path / "a.png", 32, 32)], "--model", *words)


def test_a_folder_diffusers_cannot_load_is_one_line(tmp_path, capsys, tiny_sd_folder):  # noqa: F811
    """Weights that do not fit their (valid) config: only the load can tell; still one line."""
    folder = _copy_folder(tiny_sd_folder, tmp_path / "mismatch", {"unet/config.json": {"cross_attention_dim": 48}})
    code, out = run(["reconstruct", "--model", str(folder), "--image", _image(tmp_path / "a.png", 16, 16),
                     "--steps", "2"], tmp_path)
    _one_line_error(capsys, code, "--model", str(folder))
    assert not out.exists()


# -- items 3, 4, 5: numbers checked before the work -------------------------------------------------
GiB = 2 ** 30


@pytest.mark.parametrize("args, words", [
    (["sample", "--seed", str(2 ** 64 - 1)], ("--seed", "2^64", "--num 16")),
    (["fd", "--seed", str(2 ** 64 - 100)], ("--seed", "2^64", "--num 297")),
    (["sample", "--seed", "-1"], ("--seed must be >= 0",)),
    (["reconstruct", "--seed", str(2 ** 64)], ("--seed", "2^64")),
    (["reconstruct", "--num", "300"], ("--num 300", "297 held-out digits")),
    (["edit", "--source", "3", "--target", "8", "--num", "40"], ("--num 40", "30 held-out digits of class 3")),
    (["fd", "--num", "1"], ("--num 1", "65", "64 feature dimensions")),
    (["fd", "--num", "64"], ("--num 64", "65")),
    (["edit", "--source", "3", "--target", "8", "--inversion-guidance", "-2"], ("--inversion-guidance must be",)),
    (["sample", "--guidance", "nan"], ("--guidance must be >= 0 and finite",)),
    (["sample", "--guidance", "inf"], ("--guidance must be >= 0 and finite",)),
    (["edit", "--source", "3", "--target", "8", "--inversion-guidance", "inf"], ("--inversion-guidance",)),
    (["reconstruct", "--steps", "1"], ("--steps 1", "--sampler obelm", "couples 2 states")),
    (["reconstruct", "--steps", "2", "--sampler", "leapfrog3"], ("--steps 2", "leapfrog3", "3 states")),
    (["sample", "--steps", "5000"], ("--steps 5000", "1000")),
    (["sample", "--model", "digits-flow", "--steps", "1"], ("--steps 1", "couples 2 states", "--sampler ddim")),
    (["optimize", "--source", "3", "--target", "8", "--steps", "1"], ("--steps 1", "needs --steps >= 2")),
    (["interpolate", "--num", "1"], ("--num must be >= 2 for interpolate",)),
    (["optimize", "--source", "3", "--target", "8", "--num", "31"], ("--num 31", "30 held-out digits of class 3")),
    (["optimize", "--source", "3", "--target", "8", "--lr", "inf"], ("--lr",)),
    (["optimize", "--source", "3", "--target", "8", "--edit-guidance", "nan"], ("--edit-guidance",)),
])
def test_numbers_are_checked_before_loading(tmp_path, capsys, no_load, args, words):
    _refused_before_load(capsys, tmp_path, args, *words)


@pytest.mark.parametrize("args", [
    ["sample", "--seed", str(2 ** 64 - 2), "--num", "2"],
    ["reconstruct", "--seed", str(2 ** 64 - 1), "--num", "297"],
    ["edit", "--source", "3", "--target", "8", "--num", "30"],
    ["fd", "--num", "65"],
    ["reconstruct", "--steps", "2"],
    ["sample", "--steps", "1000"],
])
def test_the_bounds_themselves_are_accepted(tmp_path, no_load, args):
    _accepted(tmp_path, args)


def test_num_beyond_the_free_disk_is_refused_before_loading(tmp_path, capsys, no_load, monkeypatch):
    """`sample --num 1000000000` of the 16x16 digits writes >= 1 TB (4-byte pixels): more than the
    disk holds here (100 GiB free, patched) -- refused before the model load, naming both."""
    import shutil
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100 * GiB))
    _refused_before_load(capsys, tmp_path, ["sample", "--num", "1000000000"],
                         "--num 1000000000", "954 GiB", "100 GiB free")
    _accepted(tmp_path, ["sample", "--num", "1000000"])            # 1 GB: fits


@pytest.mark.parametrize("command", [["fd"], ["interpolate"]])
def test_num_beyond_the_memory_is_refused_before_loading(tmp_path, capsys, no_load, monkeypatch, command):
    """fd holds all its samples (their statistics), interpolate all its frames (one strip)."""
    import belm.cli
    monkeypatch.setattr(belm.cli, "_physical_memory", lambda: 64 * GiB)
    _refused_before_load(capsys, tmp_path, command + ["--num", "1000000000"], "--num 1000000000", "954 GiB",
                         "64 GiB of memory")


# -- item 8: Ctrl-C ------------------------------------------------------------------------------------
def test_ctrl_c_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "belm.cli", "sample", "--num", "2000", "--steps", "50",
                             "--no-progress", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    for line in proc.stdout:            # the model is loaded and sampling has begun
        if line.startswith("grid:"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err   # 128 + SIGINT, as shells report an interrupted command
    assert err.strip() == "belm sample: interrupted", err
    assert not out.exists()


# -- item 9: unknown options --------------------------------------------------------------------------
def test_unknown_option_names_the_subcommand_and_its_help(tmp_path, capsys):
    code, _ = run(["reconstruct", "--bogus", "1"], tmp_path)
    err = _one_line_error(capsys, code, "unrecognized arguments: --bogus 1")
    assert err.startswith("belm reconstruct: error:") and err.endswith("(see belm reconstruct -h)"), err
    assert main(["--bogus"]) == 2
    assert capsys.readouterr().err.strip().endswith("(see belm -h)")


# -- item 10: GrowthWarning in CLI terms ----------------------------------------------------------------
def test_growth_warning_is_one_line_in_cli_terms(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "belm.cli", "reconstruct", "--num", "1", "--steps", "10",
                           "--spacing", "linspace", "--no-progress", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("belm reconstruct: warning: ") and "--steps 10" in line and "--spacing linspace" in line
    assert "use --spacing trailing (growth" in line, line
    for python_term in ("GrowthWarning", "spacing='trailing'", "Schedule.from_diffusers", ".py:"):
        assert python_term not in line, line


@pytest.mark.parametrize("sampler, spacing, steps, fix", [
    ("obelm", "linspace", 10, "use --spacing trailing (growth"),
    ("edict", "trailing", 100, "use fewer --steps, a --p closer to 1"),
])
def test_growth_line_of_every_command(sampler, spacing, steps, fix):
    """The line for each kind of fix, also for optimize (which has no --spacing option)."""
    import argparse
    import warnings

    from belm.cli import _growth_line
    from belm.errors import GrowthWarning
    from belm.models import load_digits_unet
    from belm.schedule import Schedule
    from belm.solvers.growth import check_inversion_growth
    from belm.solvers.registry import make_sampler
    _, scheduler = load_digits_unet()
    s = make_sampler(sampler, lambda x, t: x, Schedule.from_diffusers(scheduler, steps, spacing=spacing), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_inversion_growth(s)
    message = str(next(w.message for w in caught if issubclass(w.category, GrowthWarning)))
    for args in (argparse.Namespace(command="edit", sampler=sampler, spacing=spacing),
                 argparse.Namespace(command="optimize", sampler=sampler)):
        line = _growth_line(message, args)
        assert f"--steps {steps}" in line and fix in line and "\n" not in line, line
        assert "Schedule.from_diffusers" not in line and "spacing='" not in line, line


def test_growth_line_of_reversible_gradients():
    """The wording of sampling with grad="reversible" (optimize) names its gradients, not latents."""
    import argparse

    from belm.cli import _growth_line
    message = ("OBELM on this grid (N = 10, last timestep 1) multiplies the parasitic mode by 7.64e+03 when inverting "
               "(threshold 10): grad='reversible' recovers the sampling chain's states by inverting it on the backward "
               "pass, so its gradients carry that growth times float rounding (autograd's do not). Use "
               "spacing='trailing' (growth 5.9 there; e.g. Schedule.from_diffusers(scheduler, N, "
               "spacing='trailing'), or model.schedule(N) which defaults to it).")
    line = _growth_line(message, argparse.Namespace(command="optimize", sampler="obelm"))
    assert "the gradients" in line and "noise-like" not in line and "use --spacing trailing (growth 5.9 there)" in line


# -- item 11 and the rest: whatever fails inside the run is one line ---------------------------------
@pytest.mark.parametrize("exc, code", [
    (ValueError("check the rule's formulas\nsecond line"), 2),
    (ArithmeticError("a step of zero"), 2),
    (RuntimeError("could not load\n  indented detail"), 2),
    (MemoryError(), 2),
    (KeyError("state"), 1),
])
def test_any_failure_inside_the_run_is_one_line(tmp_path, capsys, monkeypatch, exc, code):
    import belm.apps.tasks

    def fail(*args, **kwargs):
        raise exc
    monkeypatch.setattr(belm.apps.tasks, "reconstruct", fail)
    status, out = run(["reconstruct", "--num", "2", "--steps", "3"], tmp_path)
    err = capsys.readouterr().err.strip()
    assert status == code and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("belm reconstruct: error: ") and not out.exists()
    if code == 1:
        assert "--debug" in err, err
    if isinstance(exc, MemoryError):
        assert "out of memory" in err and "--batch-size" in err, err
