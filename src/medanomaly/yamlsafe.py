"""Reading YAML that may come from anyone: a size limit, no aliases, errors that name the file and line.

``load_yaml(Path("config.yaml"), where="run config")`` reads a file; ``load_yaml("a: 1", where="--data option")``
reads text. A ``str`` is always text, a ``Path`` (any ``os.PathLike``) always a file, so a file name is never
mistaken for YAML or the other way round.

Refused, each with a :class:`YamlError` (a ``ValueError``) that names ``where`` (or the file) and the line:

- files or text over ``max_bytes`` (checked from the file size before reading);
- YAML aliases (``*name``): a few lines of anchors and aliases expand to gigabytes ("billion laughs"), and no
  medanomaly file needs them;
- nesting deeper than the Python stack allows, and anything ``yaml.safe_load`` refuses (syntax errors, several
  documents in one file, Python object tags).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["YamlError", "SafeNoAliasLoader", "load_yaml", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_BYTES = 1_000_000


class YamlError(ValueError):
    """Unreadable or refused YAML; the message names the source and, where known, the line."""


class SafeNoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises on alias events (anchors alone are harmless and allowed)."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102 - overrides the composer
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases are not allowed", event.start_mark)
        return super().compose_node(parent, index)


def _line(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f" line {mark.line + 1}" if mark is not None else ""


def load_yaml(source: str | bytes | os.PathLike, *, where: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Parse one YAML document from text (``str``/``bytes``) or a file (``os.PathLike``) safely; see the module doc.

    ``where`` names the source in errors (default: the file path, or ``"YAML text"``). An empty document is ``None``.
    """
    if isinstance(source, (str, bytes)):
        name = where or "YAML text"
        text = source.decode("utf-8", errors="replace") if isinstance(source, bytes) else source
        size = len(source) if isinstance(source, bytes) else len(text.encode("utf-8", errors="replace"))
        if size > max_bytes:
            raise YamlError(f"{name}: YAML text is {size} bytes, over the limit of {max_bytes} bytes")
    else:
        path = Path(source)
        name = f"{where} ({path})" if where else str(path)
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise YamlError(f"{name}: not a file")
            if size > max_bytes:
                raise YamlError(f"{name}: YAML file is {size} bytes, over the limit of {max_bytes} bytes "
                                "(pass a larger max_bytes if it is meant to be this big)")
            with open(path, "rb") as f:
                raw = f.read(max_bytes + 1)
        except OSError as e:
            raise YamlError(f"{name}: cannot read the YAML file ({e.strerror or type(e).__name__})") from None
        if len(raw) > max_bytes:  # it grew after stat
            raise YamlError(f"{name}: YAML file is over the limit of {max_bytes} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise YamlError(f"{name}: not UTF-8 text (byte {e.start})") from None
    try:
        return yaml.load(text, Loader=SafeNoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        problem = f"{context}, {problem}" if context and problem != context else problem
        raise YamlError(f"{name}:{_line(e)}: {problem}") from None
    except RecursionError:
        raise YamlError(f"{name}: YAML is nested too deeply") from None
