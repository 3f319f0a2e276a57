"""The multitask synthesis stream: the synthetic tasks with their labeller (:class:`SynthSpec`), the stream of
training samples, a pure function of ``(seed, member, step, slot)`` (:class:`SynthStream`), and the ``batch_fn`` of
the training loop, with or without DataLoader workers (:class:`BatchFeeder`).

With the ``augment`` block enabled (:func:`make_augment`), each healthy training image and its foreground first go
through a domain shift (:class:`medanomaly.data.augment.DomainShift`: rotation/zoom, resolution loss, bias field,
gamma, intensity scale), and the synthetic anomaly and its label are then made on the shifted image. The shift
draws from its own generator, seeded by ``(seed, member, step, slot)`` too, so the choice of image, flip, task and
anomaly is the same as without it. The synthetic validation sets stay unshifted (the label-free selection score).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medanomaly.data.augment import AUGMENT_DEFAULTS, DomainShift
from medanomaly.methods.multitask.pool import HealthyPool
from medanomaly.methods.params import Bool, Float, ListOf

__all__ = ["SynthSpec", "SynthStream", "BatchFeeder", "AUGMENT_DEFAULTS", "AUGMENT_SCHEMA", "make_augment",
           "check_augment"]

#: constraints of the ``augment`` block (ranges' order and the rest are checked by :func:`check_augment`)
AUGMENT_SCHEMA: dict[str, Any] = {
    "enabled": Bool(),
    "p": Float(0, 1),
    "rotate_deg": Float(0, 180),
    "scale": ListOf(Float(0.25, 4), 2, 2),
    "low_res": ListOf(Float(1, 16), 2, 2),
    "bias_field": Float(0, 2),
    "gamma": ListOf(Float(0.05, 20), 2, 2),
    "scale_intensity": ListOf(Float(0.05, 20), 2, 2),
}


def check_augment(params: dict[str, Any], where: str = "multitask") -> None:
    """Refuse a bad ``augment`` block with one line naming the setting (e.g. a range whose low end is higher)."""
    try:
        DomainShift.from_params(params)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def make_augment(params: dict[str, Any], pool: HealthyPool) -> DomainShift | None:
    """The training images' domain shift of the ``augment`` block, or None when it is off. Outputs are clipped to
    the training images' intensity range (``[0, 1]`` for the brain presets)."""
    if not params.get("enabled", False):
        return None
    lo = min(float(im.min()) for im in pool.images)
    hi = max(float(im.max()) for im in pool.images)
    return DomainShift.from_params(params, value_range=(lo, hi))


class SynthSpec:
    """The synthetic tasks by index, with their parameters and the labeller (picklable for workers)."""

    def __init__(self, names: list[str], params: dict[str, Any], sigma: float, inter_source: list[np.ndarray] | None) -> None:
        self.names, self.params, self.sigma, self.inter_source = list(names), dict(params or {}), sigma, inter_source

    def apply(self, task: int, image: np.ndarray, fg: np.ndarray, rng: np.random.Generator,
              pool: HealthyPool, pool_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(anomalous image (C, *S), soft label (1, *S), mask (1, *S) bool) for task index ``task``."""
        return _apply_synth_task(self, task, image, fg, rng, pool, pool_idx)


def _apply_synth_task(spec: SynthSpec, task: int, image: np.ndarray, fg: np.ndarray, rng: np.random.Generator,
                      pool: HealthyPool, pool_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from medanomaly import synth

    name = spec.names[task]
    fn = synth.get_task(name)
    kw = dict(spec.params.get(name, {}))
    if kw.get("labeller", "flipped-gaussian") == "flipped-gaussian" and not kw.get("labeller_params"):
        kw["labeller_params"] = {"sigma": spec.sigma}
    if name == "intra-blend" and "source_image" not in kw:
        j = int(pool_idx[rng.integers(len(pool_idx))])  # another healthy image of the same folds
        kw["source_image"], kw["source_foreground"] = pool.images[j], pool.foregrounds[j]
    elif name == "inter-blend" and "source_image" not in kw:
        if not spec.inter_source:
            raise ValueError("multitask: the inter-blend task needs external images (tasks.inter_source)")
        j = int(rng.integers(len(spec.inter_source)))
        kw["source_image"] = spec.inter_source[j]
    res = fn(image, fg, rng, channels=True, **kw)
    img = np.asarray(res.image, dtype=np.float32).reshape(image.shape)
    label = np.asarray(res.label, dtype=np.float32).reshape((1, *image.shape[1:]))
    mask = np.asarray(res.mask, dtype=bool).reshape((1, *image.shape[1:]))
    return img, label, mask


class SynthStream(Dataset):
    """Item ``k`` = synthetic sample ``k % batch_size`` of training step ``k // batch_size``; pure in ``(seed, member, k)``."""

    def __init__(self, pool: HealthyPool, indices: np.ndarray, tasks: tuple[int, ...], spec: SynthSpec, seed: int,
                 member: int, batch_size: int, flip_prob: float, augment: DomainShift | None = None) -> None:
        if len(indices) == 0:
            raise ValueError("multitask: a training fold group is empty (too few training images for the task folds)")
        self.pool, self.indices, self.tasks, self.spec = pool, np.asarray(indices), tuple(tasks), spec
        self.seed, self.member, self.batch_size, self.flip_prob = seed, member, batch_size, flip_prob
        self.augment = augment

    def __len__(self) -> int:
        return 2**62

    def sample(self, rng: np.random.Generator, aug_rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One (image, label) pair; ``aug_rng`` drives the domain shift (when ``augment`` is set)."""
        i = int(self.indices[rng.integers(len(self.indices))])
        image, fg = self.pool.images[i], self.pool.foregrounds[i]
        if self.flip_prob > 0 and rng.random() < self.flip_prob:
            image, fg = np.ascontiguousarray(image[..., ::-1]), np.ascontiguousarray(fg[..., ::-1])
        if self.augment is not None:  # before the anomaly: it and its label are made on the shifted image
            image, fg = self.augment(image, fg, aug_rng if aug_rng is not None else rng)
        task = self.tasks[int(rng.integers(len(self.tasks)))]
        img, label, _ = self.spec.apply(task, image, fg, rng, self.pool, self.indices)
        return torch.from_numpy(np.ascontiguousarray(img)), torch.from_numpy(np.ascontiguousarray(label))

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        step, slot = divmod(int(k), self.batch_size)
        aug_rng = np.random.default_rng([self.seed, self.member, step, slot, 13]) if self.augment is not None else None
        return self.sample(np.random.default_rng([self.seed, self.member, step, slot, 11]), aug_rng)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self[step * self.batch_size + j] for j in range(self.batch_size)]
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


class BatchFeeder:
    """``batch_fn(step)`` for the training loop; with workers, a DataLoader over the stream's items in step order.

    Each item is a pure function of its index, so the batches do not depend on the number of workers; a call with
    an unexpected step (a resume) restarts the loader at that step.
    """

    def __init__(self, stream: SynthStream, num_workers: int, steps: int) -> None:
        self.stream, self.num_workers, self.steps = stream, max(0, num_workers), steps
        self._it: Any = None
        self._next_step = -1
        self.wait_seconds = 0.0
        self.samples_served = 0

    def _start(self, step: int) -> None:
        from torch.utils.data import DataLoader

        self.close()
        bs = self.stream.batch_size
        sampler = range(step * bs, max(self.steps, step + 1) * bs)
        loader = DataLoader(self.stream, batch_size=bs, sampler=sampler, num_workers=self.num_workers,
                            persistent_workers=False, prefetch_factor=4, pin_memory=torch.cuda.is_available())
        self._it = iter(loader)
        self._next_step = step

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        if self.num_workers == 0:
            out = self.stream.batch(step)
        else:
            if self._it is None or step != self._next_step:
                self._start(step)
            try:
                out = next(self._it)
            except StopIteration:
                self._start(step)
                out = next(self._it)
            self._next_step = step + 1
        self.wait_seconds += time.perf_counter() - t0
        self.samples_served += out[0].shape[0]
        return out

    def close(self) -> None:
        self._it = None
