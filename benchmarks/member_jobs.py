"""Multitask ensemble training: members one after another in one process, against members in parallel processes.

Trains the same ``multitask`` ensemble (cpu-small settings, ``--members`` members, ``--steps`` steps each, no early
stop) on generated 64 px brain-like images, once per ``--jobs`` value (``member_jobs``: 1 = in turn with every
thread; N = N spawned processes with threads // N torch threads each; 0 = as many as the members and threads
allow), and prints wall seconds and the ratio against ``member_jobs=1`` measured in the same run. Run it on a quiet
machine: the ratio is what the scheduling gains, e.g. on this 2-core machine::

    python benchmarks/member_jobs.py --members 3 --steps 300 --jobs 1,0
    python benchmarks/member_jobs.py --members 4 --steps 300 --jobs 1,2

Start-up of the spawned processes (importing torch and MONAI, a few seconds each) is included in the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--jobs", default="1,0", help="member_jobs values to time, comma-separated (the first is the reference)")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args()

    from medanomaly.data import make_toy_dataset
    from medanomaly.methods import get_method_class
    from medanomaly.methods.base import RunContext
    from medanomaly.training.loop import resolve_threads

    ds = make_toy_dataset(a.images, a.size, 2, seed=0)
    cls = get_method_class("multitask")
    base = cls.config_set("cpu-small")
    base = {**base, "max_models": a.members, "tasks": {**base["tasks"], "inter_source": "inverted"},
            "train": {**base["train"], "steps": a.steps, "early_stopping_patience": 0, "val_every": a.steps,
                      "checkpoint_every": 0}}
    rows = []
    for jobs in [int(j) for j in a.jobs.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            det = cls(**{**base, "member_jobs": jobs})
            t0 = time.perf_counter()
            det.fit(ds, context=RunContext(work_dir=tmp, quiet=True))
            sec = time.perf_counter() - t0
        rows.append({"member_jobs": jobs, "processes": det._member_jobs(a.members), "seconds": round(sec, 1)})
    ref = rows[0]["seconds"]
    for r in rows:
        r["speed_vs_first"] = round(ref / r["seconds"], 2)
    print(json.dumps({"members": a.members, "steps": a.steps, "threads": resolve_threads("auto"),
                      "load": os.getloadavg(), "rows": rows}))


if __name__ == "__main__":
    main()
