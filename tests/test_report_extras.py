"""Report extras: restorations in the case grids, the healthy-image grid and training curves (write_report and
evaluate_run), and the extras["restoration"] convention of the reconstruction methods."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from medanomaly.data import make_toy_dataset
from medanomaly.data.dataset import stack_dataset
from medanomaly.evaluation import write_report
from medanomaly.evaluation.figures import log_panels, pick_healthy

torch.set_num_threads(1)
PNG = b"\x89PNG\r\n\x1a\n"


def _toy(spatial_dims: int = 2, n: int = 8, size: int = 16) -> dict[str, np.ndarray]:
    b = stack_dataset(make_toy_dataset(n=n, size=size, spatial_dims=spatial_dims, abnormal_fraction=0.5, seed=0))
    img, fg, mask = b["image"].numpy(), b["foreground"].numpy(), b["mask"].numpy()
    # a "restoration" that removes the lesions, and a residual map with a little noise
    rest = np.where(mask, np.median(img[fg]), img).astype(np.float32)
    scores = np.abs(img - rest)[:, 0] + 0.01 * np.random.default_rng(0).random(img[:, 0].shape)
    return {"image": img, "fg": fg, "mask": mask, "rest": rest, "scores": scores, "label": b["label"].numpy(),
            "case_id": list(b["case_id"])}


def _log() -> list[dict]:
    recs: list[dict] = [{"stage": "tokens", "codebook_used": 12}]  # no step: skipped
    for s in range(1, 31):
        recs.append({"stage": "tokenizer", "step": s, "loss": 1.0 / s, "lr": 1e-3, "grad_norm": 1.0, "seconds": 0.1 * s})
        recs.append({"member": "m01", "step": s, "loss": 2.0 / s, "lr": 1e-3})
    recs += [{"stage": "tokenizer", "step": 10, "loss": 0.1, "val": 0.2, "best_val": 0.2},
             {"member": "m01", "step": 20, "loss": 0.1, "val_ap": 0.4}]
    return recs


def _links(page: Path) -> set[str]:
    return set(re.findall(r'href="([^"]+)"', page.read_text()))


def test_write_report_with_restorations_and_log(tmp_path: Path) -> None:
    d = _toy()
    page = write_report(tmp_path, {"seconds_per_image": 0.1}, d["scores"], d["mask"], d["image"], d["fg"], d["case_id"],
                        d["scores"].reshape(len(d["scores"]), -1).max(1), d["label"], restorations=d["rest"],
                        train_log=_log())
    assert _links(page) == {"curves_pixel.png", "curves_sample.png", "cases.png", "healthy.png", "training_curves.png"}
    for name in _links(page):
        assert (tmp_path / name).read_bytes().startswith(PNG)
    text = page.read_text()
    assert "restoration (the method&#x27;s healthy-looking image)" in text
    assert "Healthy images" in text and "with their restorations" in text
    assert "Training curves" in text and "2 stage/model lines" in text


def test_write_report_3d_restorations_only(tmp_path: Path) -> None:
    d = _toy(spatial_dims=3, n=4, size=12)
    page = write_report(tmp_path, {}, d["scores"], d["mask"], d["image"], d["fg"], restorations=d["rest"][:, 0])
    assert _links(page) == {"curves_pixel.png", "cases.png"}  # no labels: no healthy grid; no log: no curves
    assert "restoration" in page.read_text() and "Training curves" not in page.read_text()


def test_log_panels_and_healthy_picks() -> None:
    panels, groups = log_panels(_log())
    assert groups == ["tokenizer", "m01"]  # records without a step are skipped
    assert set(panels) == {"loss", "lr", "val", "val_ap"}  # grad_norm, seconds, best_val are not curves
    assert panels["val"] == {"tokenizer": ([10.0], [0.2])} and len(panels["loss"]["m01"][0]) == 31
    scores = np.array([5.0, 1.0, 4.0, 3.0, 9.0, 2.0, 0.5, 0.7, 0.8])
    labels = np.array([0, 0, 0, 0, 1, 0, -1, 0, 0])
    picks = pick_healthy(scores, labels, None)
    assert [i for _, i, _ in picks] == [0, 2, 3, 5]  # label 0 only: 3 highest, then the median of the 7 normals
    assert [i for _, i, _ in pick_healthy(scores[:4], labels[:4], None)] == [0, 2, 3]  # median already shown
    assert pick_healthy(scores, np.ones(9), None) == []


def test_bad_extras_are_clear_errors(tmp_path: Path) -> None:
    d = _toy()
    with pytest.raises(ValueError, match="restorations shape .* does not match scores shape"):
        write_report(tmp_path, {}, d["scores"], d["mask"], d["image"], restorations=d["rest"][:, :, :8])
    bad = d["rest"].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="restorations contains non-finite"):
        write_report(tmp_path, {}, d["scores"], d["mask"], d["image"], restorations=bad)
    with pytest.raises(ValueError, match="train_log must be a list"):
        write_report(tmp_path, {}, train_log="train_log.jsonl")  # type: ignore[arg-type]
    page = write_report(tmp_path / "nostep", {}, train_log=[{"stage": "x", "loss": 1.0}, "junk"])  # type: ignore[list-item]
    assert "no record has a numeric step" in page.read_text() and not (tmp_path / "nostep" / "training_curves.png").exists()


def test_evaluate_run_autoencoder_report_has_restorations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medanomaly.app.evaluate import evaluate_run
    from medanomaly.app.train import train_run
    from medanomaly.methods import get_method_class

    params = get_method_class("autoencoder").test_params()
    overrides = {k: v for k, v in params.items() if k != "train"}
    overrides.update({f"train.{k}": v for k, v in params["train"].items()})
    overrides.update({"train.steps": 3, "train.val_every": 2})  # a log with train and validation records
    train = make_toy_dataset(8, 16, seed=0)
    test = make_toy_dataset(4, 16, abnormal_fraction=0.5, seed=1)
    train_run("autoencoder", train, tmp_path / "run", val_split=None, overrides=overrides, seed=0, quiet=True)
    assert (tmp_path / "run" / "train_log.jsonl").is_file()
    m = evaluate_run(tmp_path / "run", test, tmp_path / "ev", quiet=True)
    page = Path(m["report"])
    assert _links(page) >= {"cases.png", "healthy.png", "training_curves.png"}
    assert (tmp_path / "ev" / "cases.png").read_bytes().startswith(PNG)
    text = page.read_text()
    assert "restoration (the method&#x27;s healthy-looking image)" in text and "Training curves" in text
    assert "restorations" not in json.loads((tmp_path / "ev" / "settings.json").read_text())  # no "not shown" note

    # a restoration of another size than the input is left out of the report with a note, never an error
    from medanomaly.methods.baselines.autoencoder import AutoencoderDetector

    predict = AutoencoderDetector.predict

    def small_restoration(self, images, foreground=None):  # noqa: ANN001, ANN202
        res = predict(self, images, foreground)
        res.extras["restoration"] = res.extras["restoration"][..., :8, :8]
        return res

    monkeypatch.setattr(AutoencoderDetector, "predict", small_restoration)
    evaluate_run(tmp_path / "run", make_toy_dataset(2, 16, abnormal_fraction=1.0, seed=3), tmp_path / "ev2", quiet=True)
    note = json.loads((tmp_path / "ev2" / "settings.json").read_text())["restorations"]
    assert "not shown" in note and "(2, 8, 8)" in note and "(2, 16, 16)" in note
    assert "restoration (the method" not in (tmp_path / "ev2" / "report.html").read_text()


@pytest.mark.parametrize("method", ["autoencoder", "mae"])
def test_methods_return_restoration_at_input_size(method: str, tmp_path: Path) -> None:
    from medanomaly.methods import get_method, get_method_class
    from medanomaly.methods.base import RunContext

    det = get_method(method, **get_method_class(method).test_params())
    det.fit(make_toy_dataset(n=8, size=32, seed=1), context=RunContext(work_dir=tmp_path, quiet=True))
    size = 32 if method == "autoencoder" else 48  # the MAE works at its own model size: resized back to the input's
    b = stack_dataset(make_toy_dataset(n=2, size=size, abnormal_fraction=0.5, seed=2))
    res = det.predict(b["image"], b["foreground"])
    r = res.extras["restoration"]
    assert tuple(r.shape) == tuple(b["image"].shape) and r.dtype == torch.float32 and torch.isfinite(r).all()
