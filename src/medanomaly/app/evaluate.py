"""``medanomaly evaluate``: predict a whole split, compute the one evaluation protocol, write metrics and a report.

Pixel metrics are over the foreground pixels of the images whose lesion mask is known; sample metrics over the
images with a known label. A metric that cannot be computed is ``NaN`` with a ``<metric>_undefined`` entry saying
why (never a bare null).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.app.datasets import data_name, describe_dataset, open_dataset, preprocessing_record
from medanomaly.app.errors import Echo, PipelineError, check_writable_folder, make_echo
from medanomaly.app.guards import raise_or_warn
from medanomaly.app.predict import iter_predictions, load_run

__all__ = ["describe_device", "evaluate_run"]

_PIXEL_KEYS = ("pixel_ap", "pixel_auroc", "best_dice", "best_threshold")
_SAMPLE_KEYS = ("sample_ap", "sample_auroc")
_CAL_PIXEL_KEYS = ("calibrated_dice", "calibrated_precision", "calibrated_recall", "calibrated_fpr")
_CAL_SAMPLE_KEYS = ("calibrated_accuracy", "calibrated_sensitivity", "calibrated_specificity")
#: the calibrated rule ``evaluate`` reports without ``--threshold``
DEFAULT_THRESHOLD = "fpr=0.01,image-fpr=0.05"


def describe_device(det: Any = None) -> str:
    """The device predictions run on, in words (with the thread count on CPU)."""
    import torch

    from medanomaly.training import get_device

    dev = getattr(det, "device", None)
    if dev is None and isinstance(getattr(det, "params", None), dict):
        dev = det.params.get("device")
    d = get_device(str(dev) if dev is not None else None)
    if d.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(d)})"
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'' if n == 1 else 's'})"


def _num(x: Any) -> Any:
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _check_data_matches_run(desc: dict[str, Any], run_data: dict[str, Any] | None, what: str) -> None:
    if not run_data:
        return
    want = run_data.get("image_shape")
    if want is not None and list(desc["image_shape"]) != list(want):
        raise PipelineError(
            f"{what} gives images of shape {tuple(desc['image_shape'])}, the run was trained on {tuple(want)} "
            f"(preset {run_data.get('preset')}, size {run_data.get('size')})"
        )
    if run_data.get("channels") is not None and desc["channels"] != run_data["channels"]:
        raise PipelineError(f"{what} has {desc['channels']} channel(s), the run was trained on {run_data['channels']}")


def _undefined(metrics: dict[str, Any], keys: tuple[str, ...], reason: str) -> None:
    for k in keys:
        if not isinstance(metrics.get(k), int | float) or not math.isfinite(metrics[k]):
            metrics[k] = float("nan")
            metrics[f"{k}_undefined"] = reason
    warnings.warn(f"{', '.join(keys)} undefined: {reason}", stacklevel=3)


def evaluate_run(
    run: str | Path,
    data: Any = None,
    out: str | Path | None = None,
    *,
    split: str = "test",
    batch_size: int = 16,
    force: bool = False,
    quiet: bool = False,
    echo: Echo | None = None,
    report: bool = True,
    threshold: str | None = None,
    preset: str | None = None,
    foreground: str | None = None,
    lesion_labels: Any = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Predict a whole split of ``data`` (default: the run's own data) and write ``metrics.json`` + ``report.html``.

    ``seconds_per_image`` times ``predict`` only (no data loading). Besides the best-achievable DICE, the
    ``calibrated_*`` metrics at the run's healthy-calibrated ``threshold`` (default :data:`DEFAULT_THRESHOLD`; see
    :func:`medanomaly.evaluation.calibration.parse_threshold`): DICE/precision/recall/FPR of ``score > t`` over the
    same foreground pixels, and the image decision's accuracy/sensitivity/specificity. A run without calibration
    gets them as NaN with the reason (an explicit calibrated ``threshold`` is an error then).

    ``preset``/``foreground`` override the run's recorded preset (:func:`~medanomaly.app.datasets.open_dataset`);
    ``lesion_labels`` picks the lesion labels of multi-class masks. The guards of :mod:`medanomaly.app.guards` run
    on every evaluation: their warnings go to ``metrics["warnings"]`` (numbers in ``metrics["guards"]``) and, with
    ``strict``, become one error before anything is written. ``metrics["preprocessing"]`` records what was applied.
    """
    import torch
    from tqdm.auto import tqdm

    from medanomaly.data.dataset import collate_samples
    from medanomaly.evaluation.metrics import pixel_metrics, sample_metrics
    from medanomaly.run_folder import RunFolder

    say = make_echo(quiet, echo)
    det, cfg = load_run(run)
    run_data = cfg.get("data") or {}
    if data is None:
        if not run_data.get("name"):
            raise PipelineError(f"{run} does not record its data; pass --data")
        data = run_data["name"]
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:  # checked before any prediction: a bad --out fails at once
        check_writable_folder(out_dir)
        if (out_dir / "metrics.json").exists() and not force:
            raise PipelineError(f"{out_dir / 'metrics.json'} already exists; use --force to overwrite or choose another --out")
    if batch_size < 1:
        raise PipelineError(f"batch size must be >= 1, got {batch_size}")
    thr = _calibrated_threshold(run, threshold)

    try:
        ds = open_dataset(data, split, preset=run_data.get("preset"), size=run_data.get("size"),
                          preset_config=run_data.get("preset_config"), preset_override=preset, foreground=foreground,
                          lesion_labels=lesion_labels)
    except (KeyError, TypeError) as e:  # a preset record that does not fit the preset: name the run
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise PipelineError(f"{run}: its recorded preset does not load ({msg})") from e
    except ValueError as e:
        if run_data.get("preset_config") and "preset" in str(e):
            raise PipelineError(f"{run}: its recorded preset does not load ({e})") from e
        raise
    desc = describe_dataset(ds)
    _check_data_matches_run(desc, run_data, f"{data_name(data)} ({split})")
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_samples, num_workers=0)

    scores, masks, fgs, images = [], [], [], []
    img_scores, labels, has_mask, case_ids, slice_idx = [], [], [], [], []
    # the method's healthy-looking images (AnomalyResult.extras["restoration"]), for the report only
    restorations: list[np.ndarray] | None = [] if report and out is not None else None
    rest_bytes, rest_note = 0, ""
    predict_seconds, n_batches = 0.0, 0
    t_wall = time.perf_counter()
    with tqdm(total=len(ds), desc=f"evaluate {cfg['method']}", disable=quiet, dynamic_ncols=True, leave=False) as bar:
        for batch, res, secs in iter_predictions(det, loader):
            predict_seconds += secs
            n_batches += 1
            ps = res.pixel_scores.detach().float().cpu()
            scores.append(ps.numpy().astype(np.float32))
            if restorations is not None:
                r = res.extras.get("restoration")
                r = r.detach().float().cpu() if isinstance(r, torch.Tensor) else None
                if r is not None and r.ndim == ps.ndim + 1:
                    r = r[:, 0]  # (B, C, *S) -> channel 0
                if r is None:  # a method without one (intensity, multitask): nothing to note
                    restorations = None
                elif tuple(r.shape) != tuple(ps.shape):
                    rest_note = f"extras['restoration'] has shape {tuple(r.shape)}, not the maps' {tuple(ps.shape)}"
                    restorations = None
                elif rest_bytes + r.numel() * 4 > 1 << 30:
                    rest_note = "restorations not kept: over 1 GB for this split"
                    restorations = None
                else:
                    restorations.append(r.numpy().astype(np.float32))
                    rest_bytes += r.numel() * 4
            masks.append(batch["mask"][:, 0].numpy())
            fgs.append(batch["foreground"][:, 0].numpy())
            images.append(batch["image"].numpy().astype(np.float32))
            img_scores.append(res.image_scores.detach().float().cpu().numpy())
            labels.append(batch["label"].numpy())
            has_mask.append(batch["has_mask"].numpy())
            case_ids += list(batch["case_id"])
            slice_idx += batch["slice_index"].tolist()
            bar.update(len(batch["case_id"]))
    wall = time.perf_counter() - t_wall
    S, M, F = np.concatenate(scores), np.concatenate(masks), np.concatenate(fgs)
    IS, L, HM = np.concatenate(img_scores), np.concatenate(labels), np.concatenate(has_mask)
    n = len(IS)

    prep = preprocessing_record(ds)
    used = prep.get("preset") or run_data.get("preset_config")
    guards, warn_msgs = _guards(prep, run_data, S, M, F, HM, np.concatenate(images), f"{data_name(data)} ({split})")
    raise_or_warn(warn_msgs, strict)
    metrics: dict[str, Any] = {
        "method": cfg["method"],
        "run": str(Path(run)),
        "data": data_name(data),
        "split": split,
        "preset": (used or {}).get("name") or run_data.get("preset"),
        "preset_config": used,
        "preprocessing": prep,
        "guards": guards,
        "warnings": warn_msgs,
        "n_images": int(n),
        "n_with_mask": int(HM.sum()),
        "n_abnormal": int((L == 1).sum()),
        "n_normal": int((L == 0).sum()),
    }
    if HM.any():
        sel = HM.astype(bool)
        pm = pixel_metrics(S[sel], M[sel], foreground=F[sel], case_ids=[c for c, k in zip(case_ids, sel, strict=True) if k])
        metrics.update(pixel_ap=_num(pm.get("ap")), pixel_auroc=_num(pm.get("auroc")), best_dice=_num(pm.get("best_dice")),
                       best_threshold=_num(pm.get("best_threshold")))
        for k, v in pm.items():
            if k not in ("ap", "auroc", "best_dice", "best_threshold") and isinstance(v, int | float | np.number):
                metrics[f"pixel_{k}"] = _num(v)
        if not all(isinstance(metrics[k], int | float) and math.isfinite(metrics[k]) for k in _PIXEL_KEYS[:3]):
            _undefined(metrics, _PIXEL_KEYS, "no lesion voxel in the foreground of the images with a mask"
                       if not (M[sel] & F[sel]).any() else "the metric is undefined for these maps")
    else:
        _undefined(metrics, _PIXEL_KEYS, "no image of this split has a lesion mask")
    known = L >= 0
    classes = set(L[known].tolist())
    if known.any() and len(classes) == 2:
        sm = sample_metrics(IS[known], L[known])
        metrics["sample_ap"], metrics["sample_auroc"] = _num(sm.get("ap")), _num(sm.get("auroc"))
    elif not known.any():
        _undefined(metrics, _SAMPLE_KEYS, "no image labels")
    else:
        only = "abnormal" if classes == {1} else "normal"
        _undefined(metrics, _SAMPLE_KEYS, f"all labelled images are {only}: sample AP/AUROC need both classes")
    _calibrated_metrics(metrics, thr, S, M, F, HM, IS, L)
    train_seconds, train_seconds_are = RunFolder(run).train_seconds()
    metrics.update(
        {
            "seconds_per_image": predict_seconds / max(n, 1),
            "seconds_per_batch": predict_seconds / max(n_batches, 1),
            "batch_size": batch_size,
            "predict_seconds": predict_seconds,
            "wall_seconds": wall,
            "device": describe_device(det),
            "train_seconds": train_seconds,
            "train_seconds_are": train_seconds_are,
            "pixel_metrics_over": "foreground pixels of images with a known mask",
        }
    )
    if out_dir is not None:
        from medanomaly.training.atomic import atomic_write_text

        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1))
        per_image = [
            {"case_id": c, "slice_index": s, "label": int(lab), "image_score": float(v)}
            for c, s, lab, v in zip(case_ids, slice_idx, L, IS, strict=True)
        ]
        atomic_write_text(out_dir / "image_scores.json", json.dumps(per_image))
        if report:
            settings = {
                "method": cfg["method"],
                "params": json.dumps(cfg.get("params", {}), sort_keys=True),
                "run": str(Path(run).resolve()),
                "data": metrics["data"],
                "split": split,
                "preset": json.dumps(used or run_data.get("preset")),
                "preprocessing": _describe_prep(prep),
                "dropped_slices": json.dumps(prep.get("dropped_by_case") or {}) if "slices" in prep else "none (no slice filter)",
                "trained_on": f"{run_data.get('name')} / {run_data.get('split')} ({run_data.get('n_train')} healthy images)",
                "seed": (cfg.get("train") or {}).get("seed"),
                "batch_size": batch_size,
            }
            if rest_note:
                settings["restorations"] = f"not shown: {rest_note}"
            if warn_msgs:
                settings["warnings"] = " | ".join(warn_msgs)
            train_log = RunFolder(run).read_train_log() or None
            path = _write_report(out_dir, metrics, settings, images=np.concatenate(images), scores=S, masks=M,
                                 foreground=F, image_scores=IS, labels=L, has_mask=HM, case_ids=case_ids,
                                 restorations=np.concatenate(restorations) if restorations else None, train_log=train_log)
            metrics["report"] = str(path)
            atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1))
        say(f"metrics: {out_dir / 'metrics.json'}" + (f"\nreport:  {metrics['report']}" if metrics.get("report") else ""))
    return metrics


def _guards(prep: dict[str, Any], run_data: dict[str, Any], S: np.ndarray, M: np.ndarray, F: np.ndarray, HM: np.ndarray,
            images: np.ndarray, what: str) -> tuple[dict[str, Any], list[str]]:
    """The numbers the guards read and their warnings (lesion masks are only counted, after prediction)."""
    from medanomaly.app.guards import (
        MIN_INTENSITY_VALUES,
        coverage_guard,
        dropped_guard,
        intensity_guard,
        intensity_shift,
        intensity_stats,
        lesion_guard,
    )

    sel = HM.astype(bool)
    Mb, Fb = M[sel].astype(bool), F[sel].astype(bool)
    lost = int(prep.get("lesion_voxels_dropped", 0)) + int(prep.get("lesion_voxels_cropped", 0))
    outside = int((Mb & ~Fb).sum()) + lost
    total = int(Mb.sum()) + lost
    fg_vals = images[:, 0][F.astype(bool)] if images.shape[2:] == F.shape[1:] else images[:, 0].ravel()
    test_stats = intensity_stats(fg_vals)
    shift = intensity_shift(test_stats, run_data.get("intensity")) if fg_vals.size >= MIN_INTENSITY_VALUES else None
    g: dict[str, Any] = {
        "head_coverage_min": prep.get("head_coverage_min"),
        "lesion_voxels": total,
        "lesion_voxels_outside": outside,
        "lesion_outside_fraction": round(outside / total, 5) if total else None,
        "slices": prep.get("slices"),
        "dropped_slices": prep.get("dropped_slices"),
        "dropped_fraction": round(prep["dropped_slices"] / prep["slices"], 4) if prep.get("slices") else None,
        "intensity": test_stats,
        "train_intensity": run_data.get("intensity"),
        "intensity_shift": shift,
    }
    if run_data.get("intensity") is None:
        g["intensity_note"] = "the run records no training intensity statistics (trained before they were recorded)"
    elif fg_vals.size < MIN_INTENSITY_VALUES:
        g["intensity_note"] = f"not compared: under {MIN_INTENSITY_VALUES} foreground values"
    msgs = coverage_guard(prep, what) + lesion_guard(outside, total, what, lost) + dropped_guard(prep, what)
    msgs += intensity_guard(shift, what)
    return g, msgs


def _describe_prep(prep: dict[str, Any]) -> str:
    """One line for the report's settings table: the foreground, skull-stripped detection, dropped slices."""
    parts = [f"foreground {prep.get('foreground')} ({prep.get('foreground_source')})"]
    if "skull_stripped_cases" in prep:
        parts.append(f"skull-stripped input detected in {prep['skull_stripped_cases']} of {prep.get('cases')} cases")
    if prep.get("head_coverage_min") is not None:
        parts.append(f"foreground covers >= {100 * prep['head_coverage_min']:.0f} % of the head")
    if prep.get("slices"):
        parts.append(f"{prep.get('dropped_slices')} of {prep['slices']} slices dropped")
    return "; ".join(parts)


def _calibrated_threshold(run: str | Path, threshold: str | None) -> dict[str, Any] | None:
    """The numbers of the calibrated rule (None: the default rule on a run without calibration)."""
    from medanomaly.evaluation.calibration import parse_threshold, resolve_threshold
    from medanomaly.run_folder import RunFolder

    try:
        rule = parse_threshold(threshold if threshold is not None else DEFAULT_THRESHOLD)
        calibration = RunFolder(run).read_calibration()
        if calibration is None and threshold is None:
            return None
        return resolve_threshold(rule, calibration, where=str(run))
    except ValueError as e:
        raise PipelineError(str(e)) from None


def _calibrated_metrics(metrics: dict[str, Any], thr: dict[str, Any] | None, S: np.ndarray, M: np.ndarray, F: np.ndarray,
                        HM: np.ndarray, IS: np.ndarray, L: np.ndarray) -> None:
    """``calibrated_*``: the pixel metrics at the voxel threshold (images with a mask, foreground pixels) and the
    image decision at the image threshold (labelled images)."""
    from medanomaly.evaluation.calibration import decision_metrics, voxel_metrics_at

    if thr is None:
        _undefined(metrics, ("calibrated_threshold", *_CAL_PIXEL_KEYS, "calibrated_image_threshold", *_CAL_SAMPLE_KEYS),
                   "the run has no calibration (trained before calibration was recorded): re-train it or pass "
                   "--threshold with a number")
        return
    metrics["calibrated_rule"], metrics["calibrated_image_rule"] = thr["voxel_rule"], thr["image_rule"]
    t, it = thr["voxel_threshold"], thr["image_threshold"]
    if t is not None:
        metrics["calibrated_threshold"] = float(t)
        sel = HM.astype(bool)
        if sel.any():
            vm = voxel_metrics_at(S[sel], M[sel], F[sel], t)
            for k in _CAL_PIXEL_KEYS:
                metrics[k] = vm[k.removeprefix("calibrated_")]
            metrics["calibrated_voxels_above"] = vm["tp"] + vm["fp"]
            bad = tuple(k for k in _CAL_PIXEL_KEYS if not math.isfinite(metrics[k]))
            if bad:
                _undefined(metrics, bad, "0/0 at the calibrated threshold (no lesion voxel and no voxel above it?)")
        else:
            _undefined(metrics, _CAL_PIXEL_KEYS, "no image of this split has a lesion mask")
    if it is not None:
        metrics["calibrated_image_threshold"] = float(it)
        known = L >= 0
        if known.any():
            dm = decision_metrics(IS[known], L[known], it)
            for k in _CAL_SAMPLE_KEYS:
                metrics[k] = dm[k.removeprefix("calibrated_")]
            bad = tuple(k for k in _CAL_SAMPLE_KEYS if not math.isfinite(metrics[k]))
            if bad:
                _undefined(metrics, bad, "the labelled images hold only one class")
        else:
            _undefined(metrics, _CAL_SAMPLE_KEYS, "no image labels")


def _write_report(out_dir: Path, metrics: dict[str, Any], settings: dict[str, Any], **arrays: Any) -> Path:
    """The HTML page (metric table, PR/ROC curves, best/median/worst cases with restorations, healthy images,
    training curves). Without any lesion mask the maps still go in (healthy grid)."""
    from medanomaly.evaluation.html import write_report

    has_mask = arrays.pop("has_mask")
    sel = has_mask.astype(bool)
    rest = arrays.get("restorations")
    kw: dict[str, Any] = {"sample_scores": arrays["image_scores"], "sample_labels": arrays["labels"],
                          "train_log": arrays.get("train_log")}
    if sel.any():
        kw.update(scores=arrays["scores"][sel], masks=arrays["masks"][sel], images=arrays["images"][sel],
                  foreground=arrays["foreground"][sel], case_ids=[c for c, k in zip(arrays["case_ids"], sel, strict=True) if k],
                  restorations=rest[sel] if rest is not None else None)
    else:
        kw.update(scores=arrays["scores"], images=arrays["images"], foreground=arrays["foreground"],
                  case_ids=list(arrays["case_ids"]), restorations=rest)
    from medanomaly.run_folder import RunFolder

    t = metrics.get("calibrated_threshold")  # the viewer cases: healthy colour scale, mask at the calibrated threshold
    kw.update(calibration=RunFolder(metrics["run"]).read_calibration(), method=metrics.get("method"),
              calibrated_threshold=float(t) if isinstance(t, int | float) and math.isfinite(t) else None)
    title = f"medanomaly: {metrics.get('method')} on {metrics.get('data')} ({metrics.get('split')})"
    return Path(write_report(out_dir, metrics, title=title, settings=settings, **kw))
