"""Cross-validation over (synthetic task, data fold) pairs.

Each of the ``n_tasks`` synthetic tasks is tied to one fold of the healthy training data. A model is trained on
``T = train_count`` tasks and validated on the others; there is one model per combination of ``n_tasks choose T``
(5/10/10/5 models for T = 1/2/3/4 with five tasks). The data folds of the two task groups are used for training or
validation, whichever group is larger trains (so a 1/4 split trains task ``t`` on the four folds not tied to
``t`` and validates the four other tasks on fold ``t``). Training and validation data never share a fold.

Folds are formed over *groups* (patients / cases) so that the slices of one patient never sit on both sides.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

__all__ = ["Combination", "task_combinations", "select_combinations", "assign_folds"]


@dataclass(frozen=True)
class Combination:
    """One cross-validation member: which tasks and data folds train it, which validate it."""

    index: int
    train_tasks: tuple[int, ...]
    val_tasks: tuple[int, ...]
    train_folds: tuple[int, ...]
    val_folds: tuple[int, ...]

    @property
    def name(self) -> str:
        """Folder-safe name, e.g. ``m03_t0-2``: member index and its training tasks."""
        return f"m{self.index:02d}_t{'-'.join(map(str, self.train_tasks))}"


def task_combinations(n_tasks: int, train_count: int) -> list[Combination]:
    """All ``n_tasks choose train_count`` members, in lexicographic order of their training tasks."""
    if n_tasks < 2:
        raise ValueError(f"cross-validation over tasks needs at least 2 tasks, got {n_tasks}")
    if not 1 <= train_count < n_tasks:
        raise ValueError(f"tasks.train_count must be between 1 and {n_tasks - 1} (some tasks must validate), got {train_count}")
    out = []
    for i, train in enumerate(combinations(range(n_tasks), train_count)):
        val = tuple(t for t in range(n_tasks) if t not in train)
        # data folds follow their tasks; the larger side trains
        train_folds, val_folds = (train, val) if len(train) >= len(val) else (val, train)
        out.append(Combination(i, tuple(train), val, tuple(train_folds), tuple(val_folds)))
    return out


def select_combinations(combos: Sequence[Combination], max_models: int | None = None,
                        members: Sequence[int] | None = None) -> list[Combination]:
    """The members to train: ``members`` (explicit indices) if given, else up to ``max_models`` spread evenly.

    Spreading (indices ``linspace(0, n - 1, k)``) keeps every task represented as far as possible when the
    number of models is capped for CPU runs.
    """
    combos = list(combos)
    if members is not None:
        bad = [m for m in members if not 0 <= int(m) < len(combos)]
        if bad:
            raise ValueError(f"members {bad} out of range: there are {len(combos)} task combinations (0..{len(combos) - 1})")
        return [combos[int(m)] for m in sorted(set(int(m) for m in members))]
    if max_models is None or max_models >= len(combos):
        return combos
    if max_models < 1:
        raise ValueError(f"max_models must be >= 1, got {max_models}")
    idx = np.unique(np.round(np.linspace(0, len(combos) - 1, max_models)).astype(int))
    return [combos[i] for i in idx]


def assign_folds(groups: Sequence[str], n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold id (0..n_folds-1) per sample; samples of one group share a fold; folds balanced in sample count.

    Groups are shuffled (``seed``) and then placed largest first into the currently smallest fold. With fewer
    groups than folds the split falls back to single samples (with a warning).
    """
    groups = [str(g) for g in groups]
    n = len(groups)
    if n < n_folds:
        raise ValueError(f"need at least {n_folds} training samples for {n_folds} task folds, got {n}")
    uniq, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    if len(uniq) < n_folds:
        warnings.warn(f"only {len(uniq)} distinct cases for {n_folds} folds: splitting by sample instead of by case",
                      stacklevel=2)
        uniq, inverse, counts = np.arange(n).astype(str), np.arange(n), np.ones(n, int)
    rng = np.random.default_rng([int(seed), 7919])
    order = rng.permutation(len(uniq))
    order = order[np.argsort(-counts[order], kind="stable")]  # largest first, ties in shuffled order
    sizes = np.zeros(n_folds, int)
    group_fold = np.empty(len(uniq), int)
    for g in order:
        f = int(np.argmin(sizes))
        group_fold[g] = f
        sizes[f] += counts[g]
    return group_fold[inverse]
