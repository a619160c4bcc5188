"""Files that appear whole, with the permissions a plain ``open`` gives.

Low-level helpers shared by :meth:`belm.solvers.base.Latent.save` and the output folders of
:mod:`belm.apps.io` (this module sits at the bottom of the layers: standard library only).

Why not :func:`tempfile.mkstemp`: it creates files with mode 0600 whatever the umask, and
safetensors' ``save_file`` does the same (it writes a new file of its own), so a latent or
``samples.safetensors`` written that way is unreadable to the group even where the user's
umask says otherwise. Here a new file is created exclusively with mode 0o666, which the
kernel reduces by the umask exactly as for ``open(path, "w")``; that file's mode is then the
one every replacement gets.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from typing import Callable, Optional

__all__ = ["open_new", "plain_mode", "fsync_path", "write_atomically"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def open_new(folder: Optional[str | os.PathLike], prefix: str, *, dir_fd: Optional[int] = None) -> tuple[str, int]:
    """Create a new, empty file ``prefix + <16 random hex digits>`` and open it for writing.

    Args:
        folder: the folder to create it in; None with ``dir_fd``: the folder open as ``dir_fd``.
        prefix: start of the file's name (e.g. ``".belm-tmp-"``).
        dir_fd: an open folder that ``folder`` (or the bare name) is relative to.

    Returns:
        (its path, or its bare name when ``folder`` is None; a file descriptor open for writing).
        The file is created exclusively (never an existing file, never through a symbolic link)
        with mode 0o666 less the umask.
    """
    for _ in range(100):
        name = prefix + secrets.token_hex(8)
        path = name if folder is None else os.path.join(os.fspath(folder), name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666, dir_fd=dir_fd)
        except FileExistsError:
            continue
        return path, fd
    raise FileExistsError(errno.EEXIST, f"could not create a new file {prefix}* in {folder or 'the folder'}")


def plain_mode(fd: int) -> int:
    """The permission bits of a file just made by :func:`open_new` (0o666 less the umask):
    the mode ``open(path, "w")`` would give, read without touching the process's umask."""
    return stat.S_IMODE(os.fstat(fd).st_mode)


def fsync_path(path: str | os.PathLike, *, dir_fd: Optional[int] = None, folder: bool = False) -> None:
    """Flush a file (or, with ``folder=True``, a folder's entries) to disk.

    Some file systems refuse fsync on a folder (EINVAL); their renames are then as durable
    as they can be made, so that refusal is not an error."""
    flags = os.O_RDONLY | _CLOEXEC | (os.O_DIRECTORY if folder else _NOFOLLOW)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not folder or exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike, write: Callable[[str], None], *, prefix: str) -> None:
    """Write ``path`` whole or not at all: ``write(tmp)`` fills a new file beside it, which is
    then given the plain mode (0o666 less the umask), flushed and renamed over ``path``.

    ``write`` may replace ``tmp`` (as safetensors' ``save_file`` does); a symbolic link at
    ``path`` is replaced itself, never written through.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp, fd = open_new(folder, prefix)
    try:
        mode = plain_mode(fd)
        os.close(fd)
        fd = -1
        write(tmp)
        os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(folder, folder=True)
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.lexists(tmp):
            os.unlink(tmp)
