"""The errors and the message channel of the application layer."""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["DataNotFoundError", "Echo", "PipelineError", "make_echo"]

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
