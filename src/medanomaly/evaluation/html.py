"""The evaluation report folder: ``metrics.json``, ``settings.json``, the figures and one self-contained HTML page.

A report folder written by :func:`write_report` holds

- ``metrics.json``    the metrics as given (nan written as null) and ``settings.json`` the settings
- ``curves_pixel.png``  pixel-level precision-recall and ROC curves (the best-DICE point marked)
- ``curves_sample.png`` image-level precision-recall and ROC curves (when sample scores and labels are given)
- ``cases.png``       best, median and worst cases by per-case DICE at the best threshold: image, anomaly map,
  and an overlay with the lesion contour (green) and the thresholded prediction (red), with the method's
  restoration (the healthy-looking image it compares against) between image and map when given; 3D volumes show the
  slice along the last axis (axial for RAS volumes) with the largest lesion area, or the highest score without a lesion
- ``healthy.png``     normal images (label 0) with the 3 highest image scores (false-positive candidates) and the
  median one: image with the thresholded prediction, restoration (when given), anomaly map on the lesion grid's scale
- ``training_curves.png`` the run's training log: one panel per metric kind (train loss, each validation metric, other
  logged values, learning rate) against the step, one line per stage/model/member
- ``cases/``          the picked cases for ``medanomaly view``: ``<id>.npz`` (image, map, lesion, foreground),
  ``<id>.png`` (the full-resolution clinician overlay of :mod:`medanomaly.evaluation.overlays`), ``view.json``
- ``report.html``     metric and settings tables and the figures, embedded as base64 (so the page alone is
  enough) and linked to the PNG files beside it.

The figures are drawn by :mod:`medanomaly.evaluation.figures`; comparison tables are
:func:`medanomaly.evaluation.table.write_comparison_table`.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.evaluation._checks import check_binary, check_scores, squeeze_channel, to_numpy
from medanomaly.evaluation._output import REPORT_CSS, atomic_write, format_value, json_safe
from medanomaly.evaluation.figures import (
    log_panels,
    pick_cases,
    pick_healthy,
    plot_cases,
    plot_curves,
    plot_train_log,
    save_fig,
    score_range,
)
from medanomaly.evaluation.metrics import per_case_dice, pixel_curves, pixel_metrics, sample_curves, sample_metrics

__all__ = ["MAIN_KEYS", "write_report"]

#: metric keys shown first in the HTML table, in this order
MAIN_KEYS = (
    "pixel_ap", "ap", "pixel_auroc", "auroc", "best_dice", "best_threshold", "dice_per_case_mean", "dice_per_case_std",
    "sample_ap", "sample_auroc", "seconds_per_image", "seconds_per_batch", "device",
)


def _package_version() -> str:
    try:
        from medanomaly import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def _img_tag(path: Path, alt: str, embed: bool) -> str:
    src = path.name
    if embed:
        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><a href="{html.escape(path.name)}"><img src="{src}" alt="{html.escape(alt)}"></a>' \
           f"<figcaption>{html.escape(alt)}</figcaption></figure>"


def _viewer_section(out: Path, cases: list[dict[str, Any]], embed: bool) -> str:
    """The cases at full size, each with the `medanomaly view` command that opens it."""
    import shlex

    rows = ["<h2>Cases, full size, in the viewer</h2>",
            "<p class='note'>Each case at every pixel of the grid the metrics were computed on (the preprocessed "
            "image; <code>medanomaly predict</code> gives maps and overlays at each input's own resolution). Colours "
            "on the run's healthy-validation scale (comparable between cases); cyan dashed: mask at the calibrated "
            "threshold; green: lesion. Open a case with the command under it (a local page with a threshold slider "
            "and slice scrolling).</p>"]
    for c in cases:
        png = Path(c["png"])
        src = f"cases/{png.name}"
        if embed:
            src = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
        cmd = f"medanomaly view {shlex.quote(str(out))} --case {shlex.quote(c['id'])}"
        rows.append(f"<figure><a href='cases/{html.escape(png.name)}'><img src='{src}' alt='{html.escape(c['title'])}' "
                    f"style='max-width:100%'></a><figcaption>{html.escape(c['title'])}<br><code>{html.escape(cmd)}</code>"
                    "</figcaption></figure>")
    return "\n".join(rows)


def _table(d: dict[str, Any], first: Sequence[str] = ()) -> str:
    keys = [k for k in first if k in d] + [k for k in d if k not in first]
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(format_value(d[k]))}</td></tr>" for k in keys)
    return f"<table>{rows}</table>"


def _check_restorations(restorations: Any, shape: tuple[int, ...]) -> np.ndarray:
    """(N, *S) float32 from (N, *S) or (N, C, *S) (channel 0), checked against the maps' shape ``shape``."""
    r = given = to_numpy(restorations, "restorations")
    if r.ndim == len(shape) + 1 and r.shape[0] == shape[0] and r.shape[1] >= 1:
        r = r[:, 0]
    if tuple(r.shape) != tuple(shape):
        raise ValueError(f"restorations shape {tuple(given.shape)} does not match scores shape {tuple(shape)} "
                         "(expected (N, *spatial) or (N, C, *spatial) at the input size)")
    r = check_scores(r, "restorations")
    return r.astype(np.float32, copy=False)


def _check_train_log(train_log: Any) -> list[Any]:
    if isinstance(train_log, (str, bytes, dict)) or not isinstance(train_log, Sequence):
        raise ValueError(f"train_log must be a list of dict records (the run's train_log.jsonl), got {type(train_log).__name__}")
    return list(train_log)


def write_report(
    out_dir: str | Path,
    metrics: dict[str, Any],
    scores: Any = None,
    masks: Any = None,
    images: Any = None,
    foreground: Any = None,
    case_ids: Sequence[Any] | None = None,
    sample_scores: Any = None,
    sample_labels: Any = None,
    title: str = "medanomaly evaluation",
    settings: dict[str, Any] | None = None,
    embed_images: bool = True,
    max_curve_voxels: int = 20_000_000,
    seed: int = 0,
    restorations: Any = None,
    train_log: Sequence[dict[str, Any]] | None = None,
    calibration: dict[str, Any] | None = None,
    calibrated_threshold: float | None = None,
    method: str | None = None,
) -> Path:
    """Write the report folder (module docstring) and return the path of ``report.html``.

    ``metrics`` is written as given (the caller chooses the keys, e.g. ``pixel_ap``, ``best_dice``,
    ``seconds_per_image``, ``device``). ``scores``/``masks``/``foreground`` (N, *spatial) and ``images``
    (N, C, *spatial) or (N, *spatial) drive the pixel curves and the case grid; the best-DICE threshold is read
    from ``metrics["best_threshold"]`` (or ``pixel_best_threshold``) and computed when absent. Per-case DICE for
    the grid is per image. Pixel curves from more than ``max_curve_voxels`` voxels use a random subset (noted
    under the figure); metrics are never subsampled here. ``settings`` (method, config, data, split, device ...)
    is shown in the page and written to ``settings.json``.

    Optional extras: ``restorations`` (N, *spatial) or (N, C, *spatial), the healthy-looking images the method
    compares against (``AnomalyResult.extras["restoration"]``), add a column to the case grids; the healthy-image
    grid is drawn when ``images`` and ``sample_labels`` are given and ``sample_scores``/``sample_labels`` have one
    entry per image (``scores`` without ``masks`` gives that grid alone); ``train_log`` (the run's
    ``train_log.jsonl`` records) gives the training-curve figure. Without them the report is as before.

    With ``images``, the picked cases (best/median/worst, healthy) also go to ``cases/`` for ``medanomaly view``
    (:func:`medanomaly.evaluation.overlays.write_report_cases`) with full-resolution clinician overlays, coloured on the
    run's healthy ``calibration`` scale with the mask at ``calibrated_threshold``; the page links each case to the
    viewer command.
    """
    out = Path(out_dir)
    view_picks: list[tuple[str, int, str]] = []
    view_cases: list[dict[str, Any]] = []
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(settings or {})
    log = _check_train_log(train_log) if train_log is not None else None
    atomic_write(out / "metrics.json", json.dumps(json_safe(metrics), indent=2, sort_keys=False, allow_nan=False) + "\n")
    atomic_write(out / "settings.json", json.dumps(json_safe(settings), indent=2, allow_nan=False) + "\n")
    figures: list[tuple[Path, str]] = []
    notes: list[str] = []

    if scores is not None:
        s = check_scores(squeeze_channel(to_numpy(scores, "scores")), "scores").astype(np.float32)
        if s.ndim not in (3, 4):
            raise ValueError(f"scores must be (N, *spatial) with 2 or 3 spatial dims, got shape {s.shape}")
        m = None
        if masks is not None:
            m = check_binary(squeeze_channel(to_numpy(masks, "masks")), "masks")
            if m.shape != s.shape:
                raise ValueError(f"scores shape {s.shape} does not match masks shape {m.shape}")
        f = None
        if foreground is not None:
            f = check_binary(squeeze_channel(to_numpy(foreground, "foreground")), "foreground")
            if f.shape != s.shape:
                raise ValueError(f"foreground shape {f.shape} does not match scores shape {s.shape}")
        im = None
        if images is not None:
            im = to_numpy(images, "images").astype(np.float32)
            if im.ndim == s.ndim + 1:
                im = im[:, 0]
            if im.shape != s.shape:
                raise ValueError(f"images shape {im.shape} does not match scores shape {s.shape}")
        rest = _check_restorations(restorations, s.shape) if restorations is not None else None
        if rest is not None and im is None:
            notes.append("restorations were given without images: not shown")
            rest = None
        map_range = score_range(s, f)
        thr = metrics.get("best_threshold", metrics.get("pixel_best_threshold"))
        pm = None
        if m is not None and (thr is None or not math.isfinite(float(thr))):
            pm = pixel_metrics(s, m, f, per_case=False)
            thr = pm["best_threshold"]
        thr = float(thr) if thr is not None else float("nan")
        img_scores = None
        if sample_scores is not None:
            img_scores = np.ravel(to_numpy(sample_scores, "sample_scores")).astype(np.float64)
            if img_scores.size != s.shape[0]:
                img_scores = None
        if img_scores is None:
            img_scores = (s if f is None else np.where(f, s, -np.inf)).reshape(len(s), -1).max(1)
        if m is not None:
            # pixel curves (subsampled for very large inputs: only the picture, never the numbers)
            sel_s, sel_m = (s[f], m[f]) if f is not None else (s.ravel(), m.ravel())
            note = ""
            if sel_s.size > max_curve_voxels:
                keep = np.random.default_rng(seed).choice(sel_s.size, max_curve_voxels, replace=False)
                sel_s, sel_m = sel_s[keep], sel_m[keep]
                note = f"curves drawn from a random {max_curve_voxels:,} of the evaluated voxels"
            if sel_m.any():
                cur = pixel_curves(sel_s[None], sel_m[None])
                ap = metrics.get("pixel_ap", metrics.get("ap"))
                au = metrics.get("pixel_auroc", metrics.get("auroc"))
                if ap is None or au is None:
                    pm = pm or pixel_metrics(s, m, f, per_case=False)
                    ap, au = (pm["ap"] if ap is None else ap), (pm["auroc"] if au is None else au)
                pred = sel_s >= thr
                tp = float((pred & sel_m).sum())
                best_pt = (tp / sel_m.sum(), tp / max(pred.sum(), 1))
                fig = plot_curves(cur, "pixel", ap, au, float(sel_m.mean()), best_pt, note)
                figures.append((out / "curves_pixel.png", "Pixel level: precision-recall and ROC"))
                save_fig(fig, figures[-1][0])
            del sel_s, sel_m
            _, dice = per_case_dice(s, m, thr, f, None, "with_lesion")
            picks = pick_cases(dice, img_scores, case_ids)
            view_picks += picks
            fig = plot_cases(picks, im, s, m, f, thr, rest, map_range)
            caption = "Best, median and worst images by their own DICE at the best-DICE threshold"
            if rest is not None:
                caption += ": image, restoration (the method's healthy-looking image), anomaly map, overlay"
            figures.append((out / "cases.png", caption))
            save_fig(fig, figures[-1][0])
        # healthy images: false-positive candidates (labels are used after the fact, for this picture only)
        if im is not None and sample_labels is not None:
            lab = np.ravel(to_numpy(sample_labels, "sample_labels"))
            if lab.size != s.shape[0] or sample_scores is None or np.size(sample_scores) != s.shape[0]:
                notes.append("healthy-image grid not drawn: sample scores/labels do not have one entry per image")
            else:
                hp = pick_healthy(img_scores, lab, case_ids)
                view_picks += hp
                if hp:
                    fig = plot_cases(hp, im, s, None, f, thr, rest, map_range, overlay=False,
                                      title="normal images (label 0): the 3 highest image scores and the median; red "
                                            "dashed: prediction at the best-DICE threshold; map colours as above")
                    figures.append((out / "healthy.png", "Healthy images: the normal images with the highest image "
                                    "scores (false-positive candidates) and the median one"
                                    + (", with their restorations" if rest is not None else "")))
                    save_fig(fig, figures[-1][0])
        if im is not None and view_picks:  # the cases for `medanomaly view`, with full-resolution overlays
            from medanomaly.evaluation.overlays import write_report_cases

            view_cases = write_report_cases(out, view_picks, im, s, m, f, case_ids, img_scores, calibration=calibration,
                                            threshold=calibrated_threshold, method=method)

    if sample_scores is not None and sample_labels is not None:
        ss = np.ravel(to_numpy(sample_scores, "sample_scores"))
        sl = np.ravel(to_numpy(sample_labels, "sample_labels"))
        known = sl != -1
        if (sl[known] == 1).any() and (sl[known] == 0).any():
            cur = sample_curves(ss, sl)
            sm = sample_metrics(ss, sl)
            fig = plot_curves(cur, "image", metrics.get("sample_ap", sm["ap"]), metrics.get("sample_auroc", sm["auroc"]),
                               float((sl[known] == 1).mean()))
            figures.append((out / "curves_sample.png", "Image level: precision-recall and ROC"))
            save_fig(fig, figures[-1][0])

    if log is not None:
        fig = plot_train_log(log)
        if fig is None:
            notes.append(f"training log given ({len(log)} records) but no record has a numeric step: no curves")
        else:
            n_groups = len(log_panels(log)[1])
            figures.append((out / "training_curves.png", f"Training curves from the run's training log ({len(log)} records, "
                            f"{n_groups} stage/model line{'s' if n_groups != 1 else ''}; faint: raw, solid: moving average)"))
            save_fig(fig, figures[-1][0])

    timing = {k: v for k, v in {**settings, **metrics}.items() if any(t in k for t in ("second", "time", "device"))}
    if not timing:
        timing = {"timing": "not recorded by the caller"}
    timing["report_written"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    timing["medanomaly"] = _package_version()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{REPORT_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Metrics</h2>",
        _table({k: v for k, v in metrics.items() if not isinstance(v, dict)}, MAIN_KEYS),
        "<p class='note'>Pixel metrics pooled over all evaluated voxels (the foreground when given). Best DICE is the "
        "maximum over thresholds of the dataset-pooled DICE (exact, from the precision-recall counts); per-case DICE "
        "at that threshold over cases with a lesion. nan/n/a: undefined on these data (e.g. no lesion).</p>",
    ]
    parts += ["<h2>Timing and device</h2>", _table(timing)]
    if settings:
        parts += ["<h2>Settings</h2>", _table({k: v for k, v in settings.items() if k not in timing})]
    if notes:
        parts += ["<h2>Notes</h2>"] + [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [_img_tag(p, alt, embed_images) for p, alt in figures]
    if view_cases:
        parts.append(_viewer_section(out, view_cases, embed_images))
    parts.append("</body></html>\n")
    page = out / "report.html"
    atomic_write(page, "\n".join(parts))
    return page
