"""The pipeline functions behind the CLI, on in-memory toy data (no files, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from medanomaly import pipeline
from medanomaly.data import make_toy_dataset

torch.set_num_threads(1)


def test_parse_overrides_yaml_scalars() -> None:
    got = pipeline.parse_overrides(["a=3", "b=0.5", "c=true", "d=[1, 2]", "e=foo", "f.g=null", "h="])
    assert got == {"a": 3, "b": 0.5, "c": True, "d": [1, 2], "e": "foo", "f.g": None, "h": ""}
    with pytest.raises(pipeline.PipelineError, match="key=value"):
        pipeline.parse_overrides(["novalue"])
    with pytest.raises(pipeline.PipelineError, match="empty key"):
        pipeline.parse_overrides(["=3"])


def test_resolve_config_precedence_and_data_section(tmp_path: Path) -> None:
    # defaults < config set < file < --set; a "data" section and data.* overrides become data options
    params, data = pipeline.resolve_config("intensity", config_set="cpu-small")
    assert params["image_score"] == "topk" and data == {}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"intensity": {"sign": -1, "data": {"size": 48}}, "autoencoder": {"batch_size": 2}}))
    params, data = pipeline.resolve_config("intensity", config_set="cpu-small", config_file=f,
                                           overrides={"topk_fraction": 0.2, "data.size": 40})
    assert params["sign"] == -1 and params["topk_fraction"] == 0.2 and data == {"size": 40}
    # a run's own config.yaml works as a config file; another method's is refused
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(yaml.safe_dump({"method": "autoencoder", "params": {"batch_size": 2}}))
    with pytest.raises(pipeline.PipelineError, match="autoencoder"):
        pipeline.resolve_config("intensity", config_file=run_cfg)
    with pytest.raises(KeyError, match="nope"):
        pipeline.resolve_config("intensity", overrides={"nope": 1})
    with pytest.raises(pipeline.PipelineError, match="unknown data option"):
        pipeline.resolve_config("intensity", overrides={"data.colour": 1})


def test_train_and_evaluate_in_memory(tmp_path: Path) -> None:
    train = make_toy_dataset(8, 24, seed=0)
    test = make_toy_dataset(8, 24, abnormal_fraction=0.5, seed=1)
    s = pipeline.train_run("intensity", train, tmp_path / "run", val_split=None, seed=5, quiet=True)
    assert s.n_train == 8 and pipeline.is_finished_run(tmp_path / "run")
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["train"]["seed"] == 5 and cfg["params"]["seed"] == 5
    m = pipeline.evaluate_run(tmp_path / "run", test, tmp_path / "ev", quiet=True)
    assert m["n_images"] == 8 and m["pixel_auroc"] > 0.8 and m["sample_auroc"] is not None
    on_disk = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert on_disk["pixel_ap"] == pytest.approx(m["pixel_ap"])
    assert (tmp_path / "ev" / "report.html").is_file()
    # other image size than the run was trained on: a clear error
    with pytest.raises(pipeline.PipelineError, match="shape"):
        pipeline.evaluate_run(tmp_path / "run", make_toy_dataset(4, 16, seed=2), None, quiet=True)
    # predicting files needs the preset a file-trained run records
    with pytest.raises(pipeline.PipelineError, match="preset"):
        pipeline.predict_files(tmp_path / "run", [tmp_path / "x.png"], tmp_path / "p", quiet=True)


def test_find_data_root_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDANOMALY_DATA", str(tmp_path))
    root, looked = pipeline.find_data_root()
    assert root is None and str(tmp_path) in looked[0]
    (tmp_path / "brain_lgg_flair_2d").mkdir()
    root, _ = pipeline.find_data_root()
    assert root == tmp_path
    with pytest.raises(pipeline.DataNotFoundError, match="MEDANOMALY_DATA"):
        monkeypatch.setenv("MEDANOMALY_DATA", str(tmp_path / "missing"))
        pipeline.run_demo(tmp_path / "demo", quiet=True)
