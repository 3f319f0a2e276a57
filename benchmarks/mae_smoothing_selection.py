"""Label-free choice of the ``mae`` map post-processing ``score.smooth`` (min- then average pooling) on synthetic
anomalies in HEALTHY validation slices; the test split is evaluated only after the choice, as a report.

For a trained ``mae`` run (default ``out/lgg_to_brats_all/runs/seed-0/mae``, lgg-flair-2d at 64 px):

1. Data: the run's validation split (``val``, ``normal_only=True``: tumour-free slices of the val patients) at the
   run's recorded preset and size, loaded as ``medanomaly evaluate`` loads data (``open_dataset`` with the run's
   ``preset_config``). No lesion mask or label of any split enters steps 1-4.
2. Synthetic anomalies: the five tasks of the ``multitask`` method (``intra-blend``, ``inter-blend``, ``sink``,
   ``source``, ``smooth-intensity``; :mod:`medanomaly.synth`) through multitask's own :class:`SynthSpec` (same
   labeller sigma rule; ``intra-blend`` patches come from another val slice, ``inter-blend`` from the
   ``pneumoniamnist`` training images as the method's ``inter_source: auto``, else contrast-inverted val slices).
   ``--draws`` draws per slice and task, each seeded by ``(--seed, task, slice, draw)``; a draw whose mask misses
   the foreground is redrawn (up to 5 times). Ground truth: the synthetic mask inside the foreground (multitask's
   synthetic validation convention).
3. Maps: the run's map with smoothing off (``det.predict``), and ``smooth_min_avg`` of it re-masked to the
   foreground (exactly what ``score.smooth`` does; checked against ``predict`` of a detector with each setting on
   a batch) for ``min_size`` x ``avg_size`` in {1, 3, 5} x {1, 3, 5} (``--sizes``); plain ``intensity`` (default settings: the
   image z-scored over its foreground, no smoothing) as a reference.
4. Metrics (:func:`medanomaly.evaluation.metrics.pixel_metrics`, exact and tested against scikit-learn): pixel AP,
   AUROC and best DICE over the foreground pixels of the clean val slices (all negative) plus the anomalous slices
   of one task (per task) or of all tasks (overall); ``edge``: the share of the top-k foreground pixels (k = number
   of positives) within 4 px of the foreground edge, overall. Choice: the setting with the best overall pixel AP
   (ties: the smaller windows).
5. Only after the choice, as a report (``--no-test`` skips it): ``medanomaly evaluate``'s code
   (:func:`medanomaly.app.evaluate.evaluate_run`) on the ``--test-data`` test split(s) for the run as it is (off)
   and for a copy of the run with the chosen ``score.smooth`` (same weights, ``config.yaml`` with the new setting,
   ``calibration.json`` recomputed with :func:`medanomaly.app.calibrate.healthy_calibration` on the same healthy
   validation images as ``medanomaly train`` does; recomputing the original run's calibration this way is checked
   against its stored ``calibration.json`` first).

Command (1 thread; the numbers of docs/results/mae_smoothing_selection.md)::

    cd /work/main && . .venv/bin/activate
    OMP_NUM_THREADS=1 MEDANOMALY_THREADS=1 python benchmarks/mae_smoothing_selection.py \\
        --run out/lgg_to_brats_all/runs/seed-0/mae --out out/mae_smoothing_selection --draws 3 --seed 0 \\
        --test-data lgg-flair-2d --test-data brats2018-3d:view=slices

A wider grid, selection only: ``--sizes 1,3,5,7,9 --no-test --out out/mae_smoothing_selection_wide``. Smoke run
(seconds): ``--max-slices 16 --draws 1 --no-test --out /tmp/mss_smoke``.

Writes ``OUT/selection.json`` (every number), ``OUT/selection.md`` (the tables), ``OUT/run-min<A>-avg<B>`` (the
derived run) and ``OUT/eval/<setting>-<data>/metrics.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

TASKS = ("intra-blend", "inter-blend", "sink", "source", "smooth-intensity")
Setting = tuple[int, int]


def label(s: Setting) -> str:
    return "off" if s == (1, 1) else f"min{s[0]}-avg{s[1]}"


# -- data -------------------------------------------------------------------------------------------------------
def healthy_val(cfg: dict[str, Any], data: str | None, split: str | None) -> tuple[Any, dict[str, torch.Tensor]]:
    """The run's healthy validation slices at its preset/size (as ``evaluate`` opens data): (dataset, stacked)."""
    from medanomaly.app.datasets import open_dataset
    from medanomaly.data import stack_dataset

    rd = cfg.get("data") or {}
    ds = open_dataset(data or rd["name"], split or rd.get("val_split") or "val", normal_only=True,
                      preset=rd.get("preset"), size=rd.get("size"), preset_config=rd.get("preset_config"))
    st = stack_dataset(ds)
    return ds, {"image": st["image"].float(), "foreground": st["foreground"].bool()}


def synthetic(val: dict[str, torch.Tensor], tasks: tuple[str, ...], draws: int, seed: int,
              inter_data: str | None) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Per task: ``draws`` anomalous copies of every val slice (images (N*draws, C, H, W), masks (N*draws, H, W))."""
    import warnings

    from medanomaly.methods.multitask.pool import HealthyPool, inter_source_images
    from medanomaly.methods.multitask.synthesis import SynthSpec

    x, fg = val["image"].numpy(), val["foreground"][:, 0].numpy()
    pool = HealthyPool([im for im in x], [f for f in fg], [str(i) for i in range(len(x))])
    info: dict[str, Any] = {"inter_source": None, "redrawn": {}, "empty": {}}
    inter = None
    if "inter-blend" in tasks:
        ds = None
        if inter_data:
            from medanomaly.app.datasets import open_dataset

            try:
                ds = open_dataset(inter_data, "train", normal_only=True)
                info["inter_source"] = f"{inter_data} (train, normal_only)"
            except Exception as e:  # noqa: BLE001 - the method's own fallback, said so
                info["inter_source"] = f"contrast-inverted val slices ({inter_data} not loaded: {str(e)[:120]})"
        else:
            info["inter_source"] = "contrast-inverted val slices"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inter = inter_source_images("auto", pool, True, ds)
    spec = SynthSpec(list(tasks), {}, 0.2 * pool.foreground_std(), inter)  # multitask's labeller rule (sigma 0.2 std)
    out: dict[str, dict[str, torch.Tensor]] = {}
    idx_all = np.arange(len(x))
    for t, name in enumerate(tasks):
        imgs, masks, redrawn, empty = [], [], 0, 0
        for i in range(len(x)):
            others = np.delete(idx_all, i)  # intra-blend: a patch of another slice
            for d in range(draws):
                rng = np.random.default_rng([seed, t, i, d])
                for attempt in range(5):
                    img, _, mask = spec.apply(t, x[i], fg[i], rng, pool, others)
                    m = mask[0] & fg[i]
                    if m.any():
                        break
                    redrawn += attempt < 4
                else:
                    empty += 1
                imgs.append(torch.from_numpy(np.ascontiguousarray(img)))
                masks.append(torch.from_numpy(np.ascontiguousarray(m)))
        out[name] = {"image": torch.stack(imgs), "mask": torch.stack(masks),
                     "foreground": val["foreground"].repeat_interleave(draws, 0)}
        info["redrawn"][name], info["empty"][name] = redrawn, empty
    return out, info


# -- maps and metrics -------------------------------------------------------------------------------------------
def predict_maps(det: Any, images: torch.Tensor, fg: torch.Tensor, bs: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([det.predict(images[i:i + bs], fg[i:i + bs]).pixel_scores.float()
                          for i in range(0, len(images), bs)])


def smoothed(maps: torch.Tensor, fg: torch.Tensor, s: Setting) -> torch.Tensor:
    """What ``score.smooth`` does to the (foreground-masked) map: ``smooth_min_avg``, then masked again."""
    from medanomaly.evaluation.postprocess import smooth_min_avg

    if s == (1, 1):
        return maps
    return smooth_min_avg(maps, s[0], s[1], spatial_dims=2) * fg[:, 0]


def with_setting(det: Any, s: Setting) -> Any:
    """The run's detector (same weights) with ``score.smooth`` = ``s``."""
    from medanomaly.methods import get_method

    params = copy.deepcopy(det.params)
    params["score"]["smooth"] = {"min_size": s[0], "avg_size": s[1]}
    new = get_method(det.name, **params)
    new.load_state_tensors(det.state_tensors())
    new.train_log = list(det.train_log)
    new.is_fitted = True
    return new


def edge_band(fg: torch.Tensor, r: int = 4) -> torch.Tensor:
    """Foreground pixels within ``r`` px (Chebyshev) of the foreground edge; (N, 1, H, W) -> (N, H, W)."""
    f = fg[:, 0].float().unsqueeze(1)
    inner = -torch.nn.functional.max_pool2d(-torch.nn.functional.pad(f, (r, r, r, r)), 2 * r + 1, stride=1)
    return fg[:, 0] & (inner[:, 0] < 0.5)


def metrics(maps: torch.Tensor, masks: torch.Tensor, fg: torch.Tensor, band: torch.Tensor | None = None) -> dict[str, float]:
    from medanomaly.evaluation.metrics import pixel_metrics

    pm = pixel_metrics(maps.numpy(), masks.numpy(), fg[:, 0].numpy(), per_case=False)
    out = {"ap": float(pm["ap"]), "auroc": float(pm["auroc"]), "best_dice": float(pm["best_dice"])}
    if band is not None:
        f = fg[:, 0]
        v, m, b = maps[f].numpy().astype(np.float64), masks[f].numpy(), band[f].numpy()
        k = int(m.sum())
        top = np.argsort(v, kind="stable")[-k:]
        out["edge"] = float(b[top].mean())
    return out


def score_sets(clean: torch.Tensor, synth_maps: dict[str, torch.Tensor], val: dict[str, torch.Tensor],
               synth: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """Per task (clean slices + that task's anomalous slices) and overall (clean + all tasks)."""
    fg0 = val["foreground"]
    neg = torch.zeros(fg0.shape[0], *fg0.shape[2:], dtype=torch.bool)
    res = {}
    for name, m in synth_maps.items():
        res[name] = metrics(torch.cat([clean, m]), torch.cat([neg, synth[name]["mask"]]),
                            torch.cat([fg0, synth[name]["foreground"]]))
    allm = torch.cat([clean, *synth_maps.values()])
    allfg = torch.cat([fg0, *(synth[n]["foreground"] for n in synth_maps)])
    res["overall"] = metrics(allm, torch.cat([neg, *(synth[n]["mask"] for n in synth_maps)]), allfg, edge_band(allfg))
    return res


# -- after the choice: the test report --------------------------------------------------------------------------
def _close(a: Any, b: Any) -> float:
    """Largest absolute difference between two calibration records' numbers (inf when their structure differs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return math.inf
        return max([_close(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return math.inf
        return max([_close(u, v) for u, v in zip(a, b, strict=True)] or [0.0])
    if isinstance(a, bool | str | type(None)) or isinstance(b, bool | str | type(None)):
        return 0.0 if a == b else math.inf
    return abs(float(a) - float(b))


def derived_run(run: Path, det: Any, cfg: dict[str, Any], s: Setting, dest: Path) -> tuple[Path, dict[str, Any]]:
    """A copy of ``run`` with ``score.smooth`` = ``s``: same weights, the setting recorded in ``config.yaml`` (and in
    ``train.overrides``), ``calibration.json`` recomputed on the healthy validation images as ``train`` does."""
    from medanomaly.app.calibrate import healthy_calibration
    from medanomaly.app.datasets import open_dataset
    from medanomaly.run_folder import RunFolder, plain

    rd = cfg["data"]
    val_split = rd.get("val_split")
    if not val_split:
        raise SystemExit(f"{run}: trained without a validation split; its calibration came from the training images")
    # the validation images exactly as medanomaly train opened them
    val = open_dataset(rd["name"], val_split, normal_only=True, preset=rd.get("preset"), size=rd.get("size"),
                       max_cases=rd.get("max_cases"))
    source = f"validation split '{val_split}' (healthy images)"
    stored = RunFolder(run).read_calibration()
    again = json.loads(json.dumps(plain(healthy_calibration(det, val, source=source))))
    check = {k: _close(again[k], stored[k]) for k in ("voxel", "image", "n_images", "source")} if stored else None
    if check is not None and max(check.values()) > 1e-4:
        raise SystemExit(f"recomputing {run}'s calibration does not reproduce its calibration.json ({check})")
    new = with_setting(det, s)
    calibration = healthy_calibration(new, val, source=source)
    train = dict(cfg.get("train") or {})
    train["overrides"] = {**(train.get("overrides") or {}), "score.smooth.min_size": s[0], "score.smooth.avg_size": s[1]}
    train["derived_from"] = f"{run} (same weights; score.smooth changed, calibration recomputed)"
    sections = {k: cfg[k] for k in ("data", "sources") if k in cfg} | {"train": train}
    return new.save(dest, sections=sections, calibration=calibration), {"calibration_recheck_max_abs_diff": check}


def test_report(run: Path, det: Any, cfg: dict[str, Any], chosen: Setting, out: Path, datasets: list[str],
                split: str) -> dict[str, Any]:
    from medanomaly.app.evaluate import evaluate_run

    runs = {"off": run}
    rec: dict[str, Any] = {}
    if chosen != (1, 1):
        runs[label(chosen)], rec["derived"] = derived_run(run, det, cfg, chosen, out / f"run-{label(chosen)}")
    keys = ("pixel_ap", "pixel_auroc", "best_dice", "sample_ap", "sample_auroc", "calibrated_dice",
            "calibrated_precision", "calibrated_recall", "calibrated_fpr", "calibrated_threshold", "n_images",
            "n_with_mask", "predict_seconds")
    for data in datasets:
        for name, r in runs.items():
            tag = data.replace(":", "_").replace("=", "-").replace("/", "_")
            m = evaluate_run(r, data, out / "eval" / f"{name}-{tag}", split=split, report=False, quiet=True, force=True)
            rec[f"{data} | {name}"] = {k: m.get(k) for k in keys}
            print(json.dumps({"test": data, "setting": name, **{k: m.get(k) for k in keys[:6]}}), flush=True)
    return rec


# -- tables -----------------------------------------------------------------------------------------------------
def tables(rows: dict[str, dict[str, dict[str, float]]], tasks: tuple[str, ...]) -> str:
    cols = [*tasks, "overall"]
    lines = ["Pixel AP (foreground pixels; clean val slices + anomalous slices):", "",
             "| map | " + " | ".join(cols) + " | overall AUROC | overall best DICE | top-k in edge band |",
             "|---|" + "---:|" * (len(cols) + 3)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]['ap']:.3f}" for c in cols)
                     + f" | {r['overall']['auroc']:.3f} | {r['overall']['best_dice']:.3f} | {r['overall']['edge']:.2f} |")
    lines += ["", "Pixel AUROC / best DICE per task:", "", "| map | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]['auroc']:.3f} / {r[c]['best_dice']:.3f}" for c in tasks) + " |")
    return "\n".join(lines)


def parse_sizes(text: str, parser: argparse.ArgumentParser) -> tuple[int, ...]:
    """``--sizes``: odd window sizes >= 1, including 1 (off); anything else is one argparse error, before any work."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        parser.error(f"--sizes must be comma-separated odd integers (e.g. 1,3,5), got {text!r}")
    if 1 not in sizes or any(v < 1 or v % 2 == 0 for v in sizes):
        parser.error(f"--sizes must be odd integers >= 1 and include 1 (off), got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="out/lgg_to_brats_all/runs/seed-0/mae", help="a finished mae run folder (2D)")
    p.add_argument("--out", default="out/mae_smoothing_selection")
    p.add_argument("--data", default=None, help="healthy validation data (default: the run's own)")
    p.add_argument("--split", default=None, help="its split (default: the run's val split)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--sizes", default="1,3,5", help="odd window sizes of the grid (min_size x avg_size)")
    p.add_argument("--draws", type=int, default=3, help="synthetic draws per slice and task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inter-data", default="pneumoniamnist", help="inter-blend source images ('' = inverted val slices)")
    p.add_argument("--max-slices", type=int, default=None, help="only the first N val slices (smoke runs)")
    p.add_argument("--test-data", action="append", default=None,
                   help="data set(s) whose --test-split is evaluated after the choice (default: lgg-flair-2d)")
    p.add_argument("--test-split", default="test")
    p.add_argument("--no-test", action="store_true", help="stop after the choice")
    args = p.parse_args(argv)
    sizes = parse_sizes(args.sizes, p)
    from medanomaly.app.predict import load_run
    from medanomaly.methods import get_method
    from medanomaly.methods.base import RunContext

    t0 = time.perf_counter()
    torch.manual_seed(0)
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    det, cfg = load_run(run)
    if cfg["method"] != "mae":
        raise SystemExit(f"{run} holds a '{cfg['method']}' run; this script chooses mae's score.smooth")
    if det.params["score"]["smooth"] != {"min_size": 1, "avg_size": 1}:
        raise SystemExit(f"{run} already smooths its map ({det.params['score']['smooth']}); give the unsmoothed run")
    det.set_context(RunContext(quiet=True))
    val_ds, val = healthy_val(cfg, args.data, args.split)
    if args.max_slices:
        val = {k: v[:args.max_slices] for k, v in val.items()}
    tasks = tuple(args.tasks.split(","))
    synth, sinfo = synthetic(val, tasks, args.draws, args.seed, args.inter_data or None)
    n_anom = {k: int(v["mask"].flatten(1).any(1).sum()) for k, v in synth.items()}
    print(f"{len(val['image'])} healthy val slices; anomalous slices per task: {n_anom}; {sinfo} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    # maps: off once, the grid by post-processing (checked against predict of each setting on one batch)
    t1 = time.perf_counter()
    clean = predict_maps(det, val["image"], val["foreground"])
    raw = {n: predict_maps(det, d["image"], d["foreground"]) for n, d in synth.items()}
    predict_s = time.perf_counter() - t1
    grid = [(a, b) for a in sizes for b in sizes]
    xb, fb = synth[tasks[0]]["image"][:32], synth[tasks[0]]["foreground"][:32]
    for s in grid:
        got = predict_maps(with_setting(det, s), xb, fb)
        if not torch.equal(got, smoothed(raw[tasks[0]][:32], fb, s)):
            raise SystemExit(f"score.smooth {s}: predict differs from smooth_min_avg of the unsmoothed map")
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for s in grid:
        rows[f"mae {label(s)}"] = score_sets(smoothed(clean, val["foreground"], s),
                                             {n: smoothed(m, synth[n]["foreground"], s) for n, m in raw.items()},
                                             val, synth)
        print(json.dumps({"setting": label(s), **{k: round(v["ap"], 4) for k, v in rows[f"mae {label(s)}"].items()}}),
              flush=True)
    ref = get_method("intensity")  # plain intensity: image z-scored over its foreground, no smoothing
    ref.fit(val_ds, context=RunContext(quiet=True))  # normalise='image' learns nothing
    rows["intensity (reference)"] = score_sets(predict_maps(ref, val["image"], val["foreground"]),
                                               {n: predict_maps(ref, d["image"], d["foreground"]) for n, d in synth.items()},
                                               val, synth)
    best = max(grid, key=lambda s: (round(rows[f"mae {label(s)}"]["overall"]["ap"], 6), -sum(s), -s[0]))
    off_ap, best_ap = rows["mae off"]["overall"]["ap"], rows[f"mae {label(best)}"]["overall"]["ap"]
    md = tables(rows, tasks)
    print(md)
    print(f"\nCHOSEN (best overall synthetic pixel AP, label-free): score.smooth = {{min_size: {best[0]}, "
          f"avg_size: {best[1]}}} ({label(best)}): AP {best_ap:.3f} vs off {off_ap:.3f}", flush=True)
    record: dict[str, Any] = {
        "run": str(run), "args": vars(args), "n_val_slices": len(val["image"]), "anomalous_slices": n_anom,
        "synth": sinfo, "rows": rows, "chosen": {"min_size": best[0], "avg_size": best[1]},
        "mae_predict_seconds_off": round(predict_s, 1), "selection_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "selection.json").write_text(json.dumps(record, indent=1))
    if not args.no_test:
        t2 = time.perf_counter()
        record["test"] = test_report(run, det, cfg, best, out, args.test_data or ["lgg-flair-2d"], args.test_split)
        record["test_seconds"] = round(time.perf_counter() - t2, 1)
        lines = ["| test data | setting | pixel AP | pixel AUROC | best DICE | sample AP | sample AUROC | calibrated DICE |",
                 "|---|---|---:|---:|---:|---:|---:|---:|"]
        for key, m in record["test"].items():
            if " | " in key:
                lines.append(f"| {key} | " + " | ".join(f"{m[k]:.3f}" for k in ("pixel_ap", "pixel_auroc", "best_dice",
                                                                              "sample_ap", "sample_auroc",
                                                                              "calibrated_dice")) + " |")
        md += "\n\nAfter the choice (report only):\n\n" + "\n".join(lines)
        print("\n".join(lines))
    record["total_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "selection.json").write_text(json.dumps(record, indent=1))
    (out / "selection.md").write_text(md + "\n")
    print(f"total {record['total_seconds']:.0f} s; wrote {out / 'selection.json'} and {out / 'selection.md'}")


if __name__ == "__main__":
    main()
