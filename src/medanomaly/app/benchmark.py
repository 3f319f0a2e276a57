"""``medanomaly benchmark``: train (or reuse) and evaluate several methods on the same split, one comparison table.

Sharing of trained parts (a family's tokenizer or MAE, a multitask ensemble's members) is declared by the methods
(:meth:`~medanomaly.methods.base.Detector.shared_parts` / ``reuse_parts``); this module only matches the parts
of the runs asked for. Nothing here names a method family.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medanomaly.app.config import parse_overrides, resolve_config
from medanomaly.app.datasets import data_name, open_dataset
from medanomaly.app.errors import Echo, PipelineError, make_echo
from medanomaly.app.evaluate import evaluate_run
from medanomaly.app.train import train_run

__all__ = ["parse_benchmark_methods", "parse_benchmark_overrides", "parse_seeds", "plan_sharing", "run_benchmark"]


def parse_benchmark_methods(items: Sequence[str]) -> list[tuple[str, str]]:
    """``["intensity", "mim-ood-r8=mim-ood"]`` -> ``[(label, method), ...]``; a label names a variant's run."""
    from medanomaly.methods import get_method_class

    out: list[tuple[str, str]] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        label, eq, method = item.partition("=")
        label, method = label.strip(), (method.strip() if eq else label.strip())
        if not label or not method or "/" in label or label.startswith("."):
            raise PipelineError(f"--methods: '{item}' is not NAME or LABEL=NAME")
        get_method_class(method)  # unknown method: fails before any training
        out.append((label, method))
    if not out:
        raise PipelineError("--methods is empty; give a comma-separated list, e.g. intensity,autoencoder")
    labels = [lab for lab, _ in out]
    if len(set(labels)) != len(labels):
        raise PipelineError(f"--methods lists a label twice: {','.join(labels)} (name variants LABEL=METHOD)")
    return out


def parse_benchmark_overrides(items: Sequence[str] | None, labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["mim-ood-r8.restoration.R=8"]`` -> ``{"mim-ood-r8": {"restoration.R": 8}}``; the first part is a label."""
    flat = parse_overrides(items)
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        label = next((lab for lab in sorted(labels, key=len, reverse=True) if key.startswith(lab + ".")), None)
        if label is None:
            raise PipelineError(f"--set {key}: must start with one of the labels in --methods ({', '.join(labels)}), "
                                "e.g. --set mim-ood.restoration.R=8")
        out.setdefault(label, {})[key[len(label) + 1:]] = value
    return out


def _canon(x: Any) -> str:
    return json.dumps(x, sort_keys=True, default=str)


def plan_sharing(
    entries: Sequence[tuple[str, str]], params: dict[str, dict[str, Any]], overrides: dict[str, dict[str, Any]],
    runs_dir: Path,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Which runs start from another run's trained parts, as the papers' comparisons share them.

    Each method declares the parts it trains and what determines each (``shared_parts(params)``). A run reuses
    parts from the one earlier-ranked run (rank: the method's ``share_priority``, then the order listed) that
    provides the most of its parts with equal settings; ``reuse_parts`` turns that into parameter overrides. A run
    whose own overrides already set those parameters is left alone. Returns (extra overrides per label, a note per
    label for the comparison table).
    """
    from medanomaly.methods import get_method_class

    rank = {lab: (get_method_class(m).share_priority, i) for i, (lab, m) in enumerate(entries)}
    parts = {lab: {k: _canon(v) for k, v in get_method_class(m).shared_parts(params[lab]).items()} for lab, m in entries}
    extra: dict[str, dict[str, Any]] = {}
    notes: dict[str, str] = {}
    for lab, m in entries:
        mine = parts[lab]
        if not mine:
            continue
        cls = get_method_class(m)
        keys = set(cls.reuse_parts(sorted(mine), "x"))  # a run told where to load from (or not to) is left alone
        if any(k == r or r.startswith(f"{k}.") for k in overrides.get(lab) or {} for r in keys):
            continue
        best, best_parts, differ = None, [], None
        for src, _ in sorted(entries, key=lambda e: rank[e[0]]):
            if rank[src] >= rank[lab]:
                break
            same = [p for p, key in mine.items() if parts[src].get(p) == key]
            if len(same) > len(best_parts):
                best, best_parts = src, same
            if differ is None and any(p in parts[src] and parts[src][p] != key for p, key in mine.items()):
                differ = src
        if best is None:
            if differ is not None:
                notes[lab] = f"own {', '.join(p.split('.')[-1] for p in mine)} (settings differ from {differ})"
            continue
        extra[lab] = cls.reuse_parts(best_parts, str(runs_dir / best))
        notes[lab] = f"{', '.join(p.split('.')[-1] for p in best_parts)} from {best}"
    return extra, notes


def _training_order(entries: list[tuple[str, str]], extra: dict[str, dict[str, Any]], runs_dir: Path) -> list[tuple[str, str]]:
    """Sources before the runs that reuse them (a topological order; entries keep their listed order otherwise)."""
    deps = {lab: {Path(str(v)).name for v in ov.values() if isinstance(v, str) and Path(str(v)).parent == runs_dir}
            for lab, ov in extra.items()}
    done: list[tuple[str, str]] = []
    left = list(entries)
    while left:
        for e in left:
            if deps.get(e[0], set()) <= {d[0] for d in done}:
                done.append(e)
                left.remove(e)
                break
        else:  # pragma: no cover - plan_sharing only reuses earlier-ranked runs, so there is no cycle
            raise PipelineError(f"circular sharing between {[e[0] for e in left]}")
    return done


#: the calibrated-threshold metrics of ``evaluate`` (``calibrated_*`` in metrics.json) shown beside best DICE
_CALIBRATED = ("calibrated_dice", "calibrated_precision", "calibrated_recall", "calibrated_fpr")


def parse_seeds(text: str | Sequence[int] | None) -> list[int] | None:
    """``"0,1,2"`` (or a list) -> ``[0, 1, 2]``; None or empty -> None. Seeds are distinct ints >= 0."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    try:
        seeds = [int(t) for t in items if t != ""]
    except (TypeError, ValueError) as e:
        raise PipelineError(f"--seeds: '{text}' is not a comma-separated list of integers, e.g. 0,1,2") from e
    if any(k < 0 for k in seeds) or len(set(seeds)) != len(seeds):
        raise PipelineError(f"--seeds: {seeds} must be distinct integers >= 0")
    return seeds or None


def run_benchmark(
    methods: Sequence[str],
    data: Any,
    out: str | Path,
    *,
    config_set: str | None = "cpu-small",
    overrides: dict[str, dict[str, Any]] | None = None,
    split: str = "test",
    train_split: str = "train",
    train_data: Any = None,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    size: Any = None,
    batch_size: int = 16,
    share: bool = True,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
    echo: Echo | None = None,
) -> list[dict[str, Any]]:
    """Train (or reuse finished runs under ``out/runs/<label>``) and evaluate each method on the same split.

    ``methods``: names or ``LABEL=METHOD`` variants (``mim-ood-r8=mim-ood``); ``overrides``: parameters per label.
    ``train_data``: train on other data than ``data`` (e.g. healthy IXI, test on BraTS); default: ``data``.
    ``share``: runs start from the trained parts of others where the methods declare them shareable (see
    :func:`plan_sharing`); those parts are trained first. A finished run is reused only when it was trained with the
    same method, parameters, config set and overrides on the same training images (content fingerprint);
    ``resume`` continues unfinished runs; ``force`` retrains everything.

    ``seeds``: train and evaluate every method once per seed, in ``out/runs/seed-<k>/<label>`` and
    ``out/eval/seed-<k>/<label>``; sharing is planned within each seed's runs only, never across seeds.
    ``comparison.md``/``.html`` then show mean ± std over the seeds (:func:`~medanomaly.evaluation.table.aggregate_seeds`),
    ``comparison.csv``/``.json`` the per-seed rows. ``seed`` (one seed, the old layout) and ``seeds`` exclude each
    other. Returns the per-seed rows (one per method when ``seeds`` is not given).
    """
    if seed is not None and seeds is not None:
        raise PipelineError("give either --seed or --seeds, not both")
    seed_list = parse_seeds(seeds)
    entries = parse_benchmark_methods(methods)
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    unknown = sorted(set(overrides) - {lab for lab, _ in entries})
    if unknown:
        raise PipelineError(f"overrides for {unknown}, which --methods does not list")
    if seed_list is not None:
        clash = sorted(lab for lab in overrides if "seed" in overrides[lab])
        if clash:
            raise PipelineError(f"--set {clash[0]}.seed and --seeds: the seeds come from --seeds")
    out = Path(out)
    train_data = data if train_data is None else train_data
    runs = [(k, out / "runs" / f"seed-{k}", out / "eval" / f"seed-{k}") for k in seed_list] if seed_list is not None \
        else [(seed, out / "runs", out / "eval")]
    params = {k: _resolve_params(entries, overrides, config_set, k) for k, _, _ in runs}  # every seed checked first
    say = make_echo(quiet, echo)
    fingerprints: dict[str, str] = {}

    def fingerprint() -> str:
        from medanomaly.data.fingerprint import dataset_fingerprint

        key = _canon(size)
        if key not in fingerprints:
            fingerprints[key] = dataset_fingerprint(open_dataset(train_data, train_split, normal_only=True, size=size))
        return fingerprints[key]

    rows: list[dict[str, Any]] = []
    for k, runs_dir, eval_dir in runs:
        tag = "" if seed_list is None else f"seed {k}: "
        extra, notes = plan_sharing(entries, params[k], overrides, runs_dir) if share else ({}, {})
        results: dict[str, dict[str, Any]] = {}
        for lab, m in _training_order(list(entries), extra, runs_dir):
            run_dir, ov = runs_dir / lab, {**overrides.get(lab, {}), **extra.get(lab, {})}
            reused = _reusable(run_dir, m, ov, config_set, train_data, train_split, k, size, force, fingerprint,
                               shared=_sharing_keys(m, params[k][lab]) | set(extra.get(lab, {})))
            if reused:
                say(f"[{tag}{lab}] reusing the finished run in {run_dir}")
            else:
                say(f"[{tag}{lab}] training {m}" + (f" ({notes[lab]})" if lab in notes else "") + " ...")
                train_run(m, train_data, run_dir, split=train_split, config_set=config_set, overrides=ov or None,
                          seed=k, size=size, resume=resume, force=force, quiet=quiet, echo=echo,
                          eval_data=data, eval_split=split)
            say(f"[{tag}{lab}] evaluating on '{split}' ...")
            metrics = evaluate_run(run_dir, data, eval_dir / lab, split=split, batch_size=batch_size, force=True,
                                   quiet=quiet, echo=echo)
            results[lab] = _row(lab, m, config_set, metrics, reused, notes.get(lab, ""), overrides.get(lab),
                                eval_dir.relative_to(out) / lab / "report.html", None if seed_list is None else k)
        rows += [results[lab] for lab, _ in entries]
    from medanomaly.evaluation.table import aggregate_seeds, write_comparison_table
    from medanomaly.methods.base import library_versions
    from medanomaly.training.atomic import atomic_write_text

    summary = aggregate_seeds(rows) if seed_list is not None else rows
    write_comparison_table(summary, out, csv_rows=rows)
    atomic_write_text(out / "comparison.json", json.dumps({"seeds": seed_list, "rows": rows, "summary": summary},
                                                          indent=1, default=str))
    record = {"data": data_name(data), "train_data": data_name(train_data), "split": split, "config_set": config_set,
              "batch_size": batch_size, "methods": {lab: m for lab, m in entries}, "seeds": seed_list, "rows": rows,
              "versions": library_versions()}
    atomic_write_text(out / "benchmark.json", json.dumps(record, indent=1, default=str))
    say(f"comparison table: {out / 'comparison.md'}")
    return rows


def _resolve_params(entries: list[tuple[str, str]], overrides: dict[str, dict[str, Any]], config_set: str | None,
                    seed: int | None) -> dict[str, dict[str, Any]]:
    """Every run's parameters at ``seed``; fails before any training on a typo, a bad value or a missing config set."""
    from medanomaly.methods import get_method_class

    params: dict[str, dict[str, Any]] = {}
    for lab, m in entries:
        cls = get_method_class(m)
        if config_set and config_set not in cls.config_sets():
            avail = ", ".join(cls.config_sets()) or "(none)"
            raise PipelineError(f"method '{m}' has no config set '{config_set}'; available: {avail}")
        try:
            ov = dict(overrides.get(lab) or {})
            if seed is not None:
                ov["seed"] = int(seed)
            params[lab] = resolve_config(m, config_set=config_set, overrides=ov)[0]
        except (KeyError, ValueError) as e:
            raise PipelineError(f"--set for '{lab}': {e.args[0] if e.args else e}") from e
    return params


def _reusable(run_dir: Path, method: str, ov: dict[str, Any], config_set: str | None, train_data: Any, train_split: str,
              seed: int | None, size: Any, force: bool, fingerprint: Any, shared: set[str] | None = None) -> bool:
    """True when ``run_dir`` holds a finished run of these settings on these images; raises when it holds another.

    ``shared``: the parameters that say where a shared part is loaded from (the benchmark's sharing plan). Sharing
    happens only between equal settings, so a part loaded from another run equals the part trained in the run
    itself: a finished run is reused whether or not it was trained with those parameters."""
    from medanomaly.run_folder import RunFolder

    folder = RunFolder(run_dir)
    if not folder.is_finished or force:
        return False
    cfg = folder.read_config()
    shared = shared or set()
    recorded = {k: v for k, v in ((cfg.get("train") or {}).get("overrides") or {}).items() if k not in shared}
    wanted = {k: v for k, v in ov.items() if k not in shared}
    same = (
        cfg.get("method") == method
        and (cfg.get("train") or {}).get("config_set") == config_set
        and (cfg.get("data") or {}).get("name") == data_name(train_data)
        and recorded == json.loads(json.dumps(wanted, default=str))
        and (seed is None or (cfg.get("train") or {}).get("seed") == seed)
        and (size is None or (cfg.get("data") or {}).get("size") == size)
    )
    if not same:
        raise PipelineError(f"{run_dir} holds a run trained with other settings (method/data/config set/overrides/"
                            "seed); use --force to retrain")
    changed = [c for c in _changed_params(cfg.get("params") or {}, method, config_set,
                                          {**wanted, **({} if seed is None else {"seed": seed})}) if c not in shared]
    if changed:
        raise PipelineError(f"{run_dir} was trained with other values of {', '.join(changed)} than its config set "
                            f"'{config_set}' gives now (the config set changed since); use --force to retrain")
    if (cfg.get("data") or {}).get("fingerprint") != fingerprint():
        raise PipelineError(f"{run_dir} was trained on other images than {data_name(train_data)} "
                            f"({train_split}) holds now; use --force to retrain")
    return True


def _sharing_keys(method: str, params: dict[str, Any]) -> set[str]:
    """The parameters through which ``method`` loads shared parts from another run (``reuse_parts``' keys)."""
    from medanomaly.methods import get_method_class

    cls = get_method_class(method)
    parts = cls.shared_parts(params)
    return set(cls.reuse_parts(sorted(parts), "x")) if parts else set()


def _changed_params(recorded: dict[str, Any], method: str, config_set: str | None, ov: dict[str, Any]) -> list[str]:
    """The parameters whose recorded value differs from what the settings resolve to now (dotted, sorted).

    A parameter the run does not record (added to the method after the run was trained) is not a difference: new
    parameters default to the behaviour before they existed (e.g. multitask's ``augment``, off).
    """
    from medanomaly.app.config import resolve_config

    now = json.loads(json.dumps(resolve_config(method, config_set=config_set, overrides=ov)[0], default=str))
    then = json.loads(json.dumps(recorded, default=str))

    def diff(a: Any, b: Any, path: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted(set(a) & set(b)) for d in diff(a[k], b[k], f"{path}{k}.")]
        return [] if a == b else [path[:-1]]

    return diff(then, now, "")


def _row(lab: str, method: str, config_set: str | None, metrics: dict[str, Any], reused: bool, shares: str,
         settings: dict[str, Any] | None, report: Path, seed: int | None) -> dict[str, Any]:
    """One comparison-table row; the calibrated-threshold metrics sit beside best DICE when the evaluation has them."""
    row: dict[str, Any] = {"method": lab, "base_method": method}
    if seed is not None:
        row["seed"] = seed
    row.update({"config_set": config_set, "pixel_ap": metrics["pixel_ap"], "pixel_auroc": metrics["pixel_auroc"],
                "best_dice": metrics["best_dice"]})
    row.update({k: metrics[k] for k in _CALIBRATED if k in metrics})
    row.update({
        "sample_ap": metrics["sample_ap"],
        "sample_auroc": metrics["sample_auroc"],
        "train_seconds": metrics.get("train_seconds"),
        "seconds_per_image": metrics["seconds_per_image"],
        "seconds_per_batch": metrics["seconds_per_batch"],
        "device": metrics["device"],
        "n_test": metrics["n_images"],
        "reused_run": reused,
        "shares": shares,
        "settings": json.dumps(settings, sort_keys=True, default=str) if settings else "",
        "report": str(report),
    })
    return row
