"""On-the-fly synthetic anomalies over a data set of healthy images, with worker-safe seeding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medanomaly.synth.tasks import get_task, list_tasks

__all__ = ["SynthDataset"]


class SynthDataset(Dataset):
    """Wraps a data set of healthy samples; each item gets a random task from ``tasks`` with probability ``p_anomaly``.

    Randomness comes only from ``numpy.random.default_rng([seed, epoch, index])``, so an item is the same in any
    DataLoader worker and in any order; call :meth:`set_epoch` before each epoch for new anomalies (with
    ``persistent_workers=False``, the default, workers see the new epoch).

    Items are dicts: ``image`` float32 (C, *S), ``label`` float32 (1, *S) in [0, 1], ``mask`` bool (1, *S),
    ``foreground`` bool (1, *S), ``anomalous`` float32 scalar (1. when the task produced a positive sample),
    ``task`` (name or ``"none"``), ``index``. Tasks needing a second image draw it from ``base`` (``intra-blend``,
    ``fpi``) or from ``source`` (``inter-blend``, required then).
    """

    def __init__(
        self,
        base: Dataset,
        tasks: Sequence[str],
        p_anomaly: float = 0.5,
        seed: int = 0,
        task_params: Mapping[str, Mapping[str, Any]] | None = None,
        source: Dataset | None = None,
        task_weights: Sequence[float] | None = None,
    ) -> None:
        if len(base) == 0:  # type: ignore[arg-type]
            raise ValueError("SynthDataset: the base data set is empty")
        tasks = list(tasks)
        if not tasks:
            raise ValueError("SynthDataset: give at least one task")
        unknown = [t for t in tasks if t not in list_tasks()]
        if unknown:
            raise ValueError(f"SynthDataset: unknown tasks {unknown}; choose from {list_tasks()}")
        if not 0.0 <= p_anomaly <= 1.0:
            raise ValueError(f"SynthDataset: p_anomaly must be in [0, 1], got {p_anomaly}")
        if "inter-blend" in tasks and source is None and not (task_params or {}).get("inter-blend", {}).get("source_sampler"):
            raise ValueError("SynthDataset: task 'inter-blend' needs a source data set (source=...)")
        if task_weights is not None:
            w = np.asarray(task_weights, dtype=np.float64)
            if w.shape != (len(tasks),) or (w < 0).any() or w.sum() <= 0:
                raise ValueError("SynthDataset: task_weights must be non-negative, one per task, not all zero")
            self.task_probs = w / w.sum()
        else:
            self.task_probs = np.full(len(tasks), 1.0 / len(tasks))
        self.base, self.tasks, self.p_anomaly, self.seed = base, tasks, float(p_anomaly), int(seed)
        self.source = source
        self.task_params = {k: dict(v) for k, v in (task_params or {}).items()}
        bad = set(self.task_params) - set(tasks)
        if bad:
            raise ValueError(f"SynthDataset: task_params for tasks not in use: {sorted(bad)}")
        self._fns = {t: get_task(t) for t in tasks}
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def _sampler(self, ds: Dataset, exclude: int | None):
        def sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
            n = len(ds)  # type: ignore[arg-type]
            j = int(rng.integers(n))
            if exclude is not None and n > 1 and j == exclude:
                j = (j + 1 + int(rng.integers(n - 1))) % n
            s = ds[j]
            return np.asarray(s["image"]), np.asarray(s["foreground"])

        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.base[index]
        image = torch.as_tensor(sample["image"], dtype=torch.float32)
        fg = torch.as_tensor(sample["foreground"]).bool()
        if fg.ndim == image.ndim - 1:
            fg = fg.unsqueeze(0)
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        spatial = tuple(image.shape[1:])
        out = {"image": image, "label": torch.zeros((1, *spatial)), "mask": torch.zeros((1, *spatial), dtype=torch.bool),
               "foreground": fg, "anomalous": torch.tensor(0.0), "task": "none", "index": int(index)}
        if rng.random() >= self.p_anomaly:
            return out
        name = self.tasks[int(rng.choice(len(self.tasks), p=self.task_probs))]
        params = dict(self.task_params.get(name, {}))
        if name in ("intra-blend", "fpi") and "source_image" not in params and "source_sampler" not in params:
            params["source_sampler"] = self._sampler(self.base, index)
        if name == "inter-blend" and "source_image" not in params and "source_sampler" not in params:
            params["source_sampler"] = self._sampler(self.source, None)
        res = self._fns[name](image.numpy(), fg.numpy(), rng, channels=True, **params)
        out.update(image=torch.from_numpy(res.image), label=torch.from_numpy(res.label), mask=torch.from_numpy(res.mask),
                   anomalous=torch.tensor(float(res.positive)), task=name)
        return out
