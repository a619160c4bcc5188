"""Issue 21: `belm invert` on folders into latent shards; resumable, kill-safe, the same bits for any
world size; `sample/reconstruct/edit --latents`; every command either shards or refuses under
more than one rank; inherited distributed variables give one line, not a hang."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from belm.apps import datasets
from belm.apps.sharding import backend_for, shards_of_rank
from belm.cli import main

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 7
#: small runs: 7 digits in shards of 3 (3, 3, 1), 4 steps
SIZES = ["--steps", "4", "--shard-size", "3"]
INVERT = [*SIZES, "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """NUM_IMAGES held-out digits as 16x16 PNGs (the model's size), plus one 24x16 image aside."""
    from PIL import Image

    from belm.apps.io import to_uint8
    from belm.models import digits_dataset
    folder = tmp_path_factory.mktemp("digits")
    images, _ = digits_dataset("heldout")
    for i in range(NUM_IMAGES):
        Image.fromarray(to_uint8(images[i:i + 1])[0][..., 0]).save(folder / f"digit_{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def reference(digits_folder, tmp_path_factory) -> Path:
    """An uninterrupted one-process inversion of the folder (in-process)."""
    out = tmp_path_factory.mktemp("ref") / "latents"
    assert main(["invert", str(digits_folder), "--out", str(out), *INVERT]) == 0
    return out


def _files(folder: Path) -> dict[str, bytes]:
    """The shard files and the index, by name (summary.json holds timings: not compared)."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))} | \
        {"index.json": (folder / "index.json").read_bytes()}


def _env(**extra) -> dict:
    env = dict(os.environ)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    """Two ranks on this machine (gloo); ``--`` ends torchrun's options (its parser would take
    ``--num`` for its ``--numa-binding``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "belm.cli", "--", *args]


def _one_line(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


# -- inputs ---------------------------------------------------------------------------------
def test_list_images_takes_folders_globs_and_list_files_sorted_once(tmp_path, digits_folder):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two of them\n{digits_folder / 'digit_003.png'}\n\n{digits_folder / 'digit_001.png'}\n")
    paths = datasets.list_images([str(listing), str(digits_folder / "digit_00[0-2].png"), str(digits_folder)])
    assert paths == sorted(str(p) for p in digits_folder.glob("*.png"))      # all, sorted, no repeats
    assert datasets.list_images([str(listing)]) == [str(digits_folder / "digit_001.png"),
                                                   str(digits_folder / "digit_003.png")]
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="notes.md"):
        datasets.list_images([str(tmp_path / "notes.md")])
    with pytest.raises(FileNotFoundError, match="nothing"):
        datasets.list_images([str(tmp_path / "nothing")])


def test_fit_policies(tmp_path):
    from PIL import Image
    wide = tmp_path / "wide.png"
    pixels = torch.zeros(16, 32, dtype=torch.uint8)
    pixels[:, 8:24] = 255                      # a white center square in a 32x16 black image
    Image.fromarray(pixels.numpy()).save(wide)
    with pytest.raises(ValueError, match="wide.png is 32x16.*--fit resize"):
        datasets.read_image(str(wide), (1, 16, 16), "none")
    cropped, digest = datasets.read_image(str(wide), (1, 16, 16), "crop")
    assert cropped.shape == (1, 16, 16) and torch.equal(cropped, torch.ones_like(cropped))   # the center only
    stretched, _ = datasets.read_image(str(wide), (1, 16, 16), "resize")
    assert stretched.shape == (1, 16, 16) and stretched.min() == -1      # the black sides squeezed in
    assert len(digest) == 64


@pytest.mark.parametrize("extra, words", [
    (["--shard-size", "0"], ["--shard-size must be >= 1"]),
    (["--workers", "-1"], ["--workers must be >= 0"]),
    (["--exact", "bitwise", "--sampler", "ddim"], ["--exact bitwise", "obelm and bdia"]),
    (["--exact", "bitwise", "--batch-size", "2"], ["--exact bitwise inverts whole shards"]),
    (["--guidance", "2"], ["--guidance 2 needs --source"]),
    (["--freeze", "4"], ["--freeze must lie in [0, 3]"]),
])
def test_bad_invert_arguments_are_one_line_before_any_work(tmp_path, digits_folder, capsys, extra, words):
    out = tmp_path / "latents"
    assert main(["invert", str(digits_folder), "--out", str(out), *INVERT, *extra]) == 2
    _one_line(capsys, *words)
    assert not out.exists()


def test_invert_without_images_is_one_line(tmp_path, capsys):
    assert main(["invert", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *INVERT]) == 2
    _one_line(capsys, "missing", "neither a file, a folder nor a glob pattern")
    (tmp_path / "empty").mkdir()
    assert main(["invert", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), *INVERT]) == 2
    _one_line(capsys, "no PNG, JPEG or WebP file")


def test_invert_refuses_a_wrong_size_before_work_in_one_line(tmp_path, digits_folder, capsys):
    from PIL import Image
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("L", (24, 16)).save(folder / "big.png")
    out = tmp_path / "latents"
    assert main(["invert", str(folder), "--out", str(out), *INVERT]) == 2
    _one_line(capsys, "big.png is 24x16", "--fit resize")
    assert not list(out.glob("shard-*"))
    # the refused run wrote no latent, so the corrected command is not "other settings"
    assert main(["invert", str(folder), "--out", str(out), *INVERT, "--fit", "resize"]) == 0
    assert len(list(out.glob("shard-*"))) == 1


# -- files ----------------------------------------------------------------------------------
def test_canonical_safetensors_bytes_depend_only_on_content():
    from safetensors.torch import load, save
    tensors = {"state_0": torch.arange(6.0).reshape(2, 3)}
    metadata = {f"key_{i}": str(i) for i in range(12)}
    plain = {save(tensors, metadata=metadata) for _ in range(8)}
    assert len(plain) > 1            # safetensors' own header order varies: the reason for the rewrite
    canonical = {datasets.canonical_safetensors(tensors, metadata) for _ in range(8)}
    assert len(canonical) == 1
    assert torch.equal(load(canonical.pop())["state_0"], tensors["state_0"])


def test_shards_of_rank_partition_round_robin():
    for shards, size in [(7, 2), (3, 4), (10, 3), (0, 2)]:
        parts = [shards_of_rank(shards, r, size) for r in range(size)]
        assert sorted(sum(parts, [])) == list(range(shards))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


# -- invert -> sample / reconstruct / edit --latents ----------------------------------------
def test_invert_writes_shards_and_an_index_that_sample_latents_reads_back(tmp_path, digits_folder, reference):
    from safetensors.torch import load_file

    from belm.solvers.base import Latent
    index = json.loads((reference / "index.json").read_text())
    assert [e["path"] for e in index["images"]] == sorted(str(p) for p in digits_folder.glob("*.png"))
    assert [(e["shard"], e["row"]) for e in index["images"]] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    assert [s["count"] for s in index["shards"]] == [3, 3, 1]
    assert index["settings"]["steps"] == 4 and index["belm_version"]
    lat = Latent.load(reference / "shard-000001.safetensors")      # a shard is a plain belm latent
    assert lat.states[0].shape == (3, 1, 16, 16) and lat.method.startswith("OBELM")

    out = tmp_path / "samples"
    assert main(["sample", "--latents", str(reference), "--out", str(out), "--no-progress"]) == 0
    images = load_file(str(out / "samples.safetensors"))["images"]
    inputs = torch.stack([datasets.read_image(e["path"], (1, 16, 16), "none")[0] for e in index["images"]])
    assert images.shape == inputs.shape
    assert (images - inputs).abs().max() < 1e-4          # the exact sampler's round trip
    assert len(list(out.glob("sample_*.png"))) == NUM_IMAGES


@pytest.mark.parametrize("model", ["digits", "digits-flow"])
def test_bitwise_latents_sample_back_to_the_inputs_bit_for_bit(tmp_path, digits_folder, model):
    from safetensors.torch import load_file
    latents, out = tmp_path / "latents", tmp_path / "samples"
    assert main(["invert", str(digits_folder), "--model", model, "--out", str(latents), "--exact", "bitwise",
                 *INVERT]) == 0
    assert main(["sample", "--latents", str(latents), "--out", str(out), "--no-progress"]) == 0
    images = load_file(str(out / "samples.safetensors"))["images"]
    index = json.loads((latents / "index.json").read_text())
    inputs = torch.stack([datasets.read_image(e["path"], (1, 16, 16), "none")[0] for e in index["images"]])
    assert torch.equal(images, inputs)


def test_one_progress_bar_with_shards_done_unless_no_progress(tmp_path, digits_folder, capsys):
    assert main(["invert", str(digits_folder), "--out", str(tmp_path / "a"), *SIZES, "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "invert" in err and "shards 3/3" in err and "img/s" in err
    assert main(["invert", str(digits_folder), "--out", str(tmp_path / "b"), *INVERT]) == 0
    assert "shards" not in capsys.readouterr().err


def test_reconstruct_and_edit_read_latents_back(tmp_path, reference):
    out = tmp_path / "rec"
    assert main(["reconstruct", "--latents", str(reference), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num"] == NUM_IMAGES and summary["max_abs_error"] < 1e-4
    out = tmp_path / "edit"
    assert main(["edit", "--latents", str(reference), "--target", "3", "--out", str(out), "--no-progress"]) == 0
    assert len(list(out.glob("edited_*.png"))) == NUM_IMAGES


def test_latents_option_that_contradicts_the_index_is_one_line(tmp_path, reference, capsys):
    assert main(["sample", "--latents", str(reference), "--steps", "9", "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "--steps 9", "--steps 4", "omit --steps")
    assert main(["sample", "--latents", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "no index.json")
    before = _files(reference)
    assert main(["sample", "--latents", str(reference), "--out", str(reference)]) == 2
    _one_line(capsys, "is the --latents folder")
    assert _files(reference) == before


# -- resume ---------------------------------------------------------------------------------
def test_rerun_skips_verified_shards_redoes_damaged_ones_and_refuses_other_settings(tmp_path, digits_folder,
                                                                                 reference, capsys):
    out = tmp_path / "latents"
    assert main(["invert", str(digits_folder), "--out", str(out), *INVERT]) == 0
    assert main(["invert", str(digits_folder), "--out", str(out), *INVERT]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["computed"], summary["skipped"]) == (0, 3)
    # A shard whose tensors were altered (same size, same name) is redone, not trusted.
    shard = out / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["invert", str(digits_folder), "--out", str(out), *INVERT]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["computed"], summary["skipped"]) == (1, 2)
    assert _files(out) == _files(reference)
    # Another setting (or other inputs) never mixes into the folder.
    capsys.readouterr()
    before = _files(out)
    assert main(["invert", str(digits_folder), "--out", str(out), *INVERT, "--sampler", "bdia"]) == 2
    _one_line(capsys, "other settings", "sampler: 'obelm' -> 'bdia'")
    assert main(["invert", str(digits_folder), "--out", str(out), *INVERT, "--num", "5"]) == 2
    _one_line(capsys, "other settings")
    assert _files(out) == before


def test_sample_parts_resume_and_assemble_in_index_order(tmp_path, reference):
    index = datasets.read_index(reference)
    seen = []

    def sample_fn(latent):          # stands in for the sampler: the latent's noisiest state
        seen.append(latent.states[0].shape[0])
        return latent.states[0].to(torch.float32)

    parts = tmp_path / "parts"
    assert datasets.sample_dataset(index, reference, parts, sample_fn=sample_fn) == [0, 1, 2]
    assert datasets.sample_dataset(index, reference, parts, sample_fn=sample_fn) == []      # all kept
    (parts / "part-000001.safetensors").write_bytes(b"damaged")
    assert datasets.sample_dataset(index, reference, parts, sample_fn=sample_fn) == [1]
    assert seen == [3, 3, 1, 3]
    expected = torch.cat([lat.states[0] for _, lat in datasets.iter_latents(reference, index)]).to(torch.float32)
    counts = [entry["count"] for entry in index["shards"]]
    assert torch.equal(torch.cat(list(datasets.iter_parts(parts, range(3), counts))), expected)
    with pytest.raises(ValueError, match="part-000001.safetensors holds 3 images; 1 expected"):
        list(datasets.iter_parts(parts, [0, 1], [3, 1]))
    with pytest.raises(FileNotFoundError, match="part-000003.safetensors is missing"):
        list(datasets.iter_parts(parts, [3]))


def test_sample_latents_holds_one_part_at_a_time(monkeypatch, tmp_path, reference):
    # Before: rank 0 read every part into one tensor (all images in memory) before writing.
    from alive_batches import AliveBatches
    from safetensors.torch import load_file
    read = AliveBatches(datasets.iter_parts)
    monkeypatch.setattr(datasets, "iter_parts", read.wrapped)
    out = tmp_path / "s"
    assert main(["sample", "--latents", str(reference), "--out", str(out), "--no-progress"]) == 0
    assert len(read.copies) == 3 and read.most_alive <= 1
    assert torch.equal(load_file(str(out / "samples.safetensors"))["images"], torch.cat(read.copies))
    assert sorted(p.name for p in out.glob("sample_*.png")) == [f"sample_{i:06d}.png" for i in range(7)]
    assert not (out / ".belm-parts").exists()


def test_invert_refuses_a_folder_it_did_not_write(tmp_path, digits_folder, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    assert main(["invert", str(digits_folder), "--out", str(out), *INVERT]) == 2
    _one_line(capsys, "not a belm latents folder", "thesis.tex")
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_sigkill_mid_run_then_resume_gives_the_same_bytes(tmp_path, digits_folder, reference):
    out = tmp_path / "latents"
    command = [sys.executable, "-m", "belm.cli", "invert", str(digits_folder), "--out", str(out), *INVERT]
    # test-only pause after each shard, so that the kill lands while shards remain
    proc = subprocess.Popen(command, cwd=REPO, env=_env(BELM_TEST_PAUSE_AFTER_SHARD="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("shard-*.safetensors")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    complete = len(list(out.glob("shard-*.safetensors")))
    assert 1 <= complete < 3 and not (out / "index.json").exists()
    assert main(["invert", str(digits_folder), "--out", str(out), *INVERT]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["computed"] == 3 - complete and summary["skipped"] == complete    # only what was unwritten
    assert _files(out) == _files(reference)
    assert not list(out.glob(".*tmp*"))


# -- several ranks --------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_ranks_give_the_bytes_of_one_process(tmp_path, digits_folder, reference):
    from safetensors.torch import load_file
    two = tmp_path / "two"
    # decoding in a DataLoader worker here (the in-process reference decoded in the rank itself)
    proc = subprocess.run(_torchrun("invert", str(digits_folder), "--out", str(two), *SIZES, "--workers", "1",
                                    "--no-progress"), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _files(two) == _files(reference)                   # shards and index, byte for byte
    ranks = json.loads((two / "summary.json").read_text())["ranks"]
    assert [r["images"] for r in ranks] == [4, 3]             # shards 0, 2 on rank 0; shard 1 on rank 1
    one_out, two_out = tmp_path / "s1", tmp_path / "s2"
    assert main(["sample", "--latents", str(reference), "--out", str(one_out), "--no-progress"]) == 0
    proc = subprocess.run(_torchrun("sample", "--latents", str(two), "--out", str(two_out), "--no-progress"),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert torch.equal(load_file(str(one_out / "samples.safetensors"))["images"],
                       load_file(str(two_out / "samples.safetensors"))["images"])
    assert not (two_out / ".belm-parts").exists()


NOT_SHARDED = [
    ["demo", "--quick"],
    ["reconstruct", "--num", "2"],
    ["edit", "--source", "3", "--target", "8", "--num", "2"],
    ["interpolate"],
    ["fd", "--num", "65"],
    ["optimize", "--source", "3", "--target", "8"],
    ["sample", "--latent", "LATENT"],
    ["reconstruct", "--latents", "LATENTS"],
    ["edit", "--latents", "LATENTS", "--target", "3"],
]


@pytest.mark.parametrize("argv", NOT_SHARDED, ids=lambda a: " ".join(a[:2]))
def test_every_command_that_does_not_shard_refuses_under_two_ranks(tmp_path, argv, reference, capsys,
                                                                   monkeypatch):
    latent = tmp_path / "z.safetensors"
    from belm.solvers.base import Latent
    Latent.load(reference / "shard-000000.safetensors").save(latent)
    argv = [str(latent) if a == "LATENT" else str(reference) if a == "LATENTS" else a for a in argv]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out), "--no-progress"]) == 2
    _one_line(capsys, "does not run sharded", "WORLD_SIZE=2", "one process")
    assert not out.exists()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_inherited_distributed_variables_without_a_launcher_give_one_line(tmp_path, digits_folder, rank):
    # RANK=0 would wait for the other rank forever, RANK=1 retry connecting forever.
    env = _env(WORLD_SIZE="2", RANK=rank, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               BELM_RENDEZVOUS_TIMEOUT="2")
    proc = subprocess.run([sys.executable, "-m", "belm.cli", "invert", str(digits_folder), "--out",
                           str(tmp_path / "out"), *INVERT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "could not meet the other ranks" in err and "torchrun" in err, err


def test_backend_follows_the_device_and_cuda_ranks_bind_to_local_rank(monkeypatch):
    import torch.distributed as dist

    from belm.apps import sharding
    calls = {}

    class Store:
        def set_timeout(self, timeout):
            calls["store_timeout"] = timeout

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)      # CUDA visible, yet a CPU run
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", str(d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "rendezvous", lambda url, timeout: iter([(Store(), 1, 2)]))
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.update(backend=backend, init_timeout=kw["timeout"]))
    monkeypatch.setattr(dist, "barrier", lambda: calls.__setitem__("barrier", True))
    monkeypatch.setattr(dist.distributed_c10d, "_set_pg_timeout", lambda t: calls.__setitem__("pg_timeout", t))
    monkeypatch.setenv("BELM_RENDEZVOUS_TIMEOUT", "7")
    for name, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    assert sharding.init_world("cpu") == "cpu" and calls["backend"] == "gloo" and "set_device" not in calls
    # joining is bounded by the rendezvous timeout; collectives afterwards wait for the slowest rank
    assert calls["init_timeout"].total_seconds() == 7 and calls["barrier"]
    assert calls["pg_timeout"] == calls["store_timeout"] and calls["pg_timeout"].total_seconds() > 86400
    assert sharding.init_world("cuda") == "cuda:1" and calls["backend"] == "nccl" and calls["set_device"] == "cuda:1"
    assert backend_for(None) == "gloo" and backend_for("cuda:0") == "nccl"
