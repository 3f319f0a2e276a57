"""Typed, validated method parameters: a constraint table per method, checked when a detector is built.

Every method declares, next to its ``defaults``, a ``parameter_schema``: the same nested dict with a constraint
object in place of each value (``{"train": {"lr": Float(0, None, closed="neither")}, "seed": SEED}``).
:func:`validate_params` walks the merged parameters against that table and returns a converted copy, so that a bad
value fails in ``Detector.__init__`` with one line naming the method, the dotted key, the value and what was
expected, before any data is read (and loading a run folder whose ``config.yaml`` holds a bad value fails too)::

    autoencoder: train.lr = 'abc' is not a float; expected a float > 0
    mim-ood: tokenizer.num_embeddings = 3.5: expected an int in [2, 65536]

Conversions are few and deliberate: a float accepts an int and a string that is a float literal (PyYAML follows
YAML 1.1, which reads ``1e-3`` as the string ``'1e-3'``; ``--set train.lr=1e-3`` must work); an int accepts only
ints (not a bool, not ``3.5``, not ``"8"``); a bool only a bool; a path is a string (a ``pathlib.Path`` becomes one).

Why a constraint table and not dataclasses or pydantic: the parameters stay plain nested dicts, which is what
``merge_params``, dotted ``--set`` overrides, shipped ``configs/*.yaml`` and the ``config.yaml`` of run folders are
made of; they round-trip through YAML unchanged, with no model classes to map to and from. A table adds no
dependency, keeps the declaration beside ``defaults`` in each method's file, and is the style of scikit-learn's
``_parameter_constraints`` / ``_param_validation``, which the detector API (all parameters in the constructor,
``get_params``) already follows.

A key of ``defaults`` without a constraint, or a constraint without a default, is a bug of the method:
:func:`check_schema` lists such mismatches (a registry-wide test runs it), and :func:`validate_params` refuses a
parameter that has no constraint rather than letting it through unchecked.
"""

from __future__ import annotations

import copy
import math
import numbers
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any as TypingAny

__all__ = [
    "ParameterError",
    "with_new_defaults",
    "Spec",
    "Int",
    "Float",
    "Bool",
    "Str",
    "Options",
    "Path",
    "Optional",
    "ListOf",
    "DictOf",
    "AnyOf",
    "Any",
    "validate_params",
    "check_schema",
    "pick",
    "with_changes",
    "SEED",
    "DEVICE",
    "IMAGE_SCORE_SCHEMA",
    "TRAIN_SPECS",
    "MAX_STEPS",
    "MAX_WIDTH",
]


class ParameterError(ValueError):
    """A parameter value does not meet its constraint (or a method's schema does not fit its defaults)."""


class _Invalid(Exception):
    """Raised by a spec: ``reason`` (e.g. 'is not a float') or None for a plain 'expected ...' message."""

    def __init__(self, key: str, value: TypingAny, expected: str, reason: str | None = None) -> None:
        super().__init__(key)
        self.key, self.value, self.expected, self.reason = key, value, expected, reason

    def line(self, where: str) -> str:
        head = f"{where}: {self.key} = {_show(self.value)}"
        return f"{head} {self.reason}; expected {self.expected}" if self.reason else f"{head}: expected {self.expected}"


def _show(value: TypingAny, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v: TypingAny) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: TypingAny) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# A float literal as Python and YAML 1.2 write it (digits, optional fraction, optional exponent); no nan/inf.
_FLOAT_LITERAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


class Spec:
    """A constraint on one value. ``convert(value, key)`` returns the (converted) value or raises ``_Invalid``."""

    def describe(self) -> str:
        raise NotImplementedError

    def convert(self, value: TypingAny, key: str) -> TypingAny:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.describe()}>"


def _range_text(kind: str, lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is None and hi is None:
        return kind
    if hi is None:
        return f"{kind} {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{kind} {'<' if hi_open else '<='} {hi}"
    return f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


class Int(Spec):
    """An int in ``[min, max]`` (either bound None: unbounded). Not a bool, not a float, not a string."""

    def __init__(self, min: int | None = None, max: int | None = None) -> None:  # noqa: A002 - scikit-learn's names
        self.min, self.max = min, max

    def describe(self) -> str:
        return _range_text("an int", self.min, self.max)

    def convert(self, value: TypingAny, key: str) -> int:
        if isinstance(value, bool):
            raise _Invalid(key, value, self.describe(), "is a bool, not an int")
        if not _is_int(value):
            raise _Invalid(key, value, self.describe(), None if _is_real(value) else "is not an int")
        v = int(value)
        if (self.min is not None and v < self.min) or (self.max is not None and v > self.max):
            raise _Invalid(key, value, self.describe())
        return v


class Float(Spec):
    """A finite float in the interval ``min``..``max``; ``closed``: "both", "left", "right" or "neither".

    Accepts ints and strings that are float literals (``'1e-3'``, which YAML 1.1 leaves a string) and converts them.
    """

    def __init__(self, min: float | None = None, max: float | None = None, closed: str = "both") -> None:  # noqa: A002
        if closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"Float: closed must be both | left | right | neither, got {closed!r}")
        self.min, self.max, self.closed = min, max, closed

    def describe(self) -> str:
        return _range_text("a float", self.min, self.max, self.closed in ("right", "neither"), self.closed in ("left", "neither"))

    def convert(self, value: TypingAny, key: str) -> float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            v = float(value)
        elif _is_real(value):
            v = float(value)
        else:
            raise _Invalid(key, value, self.describe(), "is not a float")
        lo_ok = self.min is None or (v > self.min if self.closed in ("right", "neither") else v >= self.min)
        hi_ok = self.max is None or (v < self.max if self.closed in ("left", "neither") else v <= self.max)
        if not (math.isfinite(v) and lo_ok and hi_ok):
            raise _Invalid(key, value, self.describe())
        return v


class Bool(Spec):
    """``True`` or ``False`` only (not 0/1, not 'yes')."""

    def describe(self) -> str:
        return "a bool (true / false)"

    def convert(self, value: TypingAny, key: str) -> bool:
        if not isinstance(value, bool):
            raise _Invalid(key, value, self.describe(), "is not a bool")
        return value


class Str(Spec):
    """A string; ``pattern``: a regular expression it must match in full; ``nonempty``: refuse ''."""

    def __init__(self, pattern: str | None = None, nonempty: bool = False, what: str | None = None) -> None:
        self.pattern = re.compile(pattern) if pattern else None
        self.nonempty = nonempty
        self.what = what

    def describe(self) -> str:
        if self.what:
            return self.what
        if self.pattern is not None:
            return f"a string matching {self.pattern.pattern!r}"
        return "a non-empty string" if self.nonempty else "a string"

    def convert(self, value: TypingAny, key: str) -> str:
        if not isinstance(value, str):
            raise _Invalid(key, value, self.describe(), "is not a string")
        if (self.nonempty and not value) or (self.pattern is not None and not self.pattern.fullmatch(value)):
            raise _Invalid(key, value, self.describe())
        return value


class Path(Str):
    """A file or folder path, kept as a string (a ``pathlib.Path`` is converted) so that it dumps to YAML.

    Whether it exists is checked where it is used (``fit``), not here: a config may name a path of another machine.
    """

    def describe(self) -> str:
        return "a path (string)" if not self.nonempty else "a non-empty path (string)"

    def convert(self, value: TypingAny, key: str) -> str:
        if isinstance(value, pathlib.PurePath):
            value = str(value)
        if not isinstance(value, str):
            raise _Invalid(key, value, self.describe(), "is not a path")
        if self.nonempty and not value:
            raise _Invalid(key, value, self.describe())
        return value


class Options(Spec):
    """One of the listed values (compared by equality; a bool never matches an int option or the reverse)."""

    def __init__(self, *values: TypingAny) -> None:
        if not values:
            raise ValueError("Options needs at least one value")
        self.values = values

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)

    def convert(self, value: TypingAny, key: str) -> TypingAny:
        for option in self.values:
            same_kind = type(value) is type(option) or (_is_int(value) and _is_int(option)) or (
                _is_real(value) and isinstance(option, float))
            if same_kind and isinstance(value, bool) == isinstance(option, bool) and value == option:
                return option
        raise _Invalid(key, value, self.describe())


class Optional(Spec):
    """``None`` (YAML ``null``) or a value meeting ``spec``."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec

    def describe(self) -> str:
        return f"null or {self.spec.describe()}"

    def convert(self, value: TypingAny, key: str) -> TypingAny:
        if value is None:
            return None
        try:
            return self.spec.convert(value, key)
        except _Invalid as e:
            if e.key != key:  # an item of a list: keep its own message
                raise
            raise _Invalid(key, value, self.describe(), e.reason) from None


def _count_text(min_len: int, max_len: int | None) -> str:
    if max_len is None:
        return "any number of items" if min_len == 0 else f"at least {min_len} item{'s' * (min_len != 1)}"
    if min_len == max_len:
        return f"{min_len} item{'s' * (min_len != 1)}"
    return f"{min_len} to {max_len} items"


class ListOf(Spec):
    """A list (a tuple is accepted and becomes a list) of ``min_len``..``max_len`` items each meeting ``spec``."""

    def __init__(self, spec: Spec, min_len: int = 0, max_len: int | None = None) -> None:
        self.spec, self.min_len, self.max_len = spec, min_len, max_len

    def describe(self) -> str:
        return f"a list of {_count_text(self.min_len, self.max_len)}, each {self.spec.describe()}"

    def convert(self, value: TypingAny, key: str) -> list[TypingAny]:
        if not isinstance(value, list | tuple):
            raise _Invalid(key, value, self.describe(), "is not a list")
        if len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            raise _Invalid(key, value, self.describe(), f"has {len(value)} item{'s' * (len(value) != 1)}")
        return [self.spec.convert(v, f"{key}[{i}]") for i, v in enumerate(value)]


class DictOf(Spec):
    """A mapping whose keys meet ``keys`` and whose values meet ``values`` (for parameters keyed by name)."""

    def __init__(self, keys: Spec, values: Spec) -> None:
        self.keys, self.values = keys, values

    def describe(self) -> str:
        return f"a mapping of {self.keys.describe()} to {self.values.describe()}"

    def convert(self, value: TypingAny, key: str) -> dict[TypingAny, TypingAny]:
        if not isinstance(value, Mapping):
            raise _Invalid(key, value, self.describe(), "is not a mapping")
        out = {}
        for k, v in value.items():
            try:
                k2 = self.keys.convert(k, key)
            except _Invalid:
                raise _Invalid(f"{key} (a key)", k, self.keys.describe()) from None
            out[k2] = self.values.convert(v, f"{key}.{k}")
        return out


class AnyOf(Spec):
    """A value meeting one of ``specs`` (the first that accepts it converts it)."""

    def __init__(self, *specs: Spec) -> None:
        self.specs = specs

    def describe(self) -> str:
        return " or ".join(s.describe() for s in self.specs)

    def convert(self, value: TypingAny, key: str) -> TypingAny:
        for spec in self.specs:
            try:
                return spec.convert(value, key)
            except _Invalid:
                continue
        raise _Invalid(key, value, self.describe())


class Any(Spec):
    """Anything (deep-copied). Only for truly free-form values; every use says why in a comment."""

    def describe(self) -> str:
        return "any value"

    def convert(self, value: TypingAny, key: str) -> TypingAny:
        return copy.deepcopy(value)


# -- shared constraints -----------------------------------------------------------------------------------------
#: training steps: a billion is far beyond any run, and bounds an accidental 1e12 that would overflow counters
MAX_STEPS = 10**9
#: channel counts, widths, embedding dims: bounded so that a typo (40960) fails here, not by exhausting memory
MAX_WIDTH = 4096

SEED = Int(0, 2**63 - 1)
#: "auto" (CUDA when present), "cpu", "cuda", "cuda:<index>" or "mps"
DEVICE = Str(pattern=r"auto|cpu|mps|cuda(:\d+)?", what="'auto', 'cpu', 'mps', 'cuda' or 'cuda:<index>'")

#: the top-level ``image_score`` section: how a pixel map reduces to one score per image
IMAGE_SCORE_SCHEMA: dict[str, Spec] = {"reduce": Options("max", "mean", "topk"), "fraction": Float(0, 1, closed="right")}

#: constraints of the keys of :class:`medanomaly.training.TrainConfig`-like sections (``train``, ``pretrain`` ...)
TRAIN_SPECS: dict[str, Spec] = {
    "steps": Int(0, MAX_STEPS),
    "batch_size": Int(1, 65536),
    "lr": Float(0, None, closed="neither"),
    "weight_decay": Float(0, None),
    "betas": ListOf(Float(0, 1, closed="left"), 2, 2),
    "warmup_steps": Int(0, MAX_STEPS),
    "schedule": Options("cosine", "constant"),
    "min_lr_ratio": Float(0, 1),
    "grad_clip": Optional(Float(0, None)),  # 0 or null: no clipping
    "val_every": Int(0, MAX_STEPS),  # 0: no validation
    "early_stopping_patience": Int(0, MAX_STEPS),  # 0: off
    "checkpoint_every": Int(0, MAX_STEPS),  # 0: only at the end
    "amp": Bool(),
    "deterministic": Bool(),
    "device": DEVICE,
    "mask_ratio": Float(0, 1, closed="neither"),
    "flip": Bool(),
}


def pick(table: Mapping[str, Spec], keys: Iterable[str], **changes: Spec) -> dict[str, Spec]:
    """The constraints of ``keys`` from ``table`` (a ``defaults`` section's keys), with ``changes`` replacing some.

    A key that the table does not know raises at import time, so a new training knob cannot go unchecked.
    """
    keys = list(keys)
    missing = [k for k in keys if k not in table and k not in changes]
    if missing:
        raise KeyError(f"no constraint for {missing}; add them to the table or pass them as changes")
    extra = set(changes) - set(keys)
    if extra:
        raise KeyError(f"changes for keys that are not in the section: {sorted(extra)}")
    return {k: changes.get(k, table.get(k)) for k in keys}  # type: ignore[misc]


def with_changes(schema: Mapping[str, TypingAny], **changes: TypingAny) -> dict[str, TypingAny]:
    """A copy of a (nested) schema with dotted-key constraints replaced, e.g. ``{"restoration.threshold.value": Float(0, 1)}``
    (for a method that derives from another). A key that is not in ``schema`` raises ``KeyError``."""
    out = _copy_tree(schema)
    for key, spec in changes.items():
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"with_changes: '{'.'.join(parts[: i + 1])}' is not in the schema")
            if i < len(parts) - 1:
                node = node[part]
        node[parts[-1]] = spec
    return out


def _copy_tree(tree: Mapping[str, TypingAny]) -> dict[str, TypingAny]:
    return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


# -- validation -----------------------------------------------------------------------------------------------
def validate_params(params: Mapping[str, TypingAny], schema: Mapping[str, TypingAny], where: str = "") -> dict[str, TypingAny]:
    """A converted copy of ``params`` checked against ``schema`` (nested dicts of :class:`Spec`, by dotted key).

    Raises :class:`ParameterError` with one line per problem (``<where>: <key> = <value>: expected ...``); every
    problem is reported, not only the first. A parameter without a constraint is refused (a bug of the method).
    """
    problems: list[str] = []
    out = _validate(params, schema, "", where or "parameters", problems)
    if problems:
        raise ParameterError("\n".join(problems))
    return out


def _validate(params: Mapping[str, TypingAny], schema: Mapping[str, TypingAny], prefix: str, where: str,
              problems: list[str]) -> dict[str, TypingAny]:
    out: dict[str, TypingAny] = {}
    for k, value in params.items():
        key = f"{prefix}{k}"
        spec = schema.get(k)
        if spec is None:
            problems.append(f"{where}: {key} has no constraint in the method's parameter_schema (a bug of the method)")
            out[k] = value
        elif isinstance(spec, Mapping):
            if isinstance(value, Mapping):
                out[k] = _validate(value, spec, f"{key}.", where, problems)
            else:
                problems.append(f"{where}: {key} = {_show(value)} is not a mapping; expected a mapping with keys "
                                f"{', '.join(sorted(spec))}")
                out[k] = value
        else:
            try:
                out[k] = spec.convert(value, key)
            except _Invalid as e:
                problems.append(e.line(where))
                out[k] = value
    return out


def check_schema(defaults: Mapping[str, TypingAny], schema: Mapping[str, TypingAny], where: str = "") -> list[str]:
    """Mismatches between a method's ``defaults`` and its ``parameter_schema``; [] when they fit.

    Lists keys without a constraint, constraints without a default, sections that are a dict on one side only,
    non-:class:`Spec` entries, and defaults that do not meet their own constraint.
    """
    problems: list[str] = []
    _check(defaults, schema, "", where or "schema", problems)
    if not problems:
        try:
            validate_params(defaults, schema, where)
        except ParameterError as e:
            problems += [f"default does not meet its constraint: {line}" for line in str(e).splitlines()]
    return problems


def _check(defaults: Mapping[str, TypingAny], schema: Mapping[str, TypingAny], prefix: str, where: str,
           problems: list[str]) -> None:
    for k in defaults:
        if k not in schema:
            problems.append(f"{where}: default '{prefix}{k}' has no constraint")
    for k, spec in schema.items():
        key = f"{prefix}{k}"
        if k not in defaults:
            problems.append(f"{where}: constraint '{key}' has no default")
        elif isinstance(spec, Mapping):
            if isinstance(defaults[k], Mapping):
                _check(defaults[k], spec, f"{key}.", where, problems)
            else:
                problems.append(f"{where}: '{key}' is a section in the schema but not in the defaults")
        elif not isinstance(spec, Spec):
            problems.append(f"{where}: constraint '{key}' is a {type(spec).__name__}, not a Spec")


def with_new_defaults(recorded: Mapping[str, TypingAny], current: Mapping[str, TypingAny],
                      defaults: Mapping[str, TypingAny]) -> dict[str, TypingAny]:
    """``recorded`` parameters (of a run started by an older version) plus the parameters added to the method since,
    where ``current`` holds them at their ``defaults`` value: a parameter added later defaults to the behaviour
    before it existed, so a run that lacks it is the same fit. A new parameter set to another value is left out, so
    the comparison with ``current`` still sees the difference."""
    out = dict(recorded)
    for k, v in current.items():
        d = defaults.get(k) if isinstance(defaults, Mapping) else None
        if k not in recorded:
            if d is not None and v == d:
                out[k] = v
        elif isinstance(v, Mapping) and isinstance(recorded[k], Mapping):
            out[k] = with_new_defaults(recorded[k], v, d if isinstance(d, Mapping) else {})
    return out
