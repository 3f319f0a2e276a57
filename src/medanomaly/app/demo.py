"""``medanomaly demo``: train the demo method's small configuration on the real 2D brain data, evaluate on test."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medanomaly.app.errors import DataNotFoundError, Echo, make_echo
from medanomaly.app.evaluate import evaluate_run
from medanomaly.app.train import train_run

__all__ = ["DEMO_CONFIG_SET", "DEMO_DATA", "DEMO_DATA_OPTIONS", "DEMO_METHOD", "DEMO_OVERRIDES", "data_not_found_message",
           "run_demo"]

#: the method, data and configuration ``medanomaly demo`` trains; change these to switch the demo
DEMO_METHOD = "multitask"
DEMO_DATA = "lgg-flair-2d"
DEMO_CONFIG_SET = "cpu-small"
#: parameter overrides on top of the demo's config set (dotted keys allowed)
DEMO_OVERRIDES: dict[str, Any] = {}
#: how the demo loads its data (``size``: image side for the preset; the cpu-small configs are sized for 64 px)
DEMO_DATA_OPTIONS: dict[str, Any] = {"size": 64}


def data_not_found_message(looked: Sequence[str]) -> str:
    places = "; ".join(looked) if looked else "(nowhere)"
    return (
        f"the shared real data (a folder holding brain_lgg_flair_2d/) was not found. Looked in: {places}. "
        "Point to it with `export MEDANOMALY_DATA=/path/to/data` (the folder that holds brain_lgg_flair_2d/, "
        "see its README.md/SOURCE.md for where the data come from), or run `medanomaly train/evaluate` on your own "
        "manifest with --data FILE.csv"
    )


def run_demo(
    out: str | Path = "medanomaly-demo",
    *,
    method: str = DEMO_METHOD,
    data: str = DEMO_DATA,
    config_set: str | None = DEMO_CONFIG_SET,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
    echo: Echo | None = None,
) -> dict[str, Any]:
    """Train the demo run in ``out/run`` (a finished one is reused; ``force`` retrains, ``resume`` continues a
    killed one), evaluate on the test split. Returns the metrics, with ``report``, ``train_seconds``, ``total_seconds``."""
    from medanomaly.data.roots import ENV, find_data_root
    from medanomaly.run_folder import RunFolder
    from medanomaly.training.atomic import atomic_write_text

    say = make_echo(quiet, echo)
    root, looked = find_data_root(require="brain_lgg_flair_2d")
    if root is None:
        raise DataNotFoundError(data_not_found_message(looked))
    os.environ.setdefault(ENV, str(root))
    t0 = time.perf_counter()
    out = Path(out)
    run_dir = out / "run"
    if RunFolder(run_dir).is_finished and not force:
        say(f"reusing the finished demo run in {run_dir} (use --force to retrain)")
    else:
        ov = {**DEMO_OVERRIDES, **(overrides or {})}
        train_run(method, data, run_dir, config_set=config_set, overrides=ov or None, resume=resume, force=force,
                  quiet=quiet, echo=echo, size=DEMO_DATA_OPTIONS.get("size"), preset=DEMO_DATA_OPTIONS.get("preset"))
    metrics = evaluate_run(run_dir, data, out / "eval", split="test", force=True, quiet=quiet, echo=echo)
    metrics["total_seconds"] = time.perf_counter() - t0
    atomic_write_text(out / "eval" / "metrics.json", json.dumps(metrics, indent=1))
    return metrics
