"""Train seconds of a resumed run: ``train.seconds`` holds only the last session's, so the evaluation reports the
training-loop seconds summed over every session of the log (``RunFolder.train_seconds``, ``loop_seconds``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from medanomaly.run_folder import CONFIG_FILE, TRAIN_LOG_FILE, RunFolder, loop_seconds


def _session(n: int, dt: float, **tags: str) -> list[dict]:
    return [{"step": i + 1, "loss": 0.1, "seconds": dt * (i + 1), **tags} for i in range(n)]


def test_loop_seconds_sums_each_sessions_last_count_per_stage_and_member() -> None:
    log = (_session(4, 0.5, stage="tokenizer")            # session 1: 2.0 s, killed during the tokenizer
           + _session(3, 0.25, stage="tokenizer")         # session 2 resumes it: 0.75 s
           + _session(5, 1.0, stage="atd")                # then a new stage in session 2: 5.0 s
           + _session(2, 0.1, member="m00") + _session(3, 0.2, member="m02"))  # members: 0.2 + 0.6 s
    log.insert(3, {"stage": "calibration", "threshold": 0.5})  # records without seconds are ignored
    assert loop_seconds(log) == pytest.approx(2.0 + 0.75 + 5.0 + 0.2 + 0.6)
    assert loop_seconds([{"stage": "x", "threshold": 1.0}]) is None
    assert loop_seconds([]) is None


def test_loop_seconds_matches_brute_force_on_random_logs() -> None:
    """Random multi-session, multi-stage logs as the loop writes them (a session's count starts near 0 and grows;
    a resumed stage's count restarts below where the killed session left it): the sum of each session's last count."""
    rng = random.Random(0)
    for _ in range(200):
        log, want = [], 0.0
        for _session_k in range(rng.randint(1, 4)):
            for stage in rng.sample(["a", "b", "c"], rng.randint(1, 3)):
                n, dt = rng.randint(2, 6), rng.uniform(0.05, 2.0)
                recs = [{"step": i, "seconds": 0.01 + dt * i, "stage": stage} for i in range(n)]
                log += recs
                want += recs[-1]["seconds"]
        assert loop_seconds(log) == pytest.approx(want)


def _folder(tmp_path: Path, resumed: bool, log: list[dict]) -> RunFolder:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump({"method": "autoencoder", "params": {},
                                                        "train": {"seconds": 1.5, "resumed": resumed}}))
    (tmp_path / TRAIN_LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in log))
    return RunFolder(tmp_path)


def test_run_folder_train_seconds(tmp_path: Path) -> None:
    log = _session(4, 1.0, stage="s") + _session(2, 3.0, stage="s")  # 4 s killed, then 6 s after the resume
    s, what = _folder(tmp_path / "resumed", True, log).train_seconds()
    assert s == pytest.approx(10.0) and "resumed" in what
    s, what = _folder(tmp_path / "one-go", False, log).train_seconds()  # one session: the wall seconds recorded
    assert s == 1.5 and "one session" in what
    s, _ = _folder(tmp_path / "no-log", True, []).train_seconds()  # resumed but no log: the recorded seconds
    assert s == 1.5
