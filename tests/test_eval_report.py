"""Report folder and comparison tables: files exist, JSON is valid, the HTML shows and links existing images."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from medanomaly.data import make_toy_dataset
from medanomaly.data.dataset import stack_dataset
from medanomaly.evaluation import image_scores, pixel_metrics, sample_metrics, write_comparison_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _check_page(page: Path, expected: set[str]) -> None:
    text = page.read_text()
    links = set(re.findall(r'href="([^"]+)"', text))
    assert links == expected
    for name in links:
        assert (page.parent / name).read_bytes().startswith(PNG)
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(embedded) == len(expected)
    assert all(base64.b64decode(e).startswith(PNG) for e in embedded)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_write_report_toy(tmp_path: Path, spatial_dims: int) -> None:
    b = stack_dataset(make_toy_dataset(n=6, size=16, spatial_dims=spatial_dims, abnormal_fraction=0.5, seed=0))
    img, fg, mask = b["image"].numpy(), b["foreground"].numpy(), b["mask"].numpy()
    scores = np.abs(img[:, 0] - 0.5) + 0.01 * np.random.default_rng(0).random(img[:, 0].shape)
    pm = pixel_metrics(scores, mask, fg)
    img_scores = image_scores(torch.from_numpy(scores), torch.from_numpy(fg), "max").numpy()
    sm = sample_metrics(img_scores, b["label"])
    metrics = {"pixel_ap": pm["ap"], "pixel_auroc": pm["auroc"], "best_dice": pm["best_dice"],
               "best_threshold": pm["best_threshold"], "sample_ap": sm["ap"], "sample_auroc": sm["auroc"],
               "seconds_per_image": 0.01, "device": "cpu", "undefined": float("nan")}
    page = write_report(tmp_path / "rep", metrics, scores, mask, img, fg, b["case_id"], img_scores, b["label"],
                        title="toy <test>", settings={"method": "intensity", "split": "test"})
    assert page == tmp_path / "rep" / "report.html"
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["pixel_ap"] == pytest.approx(pm["ap"]) and saved["undefined"] is None
    assert json.loads((tmp_path / "rep" / "settings.json").read_text())["method"] == "intensity"
    _check_page(page, {"curves_pixel.png", "curves_sample.png", "cases.png", "healthy.png"})  # healthy: label-0 images given
    text = page.read_text()
    assert "toy &lt;test&gt;" in text and "seconds_per_image" in text and "intensity" in text


def test_write_report_without_lesions_or_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    scores, masks = rng.random((4, 12, 12)), np.zeros((4, 12, 12), bool)
    with pytest.warns(UserWarning, match="no positive"):
        page = write_report(tmp_path, {"note": "all normal", "pixel_ap": None, "best_threshold": None}, scores, masks,
                            sample_scores=rng.random(4),
                            sample_labels=[0, 0, 0, 0])
    _check_page(page, {"cases.png"})  # no curve is drawn without a positive; the grid ranks by image score
    assert "highest score" not in page.read_text() and json.loads((tmp_path / "metrics.json").read_text())["pixel_ap"] is None
    only_metrics = write_report(tmp_path / "m", {"pixel_ap": 0.5})
    assert only_metrics.exists() and "<img" not in only_metrics.read_text()
    with pytest.raises(ValueError, match="does not match"):
        write_report(tmp_path / "bad", {}, scores, masks[:, :5])


def test_write_comparison_table(tmp_path: Path) -> None:
    rows = [
        {"method": "intensity", "pixel_ap": 0.31, "best_dice": 0.42, "seconds_per_image": 0.002},
        {"method": "autoencoder", "pixel_ap": 0.55, "best_dice": 0.40, "seconds_per_image": 0.05, "note": "a|b"},
    ]
    md, csv_path, html_path = write_comparison_table(rows, tmp_path, name="bench")
    lines = md.read_text().splitlines()
    assert lines[0] == "| method | pixel_ap | best_dice | seconds_per_image | note |"
    assert "**0.4200**" in lines[2] and "**0.0020**" in lines[2] and "**0.5500**" in lines[3] and "a\\|b" in lines[3]
    table = list(csv.DictReader(csv_path.open()))
    assert table[1]["pixel_ap"] == "0.55" and table[0]["note"] == ""
    page = html_path.read_text()
    assert page.count("<tr>") == 3 and "<b>0.5500</b>" in page
    with pytest.raises(ValueError, match="no rows"):
        write_comparison_table([], tmp_path)


def test_importing_evaluation_does_not_load_matplotlib() -> None:
    import subprocess
    import sys

    code = "import sys, medanomaly.evaluation as e; e.write_report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
