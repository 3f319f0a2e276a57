"""Atomic file writes: a temporary file in the same folder, fsync, then rename (never a partial file).

Temporaries are named ``.NAME.XXXXXXXX.tmp`` (``NAME`` the target's name, ``X`` random), so that the leftovers of
a process killed while writing are recognisable; :func:`clean_stale_tmp` removes them.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "clean_stale_tmp", "is_atomic_tmp"]

# mkstemp's random part is 8 characters of [a-z0-9_]
_TMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _default_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give (0o666 less the umask); mkstemp alone gives 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def is_atomic_tmp(name: str) -> bool:
    """True when ``name`` is a temporary file name of :func:`atomic_write_bytes` (``.NAME.XXXXXXXX.tmp``)."""
    return bool(_TMP_RE.match(name))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; on any failure the old file (if any) is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def clean_stale_tmp(folder: str | Path, min_age_s: float = 0.0) -> list[Path]:
    """Remove the temporaries (``.NAME.XXXXXXXX.tmp``) a killed writer left in ``folder`` (not recursive).

    Only plain files with that name pattern are touched; ``min_age_s`` spares ones modified more recently (a
    writer in another process may still be busy with them). Returns the removed paths; a missing folder is fine.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time()
    removed = []
    for p in folder.iterdir():
        if not is_atomic_tmp(p.name):
            continue
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        if not p.is_file() or p.is_symlink() or (min_age_s > 0 and now - st.st_mtime < min_age_s):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed
