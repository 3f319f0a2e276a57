"""Evaluation reports: ``metrics.json``, curve and case figures, one self-contained HTML page; comparison tables.

A report folder written by :func:`write_report` holds

- ``metrics.json``    the metrics as given (nan written as null) and ``settings.json`` the settings
- ``curves_pixel.png``  pixel-level precision-recall and ROC curves (the best-DICE point marked)
- ``curves_sample.png`` image-level precision-recall and ROC curves (when sample scores and labels are given)
- ``cases.png``       best, median and worst cases by per-case DICE at the best threshold: image, anomaly map,
  and an overlay with the lesion contour (green) and the thresholded prediction (red); 3D volumes show the slice
  along the last axis (axial for RAS volumes) with the largest lesion area, or the highest score without a lesion
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


def _plot_cases(picks: list[tuple[str, int, str]], images: np.ndarray | None, scores: np.ndarray, masks: np.ndarray,
                fg: np.ndarray | None, threshold: float) -> Any:
    """Rows: (row label, case index, caption); columns: image, anomaly map, overlay with contours."""
    plt = _plt()
    lo, hi = np.percentile(scores if fg is None else scores[fg], [1.0, 99.5])
    hi = max(hi, lo + 1e-12)
    ncols = 3 if images is not None else 1
    fig, axes = plt.subplots(len(picks), ncols, figsize=(3.2 * ncols, 3.2 * len(picks)), squeeze=False)
    for r, (label, i, caption) in enumerate(picks):
        m = masks[i]
        sl = None
        if m.ndim == 3:  # 3D: the slice along the last axis with the most lesion (or the highest score)
            sl = int(m.sum((0, 1)).argmax()) if m.any() else int(scores[i].max((0, 1)).argmax())
        s2, m2 = _slice_2d(scores[i], sl), _slice_2d(m, sl)
        pred = s2 >= threshold if math.isfinite(threshold) else np.zeros_like(m2)
        if fg is not None:
            f2 = _slice_2d(fg[i], sl)
            s2 = np.where(f2, s2, np.nan)
            pred &= f2
        cols = []
        if images is not None:
            im = _slice_2d(images[i], sl)
            cols.append(("image", im))
        cols.append(("anomaly map", s2))
        if images is not None:
            cols.append(("overlay", im))
        for c, (name, arr) in enumerate(cols):
            ax = axes[r, c]
            if name == "anomaly map":
                cmap = plt.get_cmap("inferno").with_extremes(bad="#d9d9d9")  # grey: outside the foreground
                h = ax.imshow(s2, cmap=cmap, vmin=lo, vmax=hi)
                fig.colorbar(h, ax=ax, fraction=0.046, pad=0.02)
            else:
                ax.imshow(arr, cmap="gray")
            if name == "overlay" or (images is None and name == "anomaly map"):
                if name == "overlay":
                    ax.imshow(np.ma.masked_less(np.nan_to_num(s2, nan=lo), threshold if math.isfinite(threshold) else hi),
                              cmap="autumn", alpha=0.45, vmin=lo, vmax=hi)
                if m2.any():
                    ax.contour(m2.astype(float), levels=[0.5], colors="lime", linewidths=1.2)
                if pred.any():
                    ax.contour(pred.astype(float), levels=[0.5], colors="red", linewidths=0.9, linestyles="--")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
        axes[r, 0].set_ylabel(f"{label}\n{caption}" + (f"\nslice {sl}" if sl is not None else ""), fontsize=8)
    fig.suptitle("green: lesion, red dashed: prediction at the best-DICE threshold", fontsize=9, y=1.0)
    fig.tight_layout()
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
) -> Path:
    """Write the report folder (module docstring) and return the path of ``report.html``.

    ``metrics`` is written as given (the caller chooses the keys, e.g. ``pixel_ap``, ``best_dice``,
    ``seconds_per_image``, ``device``). ``scores``/``masks``/``foreground`` (N, *spatial) and ``images``
    (N, C, *spatial) or (N, *spatial) drive the pixel curves and the case grid; the best-DICE threshold is read
    from ``metrics["best_threshold"]`` (or ``pixel_best_threshold``) and computed when absent. Per-case DICE for
    the grid is per image. Pixel curves from more than ``max_curve_voxels`` voxels use a random subset (noted
    under the figure); metrics are never subsampled here. ``settings`` (method, config, data, split, device ...)
    is shown in the page and written to ``settings.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(settings or {})
    _atomic_write(out / "metrics.json", json.dumps(json_safe(metrics), indent=2, sort_keys=False, allow_nan=False) + "\n")
    _atomic_write(out / "settings.json", json.dumps(json_safe(settings), indent=2, allow_nan=False) + "\n")
    figures: list[tuple[Path, str]] = []

    if scores is not None and masks is not None:
        s = _check_scores(_squeeze_channel(_to_numpy(scores, "scores")), "scores").astype(np.float32)
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
        thr = metrics.get("best_threshold", metrics.get("pixel_best_threshold"))
        pm = None
        if thr is None or not math.isfinite(float(thr)):
            pm = pixel_metrics(s, m, f, per_case=False)
            thr = pm["best_threshold"]
        thr = float(thr)
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
        img_scores = None
        if sample_scores is not None:
            img_scores = np.ravel(_to_numpy(sample_scores, "sample_scores")).astype(np.float64)
            if img_scores.size != s.shape[0]:
                img_scores = None
        if img_scores is None:
            img_scores = (s if f is None else np.where(f, s, -np.inf)).reshape(len(s), -1).max(1)
        picks = _pick_cases(dice, img_scores, case_ids)
        fig = _plot_cases(picks, im, s, m, f, thr)
        figures.append((out / "cases.png", "Best, median and worst images by their own DICE at the best-DICE threshold"))
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
