"""``medanomaly view``: the records, the local server (127.0.0.1, token, JSON/PNG endpoints) and the page in a real
headless Chromium (skipped when no Chromium is installed)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from medanomaly.evaluation.calibration import QuantileSketch
from medanomaly.evaluation.overlays import healthy_scale, slice_view, write_report_cases
from medanomaly.viewer.records import ViewerError, add_predict_case, find_view
from medanomaly.viewer.server import make_server

AFF = np.array([[-1.5, 0, 0, 20.0], [0, -1.5, 0, 30.0], [0, 0, 3.0, -12.0], [0, 0, 0, 1]])  # LPS-stored, like BraTS


def _calibration() -> dict:
    rng = np.random.default_rng(0)
    vox, img = QuantileSketch(k=50_000), QuantileSketch(k=100)
    vox.update(rng.standard_normal(50_000))
    img.update(rng.standard_normal(50))
    return {"source": "synthetic healthy", "voxel": vox.record(), "image": img.record()}


def _volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    img = np.zeros((32, 28, 12), np.float32)
    img[4:28, 4:24, 1:11] = rng.normal(100, 5, (24, 20, 10))
    amap = rng.normal(0, 1, img.shape).astype(np.float32)
    amap[10:16, 8:14, 5:8] = 4.0  # one hot blob over 3 slices
    return img, amap, img > 0


@pytest.fixture(scope="module")
def maps_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A predict-like folder: one NIfTI volume and one 2D PNG, each with its map, foreground and view.json entry."""
    import nibabel as nib
    from PIL import Image

    from medanomaly.data.io import read_image, write_nifti_map, write_png_map

    out = tmp_path_factory.mktemp("maps")
    src = out / "inputs"
    src.mkdir()
    img, amap, fg = _volume()
    nib.save(nib.Nifti1Image(img, AFF), str(src / "vol.nii.gz"))
    ld = read_image(src / "vol.nii.gz")
    write_nifti_map(amap, ld, out / "vol_anomaly.nii.gz")
    scale = healthy_scale(_calibration(), "zscore")
    thr = {"voxel_threshold": 2.326, "voxel_rule": "fpr=0.01 (test)", "image_threshold": 1.6, "image_rule": "image-fpr=0.05"}
    add_predict_case(out, "vol", ld, src / "vol.nii.gz", amap, fg, scale, thr, 4.0, out, "zscore")
    im2 = (np.random.default_rng(2).random((20, 24)) * 200).astype(np.uint8)
    Image.fromarray(im2).save(src / "slice.png")
    ld2 = read_image(src / "slice.png")
    m2 = np.zeros((20, 24), np.float32)
    m2[5:9, 5:9] = 3.5
    write_png_map(m2, out / "slice_anomaly.png")
    add_predict_case(out, "slice", ld2, src / "slice.png", m2, None, scale, thr, 1.0, out, "zscore")
    return out


@pytest.fixture(scope="module")
def server(maps_dir: Path):  # noqa: ANN201 - the running server
    srv = make_server(maps_dir)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def test_records_written_beside_the_maps(maps_dir: Path) -> None:
    rec = json.loads((maps_dir / "view.json").read_text())
    ids = [c["id"] for c in rec["cases"]]
    assert ids == ["vol", "slice"]
    vol = rec["cases"][0]
    assert vol["map"] == "vol_anomaly.nii.gz" and vol["foreground"] == "vol_foreground.nii.gz" and vol["has_affine"]
    assert vol["scale"]["kind"] == "healthy" and vol["threshold"] == pytest.approx(2.326)
    assert rec["cases"][1]["map"] == "slice_anomaly.png" and (maps_dir / "slice_foreground.png").is_file()
    base, cases = find_view(maps_dir)
    assert base == maps_dir and len(cases) == 2


def test_server_binds_localhost_with_a_token(server) -> None:  # noqa: ANN001
    host, port = server.server_address[:2]
    assert host == "127.0.0.1" and port > 0
    assert len(server.token) >= 20
    # a token with its last character changed (to one it is not: a random token may end in any character)
    near = server.token[:-1] + ("y" if server.token.endswith("x") else "x")
    for bad in ("/", "/index.html", "/api/cases", f"/{near}/api/cases", f"/x{server.token}/",
                "/static/viewer.js", f"/../{server.token}/api/cases"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # the path exactly as written
        conn.request("GET", bad)
        assert conn.getresponse().status == 403, bad
        conn.close()
    req = urllib.request.Request(server.url + "api/cases", method="POST", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 403
    status, body, ctype = _get(server.url)
    assert status == 200 and b"medanomaly viewer" in body and ctype.startswith("text/html")
    status, body, _ = _get(server.url + "static/viewer.js")
    assert status == 200 and b"api/slice" in body
    assert _get(server.url + "static/../records.py")[0] == 404


def test_cases_and_slice_json(server) -> None:  # noqa: ANN001
    status, body, ctype = _get(server.url + "api/cases")
    assert status == 200 and ctype == "application/json"
    cases = json.loads(body)["cases"]
    vol, sl = cases
    assert vol["n_slices"] == 12 and vol["labels"] == ["R", "L", "A", "P"] and vol["start_slice"] in (5, 6, 7)
    assert vol["positions"][0] == pytest.approx(-12.0) and vol["image_score"] == 4.0
    assert sl["n_slices"] == 1 and sl["labels"] is None and sl["width"] == 24 and sl["height"] == 20
    status, body, _ = _get(server.url + "api/slice?case=0&k=6")
    j = json.loads(body)
    m = np.frombuffer(base64.b64decode(j["map"]), "<f4").reshape(j["height"], j["width"])
    _, amap, _ = _volume()
    assert np.allclose(m, slice_view(amap.shape, AFF).get(amap, 6))
    assert np.frombuffer(base64.b64decode(j["foreground"]), np.uint8).sum() > 0 and j["lesion"] is None
    status, body, _ = _get(server.url + "api/slice?case=0&k=99")
    assert status == 400 and "slice" in json.loads(body)["error"]
    assert _get(server.url + "api/slice?case=7&k=0")[0] == 400
    j = json.loads(_get(server.url + "api/slice?case=1&k=0")[1])
    m2 = np.frombuffer(base64.b64decode(j["map"]), "<f4").reshape(20, 24)
    assert m2[6, 6] == pytest.approx(3.5, abs=0.02) and m2[0, 0] == pytest.approx(0.0, abs=0.02)


def test_components_follow_the_threshold(server) -> None:  # noqa: ANN001
    j = json.loads(_get(server.url + "api/components?case=0&t=3.9")[1])
    assert j["n_components"] == 1 and j["rows"][0]["voxels"] == 6 * 6 * 3 and j["mm"]
    assert j["rows"][0]["volume_ml"] == pytest.approx(108 * 1.5 * 1.5 * 3 / 1000)
    low = json.loads(_get(server.url + "api/components?case=0&t=1.0")[1])
    assert low["voxels"] > j["voxels"]


def test_overlay_png_shows_map_and_mask(server) -> None:  # noqa: ANN001
    from PIL import Image

    status, body, ctype = _get(server.url + "api/overlay.png?case=0&k=6&t=2.3")
    assert status == 200 and ctype == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)
    warm = (rgb[..., 0] > 180) & (rgb[..., 2] < 100)
    cyan = (rgb[..., 0] < 30) & (rgb[..., 1] > 200) & (rgb[..., 2] > 230)
    assert warm.sum() > 10 and cyan.sum() > 10
    hi = np.asarray(Image.open(io.BytesIO(_get(server.url + "api/overlay.png?case=0&k=6&t=50")[1])).convert("RGB")).astype(int)
    assert ((hi[..., 0] < 30) & (hi[..., 1] > 200) & (hi[..., 2] > 230)).sum() == 0


def test_volume_endpoint_serves_gzipped_nifti(server) -> None:  # noqa: ANN001
    import gzip

    import nibabel as nib

    status, body, ctype = _get(server.url + "api/volume/0/map.nii.gz")
    assert status == 200 and ctype == "application/gzip"
    img = nib.Nifti1Image.from_bytes(gzip.decompress(body))
    _, amap, fg = _volume()
    assert np.allclose(img.affine, AFF) and img.shape == amap.shape
    got = np.asarray(img.dataobj)
    assert np.allclose(got[fg], amap[fg]) and np.all(got[~fg] == amap.min())
    assert _get(server.url + "api/volume/1/image.nii.gz")[0] == 400  # a 2D PNG case has no volume
    assert _get(server.url + "api/volume/0/other.nii.gz")[0] == 400
    status, body, _ = _get(server.url + "static/niivue.umd.js")
    assert status == 200 and len(body) > 1_000_000
    assert b"BSD 2-Clause" in _get(server.url + "static/NIIVUE_LICENSE.txt")[1]


def test_report_cases_are_viewable(tmp_path: Path) -> None:
    img, amap, fg = _volume()
    images, scores = np.stack([img[..., 6], img[..., 7]]), np.stack([amap[..., 6], amap[..., 7]])
    masks, fgs = scores > 3, np.stack([fg[..., 6], fg[..., 7]])
    entries = write_report_cases(tmp_path, [("best", 0, "a  DICE 0.9"), ("worst", 1, "b  DICE 0.1")], images, scores,
                                 masks, fgs, ["caseA", "caseB"], np.array([4.0, 3.0]), calibration=_calibration(),
                                 threshold=2.3, method="zscore")
    assert [e["id"] for e in entries] == ["best-caseA", "worst-caseB"]
    assert all(Path(e["png"]).is_file() for e in entries)
    # a report written again over it: the cases it no longer lists are removed, the others rewritten
    write_report_cases(tmp_path, [("best", 1, "b")], images, scores, masks, fgs, ["caseA", "caseB"], None)
    assert sorted(p.name for p in (tmp_path / "cases").iterdir()) == ["best-caseB.npz", "best-caseB.png", "view.json"]
    entries = write_report_cases(tmp_path, [("best", 0, "a  DICE 0.9"), ("worst", 1, "b  DICE 0.1")], images, scores,
                                 masks, fgs, ["caseA", "caseB"], np.array([4.0, 3.0]), calibration=_calibration(),
                                 threshold=2.3, method="zscore")
    srv = make_server(tmp_path)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        cases = json.loads(_get(srv.url + "api/cases")[1])["cases"]
        assert cases[0]["has_lesion"] and cases[0]["scale"]["kind"] == "healthy"
        j = json.loads(_get(srv.url + "api/slice?case=0&k=0")[1])
        assert np.frombuffer(base64.b64decode(j["lesion"]), np.uint8).sum() == masks[0].sum()
    finally:
        srv.shutdown()
        srv.server_close()


def test_nothing_to_show_and_port_in_use(tmp_path: Path, maps_dir: Path) -> None:
    with pytest.raises(ViewerError, match="nothing to show"):
        find_view(tmp_path)
    with pytest.raises(ViewerError, match="no such folder"):
        find_view(tmp_path / "missing")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: intensity\n")
    (run / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ViewerError, match="run folder"):
        find_view(run)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        with pytest.raises(ViewerError, match="in use"):
            make_server(maps_dir, port=busy.getsockname()[1])
    finally:
        busy.close()


def test_cli_view_errors_in_one_line(tmp_path: Path, maps_dir: Path) -> None:
    from typer.testing import CliRunner

    from medanomaly.cli import app

    res = CliRunner().invoke(app, ["view", str(tmp_path)])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nothing to show" in lines[0]
    res = CliRunner().invoke(app, ["view", str(maps_dir), "--case", "nope"])
    assert res.exit_code == 1 and "no case 'nope'" in res.output


# ------------------------------------------------------------------------------------------- headless Chromium
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _chrome(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    exe = _chromium()
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
            "--enable-unsafe-swiftshader",  # software WebGL2 for the NiiVue panel (trusted local page)
            f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=8000"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (apt-get install chromium)")
def test_page_in_headless_chromium(server, tmp_path: Path) -> None:  # noqa: ANN001
    from PIL import Image

    # the page loads, draws the volume's slice with the map, and the threshold level changes the mask
    counts = {}
    for level in (1.2, 4.5):
        res = _chrome(["--dump-dom", server.url + f"?case=0&k=6&t={level}"], tmp_path)
        dom = res.stdout
        assert 'data-ready="1"' in dom, res.stderr[-2000:]
        m = re.search(r'id="slice"[^>]*', dom)
        assert m, dom[:2000]
        attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', m.group(0)))
        assert int(attrs["overlay-pixels"]) > 0
        counts[level] = int(attrs["mask-pixels"])
        nv = re.search(r'<canvas id="nv"[^>]*>', dom)
        nv_status = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', nv.group(0))) if nv else {}
    assert counts[1.2] > counts[4.5]
    shot = tmp_path / "shot.png"
    res = _chrome([f"--screenshot={shot}", "--window-size=1100,900", server.url + "?case=0&k=6"], tmp_path)
    assert shot.is_file(), res.stderr[-2000:]
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    warm = (rgb[..., 0] > 180) & (rgb[..., 1] > 60) & (rgb[..., 2] < 80)  # map colours
    cyan = (rgb[..., 0] < 40) & (rgb[..., 1] > 200) & (rgb[..., 2] > 230)  # the mask outline
    assert warm.sum() > 200 and cyan.sum() > 20
    # the NiiVue panel of a volume case: both volumes loaded (needs WebGL2; software rendering is enough)
    if nv_status.get("status") == "error":
        pytest.skip("NiiVue panel: no WebGL2 in this Chromium (the canvas view was checked)")
    assert nv_status.get("status") == "loaded" and nv_status.get("volumes") == "2", nv_status


def test_report_page_links_cases_to_the_viewer(tmp_path: Path) -> None:
    from medanomaly.evaluation.html import write_report

    img, amap, fg = _volume()
    n = 4
    images = np.stack([img[..., 3 + i] for i in range(n)])
    scores = np.stack([amap[..., 3 + i] for i in range(n)])
    masks = scores > 3
    page = write_report(tmp_path / "ev", {"method": "zscore"}, scores=scores, masks=masks, images=images,
                        foreground=np.stack([fg[..., 3 + i] for i in range(n)]), case_ids=[f"c{i}" for i in range(n)],
                        sample_scores=scores.reshape(n, -1).max(1), sample_labels=masks.reshape(n, -1).any(1).astype(int),
                        calibration=_calibration(), calibrated_threshold=2.3, method="zscore")
    text = page.read_text()
    assert "Cases, full size, in the viewer" in text and "medanomaly view" in text and "--case best-c" in text
    _, cases = find_view(tmp_path / "ev")
    assert {c["id"].split("-")[0] for c in cases} >= {"best", "worst"}
    assert all((tmp_path / "ev" / "cases" / f"{c['id']}.png").is_file() for c in cases)


def test_predict_writes_what_the_viewer_shows(tmp_path: Path) -> None:
    """End to end: train a tiny intensity run, predict a PNG and a NIfTI volume with a calibrated threshold, open the
    output folder in the viewer."""
    import csv

    import nibabel as nib
    from PIL import Image

    from medanomaly.app.predict import predict_files
    from medanomaly.app.train import train_run
    from medanomaly.data import make_toy_dataset
    from medanomaly.viewer.server import ViewerApp

    rows = []
    for split, ds in (("train", make_toy_dataset(8, 32, seed=1)), ("val", make_toy_dataset(4, 32, seed=2))):
        for i in range(len(ds)):
            name = f"{split}_{i}.png"
            Image.fromarray(np.round(ds[i]["image"][0].numpy() * 255).astype(np.uint8)).save(tmp_path / name)
            rows.append({"case_id": f"{split}_{i}", "image": name, "mask": "", "label": 0, "split": split})
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    run = tmp_path / "run"
    train_run("intensity", str(tmp_path / "m.csv"), run, size=32, quiet=True)
    test = make_toy_dataset(1, 32, abnormal_fraction=1.0, seed=3, spatial_dims=3)
    vol = (test[0]["image"][0].numpy() * 100).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, AFF), str(tmp_path / "vol.nii.gz"))
    out = tmp_path / "maps"
    predict_files(run, [tmp_path / "train_0.png", tmp_path / "vol.nii.gz"], out, quiet=True, threshold="fpr=0.01,image-fpr=0.05")
    rec = json.loads((out / "view.json").read_text())
    assert [c["id"] for c in rec["cases"]] == ["train_0", "vol"]
    assert all(c["scale"]["kind"] == "healthy" and c["threshold"] is not None for c in rec["cases"])
    assert (out / "vol_foreground.nii.gz").is_file() and (out / "train_0_foreground.png").is_file()
    cases = ViewerApp(out).cases_json()["cases"]
    assert not any("error" in c for c in cases)
    assert cases[1]["volume"] and tuple(cases[1]["labels"]) == ("R", "L", "A", "P") and not cases[0]["volume"]
