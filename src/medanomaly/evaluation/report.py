"""Evaluation reports: ``metrics.json``, curve and case figures, one self-contained HTML page; comparison tables.

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
- ``report.html``     metric and settings tables and the figures, embedded as base64 (so the page alone is
  enough) and linked to the PNG files beside it.

:func:`write_comparison_table` writes one benchmark table as Markdown, CSV and HTML.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.evaluation.metrics import (
    _check_binary,
    _check_scores,
    _squeeze_channel,
    _to_numpy,
    per_case_dice,
    pixel_curves,
    pixel_metrics,
    sample_curves,
)

__all__ = ["write_report", "write_comparison_table", "json_safe"]

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


def _plt():  # noqa: ANN202 - matplotlib module
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def json_safe(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to Python, nan/inf to None, tensors to lists, paths to str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):
        return json_safe(obj.detach().cpu().tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        x = float(v)
        if not math.isfinite(x):
            return "n/a"
        if x == 0 or 1e-3 <= abs(x) < 1e5:
            return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"
        return f"{x:.3e}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _atomic_write(path: Path, data: bytes | str) -> None:
    """Write then rename (a reader never sees half a file), with ordinary permissions (a report is for people).

    Own helper rather than ``methods.base.atomic_write_bytes``: importing ``medanomaly.methods`` loads every method.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    _atomic_write(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# figures


def _plot_curves(curves: dict[str, np.ndarray], level: str, ap: float, auroc: float, prevalence: float,
                 best_point: tuple[float, float] | None = None, note: str = "") -> Any:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4))
    # the PR curve as scikit-learn draws it: a step through (recall, precision) from recall 0
    r = np.concatenate([[0.0], curves["recall"]])
    p = np.concatenate([[curves["precision"][0] if curves["precision"].size else 1.0], curves["precision"]])
    a1.step(r, p, where="post", color="C0", label=f"AP = {_fmt(ap)}")
    a1.axhline(prevalence, color="grey", ls=":", lw=1, label=f"chance = {_fmt(prevalence)}")
    if best_point is not None:
        a1.plot(*best_point, "o", color="C3", label="best DICE threshold")
    a1.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=f"{level}: precision-recall")
    a1.legend(loc="best", fontsize=8)
    a2.plot(curves["fpr"], curves["tpr"], color="C1", label=f"AUROC = {_fmt(auroc)}")
    a2.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    a2.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02), title=f"{level}: ROC")
    a2.legend(loc="lower right", fontsize=8)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.set_aspect("equal")
    if note:
        fig.text(0.5, -0.02, note, ha="center", fontsize=8, color="grey")
    fig.tight_layout()
    return fig


def _slice_2d(a: np.ndarray, index: int | None) -> np.ndarray:
    return a if a.ndim == 2 else a[..., index]


def _map_range(scores: np.ndarray, fg: np.ndarray | None) -> tuple[float, float]:
    """One colour scale for every anomaly map in the report: the 1st to 99.5th percentile of the evaluated scores."""
    vals = scores if fg is None or not fg.any() else scores[fg]
    lo, hi = (float(v) for v in np.percentile(vals, [1.0, 99.5]))
    return lo, max(hi, lo + 1e-12)


def _grey_range(image: np.ndarray, fg: np.ndarray | None = None) -> tuple[float, float]:
    """The grey scale of an image (0.5th-99.5th percentile, over the foreground when given); its restoration is drawn
    on the same scale (it is on the input's intensity scale), so a restored region shows as a visible change."""
    vals = image[fg] if fg is not None and fg.any() else image.ravel()
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(vals, [0.5, 99.5]))
    return lo, max(hi, lo + 1e-6)


def _case_slice(m: np.ndarray | None, s: np.ndarray) -> int | None:
    """3D: the slice along the last axis with the most lesion (or the highest score); 2D: None."""
    if s.ndim != 3:
        return None
    if m is not None and m.any():
        return int(m.sum((0, 1)).argmax())
    return int(s.max((0, 1)).argmax())


def _plot_cases(picks: list[tuple[str, int, str]], images: np.ndarray | None, scores: np.ndarray, masks: np.ndarray | None,
                fg: np.ndarray | None, threshold: float, restorations: np.ndarray | None = None,
                map_range: tuple[float, float] | None = None, title: str | None = None, overlay: bool = True) -> Any:
    """Rows: (row label, case index, caption); columns: image, restoration (when given), anomaly map, and an overlay
    with the lesion contour and the thresholded prediction (``overlay``; without it the prediction contour is drawn
    on the image). Image and restoration share one grey scale per row; every map shares ``map_range``."""
    plt = _plt()
    lo, hi = map_range if map_range is not None else _map_range(scores, fg)
    has_thr = math.isfinite(threshold)
    names: list[str] = []
    if images is not None:
        names.append("image")
        if restorations is not None:
            names.append("restoration")
    names.append("anomaly map")
    if images is not None and overlay:
        names.append("overlay")
    ncols = len(names)
    fig, axes = plt.subplots(len(picks), ncols, figsize=(3.2 * ncols, 3.2 * len(picks)), squeeze=False)
    cmap = plt.get_cmap("inferno").with_extremes(bad="#d9d9d9")  # grey: outside the foreground
    for r, (label, i, caption) in enumerate(picks):
        m = masks[i] if masks is not None else None
        sl = _case_slice(m, scores[i])
        s2 = _slice_2d(scores[i], sl)
        m2 = _slice_2d(m, sl) if m is not None else np.zeros(s2.shape, bool)
        pred = s2 >= threshold if has_thr else np.zeros(s2.shape, bool)
        f2 = _slice_2d(fg[i], sl) if fg is not None else None
        if f2 is not None:
            s2 = np.where(f2, s2, np.nan)
            pred &= f2
        im = _slice_2d(images[i], sl) if images is not None else None
        rs = _slice_2d(restorations[i], sl) if restorations is not None else None
        glo, ghi = _grey_range(im, f2) if im is not None else (0.0, 1.0)
        for c, name in enumerate(names):
            ax = axes[r, c]
            if name == "anomaly map":
                h = ax.imshow(s2, cmap=cmap, vmin=lo, vmax=hi)
                fig.colorbar(h, ax=ax, fraction=0.046, pad=0.02)
            else:
                ax.imshow(rs if name == "restoration" else im, cmap="gray", vmin=glo, vmax=ghi)
            if name == "overlay":
                ax.imshow(np.ma.masked_less(np.nan_to_num(s2, nan=lo), threshold if has_thr else hi),
                          cmap="autumn", alpha=0.45, vmin=lo, vmax=hi)
            contour_here = name == "overlay" or (name == "anomaly map" and images is None) or (name == "image" and not overlay)
            if contour_here:
                if m2.any():
                    ax.contour(m2.astype(float), levels=[0.5], colors="lime", linewidths=1.2)
                if pred.any():
                    ax.contour(pred.astype(float), levels=[0.5], colors="red", linewidths=0.9, linestyles="--")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
        axes[r, 0].set_ylabel(f"{label}\n{caption}" + (f"\nslice {sl}" if sl is not None else ""), fontsize=8)
    if title is None:
        title = "green: lesion, red dashed: prediction at the best-DICE threshold"
    fig.suptitle(title, fontsize=9, y=1.0)
    fig.tight_layout()
    return fig


def _pick_healthy(img_scores: np.ndarray, labels: np.ndarray, case_ids: Sequence[Any] | None) -> list[tuple[str, int, str]]:
    """The normal images (label 0) with the 3 highest image scores and the one with the median score."""
    name = (lambda i: str(case_ids[i])) if case_ids is not None else (lambda i: f"#{i}")
    normal = np.flatnonzero(labels == 0)
    if not normal.size:
        return []
    order = normal[np.argsort(-img_scores[normal], kind="stable")]
    rows = [(f"normal, score rank {k + 1}", int(i)) for k, i in enumerate(order[:3])]
    med = int(order[len(order) // 2])
    if med not in {i for _, i in rows}:
        rows.append((f"normal, median score (rank {len(order) // 2 + 1} of {len(order)})", med))
    return [(lab, i, f"{name(i)}  score {img_scores[i]:.3g}") for lab, i in rows]


# training log keys that are not curves worth a panel
_LOG_SKIP = {"step", "epoch", "seconds", "grad_norm", "best_val", "time"}
_LOG_GROUP_KEYS = ("stage", "model", "member")


def _log_panels(train_log: Sequence[Any]) -> tuple[dict[str, dict[str, tuple[list[float], list[float]]]], list[str]]:
    """{panel key: {group: (steps, values)}} from the records with a numeric step, and the group names in order."""
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    groups: list[str] = []
    for rec in train_log:
        if not isinstance(rec, dict):
            continue
        step = rec.get("step")
        if not _is_number(step) or not math.isfinite(float(step)):
            continue
        group = "/".join(str(rec[k]) for k in _LOG_GROUP_KEYS if rec.get(k) is not None) or "training"
        if group not in groups:
            groups.append(group)
        for k, v in rec.items():
            if k in _LOG_SKIP or k in _LOG_GROUP_KEYS or not _is_number(v) or not math.isfinite(float(v)):
                continue
            xs, ys = panels.setdefault(k, {}).setdefault(group, ([], []))
            xs.append(float(step))
            ys.append(float(v))
    return panels, groups


def _panel_order(keys: Sequence[str]) -> list[str]:
    def rank(k: str) -> tuple[int, str]:
        if k == "loss":
            return 0, k
        if k == "val" or k.startswith("val_"):
            return 1, k
        if k == "lr":
            return 3, k
        return 2, k

    return sorted(keys, key=rank)


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    """Centred moving average (shorter windows at the ends)."""
    if w <= 1 or y.size < 3:
        return y
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(y.size)
    a, b = np.clip(i - w // 2, 0, y.size), np.clip(i + w // 2 + 1, 0, y.size)
    return (c[b] - c[a]) / (b - a)


def _plot_train_log(train_log: Sequence[Any], max_panels: int = 6) -> Any | None:
    """One panel per metric kind (train loss, validation metrics, other values, learning rate) against the step, one
    line per stage/model/member; None when no record has a step. Long noisy series are drawn faint with a moving
    average on top; loss panels (and positive panels spanning more than a decade) use a log y axis."""
    panels, groups = _log_panels(train_log)
    if not panels:
        return None
    keys = _panel_order(list(panels))[:max_panels]
    plt = _plt()
    ncols = 2 if len(keys) == 4 else min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.3 * nrows), squeeze=False)
    colour = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    for ax, k in zip(axes.ravel(), keys, strict=False):
        allv: list[float] = []
        for g, (xs, ys) in panels[k].items():
            x, y = np.asarray(xs), np.asarray(ys)
            o = np.argsort(x, kind="stable")
            x, y = x[o], y[o]
            allv += ys
            if y.size > 100 and k != "lr":  # noisy per-step values: faint raw, solid moving average
                ax.plot(x, y, color=colour[g], alpha=0.2, lw=0.6)
                ax.plot(x, _smooth(y, max(3, y.size // 40)), color=colour[g], lw=1.4, label=g)
            else:
                ax.plot(x, y, color=colour[g], lw=1.2, marker="o" if y.size <= 40 else None, ms=3, label=g)
        v = np.asarray(allv)
        positive = v.size > 0 and bool((v > 0).all())
        if positive and k != "lr" and ("loss" in k or v.max() / v.min() > 10):  # lr: linear (a cosine tail ~0)
            ax.set_yscale("log")
        what = "train" if k == "loss" else "validation" if (k == "val" or k.startswith("val_")) else ""
        ax.set_title(f"{k} ({what})" if what else k, fontsize=10)
        ax.set_xlabel("step" + (" (counted per stage/model)" if len(panels[k]) > 1 else ""), fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(which="both", labelsize=8)
    spare = list(axes.ravel()[len(keys):])
    for ax in spare:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    seen = set(labels)
    for ax in axes.ravel()[1:len(keys)]:  # groups missing from the first panel (e.g. a stage without "loss")
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in seen:
                handles.append(h)
                labels.append(lab)
                seen.add(lab)
    sub = f": {len(groups)} stages/models" if len(groups) > 1 else "" if groups == ["training"] else f": {groups[0]}"
    fig.suptitle("training log" + sub, fontsize=10)
    bottom = 0.0
    if len(labels) > 1:
        if spare:  # in the first empty panel
            spare[0].legend(handles, labels, loc="center", fontsize=8, frameon=False, title="stage / model",
                            ncol=1 if len(labels) <= 8 else 2)
        else:  # below the panels, in a strip kept free for it
            rows = math.ceil(len(labels) / 6)
            bottom = min(0.4, (0.05 + 0.22 * rows) / (3.3 * nrows))
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False,
                       bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def _pick_cases(dice: np.ndarray, img_scores: np.ndarray | None, case_ids: Sequence[Any] | None) -> list[tuple[str, int, str]]:
    name = (lambda i: str(case_ids[i])) if case_ids is not None else (lambda i: f"#{i}")
    valid = np.flatnonzero(~np.isnan(dice))
    if valid.size:
        order = valid[np.argsort(-dice[valid], kind="stable")]
        idx = {"best": order[0], "median": order[len(order) // 2], "worst": order[-1]}
        return [(k, int(i), f"{name(i)}  DICE {dice[i]:.3f}") for k, i in idx.items()][: len(order)]
    vals = img_scores if img_scores is not None else np.zeros(len(dice))
    order = np.argsort(-vals, kind="stable")
    idx = {"highest score": order[0], "median score": order[len(order) // 2], "lowest score": order[-1]}
    return [(k, int(i), f"{name(i)}  score {vals[i]:.3g}") for k, i in idx.items()][: len(order)]


# ----------------------------------------------------------------------------------------------------------------
# the report


def _img_tag(path: Path, alt: str, embed: bool) -> str:
    src = path.name
    if embed:
        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><a href="{html.escape(path.name)}"><img src="{src}" alt="{html.escape(alt)}"></a>' \
           f"<figcaption>{html.escape(alt)}</figcaption></figure>"


def _table(d: dict[str, Any], first: Sequence[str] = ()) -> str:
    keys = [k for k in first if k in d] + [k for k in d if k not in first]
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(d[k]))}</td></tr>" for k in keys)
    return f"<table>{rows}</table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3;font-weight:600}td{font-family:ui-monospace,monospace}img{max-width:100%}
figure{margin:1em 0}figcaption{color:#666;font-size:.9em}.note{color:#555;font-size:.9em}"""


def _check_restorations(restorations: Any, shape: tuple[int, ...]) -> np.ndarray:
    """(N, *S) float32 from (N, *S) or (N, C, *S) (channel 0), checked against the maps' shape ``shape``."""
    r = given = _to_numpy(restorations, "restorations")
    if r.ndim == len(shape) + 1 and r.shape[0] == shape[0] and r.shape[1] >= 1:
        r = r[:, 0]
    if tuple(r.shape) != tuple(shape):
        raise ValueError(f"restorations shape {tuple(given.shape)} does not match scores shape {tuple(shape)} "
                         "(expected (N, *spatial) or (N, C, *spatial) at the input size)")
    r = _check_scores(r, "restorations")
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
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(settings or {})
    log = _check_train_log(train_log) if train_log is not None else None
    _atomic_write(out / "metrics.json", json.dumps(json_safe(metrics), indent=2, sort_keys=False, allow_nan=False) + "\n")
    _atomic_write(out / "settings.json", json.dumps(json_safe(settings), indent=2, allow_nan=False) + "\n")
    figures: list[tuple[Path, str]] = []
    notes: list[str] = []

    if scores is not None:
        s = _check_scores(_squeeze_channel(_to_numpy(scores, "scores")), "scores").astype(np.float32)
        if s.ndim not in (3, 4):
            raise ValueError(f"scores must be (N, *spatial) with 2 or 3 spatial dims, got shape {s.shape}")
        m = None
        if masks is not None:
            m = _check_binary(_squeeze_channel(_to_numpy(masks, "masks")), "masks")
            if m.shape != s.shape:
                raise ValueError(f"scores shape {s.shape} does not match masks shape {m.shape}")
        f = None
        if foreground is not None:
            f = _check_binary(_squeeze_channel(_to_numpy(foreground, "foreground")), "foreground")
            if f.shape != s.shape:
                raise ValueError(f"foreground shape {f.shape} does not match scores shape {s.shape}")
        im = None
        if images is not None:
            im = _to_numpy(images, "images").astype(np.float32)
            if im.ndim == s.ndim + 1:
                im = im[:, 0]
            if im.shape != s.shape:
                raise ValueError(f"images shape {im.shape} does not match scores shape {s.shape}")
        rest = _check_restorations(restorations, s.shape) if restorations is not None else None
        if rest is not None and im is None:
            notes.append("restorations were given without images: not shown")
            rest = None
        map_range = _map_range(s, f)
        thr = metrics.get("best_threshold", metrics.get("pixel_best_threshold"))
        pm = None
        if m is not None and (thr is None or not math.isfinite(float(thr))):
            pm = pixel_metrics(s, m, f, per_case=False)
            thr = pm["best_threshold"]
        thr = float(thr) if thr is not None else float("nan")
        img_scores = None
        if sample_scores is not None:
            img_scores = np.ravel(_to_numpy(sample_scores, "sample_scores")).astype(np.float64)
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
                fig = _plot_curves(cur, "pixel", ap, au, float(sel_m.mean()), best_pt, note)
                figures.append((out / "curves_pixel.png", "Pixel level: precision-recall and ROC"))
                _save_fig(fig, figures[-1][0])
            del sel_s, sel_m
            _, dice = per_case_dice(s, m, thr, f, None, "with_lesion")
            picks = _pick_cases(dice, img_scores, case_ids)
            fig = _plot_cases(picks, im, s, m, f, thr, rest, map_range)
            caption = "Best, median and worst images by their own DICE at the best-DICE threshold"
            if rest is not None:
                caption += ": image, restoration (the method's healthy-looking image), anomaly map, overlay"
            figures.append((out / "cases.png", caption))
            _save_fig(fig, figures[-1][0])
        # healthy images: false-positive candidates (labels are used after the fact, for this picture only)
        if im is not None and sample_labels is not None:
            lab = np.ravel(_to_numpy(sample_labels, "sample_labels"))
            if lab.size != s.shape[0] or sample_scores is None or np.size(sample_scores) != s.shape[0]:
                notes.append("healthy-image grid not drawn: sample scores/labels do not have one entry per image")
            else:
                hp = _pick_healthy(img_scores, lab, case_ids)
                if hp:
                    fig = _plot_cases(hp, im, s, None, f, thr, rest, map_range, overlay=False,
                                      title="normal images (label 0): the 3 highest image scores and the median; red "
                                            "dashed: prediction at the best-DICE threshold; map colours as above")
                    figures.append((out / "healthy.png", "Healthy images: the normal images with the highest image "
                                    "scores (false-positive candidates) and the median one"
                                    + (", with their restorations" if rest is not None else "")))
                    _save_fig(fig, figures[-1][0])

    if sample_scores is not None and sample_labels is not None:
        ss = np.ravel(_to_numpy(sample_scores, "sample_scores"))
        sl = np.ravel(_to_numpy(sample_labels, "sample_labels"))
        known = sl != -1
        if (sl[known] == 1).any() and (sl[known] == 0).any():
            cur = sample_curves(ss, sl)
            from medanomaly.evaluation.metrics import sample_metrics

            sm = sample_metrics(ss, sl)
            fig = _plot_curves(cur, "image", metrics.get("sample_ap", sm["ap"]), metrics.get("sample_auroc", sm["auroc"]),
                               float((sl[known] == 1).mean()))
            figures.append((out / "curves_sample.png", "Image level: precision-recall and ROC"))
            _save_fig(fig, figures[-1][0])

    if log is not None:
        fig = _plot_train_log(log)
        if fig is None:
            notes.append(f"training log given ({len(log)} records) but no record has a numeric step: no curves")
        else:
            n_groups = len(_log_panels(log)[1])
            figures.append((out / "training_curves.png", f"Training curves from the run's training log ({len(log)} records, "
                            f"{n_groups} stage/model line{'s' if n_groups != 1 else ''}; faint: raw, solid: moving average)"))
            _save_fig(fig, figures[-1][0])

    timing = {k: v for k, v in {**settings, **metrics}.items() if any(t in k for t in ("second", "time", "device"))}
    if not timing:
        timing = {"timing": "not recorded by the caller"}
    timing["report_written"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    timing["medanomaly"] = _package_version()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
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
    parts.append("</body></html>\n")
    page = out / "report.html"
    _atomic_write(page, "\n".join(parts))
    return page


# ----------------------------------------------------------------------------------------------------------------
# comparison table

_HIGHER = {"ap", "auroc", "dice", "f1", "auprc", "accuracy"}
_LOWER = {"seconds", "second", "time", "s", "sec", "loss"}


def _direction(col: str) -> int:
    tokens = set(col.lower().replace("-", "_").split("_"))
    if tokens & _LOWER:
        return -1
    if tokens & _HIGHER and not tokens & {"std", "threshold"}:
        return 1
    return 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))


def _best_rows(rows: list[dict[str, Any]], cols: list[str]) -> dict[str, set[int]]:
    best: dict[str, set[int]] = {}
    for c in cols:
        d = _direction(c)
        vals = [(i, float(r[c])) for i, r in enumerate(rows) if _is_number(r.get(c)) and math.isfinite(float(r[c]))]
        if d and len(vals) > 1:
            target = max(v for _, v in vals) if d > 0 else min(v for _, v in vals)
            best[c] = {i for i, v in vals if v == target}
    return best


def write_comparison_table(
    rows: list[dict[str, Any]], out_dir: str | Path, name: str = "comparison", title: str = "medanomaly benchmark"
) -> tuple[Path, Path, Path]:
    """Write ``rows`` (one dict per method) as ``<name>.md``, ``<name>.csv`` and ``<name>.html``.

    Columns are the union of the rows' keys in order of first appearance; missing cells are empty. In Markdown and
    HTML the best value of each metric column is bold (higher is better for AP/AUROC/DICE columns, lower for
    time/seconds columns). CSV keeps full precision. Returns the three paths.
    """
    if not rows:
        raise ValueError("write_comparison_table: no rows")
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError("write_comparison_table: every row must be a dict")
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best = _best_rows(rows, cols)

    def cell(i: int, c: str, bold: tuple[str, str], escape: bool = False) -> str:
        if c not in rows[i] or rows[i][c] is None:
            return ""
        t = html.escape(_fmt(rows[i][c])) if escape else _fmt(rows[i][c])
        return f"{bold[0]}{t}{bold[1]}" if i in best.get(c, set()) else t

    md = [f"| {' | '.join(cols)} |", "|" + "|".join("---" for _ in cols) + "|"]
    md += ["| " + " | ".join(cell(i, c, ("**", "**")).replace("|", "\\|") for c in cols) + " |" for i in range(len(rows))]
    md_path = out / f"{name}.md"
    _atomic_write(md_path, "\n".join(md) + "\n")

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if json_safe(r.get(c)) is None else json_safe(r.get(c)) for c in cols])
    csv_path = out / f"{name}.csv"
    _atomic_write(csv_path, buf.getvalue())

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(i, c, ('<b>', '</b>'), escape=True)}</td>" for c in cols) + "</tr>"
        for i in range(len(rows))
    )
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style>"
            f"</head><body><h1>{html.escape(title)}</h1><table><tr>{head}</tr>{body}</table>"
            "<p class='note'>Bold: best in the column (higher AP/AUROC/DICE, lower time).</p></body></html>\n")
    html_path = out / f"{name}.html"
    _atomic_write(html_path, page)
    return md_path, csv_path, html_path
