"""Issue 5 acceptance: the `belm` command on the bundled digits model and a tiny SD folder."""

import json
import subprocess
import sys

import pytest
import torch

from belm.cli import main
from tiny_models import tiny_sd_folder  # noqa: F401  (fixture)


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


def test_interpolation_endpoints_are_the_originals(tmp_path):
    from belm.apps import interpolate, load_model
    from belm.models import digits_dataset
    model = load_model("digits")
    images, _ = digits_dataset("heldout")
    strip = interpolate(model, images[:1], images[1:2], num=5, steps=50, progress=False)
    assert (strip[0] - images[0]).abs().max() <= 1e-5
    assert (strip[-1] - images[1]).abs().max() <= 1e-5
    assert (strip[2] - images[0]).abs().max() > 0.1      # the middle really is something else
    code, out = run(["interpolate", "--num", "5", "--steps", "20"], tmp_path)
    assert code == 0 and summary(out)["endpoint_max_abs_error"] <= 1e-5


def test_sample_is_deterministic_per_seed(tmp_path):
    from safetensors.torch import load_file
    code, out1 = run(["sample", "--num", "4", "--steps", "5", "--seed", "7"], tmp_path, "a")
    code2, out2 = run(["sample", "--num", "4", "--steps", "5", "--seed", "7"], tmp_path, "b")
    assert code == code2 == 0
    a, b = load_file(out1 / "samples.safetensors")["images"], load_file(out2 / "samples.safetensors")["images"]
    assert a.shape == (4, 1, 16, 16) and torch.equal(a, b)
    assert (out1 / "sample_000007.png").is_file() and (out1 / "grid.png").is_file()


def test_fd_command_writes_its_figure(tmp_path):
    code, out = run(["fd", "--num", "40", "--steps", "5", "--guidance", "1"], tmp_path)
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
    assert code == 0 and summary(out)["max_abs_error"] <= 1e-5 and "pixel" in summary(out)


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
