"""``medanomaly synth TASK --data NAME --out DIR``: a PNG grid (before / after / label) per task, to look at."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.synth.tasks import get_task, list_tasks

__all__ = ["run_synth_cli", "DEFAULT_SOURCES"]

# inter-blend needs another data set of the same dimensionality ("name:slices" = 2D slices of a 3D data set)
DEFAULT_SOURCES = {"lgg-flair-2d": "ixi-t1-3d:slices", "pneumoniamnist": "lgg-flair-2d", "brats2018-3d": "ixi-t1-3d",
                   "ixi-t1-3d": "brats2018-3d"}


def _load(data: str, max_cases: int, size: Any = None) -> tuple[Any, str]:
    """The data set (healthy training images when the data set has them); ``toy``/``toy-3d`` for generated data."""
    if data.startswith("toy"):
        from medanomaly.data import make_toy_dataset

        dims = 3 if data.endswith("3d") else 2
        return make_toy_dataset(8, 64 if dims == 2 else 32, dims, seed=0), data
    from medanomaly.data import load_dataset

    name, _, view = data.partition(":")
    kw: dict[str, Any] = {"view": view} if view else {}
    if size is not None:
        kw["size"] = size
    errors = []
    for split, normal in (("train", True), ("all", False), ("test", False)):
        try:
            ds = load_dataset(name, split, normal_only=normal, max_cases=max_cases, **kw)
            if len(ds):
                return ds, data
        except (ValueError, FileNotFoundError, OSError) as exc:
            errors.append(f"{split}: {exc}")
    raise ValueError(f"cannot load data set {data!r}: " + " | ".join(errors))


def _pick(ds: Any, n: int, rng: np.random.Generator) -> list[int]:
    """Up to ``n`` indices spread over the data set, preferring images with at least 10% foreground."""
    cand = np.linspace(0, len(ds) - 1, num=min(len(ds), 6 * n)).round().astype(int)
    good = [int(i) for i in cand if float(np.asarray(ds[int(i)]["foreground"]).mean()) > 0.1]
    pool = good if len(good) >= n else [int(i) for i in cand]
    pool = list(dict.fromkeys(pool))
    return sorted(rng.choice(pool, size=min(n, len(pool)), replace=False).tolist())


def _view(a: np.ndarray, axis_index: int | None) -> np.ndarray:
    a = a[0] if a.ndim in (3, 4) and a.shape[0] == 1 else a
    if a.ndim == 4:  # (C, D, H, W): first channel
        a = a[0]
    if a.ndim == 3 and axis_index is not None:
        return a[axis_index]
    if a.ndim == 3:  # (C, H, W)
        return a[0]
    return a


def run_synth_cli(task: str, data: str = "lgg-flair-2d", out: str | Path = "synth_grids", n: int = 4, seed: int = 0,
                  source: str | None = None, max_cases: int = 4, quiet: bool = False) -> list[Path]:
    """Write ``<out>/<task>_<data>.png`` for ``task`` (a name, comma-separated names or ``all``); returns the paths.

    Each grid has ``n`` columns (images) and three rows: before, after, label (3D: the slice along the first axis
    where the anomaly mask is largest). ``data`` is a built-in data set name (``name:slices`` for 2D slices of a 3D
    set), a manifest, or ``toy``/``toy-3d``.
    ``inter-blend`` takes patches from ``source`` (default: :data:`DEFAULT_SOURCES`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list_tasks() if task == "all" else [t.strip() for t in task.split(",") if t.strip()]
    for t in names:
        get_task(t)  # raises a clear error for an unknown name
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds, label = _load(data, max_cases)
    rng = np.random.default_rng(seed)
    idx = _pick(ds, n, rng)
    src_ds = None
    if "inter-blend" in names:
        src_name = source or DEFAULT_SOURCES.get(data, "toy-3d" if ds.spatial_dims == 3 else "toy")
        src_size = tuple(ds[0]["image"].shape[1:]) if ":slices" in src_name else None
        src_ds, _ = _load(src_name, max_cases, size=src_size[0] if src_size and len(set(src_size)) == 1 else None)
        if src_ds.spatial_dims != ds.spatial_dims:
            raise ValueError(f"inter-blend source {src_name!r} is {src_ds.spatial_dims}D but {data!r} is {ds.spatial_dims}D")
    written = []
    for t in names:
        fn = get_task(t)
        fig, axes = plt.subplots(3, len(idx), figsize=(2.6 * len(idx), 8.0), squeeze=False)
        for col, i in enumerate(idx):
            s = ds[i]
            img, fg = np.asarray(s["image"]), np.asarray(s["foreground"])
            params: dict[str, Any] = {}
            if t in ("intra-blend", "fpi") and len(ds) > 1:
                j = int(rng.choice([k for k in range(len(ds)) if k != i]))
                params = {"source_image": np.asarray(ds[j]["image"]), "source_foreground": np.asarray(ds[j]["foreground"])}
            if t == "inter-blend":
                j = int(rng.integers(len(src_ds)))
                params = {"source_image": np.asarray(src_ds[j]["image"]),
                          "source_foreground": np.asarray(src_ds[j]["foreground"])}
            if t == "anatpaste" and "pneumonia" in data:
                params["anatomy"] = "cxr"
            res = fn(img, fg, np.random.default_rng([seed, i]), channels=True, **params)
            z = None
            if ds.spatial_dims == 3:
                m = res.mask[0]
                z = int(m.sum(axis=(1, 2)).argmax()) if m.any() else m.shape[0] // 2
            lo, hi = float(img.min()), float(img.max())
            views = [_view(img, z), _view(res.image, z), _view(res.label, z)]
            for row, (v, title) in enumerate(zip(views, ("before", "after", "label"), strict=False)):
                ax = axes[row, col]
                if row < 2:
                    ax.imshow(v, cmap="gray", vmin=lo, vmax=hi)
                else:
                    ax.imshow(v, cmap="magma", vmin=0, vmax=1)
                ax.set_axis_off()
                extra = f" z={z}" if z is not None else ""
                ax.set_title(f"{title} #{i}{extra}" if row == 0 else (f"label max {float(res.label.max()):.2f}" if row == 2
                             else title), fontsize=8)
        fig.suptitle(f"{t} on {label}", fontsize=10)
        fig.tight_layout()
        path = out / f"{t}_{Path(str(data)).stem}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
        if not quiet:
            print(f"wrote {path}", file=sys.stderr)
    return written
