"""Label-free validation of any run: its maps on synthetic anomalies in the run's own healthy validation images.

``medanomaly validate RUN`` answers "how well does this model find anomalies?" without a single lesion label, so
that runs, settings, seeds and methods can be chosen honestly. The images are the run's validation split with
``normal_only=True`` (the images it was validated and calibrated on), at its recorded preset and size. Each image
gets ``draws`` synthetic anomalies per task (:mod:`medanomaly.synth`), seeded by ``(seed, task, image, draw)``;
sources of the blending tasks (``intra-blend``, ``fpi``) are other images of the same set. Positives: the task's
mask inside the foreground; negatives: every other foreground voxel of the anomalous images and every foreground
voxel of the clean images. Per task and pooled over the tasks: pixel AP, AUROC and best DICE
(:func:`~medanomaly.evaluation.metrics.pixel_metrics`), and the image AUROC of clean against anomalous images
(:func:`~medanomaly.evaluation.metrics.sample_metrics`).

A method trained on some of these tasks (``multitask``: the five MTMLW tasks; ``amae``: AnatPaste;
``mae-pseudo``: its pseudo-abnormal module) has seen their kind of anomaly, so compare methods on the tasks none of
them trained on (``fpi`` and ``cutpaste`` by default), and runs of one method on all tasks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.app.errors import Echo, PipelineError, check_writable_folder, make_echo

__all__ = ["DEFAULT_TASKS", "UNSEEN_TASKS", "check_tasks", "synthetic_set", "score_synthetic", "validate_run"]

#: tasks that need no second data set; ``fpi`` and ``cutpaste`` are trained on by no method of this package
DEFAULT_TASKS = ("intra-blend", "sink", "source", "smooth-intensity", "fpi", "cutpaste")
UNSEEN_TASKS = ("fpi", "cutpaste")
_NEEDS_OTHER_DATA = ("inter-blend",)
_SOURCED = ("intra-blend", "fpi")  # tasks whose source is another image of the set
_REDRAWS = 5


def check_tasks(tasks: tuple[str, ...]) -> None:
    """One error for an empty, repeated, unknown or unsupported task list."""
    from medanomaly.synth import list_tasks

    bad = [t for t in tasks if t in _NEEDS_OTHER_DATA or t not in list_tasks()]
    if bad or not tasks:
        raise ValueError(f"synthetic validation tasks must be among {[t for t in list_tasks() if t not in _NEEDS_OTHER_DATA]}"
                         f" (inter-blend needs a second data set); got {list(tasks)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks repeat: {list(tasks)}")


def synthetic_set(images: np.ndarray, foreground: np.ndarray, tasks: tuple[str, ...] = DEFAULT_TASKS, draws: int = 1,
                  seed: int = 0) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Per task, ``draws`` anomalous copies of every image: ``{"image": (M, C, *S), "mask": (M, *S), "index": (M,)}``.

    ``images`` (N, C, *S) float, ``foreground`` (N, *S) bool. A draw whose mask misses the foreground is drawn again
    (up to 5 times), then left out; the counts are in the returned info.
    """
    from medanomaly.synth import get_task

    images = np.asarray(images, dtype=np.float32)
    foreground = np.asarray(foreground, dtype=bool)
    if images.ndim < 4 or foreground.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"images (N, C, *S) and foreground (N, *S) expected; got {images.shape} and {foreground.shape}")
    if len(images) == 0:
        raise ValueError("no images to put synthetic anomalies in")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    check_tasks(tasks)
    n = len(images)
    out: dict[str, dict[str, np.ndarray]] = {}
    info: dict[str, Any] = {"redrawn": {}, "left_out": {}}
    for t, name in enumerate(tasks):
        fn = get_task(name)
        imgs, masks, index, redrawn, left_out = [], [], [], 0, 0
        for i in range(n):
            for d in range(draws):
                rng = np.random.default_rng([seed, t, i, d])
                params: dict[str, Any] = {}
                if name in _SOURCED and n > 1:
                    j = int((i + 1 + rng.integers(n - 1)) % n)  # another image of the set
                    params = {"source_image": images[j], "source_foreground": foreground[j]}
                for attempt in range(_REDRAWS):
                    r = fn(images[i], foreground[i], rng, **params)
                    m = np.asarray(r.mask).reshape(foreground.shape[1:]) & foreground[i]
                    if m.any():
                        imgs.append(np.asarray(r.image, dtype=np.float32).reshape(images.shape[1:]))
                        masks.append(m)
                        index.append(i)
                        redrawn += attempt > 0
                        break
                else:
                    left_out += 1
        if not masks:
            raise ValueError(f"task {name!r}: no draw put an anomaly in the foreground")
        out[name] = {"image": np.stack(imgs), "mask": np.stack(masks), "index": np.asarray(index)}
        info["redrawn"][name], info["left_out"][name] = redrawn, left_out
    return out, info


def score_synthetic(clean_maps: np.ndarray, clean_scores: np.ndarray, foreground: np.ndarray,
                    synth: dict[str, dict[str, np.ndarray]], maps: dict[str, np.ndarray],
                    scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Pixel and image metrics per task (clean images + that task's) and pooled (clean + every task's)."""
    from medanomaly.evaluation.metrics import pixel_metrics, sample_metrics

    neg = np.zeros(clean_maps.shape, dtype=bool)

    def one(names: list[str]) -> dict[str, float]:
        s = np.concatenate([clean_maps, *(maps[k] for k in names)])
        m = np.concatenate([neg, *(synth[k]["mask"] for k in names)])
        f = np.concatenate([foreground, *(foreground[synth[k]["index"]] for k in names)])
        pm = pixel_metrics(s, m, f, per_case=False)
        im = sample_metrics(np.concatenate([clean_scores, *(scores[k] for k in names)]),
                            np.concatenate([np.zeros(len(clean_scores)), *(np.ones(len(scores[k])) for k in names)]))
        return {"pixel_ap": float(pm["ap"]), "pixel_auroc": float(pm["auroc"]), "best_dice": float(pm["best_dice"]),
                "image_auroc": float(im["auroc"]), "positive_fraction": float(pm["positive_fraction"]),
                "n_anomalous": int(sum(len(scores[k]) for k in names))}

    per_task = {k: one([k]) for k in synth}
    res: dict[str, Any] = {"per_task": per_task, "pooled": one(list(synth))}
    for key in ("pixel_ap", "pixel_auroc", "best_dice", "image_auroc"):
        res[f"mean_{key}"] = float(np.mean([v[key] for v in per_task.values()]))
    unseen = [k for k in UNSEEN_TASKS if k in per_task]
    if unseen:
        res["unseen_tasks"] = unseen
        res["unseen_pixel_ap"] = float(np.mean([per_task[k]["pixel_ap"] for k in unseen]))
        res["unseen_image_auroc"] = float(np.mean([per_task[k]["image_auroc"] for k in unseen]))
    return res


def _evenly(n: int, k: int | None) -> np.ndarray:
    return np.arange(n) if k is None or k >= n else np.unique(np.linspace(0, n - 1, k).round().astype(int))


def validate_run(run: str | Path, out: str | Path | None = None, *, tasks: tuple[str, ...] = DEFAULT_TASKS,
                 draws: int = 1, seed: int = 0, max_images: int | None = None, batch_size: int = 16,
                 force: bool = False, quiet: bool = False, echo: Echo | None = None, figure: bool = True) -> dict[str, Any]:
    """Score a finished run on synthetic anomalies in its healthy validation images (module docstring).

    Writes ``synthetic_validation.json`` (and ``synthetic_examples.png``, one example per task) into ``out`` when
    given. ``max_images`` takes that many validation images, evenly spaced. No lesion label is read.
    """
    from medanomaly.app.datasets import open_dataset
    from medanomaly.app.predict import load_run, predict_arrays
    from medanomaly.data import stack_dataset

    say = make_echo(quiet, echo)
    if batch_size < 1:
        raise PipelineError(f"batch size must be >= 1, got {batch_size}")
    if max_images is not None and max_images < 2:
        raise PipelineError(f"--max-images must be >= 2 (clean and anomalous images are compared), got {max_images}")
    try:
        check_tasks(tuple(tasks))
    except ValueError as e:
        raise PipelineError(str(e)) from e
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        check_writable_folder(out_dir)
        if (out_dir / "synthetic_validation.json").exists() and not force:
            raise PipelineError(f"{out_dir / 'synthetic_validation.json'} already exists; use --force to overwrite")
    det, cfg = load_run(run)
    rd = cfg.get("data") or {}
    if not rd.get("name"):
        raise PipelineError(f"{run} does not record its data, so its validation images are unknown")
    split = rd.get("val_split") or "val"
    try:
        ds = open_dataset(rd["name"], split, normal_only=True, preset=rd.get("preset"), size=rd.get("size"),
                          preset_config=rd.get("preset_config"))
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise PipelineError(f"{run}: its healthy validation split '{split}' of {rd['name']} does not load ({e})") from e
    idx = _evenly(len(ds), max_images)
    if len(idx) < 2:
        raise PipelineError(f"{run}: {len(ds)} healthy validation image(s) in '{split}' of {rd['name']}; need >= 2")
    t0 = time.perf_counter()
    st = stack_dataset(ds, [int(i) for i in idx])
    x = st["image"].float().numpy()
    fg = st["foreground"][:, 0].bool().numpy()
    say(f"validating '{cfg['method']}' on {len(x)} healthy '{split}' images of {rd['name']} with synthetic anomalies "
        f"({', '.join(tasks)}; {draws} draw(s) each)")
    try:
        synth, info = synthetic_set(x, fg, tuple(tasks), draws, seed)
    except ValueError as e:
        raise PipelineError(str(e)) from e
    t_synth = time.perf_counter() - t0
    clean_maps, clean_scores = predict_arrays(det, x, fg[:, None], batch_size)
    maps, scores = {}, {}
    from tqdm.auto import tqdm

    for name in tqdm(list(synth), desc=f"validate {cfg['method']}", disable=quiet, leave=False):
        d = synth[name]
        maps[name], scores[name] = predict_arrays(det, d["image"], fg[d["index"]][:, None], batch_size)
    res = score_synthetic(clean_maps, clean_scores, fg, synth, maps, scores)
    record = {"run": str(run), "method": cfg["method"], "data": rd["name"], "split": split, "normal_only": True,
              "n_images": int(len(x)), "max_images": max_images, "tasks": list(tasks), "draws": draws, "seed": seed,
              "ground_truth": "the task's mask inside the foreground", **res, "synthesis": info,
              "seconds": {"synthesis": round(t_synth, 3), "total": round(time.perf_counter() - t0, 3)},
              "lesion_labels_read": False}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / "synthetic_validation.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(out_dir / "synthetic_validation.json")
        if figure:
            record["figure"] = str(_examples_figure(out_dir / "synthetic_examples.png", synth, maps, fg, clean_maps,
                                                    cfg["method"]))
    return record


def _examples_figure(path: Path, synth: dict[str, dict[str, np.ndarray]], maps: dict[str, np.ndarray], fg: np.ndarray,
                     clean_maps: np.ndarray, method: str) -> Path:
    """One row per task: its draw with the median anomaly size; the map shares the colour scale of all rows."""
    from medanomaly.evaluation.figures import plot_cases, save_fig, score_range

    names = list(synth)
    sizes = [synth[k]["mask"].reshape(len(synth[k]["mask"]), -1).sum(1) for k in names]
    rows = [int(np.argsort(z, kind="stable")[len(z) // 2]) for z in sizes]
    images = np.stack([synth[k]["image"][i] for k, i in zip(names, rows, strict=True)])
    images = images[:, 0]
    smaps = np.stack([maps[k][i] for k, i in zip(names, rows, strict=True)])
    masks = np.stack([synth[k]["mask"][i] for k, i in zip(names, rows, strict=True)])
    f = np.stack([fg[synth[k]["index"][i]] for k, i in zip(names, rows, strict=True)])
    lo, hi = score_range(np.concatenate([clean_maps, smaps]), np.concatenate([fg, f]))
    picks = [(k, r, "") for r, k in enumerate(names)]
    fig = plot_cases(picks, images, smaps, masks, f, float("nan"), map_range=(lo, hi),
                     title=f"{method}: synthetic anomalies in healthy validation images (green: the anomaly)")
    save_fig(fig, path)
    return path
