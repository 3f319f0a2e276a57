"""benchmarks/controlled_cases.py: its pure helpers on known inputs, and the whole script on tiny untrained models
and synthetic slices (no data set, no training)."""

from __future__ import annotations

import importlib.util
import json
import math
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def _load() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("controlled_cases", ROOT / "benchmarks" / "controlled_cases.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


cc = _load()


def test_ap_auroc_known_values_and_sklearn() -> None:
    r = cc.ap_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert r["ap"] == pytest.approx(5 / 6) and r["auroc"] == pytest.approx(0.75)
    assert r["n"] == 4 and r["n_pos"] == 2 and r["prevalence"] == 0.5
    rng = np.random.default_rng(0)
    y = rng.random((7, 9)) < 0.3
    s = rng.random((7, 9)) + y
    r = cc.ap_auroc(torch.from_numpy(s), torch.from_numpy(y))  # tensors and 2D shapes are flattened
    assert r["ap"] == pytest.approx(average_precision_score(y.ravel(), s.ravel()))
    assert r["auroc"] == pytest.approx(roc_auc_score(y.ravel(), s.ravel()))
    one = cc.ap_auroc([0.2, 0.3], [1, 1])
    assert math.isnan(one["ap"]) and math.isnan(one["auroc"])
    with pytest.raises(ValueError):
        cc.ap_auroc([0.1, 0.2, 0.3], [0, 1])


def test_random_floor_is_about_the_prevalence() -> None:
    y = np.zeros(20000, bool)
    y[:4000] = True
    r = cc.random_floor(y, np.random.default_rng(1))
    assert r["prevalence"] == 0.2
    assert abs(r["ap"] - 0.2) < 0.02 and abs(r["auroc"] - 0.5) < 0.02


def test_corruption_bookkeeping_with_the_atd_corruption() -> None:
    from medanomaly.methods.mim_ood.common import random_token_corruption
    from medanomaly.nets.tokens import MaskBank

    used = torch.tensor([1, 3, 4, 7, 9])
    bank = MaskBank((4, 4), 32, np.random.default_rng(0), "uniform", 0.1, 0.5)
    tokens = used[torch.from_numpy(np.random.default_rng(2).integers(0, 5, (6, 16)))]
    out, mask, src = cc.corrupt_healthy_tokens(tokens, random_token_corruption(bank, used), np.random.default_rng(3), 3)
    assert out.shape == mask.shape == (18, 16) and mask.dtype == torch.bool
    assert src.tolist() == [i for i in range(6) for _ in range(3)]
    assert mask.any() and (~mask).any()
    assert torch.equal(out != tokens[src], mask)  # every recorded position changed, nothing else did
    assert torch.isin(out, used).all()
    # the same rng gives the same corruption; draws of one row differ
    out2, mask2, _ = cc.corrupt_healthy_tokens(tokens, random_token_corruption(bank, used), np.random.default_rng(3), 3)
    assert torch.equal(out, out2) and torch.equal(mask, mask2)
    with pytest.raises(ValueError):
        cc.corrupt_healthy_tokens(tokens, random_token_corruption(bank, used), np.random.default_rng(3), 0)


def test_row_order_of_the_bookkeeping() -> None:
    def corrupt(y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.zeros_like(y, dtype=torch.bool)
        m[:, 0] = True
        return torch.where(m, y + 100, y), m

    tokens = torch.arange(6).view(2, 3)
    out, mask, src = cc.corrupt_healthy_tokens(tokens, corrupt, np.random.default_rng(0), 2)
    assert out.tolist() == [[100, 1, 2], [100, 1, 2], [103, 4, 5], [103, 4, 5]]
    assert src.tolist() == [0, 0, 1, 1] and mask[:, 0].all() and not mask[:, 1:].any()


def test_token_and_patch_helpers() -> None:
    m = np.array([[[True, False], [False, True]]])
    px = cc.tokens_to_pixels(m, 2)
    assert px.shape == (1, 4, 4)
    assert px[0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert np.array_equal(cc.patch_fraction(px, 2), m.astype(float))
    frac = cc.patch_fraction(np.array([[[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]], bool), 2)
    assert frac[0].tolist() == [[0.75, 0.0], [0.0, 0.25]]
    with pytest.raises(ValueError):
        cc.patch_fraction(np.zeros((1, 5, 4), bool), 2)
    v = np.arange(16, dtype=float).reshape(1, 4, 4)
    w = np.zeros((1, 4, 4), bool)
    w[0, 0, 0] = w[0, 1, 1] = True  # patch (0, 0): values 0 and 5
    w[0, 2:, 2:] = True  # patch (1, 1): 10, 11, 14, 15
    pm = cc.patch_means(v, w, 2)
    assert pm[0, 0, 0] == 2.5 and pm[0, 1, 1] == 12.5
    assert np.isnan(pm[0, 0, 1]) and np.isnan(pm[0, 1, 0])
    assert cc.masked_mean(v, w) == pytest.approx(np.mean([0, 5, 10, 11, 14, 15]))
    assert math.isnan(cc.masked_mean(v, np.zeros_like(w)))
    vals = np.array([[[0.9, 0.8, 0.1, 0.7]]])
    share = cc.top_share(vals, np.ones((1, 1, 4), bool), np.array([[[1, 0, 0, 1]]], bool), np.array([[[0, 1, 1, 0]]], bool))
    assert share == {"in_mask": 0.5, "in_band": 0.5}  # the top 2 of 4 are pixels 0 and 1
    e = cc.erode(np.ones((1, 6, 6), bool), 1)
    assert e[0].sum() == 16 and not e[0, 0].any() and e[0, 1:5, 1:5].all()


def test_patch_groups_on_a_constructed_case() -> None:
    p = 4
    fg = np.ones((1, 8, 8), bool)
    fg[0, :, 6:] = False  # the right column of patches is half foreground (kept), ...
    fg[0, 4:, 4:] = False  # ... the bottom-right patch has no foreground (dropped)
    healthy = {"fg": fg, "value": np.full((1, 8, 8), 1.0)}
    mask = np.zeros((1, 8, 8), bool)
    mask[0, :4, :4] = True  # patch (0, 0): all tumour
    mask[0, 4:6, :4] = True  # patch (1, 0): exactly half tumour -> partial (tumour needs > 50 %)
    val = np.full((1, 8, 8), 2.0)
    val[0, :4, :4] = 6.0
    tumour = {"fg": fg, "mask": mask, "value": val}
    g = cc.patch_groups(healthy, tumour, p)
    assert (g["n_healthy"], g["n_non_tumour"], g["n_partial"], g["n_tumour"]) == (3, 1, 1, 1)
    assert g["healthy_mean"] == 1.0 and g["non_tumour_mean"] == 2.0 and g["tumour_mean"] == 6.0
    assert g["ratio_tumour_healthy"] == 6.0 and g["ratio_tumour_non_tumour"] == 3.0
    assert g["auroc_tumour_vs_healthy"] == 1.0 and g["auroc_tumour_vs_non_tumour"] == 1.0
    # a tumour patch with a *smaller* value than the healthy ones: AUROC 0
    tumour["value"] = np.where(mask, 0.5, 2.0)
    assert cc.patch_groups(healthy, tumour, p)["auroc_tumour_vs_healthy"] == 0.0


# -- the whole script on tiny untrained models ------------------------------------------------------------------
def _slices(n: int, tumour: bool, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    fg = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 13**2).expand(n, 1, 32, 32).clone()
    img = torch.where(fg, 0.5 + 0.05 * torch.randn(n, 1, 32, 32, generator=g), torch.zeros(()))
    mask = torch.zeros_like(fg)
    if tumour:
        mask[:, :, 8:16, 8:16] = True  # a full 8x8 MAE patch
        img = torch.where(mask, torch.full_like(img, 0.9), img)
    return {"image": img.float(), "fg": fg, "mask": mask & fg}


@pytest.fixture(scope="module")
def tiny_dets() -> dict[str, Any]:
    from medanomaly.methods import get_method_class
    from medanomaly.nets.mae import MAE

    torch.manual_seed(0)
    mim = get_method_class("mim-ood")(**get_method_class("mim-ood").config_set("test"))
    mim._build((1, 32, 32))
    mim.token_used = torch.ones(16, dtype=torch.bool)
    for m in mim._modules().values():
        m.eval()
    with torch.no_grad():
        s = mim._score_batch(mim.tokenizer.encode(_slices(4, False, 0)["image"]).view(4, -1))
    mim.threshold = float(s.median())  # some tokens get re-sampled
    mae = get_method_class("mae")(**get_method_class("mae").config_set("test"))
    mae.mae = MAE(**mae.params["mae"]).eval()
    mim.is_fitted = mae.is_fitted = True  # untrained weights stand in for a loaded run
    return {"mim-ood": mim, "mae": mae}


def test_restoration_maps_replicate_predict(tiny_dets: dict[str, Any]) -> None:
    det = tiny_dets["mim-ood"]
    x = _slices(5, True, 3)
    with torch.no_grad():
        ref = det.predict(x["image"], x["fg"]).pixel_scores.numpy()
    maps, res = cc.restoration_maps(det, x["image"], x["fg"])
    assert np.array_equal(maps, ref) and res.any()
    none, res0 = cc.restoration_maps(det, x["image"], x["fg"], threshold=math.inf)
    assert not res0.any()
    oracle = torch.zeros(5, 64, dtype=torch.bool)
    oracle[:, [9, 10, 17]] = True
    _, reso = cc.restoration_maps(det, x["image"], x["fg"], oracle=oracle)
    assert reso.shape == (5, 2, 64) and np.array_equal(reso, oracle.unsqueeze(1).expand(5, 2, 64).numpy())


def test_whole_script_on_tiny_models(tiny_dets: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medanomaly.app.predict as predict_mod

    monkeypatch.setattr(predict_mod, "load_run", lambda run: (tiny_dets[run], {"method": run, "data": {}}))
    monkeypatch.setattr(cc, "pick_slices", lambda cfg, n, seed, test_data=None: (
        _slices(n, False, seed), _slices(n, True, seed + 1), {"n_healthy": n, "n_tumour": n}))
    res = cc.main(["--mim", "mim-ood", "--mae", "mae", "--n", "6", "--draws", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "controlled_cases.json").read_text())
    assert saved["command"]["n"] == 6 and len(saved["mim"]) == 1 and len(saved["mae"]) == 1
    m = res["mim"][0]
    assert m["atd"]["changed_equals_mask"] and m["atd"]["n_images"] == 12
    assert m["mvtm"]["map"]["replicated_map_max_abs_diff"] == 0.0
    v = m["tumour"]["map_variants"]
    assert v["run_threshold"]["max_abs_diff_to_predict"] == 0.0
    assert v["no_resampling"]["tumour_tokens_resampled"] == 0.0
    assert v["oracle_tumour_tokens"]["tumour_tokens_resampled"] == 1.0
    assert v["oracle_tumour_tokens"]["other_fg_tokens_resampled"] == 0.0
    assert 0.0 <= m["mvtm"]["acc_argmax_fg"] <= m["mvtm"]["acc_top5_fg"] <= 1.0
    e = res["mae"][0]["patches_error"]
    assert e["n_tumour"] == 6 and e["n_healthy"] > 0  # one full tumour patch per slice
    md = (tmp_path / "controlled_cases.md").read_text()
    for head in ("### 1. ATD", "### 1b.", "### 2. MVTM", "#### 2c.", "#### 2d.", "### 3. MAE", "### 4. The VQ-VAE"):
        assert head in md
    # every table row has as many cells as its header
    for block in md.split("\n\n"):
        rows = [r for r in block.splitlines() if r.startswith("|")]
        if rows:
            assert len({r.count("|") for r in rows}) == 1, block


def test_codebook_redundancy_finds_duplicate_codes(tiny_dets: dict[str, Any]) -> None:
    import copy

    det = copy.deepcopy(tiny_dets["mim-ood"])
    emb = det.tokenizer.vqvae.quantizer.quantizer.embedding.weight
    with torch.no_grad():
        emb.mul_(50.0)  # far apart codes
        base = cc.codebook_redundancy(det)
        emb[1] = emb[0]  # two codes that decode identically
        dup = cc.codebook_redundancy(det)
    assert base["codes_within_0.01"] < dup["codes_within_0.01"]
    assert dup["codes_within_0.01"] >= 2 / 16


def test_pick_slices_takes_tumours_from_another_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    """--test-data: healthy slices from the run's own val split, tumour slices from the given dataset spec (the
    domain-shift test of a T1 run); healthy slices never come from it, and it is recorded."""
    calls: list[tuple[str, bool, str | None]] = []

    def fake(cfg: dict, split: str, normal_only: bool, data: str | None = None) -> list[dict]:
        calls.append((split, normal_only, data))
        rng = np.random.default_rng(len(calls))
        tumour = split == "test"
        return [{"image": rng.random((1, 8, 8), dtype=np.float32), "foreground": np.ones((1, 8, 8), bool),
                 "mask": np.full((1, 8, 8), tumour), "label": int(tumour)} for _ in range(5)]

    monkeypatch.setattr(cc, "open_run_split", fake)
    h, t, rec = cc.pick_slices({"data": {"name": "ixi"}}, 3, 0, "brats:modality=t1")
    assert calls == [("val", True, None), ("test", False, "brats:modality=t1")]
    assert not h["mask"].any() and t["mask"].all() and rec["test_data"] == "brats:modality=t1"
    calls.clear()
    assert cc.pick_slices({"data": {"name": "ixi"}}, 3, 0)[2]["test_data"] == "ixi"
    assert calls[1] == ("test", False, None)


def test_cli_passes_test_data_and_bad_spec_is_one_error(tiny_dets: dict[str, Any], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """--test-data reaches the slice picker of every run; a spec that does not load is one argparse error naming
    the run, not a traceback."""
    import medanomaly.app.predict as predict_mod

    monkeypatch.setattr(predict_mod, "load_run", lambda run: (tiny_dets[run], {"method": run, "data": {}}))
    seen: list[str | None] = []

    def pick(cfg: dict, n: int, seed: int, test_data: str | None = None) -> tuple:
        seen.append(test_data)
        if test_data == "bad-spec":
            raise ValueError("unknown dataset 'bad-spec'")
        return _slices(n, False, seed), _slices(n, True, seed + 1), {"n_healthy": n, "n_tumour": n}

    monkeypatch.setattr(cc, "pick_slices", pick)
    res = cc.main(["--mae", "mae", "--n", "4", "--test-data", "other:modality=t1", "--out", str(tmp_path)])
    assert seen == ["other:modality=t1"] and res["command"]["test_data"] == "other:modality=t1"
    with pytest.raises(SystemExit):
        cc.main(["--mae", "mae", "--n", "4", "--test-data", "bad-spec", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert "mae: unknown dataset 'bad-spec'" in err and "Traceback" not in err
