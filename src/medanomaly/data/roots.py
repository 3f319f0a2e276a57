"""The one finder of the shared real data folder.

Order: the environment variable ``MEDANOMALY_DATA`` (when set, it is the only place looked at), then
``<repo>/../shared/data``, ``<cwd>/../shared/data`` and ``<cwd>/shared/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV", "candidates", "find_data_root", "data_root"]

ENV = "MEDANOMALY_DATA"
_FOLDERS = "brain_lgg_flair_2d/, brain_brats2018_3d/, brain_ixi_t1_3d/, cxr_pneumoniamnist/"


def candidates() -> list[Path]:
    """The default places (without ``MEDANOMALY_DATA``), in order, duplicates removed."""
    out: list[Path] = []
    for c in (Path(__file__).resolve().parents[3] / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data",
              Path.cwd() / "shared" / "data"):
        if all(os.path.normpath(c) != os.path.normpath(o) for o in out):
            out.append(c)
    return out


def find_data_root(require: str | None = None) -> tuple[Path | None, list[str]]:
    """(the data folder or None, the places looked at). ``require``: a sub-folder the root must hold (e.g.
    ``"brain_lgg_flair_2d"``). A set ``MEDANOMALY_DATA`` is the only candidate (listed as ``"<path> (MEDANOMALY_DATA)"``)."""
    env = os.environ.get(ENV)
    places = [Path(env).expanduser()] if env else candidates()
    looked: list[str] = []
    for c in places:
        looked.append(f"{c} ({ENV})" if env else str(c))
        if c.is_dir() and (require is None or (c / require).is_dir()):
            return c.resolve(), looked
    return None, looked


def data_root(required: bool = True) -> Path | None:
    """The shared data folder, or ``None`` (``required=False``) / a clear ``FileNotFoundError`` when absent."""
    root, looked = find_data_root()
    if root is not None or not required:
        return root
    env = os.environ.get(ENV)
    if env:
        raise FileNotFoundError(f"{ENV}={env} is set but that folder does not exist; point it at the folder holding "
                                f"{_FOLDERS}")
    raise FileNotFoundError(f"shared data folder not found (looked in: {', '.join(looked)}); set the environment variable "
                            f"{ENV} to the folder holding {_FOLDERS} e.g. `export {ENV}=/path/to/shared/data`")
