"""The application layer behind the CLI (medanomaly.app), on in-memory toy data (no files, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from medanomaly.app.config import parse_overrides, resolve_config
from medanomaly.app.demo import run_demo
from medanomaly.app.errors import DataNotFoundError, PipelineError
from medanomaly.app.evaluate import evaluate_run
from medanomaly.app.predict import predict_files
from medanomaly.app.train import train_run
from medanomaly.data import make_toy_dataset
from medanomaly.data.roots import find_data_root
from medanomaly.run_folder import RunFolder

torch.set_num_threads(1)


def test_parse_overrides_yaml_scalars() -> None:
    got = parse_overrides(["a=3", "b=0.5", "c=true", "d=[1, 2]", "e=foo", "f.g=null", "h="])
    assert got == {"a": 3, "b": 0.5, "c": True, "d": [1, 2], "e": "foo", "f.g": None, "h": ""}
    with pytest.raises(PipelineError, match="key=value"):
        parse_overrides(["novalue"])
    with pytest.raises(PipelineError, match="empty key"):
        parse_overrides(["=3"])


def test_resolve_config_precedence_and_data_section(tmp_path: Path) -> None:
    # defaults < config set < file < --set; a "data" section and data.* overrides become data options
    params, data = resolve_config("intensity", config_set="cpu-small")
    assert params["image_score"] == {"reduce": "topk", "fraction": 0.01} and data == {}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"methods": {"intensity": {"sign": -1, "data": {"size": 48}}, "autoencoder": {"batch_size": 2}}}))
    params, data = resolve_config("intensity", config_set="cpu-small", config_file=f,
                                           overrides={"image_score.fraction": 0.2, "data.size": 40})
    assert params["sign"] == -1 and params["image_score"]["fraction"] == 0.2 and data == {"size": 40}
    # a run's own config.yaml works as a config file; another method's is refused
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(yaml.safe_dump({"method": "autoencoder", "params": {"batch_size": 2}}))
    with pytest.raises(PipelineError, match="autoencoder"):
        resolve_config("intensity", config_file=run_cfg)
    with pytest.raises(KeyError, match="nope"):
        resolve_config("intensity", overrides={"nope": 1})
    with pytest.raises(PipelineError, match="unknown data option"):
        resolve_config("intensity", overrides={"data.colour": 1})


def test_train_and_evaluate_in_memory(tmp_path: Path) -> None:
    train = make_toy_dataset(8, 24, seed=0)
    test = make_toy_dataset(8, 24, abnormal_fraction=0.5, seed=1)
    s = train_run("intensity", train, tmp_path / "run", val_split=None, seed=5, quiet=True)
    assert s.n_train == 8 and RunFolder(tmp_path / "run").is_finished
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["train"]["seed"] == 5 and cfg["params"]["seed"] == 5
    m = evaluate_run(tmp_path / "run", test, tmp_path / "ev", quiet=True)
    assert m["n_images"] == 8 and m["pixel_auroc"] > 0.8 and m["sample_auroc"] is not None
    on_disk = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert on_disk["pixel_ap"] == pytest.approx(m["pixel_ap"])
    assert (tmp_path / "ev" / "report.html").is_file()
    # a run trained in one go reports its recorded wall seconds, and says so
    assert m["train_seconds"] == cfg["train"]["seconds"] and "one session" in m["train_seconds_are"]
    # other image size than the run was trained on: a clear error
    with pytest.raises(PipelineError, match="shape"):
        evaluate_run(tmp_path / "run", make_toy_dataset(4, 16, seed=2), None, quiet=True)
    # predicting files needs the preset a file-trained run records
    with pytest.raises(PipelineError, match="preset"):
        predict_files(tmp_path / "run", [tmp_path / "x.png"], tmp_path / "p", quiet=True)


def test_find_data_root_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDANOMALY_DATA", str(tmp_path))
    root, looked = find_data_root(require="brain_lgg_flair_2d")
    assert root is None and str(tmp_path) in looked[0]
    (tmp_path / "brain_lgg_flair_2d").mkdir()
    root, _ = find_data_root(require="brain_lgg_flair_2d")
    assert root == tmp_path
    with pytest.raises(DataNotFoundError, match="MEDANOMALY_DATA"):
        monkeypatch.setenv("MEDANOMALY_DATA", str(tmp_path / "missing"))
        run_demo(tmp_path / "demo", quiet=True)


def test_another_fits_checkpoints_are_never_resumed(tmp_path: Path) -> None:
    """Stale reuse: checkpoints in a work dir belong to one (method, params, data); another fit's are never resumed."""
    from medanomaly.methods import get_method, get_method_class
    from medanomaly.methods.base import RunContext

    p = get_method_class("autoencoder").test_params()
    a, b = make_toy_dataset(8, 16, seed=0), make_toy_dataset(8, 16, seed=1)
    work = tmp_path / "work"
    first = get_method("autoencoder", **p).fit(a, context=RunContext(work_dir=work, quiet=True))
    x = torch.stack([b[i]["image"] for i in range(2)])
    fresh_b = get_method("autoencoder", **p).fit(b, context=RunContext(work_dir=tmp_path / "other", quiet=True))
    with pytest.warns(UserWarning, match="not resuming.*another fit .the training data differ"):
        resumed_b = get_method("autoencoder", **p).fit(b, context=RunContext(work_dir=work, resume=True, quiet=True))
    assert torch.equal(resumed_b.predict(x).pixel_scores, fresh_b.predict(x).pixel_scores)  # B's model, not A's
    with pytest.warns(UserWarning, match="not resuming.*another fit .the settings differ"):
        get_method("autoencoder", **{**p, "seed": 9}).fit(b, context=RunContext(work_dir=work, resume=True, quiet=True))
    assert not torch.equal(first.predict(x).pixel_scores, fresh_b.predict(x).pixel_scores)
    again_b = get_method("autoencoder", **p).fit(b, context=RunContext(work_dir=work, quiet=True))  # no resume: afresh
    assert torch.equal(again_b.predict(x).pixel_scores, fresh_b.predict(x).pixel_scores)
    # the same fit resumes (here: from its finished checkpoint)
    resumed = get_method("autoencoder", **p).fit(b, context=RunContext(work_dir=work, resume=True, quiet=True))
    assert torch.equal(resumed.predict(x).pixel_scores, fresh_b.predict(x).pixel_scores)


def test_extra_sources_are_training_data_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A method's extra data (amae's unlabeled pool, multitask's inter-blend source) is loaded by the app, never from
    an evaluation split, and recorded; an optional one that is missing is recorded as not loaded."""
    from medanomaly.app.datasets import load_sources
    from medanomaly.methods import get_method, get_method_class

    amae = get_method_class("amae")
    params = get_method("amae", **{"stage2.unlabeled_data": "lgg-flair-2d", "stage2.unlabeled_split": "test"}).get_params()
    with pytest.raises(PipelineError, match="evaluation data"):
        load_sources(amae, params)
    params = get_method("amae", **{"stage2.unlabeled_data": "some-data", "stage2.unlabeled_split": "val"}).get_params()
    with pytest.raises(PipelineError, match="evaluation data"):  # the benchmark's evaluation split of that data
        load_sources(amae, params, eval_data="some-data", eval_split="val")
    monkeypatch.setenv("MEDANOMALY_DATA", str(tmp_path / "nodata"))
    mt = get_method_class("multitask")
    params = get_method("multitask", **{"tasks.inter_source": "auto"}).get_params()
    got, record = load_sources(mt, params)
    assert got == {"inter_source": None} and record["inter_source"]["loaded"] is False
    s = train_run("intensity", make_toy_dataset(4, 16, seed=0), tmp_path / "run", val_split=None, quiet=True)
    assert s.config["sources"] == {}
    with pytest.raises(PipelineError, match="evaluation data"):
        train_run("intensity", "lgg-flair-2d", tmp_path / "run2", split="test", quiet=True)


def test_one_reader_for_every_parameter_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The review's case: ``{mae: {num_layers: 2}}`` for method ``mae`` is its ``mae.num_layers`` parameter, read the
    same way by a --config file and a shipped config set (one reader, no guessing by method names)."""
    from medanomaly.methods import get_method_class
    from medanomaly.param_files import ParamFileError, read_param_file

    f = tmp_path / "c.yaml"
    f.write_text("mae: {num_layers: 2}\n")
    params, _ = resolve_config("mae", config_file=f)
    assert params["mae"]["num_layers"] == 2
    cls = get_method_class("mae")
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "x.yaml").write_text(f.read_text())
    monkeypatch.setattr(cls, "_configs_folder", classmethod(lambda c: folder))
    assert cls.config_set("x") == {"mae": {"num_layers": 2}}
    # per-method sections need the explicit 'methods:' key; another method's section is None, not a guess
    (folder / "y.yaml").write_text("methods: {intensity: {sign: -1}}\n")
    assert read_param_file(folder / "y.yaml", "mae") is None and cls.config_sets() == ["x"]
    assert read_param_file(folder / "y.yaml", "intensity") == ({"sign": -1}, {})
    (folder / "z.yaml").write_text("methods: {intensity: {}}\nsign: 1\n")
    with pytest.raises(ParamFileError, match="holds nothing else"):
        read_param_file(folder / "z.yaml", "intensity")


def test_seed_is_part_of_the_contract(tmp_path: Path) -> None:
    """--seed reaches every method (the base fit seeds from params['seed']); a method without one cannot register."""
    from medanomaly.methods import list_methods
    from medanomaly.methods.base import Detector, register

    for m in list_methods():
        params, _ = resolve_config(m, overrides={"seed": 7})
        assert params["seed"] == 7, m

    class NoSeed(Detector):
        name = "no-seed-method"
        defaults = {"x": 1}

    with pytest.raises(ValueError, match="int 'seed'"):
        register(NoSeed)


def test_a_parameter_added_since_at_its_default_does_not_block_resuming(tmp_path: Path) -> None:
    """A run started before a parameter existed (its fit_key lacks it) is the same fit when the parameter is at its
    default (= the old behaviour): resumed without a warning; set to another value, it is another fit."""
    import json
    import warnings

    from medanomaly.methods import get_method, get_method_class
    from medanomaly.methods.base import RunContext
    from medanomaly.methods.params import with_new_defaults

    p = get_method_class("autoencoder").test_params()
    a = make_toy_dataset(8, 16, seed=0)
    work = tmp_path / "work"
    get_method("autoencoder", **p).fit(a, context=RunContext(work_dir=work, quiet=True))
    key = json.loads((work / "fit_key.json").read_text())
    assert key["params"]["dropout"] == get_method_class("autoencoder").defaults["dropout"]
    del key["params"]["dropout"]  # as written by a version before `dropout` existed
    (work / "fit_key.json").write_text(json.dumps(key))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_method("autoencoder", **p).fit(a, context=RunContext(work_dir=work, resume=True, quiet=True))
    key = json.loads((work / "fit_key.json").read_text())
    del key["params"]["dropout"]
    (work / "fit_key.json").write_text(json.dumps(key))
    with pytest.warns(UserWarning, match="not resuming.*the settings differ"):
        get_method("autoencoder", **{**p, "dropout": 0.25}).fit(
            a, context=RunContext(work_dir=work, resume=True, quiet=True))
    # the helper itself: only missing keys at their default are filled, nested, and nothing else changes
    d = {"a": 1, "s": {"x": 1, "y": 2}, "n": 3}
    assert with_new_defaults({"a": 5, "s": {"x": 1}}, {"a": 1, "s": {"x": 1, "y": 2}, "n": 3}, d) == \
        {"a": 5, "s": {"x": 1, "y": 2}, "n": 3}
    assert with_new_defaults({"s": {"x": 1}}, {"s": {"x": 1, "y": 7}, "n": 4}, d) == {"s": {"x": 1}}


def test_resume_request_ignores_parameters_added_since_at_their_default() -> None:
    """`train --resume`: a request recorded before a parameter existed still matches when the parameter is at its
    default; another value, another seed or other images are still refused, naming what differs."""
    import copy

    from medanomaly.app.train import resume_conflict
    from medanomaly.methods import get_method_class

    params = json.loads(json.dumps(get_method_class("mae").defaults, default=str))
    request = {"method": "mae", "params": params, "data": {"name": "x", "fingerprint": "f1"}, "sources": {}}
    old = copy.deepcopy(request)
    del old["params"]["score"]["smooth"]  # written by a version before score.smooth existed
    assert resume_conflict(old, request, "mae") == "" and resume_conflict(None, request, "mae") == ""
    on = copy.deepcopy(request)
    on["params"]["score"]["smooth"] = {"min_size": 5, "avg_size": 5}
    assert resume_conflict(old, on, "mae") == "params: score.smooth"
    other = copy.deepcopy(request)
    other["params"]["seed"] = 7
    other["data"]["fingerprint"] = "f2"
    assert resume_conflict(old, other, "mae") == "data, params: seed (the training images differ)"
