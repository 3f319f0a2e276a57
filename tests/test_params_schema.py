"""Typed, validated method parameters (``medanomaly.methods.params``) and every method's ``parameter_schema``."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from medanomaly.data.toy import make_toy_dataset
from medanomaly.methods import get_method, get_method_class, list_methods
from medanomaly.methods.base import RunFolderError, load_detector, merge_params
from medanomaly.methods.params import (
    DEVICE,
    IMAGE_SCORE_SCHEMA,
    SEED,
    AnyOf,
    Bool,
    DictOf,
    Float,
    Int,
    ListOf,
    Optional,
    Options,
    ParameterError,
    Path,
    Str,
    check_schema,
    pick,
    validate_params,
    with_changes,
)
from medanomaly.methods.params import Any as AnyValue

METHODS = list_methods()


def _one(spec, value):
    """Validate one value; returns the converted value."""
    return validate_params({"k": value}, {"k": spec}, "m")["k"]


def _bad(spec, value) -> str:
    with pytest.raises(ParameterError) as e:
        _one(spec, value)
    return str(e.value)


# -- the constraint objects --------------------------------------------------------------------------------
def test_float_converts_ints_and_float_literals_only() -> None:
    for given, want in [("1e-3", 0.001), ("-2.5E+2", -250.0), (" .5 ", 0.5), (3, 3.0), (0.25, 0.25)]:
        got = _one(Float(), given)
        assert got == want and type(got) is float
    assert _bad(Float(0, None, closed="neither"), "abc") == "m: k = 'abc' is not a float; expected a float > 0"
    for bad in (True, None, [1.0], "nan", "inf", float("nan"), float("inf"), "1e-3x", ""):
        assert "expected a float" in _bad(Float(), bad)


@pytest.mark.parametrize("closed,ok,refused", [
    ("both", [0.0, 1.0], [-0.1, 1.1]), ("left", [0.0], [1.0]), ("right", [1.0], [0.0]), ("neither", [0.5], [0.0, 1.0]),
])
def test_float_interval_ends(closed: str, ok: list[float], refused: list[float]) -> None:
    spec = Float(0, 1, closed=closed)
    for v in ok:
        assert _one(spec, v) == v
    for v in refused:
        _bad(spec, v)
    assert Float(0, 1, closed="right").describe() == "a float in (0, 1]"


def test_int_accepts_only_ints() -> None:
    assert _one(Int(2), 8) == 8
    assert _bad(Int(2), 3.5) == "m: k = 3.5: expected an int >= 2"
    assert _bad(Int(1), "8") == "m: k = '8' is not an int; expected an int >= 1"
    assert _bad(Int(0, 10), True) == "m: k = True is a bool, not an int; expected an int in [0, 10]"
    assert _bad(Int(1, 4096), 5000) == "m: k = 5000: expected an int in [1, 4096]"
    assert _bad(Int(1, None), 0) == "m: k = 0: expected an int >= 1"
    assert "expected an int" in _bad(Int(), 2.0)  # a float that happens to be integral is still not an int


def test_bool_str_path_options() -> None:
    assert _one(Bool(), False) is False
    assert _bad(Bool(), 1) == "m: k = 1 is not a bool; expected a bool (true / false)"
    assert "is not a bool" in _bad(Bool(), "yes")
    assert _one(Str(), "") == ""
    assert "is not a string" in _bad(Str(), 3)
    _bad(Str(nonempty=True), "")
    assert _one(Path(), pathlib.Path("a/b")) == "a/b"
    assert "is not a path" in _bad(Path(), 3)
    assert _one(Options("max", "mean"), "mean") == "mean"
    assert _bad(Options("max", "mean"), "median") == "m: k = 'median': expected one of 'max', 'mean'"
    assert _one(Options(1, -1), -1) == -1
    _bad(Options(1, -1), True)  # a bool is not the int 1
    _bad(Options(1, -1), 1.0)  # nor is a float
    _bad(Options(True), 1)
    assert _one(Options(0.5, 1.0), 1) == 1.0


def test_spec_edges() -> None:
    with pytest.raises(ValueError, match="closed"):
        Float(0, 1, closed="open")
    with pytest.raises(ValueError, match="at least one"):
        Options()
    assert _bad(DictOf(Str(nonempty=True), Int()), {"": 1}) == "m: k (a key) = '': expected a non-empty string"
    value = {"a": [1]}
    copied = _one(AnyValue(), value)
    assert copied == value and copied["a"] is not value["a"]
    long = _bad(Int(), "x" * 500)
    assert "..." in long and len(long) < 200  # a huge value is shown truncated


def test_device_spec() -> None:
    for ok in ("auto", "cpu", "cuda", "cuda:3", "mps"):
        assert _one(DEVICE, ok) == ok
    for bad in ("gpu", "cuda:", "CUDA", 0):
        _bad(DEVICE, bad)


def test_optional_list_dict_anyof() -> None:
    assert _one(Optional(Int(1)), None) is None
    assert _bad(Optional(Int(1)), 0) == "m: k = 0: expected null or an int >= 1"
    spec = ListOf(Float(0, None, closed="neither"), 2, 2)
    assert _one(spec, (1, "2e0")) == [1.0, 2.0]  # tuple -> list, items converted
    assert _bad(spec, [1.0]).startswith("m: k = [1.0] has 1 item; expected a list of 2 items")
    assert _bad(spec, [1.0, "x"]) == "m: k[1] = 'x' is not a float; expected a float > 0"
    assert "is not a list" in _bad(spec, 1.0)
    assert _bad(Optional(ListOf(Int(0))), [1, -1]) == "m: k[1] = -1: expected an int >= 0"  # the item's own line
    d = DictOf(Str(nonempty=True), DictOf(Str(), AnyValue()))
    assert _one(d, {"sink": {"radius": [1, 2]}}) == {"sink": {"radius": [1, 2]}}
    assert _bad(d, {"sink": 3}) == "m: k.sink = 3 is not a mapping; expected a mapping of a string to any value"
    assert "is not a mapping" in _bad(d, [1])
    size = AnyOf(Int(1, 64), ListOf(Int(1, 64), 2, 3))
    assert _one(size, 8) == 8 and _one(size, (8, 8)) == [8, 8]
    assert _bad(size, "8") == "m: k = '8': expected an int in [1, 64] or a list of 2 to 3 items, each an int in [1, 64]"


def test_seed_spec() -> None:
    assert _one(SEED, 2**63 - 1) == 2**63 - 1
    for bad in (-1, 2**63, 1.5, "0", True, None):
        _bad(SEED, bad)


# -- validate_params / check_schema ----------------------------------------------------------------------------
SCHEMA = {"lr": Float(0, None, closed="neither"), "net": {"width": Int(1, 4096), "deep": {"on": Bool()}}}


def test_validate_params_nested_converts_a_copy_and_reports_every_problem() -> None:
    params = {"lr": "1e-3", "net": {"width": 8, "deep": {"on": True}}}
    out = validate_params(params, SCHEMA, "m")
    assert out == {"lr": 0.001, "net": {"width": 8, "deep": {"on": True}}}
    assert params["lr"] == "1e-3" and out["net"] is not params["net"]  # the input is not changed
    with pytest.raises(ParameterError) as e:
        validate_params({"lr": "abc", "net": {"width": 1e6, "deep": {"on": 1}}}, SCHEMA, "m")
    assert str(e.value).splitlines() == [
        "m: lr = 'abc' is not a float; expected a float > 0",
        "m: net.width = 1000000.0: expected an int in [1, 4096]",
        "m: net.deep.on = 1 is not a bool; expected a bool (true / false)",
    ]
    assert isinstance(e.value, ValueError)
    with pytest.raises(ParameterError, match=r"m: net = 3 is not a mapping; expected a mapping with keys deep, width"):
        validate_params({"lr": 1.0, "net": 3}, SCHEMA, "m")
    with pytest.raises(ParameterError, match="m: net.extra has no constraint"):
        validate_params({"lr": 1.0, "net": {"width": 1, "deep": {"on": True}, "extra": 0}}, SCHEMA, "m")


def test_check_schema_finds_every_mismatch() -> None:
    defaults = {"lr": 0.1, "net": {"width": 8, "deep": {"on": True}}}
    assert check_schema(defaults, SCHEMA, "m") == []
    assert check_schema({**defaults, "new": 1}, SCHEMA, "m") == ["m: default 'new' has no constraint"]
    assert check_schema({"lr": 0.1}, SCHEMA, "m") == ["m: constraint 'net' has no default"]
    assert check_schema({"lr": 0.1, "net": 3}, SCHEMA, "m") == ["m: 'net' is a section in the schema but not in the defaults"]
    assert check_schema({"lr": 1}, {"lr": float}, "m") == ["m: constraint 'lr' is a type, not a Spec"]
    bad_default = check_schema({**defaults, "lr": 0.0}, SCHEMA, "m")
    assert bad_default == ["default does not meet its constraint: m: lr = 0.0: expected a float > 0"]


def test_pick_and_with_changes() -> None:
    table = {"a": Int(0), "b": Bool()}
    assert pick(table, {"a": 1}) == {"a": table["a"]}
    assert isinstance(pick(table, ["a", "c"], c=Str())["c"], Str)
    with pytest.raises(KeyError, match="no constraint for"):
        pick(table, ["a", "zz"])
    with pytest.raises(KeyError, match="not in the section"):
        pick(table, ["a"], b=Bool())
    changed = with_changes(SCHEMA, **{"net.deep.on": Int(0)})
    assert isinstance(changed["net"]["deep"]["on"], Int) and isinstance(SCHEMA["net"]["deep"]["on"], Bool)
    with pytest.raises(KeyError, match="net.nope"):
        with_changes(SCHEMA, **{"net.nope": Int()})


# -- the registry -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_every_method_declares_a_schema_that_fits_its_defaults(name: str) -> None:
    cls = get_method_class(name)
    schema = getattr(cls, "parameter_schema", None)
    assert isinstance(schema, dict), f"{name} declares no parameter_schema"
    assert check_schema(cls.defaults, schema, name) == []
    assert "seed" in schema and schema["seed"] is SEED
    if isinstance(cls.defaults.get("image_score"), dict):  # the shared section's constraints, not a copy of them
        assert {k: id(v) for k, v in schema["image_score"].items()} == {k: id(v) for k, v in IMAGE_SCORE_SCHEMA.items()}


@pytest.mark.parametrize("name", METHODS)
def test_every_shipped_config_set_validates(name: str) -> None:
    cls = get_method_class(name)
    assert cls.config_sets(), f"{name} ships no config sets"
    for cs in cls.config_sets():
        params = validate_params(merge_params(cls.defaults, cls.config_set(cs), where=name), cls.parameter_schema, name)
        assert cls(**cls.config_set(cs)).params == params  # construction validates the same way


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("seed", ["0", 1.5, -1, True])
def test_wrong_seed_type_fails_at_construction(name: str, seed: object) -> None:
    with pytest.raises(ParameterError, match=rf"^{name}: seed = {seed!r}"):
        get_method(name, seed=seed)


@pytest.mark.parametrize("name", ["autoencoder", "multitask"])
def test_yaml11_float_string_from_set_is_converted(name: str) -> None:
    overrides = {"train.lr": yaml.safe_load("1e-3")}  # as ``--set train.lr=1e-3`` is parsed
    assert overrides == {"train.lr": "1e-3"}  # PyYAML follows YAML 1.1: no dot, no float
    lr = get_method(name, **overrides).params["train"]["lr"]
    assert lr == 0.001 and type(lr) is float
    with pytest.raises(ParameterError, match=rf"^{name}: train.lr = 'abc' is not a float"):
        get_method(name, **{"train.lr": "abc"})


@pytest.mark.parametrize("name", ["mim-ood", "ar-restoration", "token-critic"])
def test_token_methods_refuse_a_float_codebook_size(name: str) -> None:
    with pytest.raises(ParameterError, match=rf"^{name}: tokenizer.num_embeddings = 3.5: expected an int in \[2, "):
        get_method(name, **{"tokenizer.num_embeddings": 3.5})


@pytest.mark.parametrize("name", ["mae", "amae", "mae-pseudo"])
def test_mae_methods_refuse_a_string_patch_size(name: str) -> None:
    with pytest.raises(ParameterError, match=rf"^{name}: mae.patch_size = '8': expected an int in \[1, 1024\] or a list"):
        get_method(name, **{"mae.patch_size": "8"})
    assert get_method(name, **{"mae.patch_size": [8, 8]}).params["mae"]["patch_size"] == [8, 8]


@pytest.mark.parametrize("name,key,value,expected", [
    ("autoencoder", "batch_size", True, "batch_size = True is a bool, not an int"),  # a bool for an int
    ("multitask", "train.steps", False, "train.steps = False is a bool, not an int"),
    ("autoencoder", "channels", [4, -8, 4], r"channels\[1\] = -8: expected an int in \[1, 4096\]"),  # negative size
    ("mim-ood", "transformer.depth", -1, r"transformer.depth = -1: expected an int in \[1, 128\]"),
    ("autoencoder", "channels", [4, 100_000, 4], r"channels\[1\] = 100000: expected an int in \[1, 4096\]"),  # huge
    ("multitask", "model.base_filters", 65536, r"model.base_filters = 65536: expected an int in \[1, 4096\]"),
    ("mim-ood", "tokenizer.channels", [8, 10**6], r"tokenizer.channels\[1\] = 1000000: expected an int in \[1, 4096\]"),
    ("amae", "stage1.hidden", 10**7, r"stage1.hidden = 10000000: expected an int in \[1, 4096\]"),
    ("mae-pseudo", "classifier.dropout", 1.0, r"classifier.dropout = 1.0: expected a float in \[0, 1\)"),
    ("intensity", "image_score.fraction", 0, r"image_score.fraction = 0: expected a float in \(0, 1\]"),
    ("mae", "device", "gpu", "device = 'gpu': expected 'auto', 'cpu'"),
    ("multitask", "predict.roi_size", [64], r"predict.roi_size = \[64\] has 1 item"),
    ("ar-restoration", "reuse.modules", ["atd"], r"reuse.modules\[0\] = 'atd': expected one of 'tokenizer', 'ar'"),
])
def test_bad_values_fail_at_construction_with_one_clear_line(name: str, key: str, value: object, expected: str) -> None:
    with pytest.raises(ParameterError, match=rf"^{name}: {expected}") as e:
        get_method(name, **{key: value})
    assert len(str(e.value).splitlines()) == 1


def test_a_bad_value_fails_before_any_data_is_read() -> None:
    class Untouchable:
        def __len__(self) -> int:
            raise AssertionError("data read")

        def __getitem__(self, i: int) -> dict:
            raise AssertionError("data read")

    with pytest.raises(ParameterError):
        get_method("autoencoder", **{"train.lr": "fast"}).fit(Untouchable())


def test_run_folder_with_a_bad_config_fails_to_load(tmp_path: pathlib.Path) -> None:
    det = get_method("intensity", normalise="dataset")
    det.fit(make_toy_dataset(n=2, size=16))
    assert load_detector(det.save(tmp_path / "good")).params["seed"] == 0
    det.params["seed"] = "zero"  # a finished run folder whose config.yaml holds a seed of the wrong type
    run = det.save(tmp_path / "run")
    assert yaml.safe_load((run / "config.yaml").read_text())["params"]["seed"] == "zero"
    with pytest.raises(RunFolderError, match=r"does not fit method 'intensity' \(intensity: seed = 'zero' is not an int"):
        load_detector(run)
