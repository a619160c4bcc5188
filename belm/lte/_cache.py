"""Best-effort on-disk cache for derived BELM rules.

The cache is an optimisation only: every failure (unwritable directory, corrupt
or stale file, unparsable expression) is swallowed and the caller re-derives.
One JSON file per rule key, so concurrent processes never read-modify-write
a shared file; files are written to a temporary name and ``os.replace``-d, so a
reader never sees a half-written file.

Location: ``$BELM_CACHE_DIR`` if set (the value ``off`` disables the disk
cache), otherwise ``~/.cache/belm``; files live in its ``lte/`` subfolder.

Expressions are stored with ``sympy.srepr`` (which keeps symbol assumptions
such as ``positive=True``) and read back with ``sympy.sympify``, which
evaluates the text: only point the cache at a directory you trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

#: Bump when the stored format or the derivation conventions change, so old
#: files are ignored instead of misread.
FORMAT_VERSION = 1


def cache_dir() -> Path | None:
    """Directory of the disk cache, or ``None`` when disabled."""
    env = os.environ.get("BELM_CACHE_DIR")
    if env is not None:
        if env.strip().lower() in ("", "off", "none", "0"):
            return None
        return Path(env).expanduser() / "lte"
    return Path("~/.cache/belm").expanduser() / "lte"


def _path_for(key: str) -> Path | None:
    d = cache_dir()
    if d is None:
        return None
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return d / f"rule-v{FORMAT_VERSION}-{digest}.json"


def load(key: str) -> dict[str, Any] | None:
    """Return the stored entry for ``key`` or ``None`` (never raises)."""
    try:
        path = _path_for(key)
        if path is None or not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            return None
        # The file name is a hash: check the full key to rule out collisions.
        if data.get("version") != FORMAT_VERSION or data.get("key") != key:
            return None
        return data
    except Exception:  # noqa: BLE001 - cache must never break derivation
        return None


def store(key: str, entry: dict[str, Any]) -> bool:
    """Atomically write ``entry`` for ``key``; return success (never raises)."""
    tmp_name = None
    try:
        path = _path_for(key)
        if path is None:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(entry, version=FORMAT_VERSION, key=key)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=1, sort_keys=True)
        os.replace(tmp_name, path)
        tmp_name = None
        return True
    except Exception:  # noqa: BLE001
        return False
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
