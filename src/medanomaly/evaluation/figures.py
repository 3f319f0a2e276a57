"""The report's matplotlib figures: precision-recall/ROC curves, case grids (image, restoration, anomaly map,
overlay), the healthy-image grid and the training curves. matplotlib is imported on first use (Agg backend)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.evaluation._output import atomic_write, format_value, is_number

__all__ = ["log_panels", "pick_cases", "pick_healthy", "plot_cases", "plot_curves", "plot_train_log", "save_fig", "score_range"]


def _plt():  # noqa: ANN202 - matplotlib module
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    atomic_write(path, buf.getvalue())


def plot_curves(curves: dict[str, np.ndarray], level: str, ap: float, auroc: float, prevalence: float,
                 best_point: tuple[float, float] | None = None, note: str = "") -> Any:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4))
    # the PR curve as scikit-learn draws it: a step through (recall, precision) from recall 0
    r = np.concatenate([[0.0], curves["recall"]])
    p = np.concatenate([[curves["precision"][0] if curves["precision"].size else 1.0], curves["precision"]])
    a1.step(r, p, where="post", color="C0", label=f"AP = {format_value(ap)}")
    a1.axhline(prevalence, color="grey", ls=":", lw=1, label=f"chance = {format_value(prevalence)}")
    if best_point is not None:
        a1.plot(*best_point, "o", color="C3", label="best DICE threshold")
    a1.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=f"{level}: precision-recall")
    a1.legend(loc="best", fontsize=8)
    a2.plot(curves["fpr"], curves["tpr"], color="C1", label=f"AUROC = {format_value(auroc)}")
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


def score_range(scores: np.ndarray, fg: np.ndarray | None) -> tuple[float, float]:
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


def plot_cases(picks: list[tuple[str, int, str]], images: np.ndarray | None, scores: np.ndarray, masks: np.ndarray | None,
                fg: np.ndarray | None, threshold: float, restorations: np.ndarray | None = None,
                map_range: tuple[float, float] | None = None, title: str | None = None, overlay: bool = True) -> Any:
    """Rows: (row label, case index, caption); columns: image, restoration (when given), anomaly map, and an overlay
    with the lesion contour and the thresholded prediction (``overlay``; without it the prediction contour is drawn
    on the image). Image and restoration share one grey scale per row; every map shares ``map_range``."""
    plt = _plt()
    lo, hi = map_range if map_range is not None else score_range(scores, fg)
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


def pick_cases(dice: np.ndarray, img_scores: np.ndarray | None, case_ids: Sequence[Any] | None) -> list[tuple[str, int, str]]:
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


def pick_healthy(img_scores: np.ndarray, labels: np.ndarray, case_ids: Sequence[Any] | None) -> list[tuple[str, int, str]]:
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


def log_panels(train_log: Sequence[Any]) -> tuple[dict[str, dict[str, tuple[list[float], list[float]]]], list[str]]:
    """{panel key: {group: (steps, values)}} from the records with a numeric step, and the group names in order."""
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    groups: list[str] = []
    for rec in train_log:
        if not isinstance(rec, dict):
            continue
        step = rec.get("step")
        if not is_number(step) or not math.isfinite(float(step)):
            continue
        group = "/".join(str(rec[k]) for k in _LOG_GROUP_KEYS if rec.get(k) is not None) or "training"
        if group not in groups:
            groups.append(group)
        for k, v in rec.items():
            if k in _LOG_SKIP or k in _LOG_GROUP_KEYS or not is_number(v) or not math.isfinite(float(v)):
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


def plot_train_log(train_log: Sequence[Any], max_panels: int = 6) -> Any | None:
    """One panel per metric kind (train loss, validation metrics, other values, learning rate) against the step, one
    line per stage/model/member; None when no record has a step. Long noisy series are drawn faint with a moving
    average on top; loss panels (and positive panels spanning more than a decade) use a log y axis."""
    panels, groups = log_panels(train_log)
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
