"""Progress bars and log lines that know about quiet mode and distributed ranks."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["progress_bar", "track", "log", "quiet_default"]


def quiet_default() -> bool:
    """Quiet when ``MEDANOMALY_QUIET=1`` is set (CI, logs)."""
    return os.environ.get("MEDANOMALY_QUIET", "") not in ("", "0", "false", "no")


def _rank() -> int:
    from medanomaly.training.ddp import get_rank

    return get_rank()


def progress_bar(total: int | None = None, initial: int = 0, desc: str = "", quiet: bool = False, unit: str = "it") -> Any:
    """A tqdm bar; disabled when ``quiet``, on ranks other than 0, or with ``MEDANOMALY_QUIET=1``."""
    from tqdm.auto import tqdm

    disable = quiet or quiet_default() or _rank() != 0
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True, leave=False, unit=unit)


def track(
    iterable: Iterable[Any], desc: str = "", quiet: bool = False, total: int | None = None, unit: str = "it"
) -> Iterable[Any]:
    """Wrap an iterable in :func:`progress_bar`."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar = progress_bar(total=total, desc=desc, quiet=quiet, unit=unit)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


def log(msg: str, quiet: bool = False) -> None:
    """Print a line to stderr on rank 0 unless quiet."""
    if not (quiet or quiet_default()) and _rank() == 0:
        print(msg, file=sys.stderr, flush=True)
