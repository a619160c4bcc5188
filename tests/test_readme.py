"""Every ```python and ```bash block of README.md runs as written (issue 15).

The blocks are found generically, so snippets added to the README later are picked up.

- python blocks run in order in one shared namespace (later snippets use names of earlier
  ones, as a reader would). What the README leaves to the user is filled in beforehand
  with the bundled digits model (``eps_fn``, ``betas``, ``alphas_cumprod``, ``timesteps``,
  ``scheduler``, ``unet``, ``xT``, ``y``, ``y0``) and the tiny Stable Diffusion pipeline of
  ``tests/tiny_models.py`` (``pipe``, ``image``, and the placeholder folder paths below).
- bash blocks: each ``belm ...`` line runs in-process through ``belm.cli.main`` with
  ``--out`` in a temporary folder and ``--no-progress``, placeholders substituted, and
  must exit 0 with a strict-JSON summary.json. To keep this file near a minute on 2 cores,
  sizes are capped (``STEPS_CAP``, ``NUM_CAP``: the only changes made to a line).
  Lines starting with ``SKIP`` (make, torchrun, pip: set-up and multi-process launches
  that ``make test`` itself or tests/test_sharding.py cover) are skipped explicitly; any
  other command is an error, so a new kind of line cannot pass unnoticed.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_flux_folder, tiny_sd3_folder, tiny_sd_folder  # noqa: F401  (fixtures)

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP = ("make ", "torchrun ", "pip ")
#: Placeholders of the README → what the test puts there ({sd}: the tiny SD folder, {img}: an image file).
PLACEHOLDERS = {"path/to/local/sd3-folder": "{sd3}", "path/to/local/flux-folder": "{flux}",
                "path/to/local/sd-folder": "{sd}", "path/to/sd": "{sd}", "cat.png": "{img}"}
#: Caps on sizes, applied to every ``belm`` line (new ones included), to keep this file near a
#: minute on a shared 2-core machine: --steps at most 10, --num at most NUM_CAP[command]
#: (default 2). The README's sizes are what users run; the code paths are the same, and
#: the figures at full size are checked by tests/test_cli.py and the benchmarks.
STEPS_CAP = 10
NUM_CAP = {"fd": 65, "interpolate": 3, "sample": 4}

def blocks(language: str) -> list[str]:
    """The fenced ```language blocks of README.md, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


_FOLDERS: dict[str, Path] = {}


def _fill(text: str, sd: Path, img: Path) -> str:
    for key, value in PLACEHOLDERS.items():
        text = text.replace(key, value.format(sd=sd, img=img, **_FOLDERS))
    return text


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_sd_folder, tiny_sd3_folder, tiny_flux_folder):  # noqa: F811
    from PIL import Image
    folder = tmp_path_factory.mktemp("readme")
    img = folder / "cat.png"
    Image.fromarray((torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(0)) * 255)
                    .to(torch.uint8).numpy()).save(img)
    _FOLDERS.update(sd3=tiny_sd3_folder, flux=tiny_flux_folder)
    return tiny_sd_folder, img, folder


@pytest.fixture(scope="module")
def namespace(inputs):
    """What a reader supplies, from the bundled digits model and the tiny SD pipeline."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from belm.adapters import DiffusersEps
    from belm.models import NULL_CLASS, load_digits_unet
    sd_folder, img, _ = inputs
    unet, scheduler = load_digits_unet()
    y = torch.tensor([3, 8])
    ns = {
        "unet": unet, "scheduler": scheduler, "y": y, "y0": torch.full_like(y, NULL_CLASS),
        "eps_fn": DiffusersEps(unet, scheduler, class_labels=y),
        "betas": scheduler.betas.to(torch.float64), "alphas_cumprod": scheduler.alphas_cumprod,
        "timesteps": torch.arange(999, -1, -100),
        "xT": torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)),
        "image": Image.open(img).convert("RGB"),
        "pipe": StableDiffusionPipeline.from_pretrained(str(sd_folder), local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False),
    }
    return ns


def test_readme_has_snippets():
    assert len(blocks("python")) >= 2 and len(blocks("bash")) >= 2


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_snippet_runs(index, namespace, inputs, monkeypatch):
    sd_folder, img, folder = inputs
    monkeypatch.chdir(folder)                  # snippets that write files (lat.save) write there
    code = _fill(blocks("python")[index], sd_folder, img)
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)  # noqa: S102


def _commands() -> list[str]:
    lines = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _strict(text: str) -> dict:
    def refuse(value):
        raise ValueError(f"summary.json is not strict JSON: {value}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("line", _commands())
def test_bash_line_runs(line, inputs, capsys, monkeypatch):
    monkeypatch.chdir(inputs[2])              # relative paths (--save-latent, --latent) land in one folder
    if line.startswith(SKIP):
        pytest.skip(f"set-up or multi-process launch, not run here: {line}")
    from belm.cli import main
    sd_folder, img, folder = inputs
    argv = shlex.split(_fill(line, sd_folder, img))
    assert argv[0] == "belm", f"README bash line is neither a belm command nor listed in SKIP: {line}"
    argv = argv[1:]
    command = argv[0] if argv else ""
    for option, cap in (("--steps", STEPS_CAP), ("--num", NUM_CAP.get(command, 2))):
        if command == "demo":
            break
        if option in argv:
            i = argv.index(option) + 1
            argv[i] = str(min(int(argv[i]), cap))
        else:
            argv += [option, str(cap)]
    out = folder / re.sub(r"\W+", "_", line)[:80]
    code = main(argv + ["--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    _strict((out / "summary.json").read_text())
