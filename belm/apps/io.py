"""Output folders that are never half-written, mixed nor stale, strict JSON, and picture helpers.

An output folder (``--out``) belongs to the user. belm records the files it wrote there in
``.belm-outputs.json`` and, when the folder is reused, replaces exactly those (files of the
earlier run that this run does not write are removed). Any other file is the user's: it is
kept, and a run that would write a file of that name is refused (nothing is overwritten
that belm did not write).

The record is not trusted: a folder on a shared disk may have been prepared by someone
else. Only plain names (one path component, not ``.belm*``) are ever acted on, a record
listing anything else is reported once and ignored, and only entries that ``lstat`` shows
to be regular files directly inside the folder are deleted: never a symbolic link's target,
never a file in a subfolder, never anything outside the folder.

Everything happens inside the folder, so a folder that is a mount point, a Docker volume or
a symbolic link to another file system works (renames never cross devices):

1. the run writes into a staging folder ``OUT/.belm-stage-<random>/``; each file is flushed;
2. the journal ``OUT/.belm-commit.json`` (files to move, stale names to delete) is written
   atomically: this is the commit point;
3. each file is renamed into ``OUT``, stale files are deleted, the record is rewritten, the
   folder is flushed, then the journal and the staging folder are removed.

A run killed before step 2 leaves the old files untouched; one killed during step 3 leaves a
mix *marked by the journal*, which the next use of the folder (every belm command on it, or
:func:`recover_output_folder`) completes first, so that it then holds wholly the new run.
Staging folders of dead runs are removed the same way. One run at a time: an exclusive
``flock`` on ``OUT/.belm-lock``; a second run on the folder is refused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
import weakref
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from belm._files import fsync_path, open_new, plain_mode

__all__ = ["OutputDir", "OutputFolderError", "to_uint8", "save_grid", "save_images", "check_writable",
           "strict_json", "MANIFEST", "JOURNAL", "LOCK", "grid_scale", "recover_output_folder",
           "reserve_output_folder", "plain_name", "is_belm_latent", "check_latent_path"]

#: The record of the files belm wrote into an output folder (one JSON list of plain names).
MANIFEST = ".belm-outputs.json"
#: The commit journal: present only between a run's commit point and the end of its commit.
JOURNAL = ".belm-commit.json"
#: The lock file that serializes runs on one folder (``flock``); removed when the run ends, after
#: checking that the file it locked is still the one in the folder (a run that finds it replaced retries).
LOCK = ".belm-lock"
_STAGE_PREFIX = ".belm-stage-"
_TMP_PREFIX = ".belm-tmp-"
_RESERVED_PREFIX = ".belm"          # belm's own bookkeeping names: never outputs, never the user's
_MAX_JSON_BYTES = 256 << 20         # a record of a million names is ~20 MB; larger is not belm's
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NO_LOCKS = {getattr(errno, n) for n in ("ENOLCK", "ENOTSUP", "EOPNOTSUPP", "ENOSYS") if hasattr(errno, n)}


class OutputFolderError(ValueError):
    """An output folder belm cannot use safely: in use by another run, or holding a file of
    the user's under a name this run writes. The message is one line naming the fix."""


def _commit_checkpoint(step: str) -> None:
    """Called at every point of a commit and of its recovery where a kill leaves a different
    state on disk. Does nothing; the kill tests replace it to SIGKILL the process there."""


def plain_name(name: Any) -> bool:
    """Whether ``name`` is a name belm may act on inside an output folder: one path component
    (no ``/``, ``\\``, NUL, not ``.``/``..``, not absolute), and not belm's own ``.belm*``."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not name.startswith(_RESERVED_PREFIX) and not os.path.isabs(name))


def _note(message: str) -> None:
    print(f"belm: note: {message}", file=sys.stderr)


def _lstat(dir_fd: int, name: str) -> Optional[os.stat_result]:
    """The entry ``name`` of the open folder itself (a link is not followed); None if absent."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _is_file(dir_fd: int, name: str) -> bool:
    st = _lstat(dir_fd, name)
    return st is not None and stat.S_ISREG(st.st_mode)


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def strict_json(data: Any) -> Any:
    """``data`` with every non-finite float replaced by None, so that ``json.dumps(..., allow_nan=False)``
    succeeds and strict parsers read it (e.g. a PSNR of an exact match, +inf, becomes null).
    Tuples become lists; dict keys become strings."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {str(k): strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    if isinstance(data, np.generic):
        return strict_json(data.item())
    return data


def _probe(folder: Path, what: str) -> None:
    """Actually create and remove a file in ``folder`` (os.access says yes to root even on
    read-only file systems)."""
    try:
        # Not _TMP_PREFIX: a recovery under another run's lock removes those, and this probe
        # runs before the lock is taken.
        name, fd = open_new(folder, ".belm-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise PermissionError(f"{what} is not writable ({exc.strerror}); choose a folder you can write to") \
            from None


def check_writable(out: str | os.PathLike) -> Path:
    """Validate an output folder before any work: it must be a folder, or creatable, and writable.

    A missing folder is created (with its missing parents), tried with a file, and removed
    again, so that a run that fails later leaves nothing behind.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} exists and is not a folder; choose a folder path")
    if path.is_symlink() and not path.exists():
        raise ValueError(f"--out {path} is a symbolic link to a missing folder; create its target or choose "
                         "another --out")
    if path.is_dir():
        _probe(path, f"--out {path}")
        return path
    blocker = next((p for p in path.parents if p.exists()), Path("."))
    if not blocker.is_dir():
        raise PermissionError(f"--out {path} is not writable: {blocker} is a file; choose another folder")
    created: list[Path] = []
    try:
        try:
            _make_folders(path, created)
        except OSError as exc:
            raise PermissionError(f"--out {path} is not writable: it cannot be created ({exc.strerror}); choose "
                                  "a folder you can write to") from None
        _probe(path, f"--out {path}")
    finally:
        _remove_folders(created)
    return path


def _make_folders(path: Path, created: list[Path]) -> list[Path]:
    """Create ``path`` and its missing parents, appending each to ``created`` (outermost
    first, so that a failure midway still says what to remove)."""
    for folder in reversed([path, *path.parents]):
        if not folder.exists():
            folder.mkdir()
            created.append(folder)
    return created


def _remove_folders(created: list[Path]) -> None:
    """Undo :func:`_make_folders` (innermost first), leaving any folder something was put in."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            break


def _open_folder(path: Path) -> int:
    """Open ``path`` as a folder: every later step works relative to this descriptor, so a
    folder swapped for a link mid-run cannot redirect it."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)


def _read_json(dir_fd: int, name: str, path: Path) -> tuple[bool, Any]:
    """(found, parsed JSON or None when unreadable/malformed: reported in one line). A link,
    a non-regular file or an oversized file is malformed: the folder's own entry is read."""
    if _lstat(dir_fd, name) is None:
        return False, None
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0), dir_fd=dir_fd)
    except OSError as exc:
        _note(f"{path / name} cannot be read ({exc.strerror}); ignored")
        return True, None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_JSON_BYTES:
            _note(f"{path / name} is not a regular file of belm's; ignored")
            return True, None
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
        return True, json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        _note(f"{path / name} is not valid JSON ({exc}); ignored")
        return True, None
    finally:
        os.close(fd)


def _read_record(dir_fd: int, path: Path) -> Optional[set[str]]:
    """The names belm's record lists (None: no record). A record that is not a list of plain
    names was not written by belm: it is reported once and trusted in nothing (empty set)."""
    found, data = _read_json(dir_fd, MANIFEST, path)
    if not found:
        return None
    if data is None:
        return set()
    if not isinstance(data, list) or not all(plain_name(n) for n in data):
        bad = [n for n in data if not plain_name(n)] if isinstance(data, list) else [type(data).__name__]
        _note(f"{path / MANIFEST} is not belm's record (it lists {_shown([repr(b) for b in bad])}, not plain file "
              "names of this folder); ignored: every file there is treated as yours")
        return set()
    return set(data)


def _write_file(dir_fd: int, name: str, data: bytes) -> None:
    """Replace ``name`` in the open folder atomically (a new file, flushed, then renamed: a
    link there is replaced itself, never written through)."""
    tmp, fd = open_new(None, _TMP_PREFIX, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        _commit_checkpoint(f"written {name} (not yet renamed)")
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        if fd >= 0:
            os.close(fd)
        if _lstat(dir_fd, tmp) is not None:
            os.unlink(tmp, dir_fd=dir_fd)


def _fsync_folder(dir_fd: int) -> None:
    fsync_path(".", dir_fd=dir_fd, folder=True)


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=0) + "\n").encode()


def _valid_journal(data: Any) -> bool:
    return (isinstance(data, dict) and isinstance(data.get("stage"), str)
            and re.fullmatch(re.escape(_STAGE_PREFIX) + "[0-9a-f]+", data["stage"]) is not None
            and all(isinstance(data.get(k), list) and all(plain_name(n) for n in data[k]) for k in ("files", "stale")))


def _roll_forward(dir_fd: int, journal: dict) -> None:
    """Step 3 of the commit, from its journal: idempotent, so that a recovery after a kill at
    any point of it (or of an earlier recovery) completes it."""
    files, stage = journal["files"], journal["stage"]
    try:
        stage_fd: Optional[int] = os.open(stage, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    except OSError:
        stage_fd = None               # removed after the journal (or not belm's): nothing left to move
    try:
        for name in files:
            if stage_fd is not None and _is_file(stage_fd, name):
                os.replace(name, name, src_dir_fd=stage_fd, dst_dir_fd=dir_fd)
                _commit_checkpoint(f"moved {name}")
        writing = set(files)
        for name in journal["stale"]:
            if name not in writing and _is_file(dir_fd, name):
                os.unlink(name, dir_fd=dir_fd)
                _commit_checkpoint(f"deleted {name}")
        _write_file(dir_fd, MANIFEST, _json_bytes(sorted(writing)))
        _commit_checkpoint("record written")
        _fsync_folder(dir_fd)
        os.unlink(JOURNAL, dir_fd=dir_fd)
        _fsync_folder(dir_fd)
        _commit_checkpoint("journal removed")
    finally:
        if stage_fd is not None:
            os.close(stage_fd)
    _remove_stage(dir_fd, stage)


def _remove_stage(dir_fd: int, name: str) -> None:
    st = _lstat(dir_fd, name)
    if st is not None and stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd, ignore_errors=True)   # fd-based: never follows a link


def _recover(dir_fd: int, path: Path) -> None:
    """Complete a commit that a kill interrupted (its journal), then remove what dead runs
    left: staging folders and temporary files. Call with the folder's lock held."""
    found, journal = _read_json(dir_fd, JOURNAL, path)
    if found:
        if _valid_journal(journal):
            _note(f"{path}: completing the commit of an interrupted run ({len(journal['files'])} files)")
            _roll_forward(dir_fd, journal)
        else:
            if journal is not None:
                _note(f"{path / JOURNAL} is not a journal of belm's; ignored and removed")
            if _is_file(dir_fd, JOURNAL):
                os.unlink(JOURNAL, dir_fd=dir_fd)
    for name in os.listdir(dir_fd):
        if name.startswith(_STAGE_PREFIX):
            _remove_stage(dir_fd, name)
        elif name.startswith(_TMP_PREFIX) and _is_file(dir_fd, name):
            os.unlink(name, dir_fd=dir_fd)


class _FolderLock:
    """An exclusive ``flock`` on ``OUT/.belm-lock``, held while the object lives (or until
    :meth:`release`, which removes the file again: a finished run leaves no lock file).

    One per folder and process: a second request in this process gets the same object
    (flock would refuse the process its own lock); another process is refused. Removing a
    lock file is safe because a taker checks, once locked, that the file it locked is still
    the one in the folder (else it locked a file a releaser had just removed, and retries).
    """

    _held: "weakref.WeakValueDictionary[tuple[int, int], _FolderLock]" = weakref.WeakValueDictionary()

    def __init__(self, fd: int, dir_fd: int) -> None:
        self.fd: Optional[int] = fd
        self.dir_fd = os.dup(dir_fd)

    @classmethod
    def acquire(cls, dir_fd: int, path: Path) -> tuple["_FolderLock", bool]:
        """(the lock of the folder open as ``dir_fd``, whether this call took it: False when
        this process held it already)."""
        st = os.fstat(dir_fd)
        key = (st.st_dev, st.st_ino)
        held = cls._held.get(key)
        if held is not None and held.fd is not None:
            return held, False
        for _ in range(100):
            fd = cls._lock_file(dir_fd, path)
            now, locked = _lstat(dir_fd, LOCK), os.fstat(fd)
            if now is not None and (now.st_dev, now.st_ino) == (locked.st_dev, locked.st_ino):
                lock = cls(fd, dir_fd)
                cls._held[key] = lock
                return lock, True
            os.close(fd)                  # removed by the run that held it: take the new one
        raise OutputFolderError(f"--out {path}: its lock file {LOCK} keeps changing; choose another --out")

    @staticmethod
    def _lock_file(dir_fd: int, path: Path) -> int:
        try:
            fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666, dir_fd=dir_fd)
        except OSError as exc:
            raise OutputFolderError(f"--out {path}: cannot open its lock file {LOCK} ({exc.strerror}); remove "
                                    f"{path / LOCK} or choose another --out") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutputFolderError(f"--out {path}: {LOCK} is not a regular file; remove it or choose another "
                                        "--out")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _NO_LOCKS:
                # Some network and FUSE file systems have no locks: refusing would make them
                # unusable, so the run goes on, unserialized, and says so.
                _note(f"--out {path}: its file system cannot lock files ({exc.strerror}); make sure no other belm "
                      "run writes to it at the same time")
                return fd
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputFolderError(f"--out {path} is in use by another belm run; wait for it to finish or "
                                        "choose another --out") from None
            raise OutputFolderError(f"--out {path}: cannot lock it ({exc.strerror}); choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def release(self) -> None:
        """Remove the lock file (while still holding it) and unlock."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            now, mine = _lstat(self.dir_fd, LOCK), os.fstat(fd)
            if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(LOCK, dir_fd=self.dir_fd)
        finally:
            os.close(fd)                   # closing the descriptor releases the flock
            os.close(self.dir_fd)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def recover_output_folder(path: str | os.PathLike) -> None:
    """Bring an output folder back to one whole run: complete a commit a kill interrupted
    (roll forward from its journal) and remove what dead runs left (staging folders,
    temporary files). Every :class:`OutputDir` does this first; nothing to do on a missing
    folder.

    Raises:
        OutputFolderError: another belm run is using the folder.
    """
    path = Path(path)
    if not path.is_dir():
        return
    dir_fd = _open_folder(path)
    try:
        lock, taken = _FolderLock.acquire(dir_fd, path)
        try:
            _recover(dir_fd, path)
        finally:
            if taken:
                lock.release()
    finally:
        os.close(dir_fd)


def _refuse_foreign(dir_fd: int, path: Path, names: Iterable[str], recorded: Optional[set[str]]) -> None:
    for name in names:
        st = _lstat(dir_fd, name)
        # belm writes no folders: one under a recorded name is the user's too (and a rename
        # onto it would fail after the commit point)
        if st is not None and (name not in (recorded or ()) or stat.S_ISDIR(st.st_mode)):
            raise OutputFolderError(f"--out {path} already holds {name}, which belm did not write (it is not in "
                                    f"{MANIFEST}); move it away or choose another --out")


def reserve_output_folder(path: str | os.PathLike, names: Iterable[str] = ()) -> Optional[_FolderLock]:
    """Before any work: check that ``path`` can be created and written, and, where it exists,
    lock it for this run, recover it (:func:`recover_output_folder`) and refuse if it holds a
    file of the user's under one of ``names`` (the files the run will write).

    Returns:
        The lock (keep a reference until the run ends: the :class:`OutputDir` of this process
        reuses it), or None for a folder that does not exist yet (created and locked at commit).

    Raises:
        OutputFolderError, PermissionError, ValueError: one line naming the folder and the fix.
    """
    path = check_writable(path)
    if not path.is_dir():
        return None
    dir_fd = _open_folder(path)
    try:
        lock, _ = _FolderLock.acquire(dir_fd, path)
        _recover(dir_fd, path)
        _refuse_foreign(dir_fd, path, names, _read_record(dir_fd, path))
        return lock
    finally:
        os.close(dir_fd)


def is_belm_latent(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a latent file belm wrote (:meth:`belm.Latent.save`): a safetensors
    file whose metadata carries belm's format tag. Only the header is read."""
    from safetensors import safe_open

    from belm.solvers.base import _FORMAT as LATENT_FORMAT   # the tag Latent.save writes
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # safetensors raises its own error types for any non-safetensors file
        return False
    return metadata.get("format") == LATENT_FORMAT


def check_latent_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> bool:
    """Validate a ``--save-latent`` path before any work.

    Refused (``ValueError``/``PermissionError``, one line): a folder; a path in a missing or
    unwritable folder; one of the run's ``inputs`` (the same file under any name); an existing
    file that is not a belm latent (belm never overwrites what it did not write), or a link.

    Returns:
        True when ``path`` is a belm latent that will be replaced (say so), else False.
    """
    shown = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(shown))
    if os.path.isdir(shown):
        raise ValueError(f"--save-latent {shown} is a folder; pass a file name such as latent.safetensors")
    if not os.path.isdir(folder):
        raise ValueError(f"--save-latent {shown}: folder {folder} does not exist; create it first")
    if os.path.exists(shown):
        for source in inputs:
            if os.path.exists(source) and os.path.samefile(shown, source):
                raise ValueError(f"--save-latent {shown} is the input {os.fspath(source)}; choose another file name "
                                 "for the latent")
    if os.path.islink(shown):
        raise ValueError(f"--save-latent {shown} is a symbolic link; pass the path of a new file (belm replaces only "
                         "a latent file it wrote)")
    replacing = os.path.lexists(shown)
    if replacing and not (os.path.isfile(shown) and is_belm_latent(shown)):
        raise ValueError(f"--save-latent {shown} exists and is not a belm latent file; belm does not overwrite it: "
                         "choose another file name or move it away")
    _probe(Path(folder), f"--save-latent {shown}: folder {folder}")
    return replacing


class OutputDir:
    """Collect outputs in a staging folder inside ``path`` and commit them only on success.

    Used as a context manager: an exception (or Ctrl-C) inside leaves ``path`` exactly as it
    was. On success the files replace their namesakes, files that belm's record lists from an
    earlier run and this run did not write are removed, and the record is rewritten, through
    the journaled commit described in :mod:`belm.apps.io` (a kill at any point leaves the old
    run or, after the recovery every use starts with, the new one). Files belm did not write
    are kept; writing one of their names is refused (:class:`OutputFolderError`).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = check_writable(path)
        self.files: list[str] = []
        self._fd: Optional[int] = None
        self._stage: Optional[str] = None          # the staging folder's name inside path
        self._stage_fd: Optional[int] = None
        self._lock: Optional[_FolderLock] = None
        self._own_lock = False
        self._recorded: Optional[set[str]] = None
        self._journaled = False
        self._created: list[Path] = []             # folders this run made (removed again if it fails)

    def __enter__(self) -> "OutputDir":
        # The staging folder lives inside the output folder, so that folder must exist now.
        try:
            _make_folders(self.path, self._created)
            self._fd = _open_folder(self.path)
            self._lock, self._own_lock = _FolderLock.acquire(self._fd, self.path)
            _recover(self._fd, self.path)
            self._recorded = _read_record(self._fd, self.path)
            self._stage = _STAGE_PREFIX + secrets.token_hex(8)
            os.mkdir(self._stage, 0o700, dir_fd=self._fd)
            self._stage_fd = os.open(self._stage, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC,
                                     dir_fd=self._fd)
        except BaseException:
            self._close()
            raise
        return self

    def file(self, name: str) -> Path:
        """Path to write ``name`` to (inside the staging folder).

        Raises:
            ValueError: ``name`` is not a plain file name.
            OutputFolderError: the folder holds a file ``name`` that belm did not write.
        """
        assert self._stage is not None and self._fd is not None, "use OutputDir as a context manager"
        if not plain_name(name):
            raise ValueError(f"output file name {name!r} must be a plain file name (no folders, not .belm*)")
        _refuse_foreign(self._fd, self.path, [name], self._recorded)
        if name not in self.files:
            self.files.append(name)
        return self.path / self._stage / name

    def write_json(self, name: str, data: Any) -> None:
        """Strict JSON (no NaN/Infinity: non-finite floats are written as null)."""
        self.file(name).write_text(json.dumps(strict_json(data), indent=2, sort_keys=True, allow_nan=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        self.file(name).write_text(text)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            self._close()

    def _close(self) -> None:
        if self._stage_fd is not None:
            os.close(self._stage_fd)
            self._stage_fd = None
        if self._fd is not None:
            if self._stage is not None and not self._journaled:
                _remove_stage(self._fd, self._stage)   # not committed: the old files stay as they were
            # (journaled but failed midway, e.g. a full disk: the journal and the stage stay for
            # the recovery that the next use of the folder starts with)
            os.close(self._fd)
            self._fd = None
        if self._lock is not None and self._own_lock:
            self._lock.release()
        self._lock = None
        if not self._journaled:
            _remove_folders(self._created)         # a folder this run made goes again, as it came

    def _commit(self) -> None:
        assert self._fd is not None and self._stage_fd is not None
        dir_fd, stage_fd = self._fd, self._stage_fd
        probe, fd = open_new(None, _TMP_PREFIX, dir_fd=stage_fd)
        mode = plain_mode(fd)                       # 0o666 less the umask (save_file writes 0600)
        os.close(fd)
        os.unlink(probe, dir_fd=stage_fd)
        for name in self.files:                     # step 1: every file whole on disk
            try:
                fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=stage_fd)
            except FileNotFoundError:
                raise FileNotFoundError(f"output {name} was requested with OutputDir.file() but never written") \
                    from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ValueError(f"output {name} is not a regular file")
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_folder(stage_fd)
        _refuse_foreign(dir_fd, self.path, self.files, self._recorded)   # a file put there during the run
        if self._recorded is None:
            foreign = sorted(n for n in os.listdir(dir_fd) if not n.startswith(_RESERVED_PREFIX))
            if foreign:
                _note(f"{self.path} already held files that belm did not record ({_shown(foreign)}); they are "
                      "kept. Use an empty --out folder to avoid mixing runs.")
        writing = set(self.files)
        journal = {"stage": self._stage, "files": list(self.files),
                   "stale": sorted(n for n in (self._recorded or ()) if n not in writing)}
        _fsync_folder(dir_fd)
        _commit_checkpoint("staged")
        _write_file(dir_fd, JOURNAL, _json_bytes(journal))        # step 2: the commit point
        self._journaled = True
        _fsync_folder(dir_fd)
        _commit_checkpoint("journal written")
        _roll_forward(dir_fd, journal)                               # step 3
        self._stage = None


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [−1, 1] → (B, H, W, C) uint8."""
    x = ((images.detach().to(torch.float32).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _pil(array: np.ndarray):
    from PIL import Image
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_images(out: OutputDir, images: torch.Tensor, names: Sequence[str], scale: int = 1) -> None:
    """One PNG per image (upscaled by ``scale`` with nearest neighbour, for tiny digits)."""
    from PIL import Image
    for array, name in zip(to_uint8(images), names):
        img = _pil(array)
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        img.save(out.file(name))


def grid_scale(height: int, width: int) -> int:
    """Nearest-neighbour upscaling factor for pictures of small images: 4 up to 32 px, 2 up to
    64 px, else 1 (Stable Diffusion images stay at their size)."""
    side = max(height, width)
    return 4 if side <= 32 else 2 if side <= 64 else 1


def save_grid(out: OutputDir, rows: Iterable[torch.Tensor], name: str, scale: int | None = None,
              pad: int = 1) -> None:
    """A grid PNG: each element of ``rows`` is a (B, C, H, W) tensor in [−1, 1] (one row).

    ``scale``: nearest-neighbour upscaling; None picks :func:`grid_scale` of the image size."""
    from PIL import Image
    rows = [to_uint8(r) for r in rows]
    H, W, C = rows[0].shape[1:]
    ncols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (H + pad) + pad, ncols * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            canvas[y:y + H, x:x + W] = img
    grid = _pil(canvas)
    scale = grid_scale(H, W) if scale is None else scale
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    grid.save(out.file(name))
