"""Unit tests of the application helpers: Fréchet distance, slerp, errors, output folders."""

import math

import numpy as np
import pytest
import torch

from belm.apps.io import OutputDir
from belm.apps.metrics import frechet_distance, reconstruction_errors
from belm.apps.tasks import seeded_noise, slerp


def test_frechet_distance_matches_the_gaussian_closed_form():
    rng = np.random.default_rng(0)
    d, n = 6, 200_000
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.5, 2.0, size=d), rng.uniform(0.5, 2.0, size=d)
    a = mu1 + s1 * rng.normal(size=(n, d))
    b = mu2 + s2 * rng.normal(size=(n, d))
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert abs(frechet_distance(a, a)) < 1e-8


def test_frechet_distance_with_a_plugged_extractor():
    images = torch.randn(300, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    shifted = images + 0.5
    extractor = lambda x: x.flatten(1)[:, :3]   # noqa: E731  (any feature map can be plugged)
    assert frechet_distance(images, shifted, extractor=extractor) == pytest.approx(3 * 0.25, rel=0.05)


def test_slerp_endpoints_are_exact_and_norm_is_kept():
    a, b = seeded_noise((3, 8, 8), [1, 2]).double().unbind(0)
    a, b = a[None], b[None]
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    assert abs(mid.norm() / a.norm() - 1) < 0.1      # spherical, not a straight line through 0
    assert (mid - (a + b) / 2).abs().max() > 1e-3


def test_seeded_noise_depends_only_on_each_seed():
    whole = seeded_noise((2, 3), [10, 11, 12])
    parts = torch.cat([seeded_noise((2, 3), [10]), seeded_noise((2, 3), [11, 12])])
    assert torch.equal(whole, parts)


def test_reconstruction_errors():
    x = torch.zeros(2, 3)
    y = x.clone()
    y[1, 0] = 0.5
    e = reconstruction_errors(x, y)
    assert e["max_abs_error"] == [0.0, 0.5]
    assert e["psnr"][0] == math.inf and e["psnr"][1] == pytest.approx(10 * math.log10(4 / (0.25 / 3)))


def test_output_dir_moves_files_only_on_success(tmp_path):
    with OutputDir(tmp_path / "ok") as out:
        out.write_json("summary.json", {"a": 1})
    assert (tmp_path / "ok" / "summary.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_output_dir_replaces_its_own_files_only(tmp_path, capsys):
    out_path = tmp_path / "out"
    out_path.mkdir()
    (out_path / "before_belm.txt").write_text("user")
    with OutputDir(out_path) as out:
        out.write_text("a.txt", "1")
        out.write_text("b.txt", "1")
    assert "before_belm.txt" in capsys.readouterr().err          # named once, kept
    (out_path / "later_user.txt").write_text("user")
    with OutputDir(out_path) as out:
        out.write_text("a.txt", "2")
    names = sorted(p.name for p in out_path.iterdir())
    assert names == [".belm-outputs.json", "a.txt", "before_belm.txt", "later_user.txt"]
    assert (out_path / "a.txt").read_text() == "2"
    assert capsys.readouterr().err == ""                          # the record says what is belm's


def test_grids_upscale_small_images_only(tmp_path):
    from PIL import Image

    from belm.apps.io import save_grid
    with OutputDir(tmp_path / "g") as out:
        save_grid(out, [torch.zeros(2, 1, 16, 16)], "small.png")
        save_grid(out, [torch.zeros(2, 3, 128, 96)], "large.png")
        save_grid(out, [torch.zeros(2, 3, 16, 16)], "latent_model.png", scale=1)
    assert Image.open(tmp_path / "g" / "small.png").size == (4 * (2 * 17 + 1), 4 * 18)
    assert Image.open(tmp_path / "g" / "large.png").size == (2 * 97 + 1, 130)
    assert Image.open(tmp_path / "g" / "latent_model.png").size == (2 * 17 + 1, 18)


def test_demo_notes_growth_warnings_in_its_report_and_passes_others_on():
    """The demo's reconstruction table records a GrowthWarning beside its row (first sentence:
    the growth) instead of printing it; any other warning still reaches the caller."""
    import warnings

    from belm import OBELM, Schedule
    from belm.apps.demo import growth_noted
    from belm.errors import GrowthWarning
    from belm.schedule import make_betas

    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    leading = OBELM(lambda x, t: torch.zeros_like(x), Schedule.from_betas(betas, 10, "leading", steps_offset=1),
                    progress=False)
    notes: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", GrowthWarning)      # would fail the test if it escaped
        with growth_noted(notes, "obelm N=10"):
            leading.invert(torch.zeros(1, 1, 4, 4))
    assert list(notes) == ["obelm N=10"]
    assert "multiplies the parasitic mode by" in notes["obelm N=10"] and "spacing=" not in notes["obelm N=10"]
    with pytest.warns(UserWarning, match="unrelated"):
        with growth_noted(notes, "other"):
            warnings.warn("unrelated", UserWarning)
    assert "other" not in notes
