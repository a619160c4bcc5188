"""Issue 20: output folders and files that never lose, mix or leak a user's data.

- belm's record (``.belm-outputs.json``) is untrusted: nothing outside ``--out`` is ever
  deleted or written, whatever the record lists or the folder holds (absolute names, ``..``,
  symlinked folders and files);
- the commit is journaled: a SIGKILL at *any* point of it leaves ``--out``, after the
  recovery every use of the folder starts with, wholly the old run or wholly the new one,
  and nothing outside it changed; SIGTERM or Ctrl-C before the commit point leave the old run;
- files of the user's under belm's names are refused, never overwritten;
- ``--save-latent`` never replaces an input nor a file belm did not write;
- files honour the umask.

The kill harness forks the (already imported) test process, so each kill point costs
milliseconds, not an interpreter start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat

import pytest
import torch

import belm.apps.io as io
from belm import OBELM, Latent, Schedule
from belm.apps.io import MANIFEST, OutputDir, OutputFolderError, recover_output_folder
from belm.cli import main

NEW = {"a.txt": "new a", "c.txt": "new c", "grid.png": "new grid"}


def snapshot(folder):
    """Every entry under ``folder`` (recursively, links not followed): name -> bytes, link
    target or "<dir>"."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            elif os.path.isdir(path):
                out[rel] = "<dir>"
            else:
                with open(path, "rb") as f:
                    out[rel] = f.read()
    return out


def outside(tmp_path, out):
    """The snapshot of everything beside ``out`` (the parent folder without it)."""
    return {k: v for k, v in snapshot(tmp_path).items() if k.split(os.sep)[0] != out.name}


def write_run(out, files):
    with OutputDir(out) as o:
        for name, text in files.items():
            o.write_text(name, text)


def in_child(body):
    """Run ``body()`` in a forked child; returns its wait status (the child never returns)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def kill_at(index):
    """A checkpoint hook that SIGKILLs the process at its ``index``-th call."""
    calls = []

    def hook(step):
        calls.append(step)
        if len(calls) == index + 1:
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


@pytest.fixture
def old_run(tmp_path):
    """An --out holding an earlier run (a, b, grid) and a file of the user's, with a sibling
    folder beside it."""
    out = tmp_path / "out"
    write_run(out, {"a.txt": "old a", "b.txt": "old b", "grid.png": "old grid"})
    (out / "notes.txt").write_text("the user's")
    (tmp_path / "sibling").mkdir()
    (tmp_path / "sibling" / "keep.txt").write_text("beside --out")
    return out


# -- A. the record is untrusted: nothing outside --out is touched ---------------------------------
@pytest.mark.parametrize("entry", ["ABSOLUTE", "sub/important.txt", "../victim.txt", "./a.txt", "",
                                   ".belm-lock", "a\\..\\..\\victim.txt"])
def test_a_record_naming_anything_but_plain_names_is_ignored(tmp_path, capsys, entry):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "important.txt").write_text("precious")
    os.symlink(elsewhere, out / "sub")                       # a symlinked folder inside --out
    (out / "a.txt").write_text("written by belm, says the record")
    name = str(victim) if entry == "ABSOLUTE" else entry
    (out / MANIFEST).write_text(json.dumps([name, "a.txt"]))
    before = outside(tmp_path, out)
    write_run(out, {"new.txt": "x"})
    assert outside(tmp_path, out) == before                  # victim, elsewhere/important.txt intact
    assert os.path.islink(out / "sub") and (out / "a.txt").is_file()   # the record was not trusted at all
    err = capsys.readouterr().err
    assert "is not belm's record" in err and len(err.strip().splitlines()) == 1, err
    assert json.loads((out / MANIFEST).read_text()) == ["new.txt"]


@pytest.mark.parametrize("record", ['{"a.txt": 1}', "[1, 2]", '"a.txt"', "[null]", "not json", "[[\"a.txt\"]]"])
def test_a_record_that_is_not_a_list_of_names_is_reported_and_ignored(tmp_path, capsys, record):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("mine")
    (out / MANIFEST).write_text(record)
    write_run(out, {"b.txt": "x"})
    assert (out / "a.txt").read_text() == "mine"
    err = capsys.readouterr().err.strip()
    assert MANIFEST in err and "ignored" in err and len(err.splitlines()) == 1, err


def test_a_symlinked_record_is_not_followed(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    decoy = tmp_path / "decoy.json"
    decoy.write_text(json.dumps(["a.txt"]))
    (out / "a.txt").write_text("mine")
    os.symlink(decoy, out / MANIFEST)
    write_run(out, {"b.txt": "x"})
    assert (out / "a.txt").read_text() == "mine"              # the link's list was not believed
    assert decoy.read_text() == json.dumps(["a.txt"])         # nor written through
    assert not os.path.islink(out / MANIFEST) and json.loads((out / MANIFEST).read_text()) == ["b.txt"]
    assert "ignored" in capsys.readouterr().err


def test_a_recorded_name_that_became_a_symlink_is_replaced_not_written_through(tmp_path, old_run):
    """summary.json (written by belm before) swapped for a link to a file outside: the new
    summary replaces the link itself; a stale recorded name that is now a link is not
    deleted through (the link stays, its target is untouched)."""
    out = old_run
    target = tmp_path / "target.txt"
    target.write_text("outside --out")
    os.unlink(out / "grid.png")
    os.symlink(target, out / "grid.png")                      # written now: replaced
    os.unlink(out / "b.txt")
    os.symlink(target, out / "b.txt")                         # stale: not deleted through
    before = outside(tmp_path, out)
    write_run(out, NEW)
    assert outside(tmp_path, out) == before and target.read_text() == "outside --out"
    assert not os.path.islink(out / "grid.png") and (out / "grid.png").read_text() == "new grid"
    assert os.path.islink(out / "b.txt")


def test_a_stale_recorded_folder_or_folder_link_is_not_deleted(tmp_path, old_run):
    out = old_run
    os.unlink(out / "b.txt")
    (out / "b.txt").mkdir()
    (out / "b.txt" / "inner.txt").write_text("the user's")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "important.txt").write_text("precious")
    os.unlink(out / "a.txt")
    os.symlink(elsewhere, out / "a.txt")
    write_run(out, {"c.txt": "new c"})
    assert (out / "b.txt" / "inner.txt").read_text() == "the user's"
    assert os.path.islink(out / "a.txt") and (elsewhere / "important.txt").read_text() == "precious"


def test_a_cli_run_never_deletes_what_a_planted_record_lists(tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps([str(victim)]))
    assert main(["sample", "--num", "1", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert victim.read_text() == "precious"


def test_output_names_must_be_plain(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        with OutputDir(tmp_path / "o") as o:
            o.file("../escape.txt")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "o").exists()


# -- B. atomic, kill-safe commit -----------------------------------------------------------------
def test_staging_happens_inside_out_and_nothing_is_created_beside_it(tmp_path, old_run):
    before = outside(tmp_path, old_run)
    with OutputDir(old_run) as o:
        o.write_text("a.txt", "new")
        stages = [p.name for p in old_run.iterdir() if p.name.startswith(".belm-stage-")]
        assert len(stages) == 1 and outside(tmp_path, old_run) == before
    assert outside(tmp_path, old_run) == before
    assert sorted(p.name for p in old_run.iterdir()) == [MANIFEST, "a.txt", "notes.txt"]


def test_out_that_is_a_symlink_to_another_folder_works(tmp_path):
    real = tmp_path / "volume"
    real.mkdir()
    link = tmp_path / "out"
    os.symlink(real, link)
    write_run(link, {"a.txt": "1"})
    write_run(link, {"b.txt": "2"})
    assert os.path.islink(link) and sorted(p.name for p in real.iterdir()) == [MANIFEST, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "volume"]


def test_check_writable_creates_nothing_and_a_failed_run_leaves_no_folder(tmp_path):
    io.check_writable(tmp_path / "a" / "b" / "c")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with OutputDir(tmp_path / "a" / "b") as o:
            o.write_text("x.txt", "1")
            raise RuntimeError("the run failed")
    assert list(tmp_path.iterdir()) == []


def test_sigkill_at_every_point_of_the_commit_leaves_the_old_or_the_new_run(tmp_path, old_run):
    """The harness kills the committing process at checkpoint i, for every i, then recovers:
    --out is byte for byte the old run or the new one (files, record, the user's file) and
    nothing beside it changed. Kills up to the commit point give the old run, later ones the new."""
    out = old_run
    old = snapshot(out)
    beside = outside(tmp_path, out)
    new_dir = tmp_path / "reference"
    write_run(new_dir, NEW)                                  # what the new run gives, uninterrupted
    new = {**snapshot(new_dir), "notes.txt": b"the user's"}
    (tmp_path / "reference" / MANIFEST).unlink()
    for name in NEW:
        (new_dir / name).unlink()
    new_dir.rmdir()
    outcomes, i = [], 0
    while True:
        def commit(i=i):
            io._commit_checkpoint = kill_at(i)
            write_run(out, NEW)
        status = in_child(commit)
        if os.WIFEXITED(status):                              # i is past the last checkpoint
            assert os.WEXITSTATUS(status) == 0
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
        assert outside(tmp_path, out) == beside, i
        recover_output_folder(out)
        now = snapshot(out)
        assert now in (old, new), (i, sorted(now))
        outcomes.append("old" if now == old else "new")
        assert outside(tmp_path, out) == beside, i
        if now == new:                                       # back to the old run for the next kill
            for name in NEW:
                (out / name).unlink()
            for name, data in old.items():
                (out / name).write_bytes(data)
        i += 1
    assert snapshot(out) == new
    # the commit point splits the kills: old up to it, new after it (and there are both)
    assert "old" in outcomes and "new" in outcomes
    assert outcomes == sorted(outcomes, key=lambda o: o == "new"), outcomes


def test_a_kill_during_recovery_is_recovered_too(tmp_path, old_run):
    """Killed after moving the first file (a mix, marked by the journal), then killed again at
    every point of the recovery: the next recovery still completes the new run."""
    out = old_run

    def first_kill():
        def hook(step):
            if step.startswith("moved"):
                os.kill(os.getpid(), signal.SIGKILL)
        io._commit_checkpoint = hook
        write_run(out, NEW)
    j = 0
    while True:
        # a fresh interrupted commit each time: old run, then the kill after the first move
        for name in list(os.listdir(out)):
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        write_run(out, {"a.txt": "old a", "b.txt": "old b", "grid.png": "old grid"})
        (out / "notes.txt").write_text("the user's")
        assert os.WTERMSIG(in_child(first_kill)) == signal.SIGKILL
        assert (out / io.JOURNAL).is_file() and (out / "a.txt").read_text() == "new a"   # a mix, marked
        assert (out / "b.txt").read_text() == "old b"

        def recover(j=j):
            io._commit_checkpoint = kill_at(j)
            recover_output_folder(out)
        status = in_child(recover)
        recover_output_folder(out)
        assert sorted(os.listdir(out)) == sorted([MANIFEST, "notes.txt", *NEW]), (j, os.listdir(out))
        assert all((out / n).read_text() == t for n, t in NEW.items())
        if os.WIFEXITED(status):
            break
        j += 1
    assert j >= 3


def test_sigterm_before_the_commit_point_leaves_the_old_run(tmp_path, old_run):
    old, beside = snapshot(old_run), outside(tmp_path, old_run)

    def run():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with OutputDir(old_run) as o:
            o.write_text("a.txt", "half")
            os.kill(os.getpid(), signal.SIGTERM)
    assert os.WTERMSIG(in_child(run)) == signal.SIGTERM
    assert {k: v for k, v in snapshot(old_run).items() if not k.startswith(".belm")} == \
        {k: v for k, v in old.items() if not k.startswith(".belm")}
    recover_output_folder(old_run)                           # the dead run's stage goes
    assert snapshot(old_run) == old and outside(tmp_path, old_run) == beside


@pytest.mark.parametrize("where", ["in the run", "in the commit, before the journal"])
def test_ctrl_c_before_the_commit_point_leaves_the_old_run(tmp_path, old_run, monkeypatch, where):
    old = snapshot(old_run)

    def interrupt(step):
        if step == "staged":
            raise KeyboardInterrupt
    if where != "in the run":
        monkeypatch.setattr(io, "_commit_checkpoint", interrupt)
    with pytest.raises(KeyboardInterrupt):
        with OutputDir(old_run) as o:
            for name, text in NEW.items():
                o.write_text(name, text)
            if where == "in the run":
                raise KeyboardInterrupt
    assert snapshot(old_run) == old                          # no stage, no lock file left either


def test_a_second_run_on_the_folder_is_refused(tmp_path, capsys, old_run):
    read, write = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child holds the folder until the parent closes the pipe
        try:
            os.close(write)
            lock = io.reserve_output_folder(old_run)
            os.write(ready_w, b"1")
            os.read(read, 1)
            del lock
        finally:
            os._exit(0)
    os.close(read)
    try:
        assert os.read(ready_r, 1) == b"1"
        with pytest.raises(OutputFolderError, match="in use by another belm run"):
            write_run(old_run, NEW)
        code = main(["sample", "--num", "1", "--steps", "2", "--out", str(old_run), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "in use by another belm run" in err and len(err.splitlines()) == 1, err
    finally:
        os.close(write)
        os.waitpid(pid, 0)
    write_run(old_run, NEW)                                  # free again
    assert (old_run / "c.txt").read_text() == "new c" and not (old_run / io.LOCK).exists()


def test_a_file_system_without_locks_still_works_and_says_so(tmp_path, capsys, monkeypatch):
    import errno

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(io.fcntl, "flock", no_locks)
    write_run(tmp_path / "o", {"a.txt": "1"})
    assert (tmp_path / "o" / "a.txt").read_text() == "1" and not (tmp_path / "o" / io.LOCK).exists()
    err = capsys.readouterr().err.strip()
    assert "cannot lock files" in err and len(err.splitlines()) == 1


def test_a_cli_run_leaves_no_lock_behind(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    assert main(["sample", "--num", "1", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "grid.png", "sample_000000.png", "samples.safetensors",
                                                     "summary.json"]


def test_demo_writes_in_one_commit_at_the_end(tmp_path, monkeypatch):
    """belm demo keeps no staging folder in or beside --out while it computes."""
    import belm.apps.demo as demo
    out = tmp_path / "demo"
    seen = []

    class Digits:   # the bundled model's held-out set is all the demo reads before its first task
        def reference_images(self, split):
            return torch.zeros(20, 1, 16, 16), torch.arange(20) % 10
    monkeypatch.setattr(demo, "load_model", lambda name: Digits())

    def first_task(*args, **kwargs):
        seen.append(sorted(p.name for p in tmp_path.rglob("*")))
        raise RuntimeError("stop the demo here")
    monkeypatch.setattr(demo.tasks, "reconstruct", first_task)
    with pytest.raises(RuntimeError, match="stop the demo"):
        demo.run_demo(str(out), quick=True, progress=False)
    assert seen == [[]] and not out.exists()


# -- C. files of the user's under belm's names -----------------------------------------------------
@pytest.mark.parametrize("record", [None, ["grid.png"]])
def test_cli_refuses_a_users_file_under_a_belm_name_before_any_work(tmp_path, capsys, monkeypatch, record):
    import belm.cli as cli
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("my summary")
    if record is not None:
        (out / MANIFEST).write_text(json.dumps(record))
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded"))
    code = main(["reconstruct", "--num", "1", "--steps", "2", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "summary.json" in err and "move it away or choose another --out" in err
    assert (out / "summary.json").read_text() == "my summary"


def test_a_symlink_under_a_belm_name_is_refused_and_its_target_untouched(tmp_path, capsys):
    target = tmp_path / "target.txt"
    target.write_text("outside")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(target, out / "summary.json")
    code = main(["sample", "--num", "1", "--steps", "2", "--out", str(out), "--no-progress"])
    assert code == 2 and "summary.json" in capsys.readouterr().err
    assert target.read_text() == "outside" and os.path.islink(out / "summary.json")


def test_output_dir_refuses_to_overwrite_an_unrecorded_file(tmp_path, old_run):
    """Names known only during the run (numbered pictures): file() refuses, and so does the
    commit for a file that appeared during the run; the folder stays as it was."""
    (old_run / "sample_000000.png").write_text("the user's picture")
    old = snapshot(old_run)
    with pytest.raises(OutputFolderError, match="sample_000000.png, which belm did not write"):
        with OutputDir(old_run) as o:
            o.write_text("sample_000000.png", "belm's")
    assert snapshot(old_run) == old
    with pytest.raises(OutputFolderError, match="late.png, which belm did not write"):
        with OutputDir(old_run) as o:
            o.write_text("late.png", "belm's")
            (old_run / "late.png").write_text("the user's, made during the run")
    assert (old_run / "late.png").read_text() == "the user's, made during the run"
    assert {k: v for k, v in snapshot(old_run).items() if k != "late.png"} == old
    os.unlink(old_run / "grid.png")                             # recorded, now a folder of the user's
    (old_run / "grid.png").mkdir()
    with pytest.raises(OutputFolderError, match="grid.png, which belm did not write"):
        write_run(old_run, NEW)
    assert (old_run / "grid.png").is_dir() and not (old_run / io.JOURNAL).exists()


# -- D. --save-latent ------------------------------------------------------------------------------
def _png(path):
    from PIL import Image
    Image.new("L", (16, 16), 128).save(path)
    return path


def _latent(path):
    sched = Schedule.from_betas(torch.linspace(1e-4, 0.02, 100, dtype=torch.float64), 4, spacing="trailing")
    lat = OBELM(lambda x, t: 0.1 * x, sched, progress=False).invert(torch.randn(1, 3, dtype=torch.float64))
    lat.save(path)
    return lat


@pytest.mark.parametrize("alias", ["same", "hardlink", "symlink"])
def test_save_latent_refuses_an_input_image(tmp_path, capsys, monkeypatch, alias):
    import belm.cli as cli
    image = _png(tmp_path / "mycat.png")
    data = image.read_bytes()
    target = image if alias == "same" else tmp_path / "alias.png"
    if alias == "hardlink":
        os.link(image, target)
    elif alias == "symlink":
        os.symlink(image, target)
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded"))
    code = main(["reconstruct", "--image", str(image), "--save-latent", str(target), "--steps", "2",
                 "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"is the input {image}" in err, err
    assert image.read_bytes() == data


def test_save_latent_refuses_a_file_belm_did_not_write(tmp_path, capsys, monkeypatch):
    import belm.cli as cli
    mine = tmp_path / "thesis.safetensors"
    mine.write_bytes(b"not a latent")
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded"))
    code = main(["reconstruct", "--num", "1", "--save-latent", str(mine), "--out", str(tmp_path / "o"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is not a belm latent file" in err, err
    assert mine.read_bytes() == b"not a latent" and not (tmp_path / "o").exists()


def test_save_latent_into_out_under_a_belm_name_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    code = main(["reconstruct", "--num", "1", "--steps", "2", "--save-latent", str(out / "summary.json"),
                 "--out", str(out), "--no-progress"])
    assert code == 2 and "file this command writes into --out" in capsys.readouterr().err


def test_save_latent_replaces_its_own_latent_with_a_note(tmp_path, capsys):
    lat = tmp_path / "lat.safetensors"
    _latent(lat)
    before = lat.read_bytes()
    code = main(["reconstruct", "--num", "1", "--steps", "2", "--save-latent", str(lat), "--out", str(tmp_path / "o"),
                 "--no-progress"])
    assert code == 0
    assert "replacing the belm latent file" in capsys.readouterr().err
    assert lat.read_bytes() != before and Latent.load(lat).states[0].shape[0] == 1


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_latents_and_samples_honour_the_umask(tmp_path, umask):
    from safetensors.torch import save_file
    previous = os.umask(umask)
    try:
        _latent(tmp_path / "lat.safetensors")
        with OutputDir(tmp_path / "o") as o:
            save_file({"images": torch.zeros(2)}, str(o.file("samples.safetensors")))
            o.write_text("summary.json", "{}")
    finally:
        os.umask(previous)
    want = 0o666 & ~umask
    for path in (tmp_path / "lat.safetensors", tmp_path / "o" / "samples.safetensors", tmp_path / "o" / "summary.json",
                 tmp_path / "o" / MANIFEST):
        assert stat.S_IMODE(os.stat(path).st_mode) == want, (path, oct(os.stat(path).st_mode))
