"""The errors and the message channel of the application layer."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["DataNotFoundError", "Echo", "PipelineError", "check_writable_folder", "make_echo"]

Echo = Callable[[str], None]


class PipelineError(ValueError):
    """A user-facing problem with the request (existing output, mismatching run, bad option)."""


class DataNotFoundError(PipelineError):
    """The shared real data could not be found."""


def _stderr_echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_echo(quiet: bool, echo: Echo | None) -> Echo:
    """The function that prints progress messages: nothing when ``quiet``, else ``echo`` or stderr."""
    if quiet:
        return lambda _msg: None
    return echo or _stderr_echo


def check_writable_folder(path: str | Path, what: str = "--out") -> None:
    """Refuse at once an output folder that cannot be made: a file in the way, or no write permission (nothing is
    created here, so a command that fails later leaves nothing behind)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PipelineError(f"{what} {path} already exists and is not a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise PipelineError(f"{what} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PipelineError(f"{what} {path}: no permission to write in {probe}")
