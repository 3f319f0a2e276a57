"""``multitask``: the multi-task synthetic-anomaly U-Net with cross-validation over tasks (MTMLW, paper ``001``).

Training (healthy data only):

1. the healthy training images are split into as many folds as there are synthetic tasks (by case, so slices of
   one patient stay together), task ``k`` being tied to fold ``k``;
2. for ``T = tasks.train_count`` there is one ensemble member per combination of ``n_tasks choose T`` training
   tasks (``max_models`` / ``members`` choose a subset for small runs). A member trains on synthetic anomalies of
   its training tasks applied to its training folds and is validated on synthetic anomalies of the held-out tasks
   applied to the held-out folds (:mod:`.folds`). Early stopping and the kept checkpoint follow that synthetic
   validation loss; no real anomaly is used anywhere;
3. each member's synthetic validation scores (loss and pixel AP) are kept in the saved state, so that one can
   check whether the synthetic validation score predicts the real test score;
4. with ``augment.enabled`` (off by default), each healthy training image first goes through a random domain shift
   (rotation/zoom, resolution loss, bias field, gamma, intensity scale; :class:`medanomaly.data.augment.DomainShift`)
   and the synthetic anomaly is made on the shifted image (:mod:`.synthesis`); validation stays unshifted.

Prediction is the mean of the members' maps (``predict(..., member=i)`` gives one member's map).

Synthesis is a pure function of ``(seed, member, step, slot)``, so training batches are identical with or without
DataLoader workers and after a resume. Checkpoints go to ``work_dir/<member>/``; finished members are stored
there as ``member.safetensors`` + ``member.json`` and are reused by a later ``fit`` with the same settings and the
same training data (data fingerprint; see :mod:`.members`). This is how members trained in parallel processes, e.g.
one per GPU with ``members=[i]``, are collected.

This module is the detector and its parameters; the training images are in :mod:`.pool`, the synthesis stream in
:mod:`.synthesis`, the synthetic validation in :mod:`.validation`, the member folders in :mod:`.members`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from medanomaly.evaluation.scoring import check_image_score, image_scores
from medanomaly.methods.base import AnomalyResult, Detector, register
from medanomaly.methods.multitask.folds import Combination, assign_folds, select_combinations, task_combinations
from medanomaly.methods.multitask.members import MemberKey, claim_member_dir, data_key, load_member, save_member
from medanomaly.methods.multitask.model import MultiTaskUNet
from medanomaly.methods.multitask.pool import INTER_DEFAULT, HealthyPool, inter_source_images
from medanomaly.methods.multitask.synthesis import (
    AUGMENT_DEFAULTS,
    AUGMENT_SCHEMA,
    BatchFeeder,
    SynthSpec,
    SynthStream,
    check_augment,
    make_augment,
)
from medanomaly.methods.multitask.validation import label_loss, make_validation_set, validation_ap, validation_loss
from medanomaly.methods.params import (
    IMAGE_SCORE_SCHEMA,
    MAX_STEPS,
    MAX_WIDTH,
    SEED,
    TRAIN_SPECS,
    Bool,
    DictOf,
    Float,
    Int,
    ListOf,
    Optional,
    Options,
    Str,
    pick,
)
from medanomaly.methods.params import Any as AnyValue
from medanomaly.methods.params import Path as PathSpec

__all__ = ["MultiTaskDetector"]

TASK_NAMES = ["intra-blend", "inter-blend", "sink", "source", "smooth-intensity"]
MEMBER_PREFIX = "members"


@register
class MultiTaskDetector(Detector):
    """Ensemble of U-Nets trained on synthetic anomalies, cross-validated over synthetic tasks."""

    name = "multitask"
    spatial_dims_supported = (2, 3)
    defaults: dict[str, Any] = {
        "spatial_dims": None,  # set from the training data
        "in_channels": None,  # set from the training data
        "model": {
            "depth": 5,
            "base_filters": 32,
            "max_filters": 320,
            "act": "gelu",
            "posenc": {"coords": True, "n_fourier": 32, "fourier_scale": 12.0, "seed": 42},
        },
        "tasks": {
            "names": list(TASK_NAMES),
            "train_count": 1,
            "label_sigma": 0.2,  # flipped-Gaussian labeller
            # "foreground_std": sigma is in units of the foreground intensity std of the training images (the paper's
            # data were z-scored, so its sigma 0.2 means 0.2 std); "absolute": in image intensity units
            "label_sigma_units": "foreground_std",
            "params": {},  # per task name: extra keyword arguments of the synth task
            "inter_source": "auto",  # external images for inter-blend: "auto" (synth default), a dataset name, or None
        },
        "max_models": None,  # cap on the number of members (spread over the combinations)
        "members": None,  # explicit member indices to train (e.g. one per GPU process)
        "fold_seed": 0,
        "flip_prob": 0.5,  # random flip of the last axis (left-right) for training images
        # domain-shift augmentation of the training images before the anomaly is made (medanomaly.data.augment):
        # enabled, p (per part), rotate_deg, scale, low_res, bias_field, gamma, scale_intensity
        "augment": dict(AUGMENT_DEFAULTS),
        "loss": "mse",  # "mse" on sigmoid scores or "bce" on logits, against the soft labels
        "train": {
            "steps": 4000,
            "batch_size": 8,
            "lr": 1e-3,
            "weight_decay": 0.0,
            "warmup_steps": 100,
            "schedule": "cosine",
            "min_lr_ratio": 0.05,
            "grad_clip": 1.0,
            "val_every": 200,
            "early_stopping_patience": 5,
            "checkpoint_every": 200,
            "device": "auto",
            "amp": True,
        },
        "val_samples": 64,  # synthetic validation images per member (held-out tasks on held-out folds)
        "val_metric": "loss",  # early stopping / checkpoint choice on the synthetic validation "loss" (min) or pixel "ap" (max)
        "num_workers": 0,  # DataLoader workers for synthesis
        # members trained at the same time, each in a process of its own with threads / jobs torch threads (the
        # members are independent; on a CPU, two 1-thread processes use two cores better than one 2-thread
        # process). 1: one after another in this process; 0: as many as the members to train and the threads allow
        "member_jobs": 1,
        # a run folder whose finished members (trained with the same settings) are loaded instead of trained again,
        # e.g. a 5-member ensemble that starts from a 3-member run's members
        "reuse_members_from": "",
        # image score from the map (medanomaly.evaluation.scoring): max | mean | topk (mean of the top fraction)
        "image_score": {"reduce": "topk", "fraction": 0.01},
        "predict": {
            "batch_size": 8,
            "roi_size": None,  # sliding-window size for large volumes (None: whole image)
            "sw_batch_size": 1,
            "overlap": 0.25,
            "mask_foreground": True,  # zero the map outside the foreground when one is given
            "member_maps": False,  # also return every member's map in extras["member_maps"]
        },
        "seed": 0,
    }
    #: constraints of ``defaults`` (see :mod:`medanomaly.methods.params`); cross-key rules are in ``_check_params``
    parameter_schema: dict[str, Any] = {
        "spatial_dims": Optional(Options(2, 3)),
        "in_channels": Optional(Int(1, MAX_WIDTH)),
        "model": {
            "depth": Int(3, 10),
            "base_filters": Int(1, MAX_WIDTH),
            "max_filters": Int(1, MAX_WIDTH),
            "act": Options("gelu", "relu", "leakyrelu", "prelu", "elu", "selu", "celu", "swish", "mish", "tanh"),
            "posenc": {"coords": Bool(), "n_fourier": Int(0, 1024), "fourier_scale": Float(0, None), "seed": SEED},
        },
        "tasks": {
            # task names are resolved by medanomaly.synth.get_task (not imported here: it pulls in scipy)
            "names": ListOf(Str(nonempty=True), 2, 32),
            "train_count": Int(1, 31),
            "label_sigma": Float(0, None, closed="neither"),
            "label_sigma_units": Options("foreground_std", "absolute"),
            # per task name, keyword arguments of that synth task: free-form here, each task checks its own
            "params": DictOf(Str(nonempty=True), DictOf(Str(nonempty=True), AnyValue())),
            "inter_source": Optional(Str(nonempty=True)),  # "auto" | "inverted" | a data set name
        },
        "max_models": Optional(Int(1, 10_000)),
        "members": Optional(ListOf(Int(0, 10_000))),
        "fold_seed": SEED,
        "flip_prob": Float(0, 1),
        "augment": AUGMENT_SCHEMA,
        "loss": Options("mse", "bce"),
        "train": pick(TRAIN_SPECS, defaults["train"], steps=Int(1, MAX_STEPS)),
        "val_samples": Int(1, 10**6),
        "val_metric": Options("loss", "ap"),
        "num_workers": Int(0, 256),
        "member_jobs": Int(0, 256),
        "reuse_members_from": PathSpec(),
        "predict": {
            "batch_size": Int(1, 65536),
            "roi_size": Optional(ListOf(Int(1, 100_000), 2, 3)),
            "sw_batch_size": Int(1, 65536),
            "overlap": Float(0, 1, closed="left"),
            "mask_foreground": Bool(),
            "member_maps": Bool(),
        },
        "seed": SEED,
        "image_score": IMAGE_SCORE_SCHEMA,
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        _check_params(self.params)
        self.models: list[MultiTaskUNet] = []
        self.member_info: list[dict[str, Any]] = []
        self.label_sigma_effective: float | None = None
        #: image dimensionality / channels the members were built for (from params, else from the training data)
        self.spatial_dims_: int | None = None
        self.in_channels_: int | None = None

    # ------------------------------------------------------------------ building blocks
    def _build_model(self) -> MultiTaskUNet:
        m = self.params["model"]
        return MultiTaskUNet(
            spatial_dims=int(self.spatial_dims_), in_channels=int(self.in_channels_),
            depth=int(m["depth"]), base_filters=int(m["base_filters"]), max_filters=int(m["max_filters"]),
            posenc=dict(m["posenc"]), act=str(m["act"]),
        )

    def combinations(self) -> list[Combination]:
        """The members this configuration trains (after ``max_models`` / ``members``)."""
        t = self.params["tasks"]
        combos = task_combinations(len(t["names"]), int(t["train_count"]))
        return select_combinations(combos, self.params["max_models"], self.params["members"])

    #: settings that choose or apply members but do not change what a member learns
    _MEMBER_FREE: ClassVar[tuple[str, ...]] = ("predict", "image_score", "members", "max_models", "num_workers",
                                               "member_jobs", "reuse_members_from")

    @classmethod
    def shared_parts(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The trained members: a run that differs only in which members it keeps or how it predicts loads the
        members it has in common with another (``reuse_members_from``) and trains only the others."""
        return {"multitask.members": {k: v for k, v in params.items() if k not in cls._MEMBER_FREE
                                      and not (k == "augment" and not v.get("enabled"))}}

    @classmethod
    def reuse_parts(cls, parts: list[str], run_dir: str) -> dict[str, Any]:
        return {"reuse_members_from": run_dir}

    def _config_hash(self) -> str:
        """Hash of everything that determines a member's training (not prediction settings)."""
        keep = {k: v for k, v in self.params.items() if k not in self._MEMBER_FREE}
        keep["train"] = {k: v for k, v in keep["train"].items() if k not in ("device", "checkpoint_every")}
        if not keep.get("augment", {}).get("enabled"):  # off: the same hash as before the augment block existed
            keep.pop("augment", None)
        return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ training
    @classmethod
    def data_sources(cls, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The external images of the inter-dataset blending task, when ``tasks.inter_source`` names a data set."""
        tp = params["tasks"]
        setting = tp["inter_source"]
        if "inter-blend" not in tp["names"] or setting in (None, "inverted"):
            return {}
        name = INTER_DEFAULT if setting == "auto" else str(setting)
        return {"inter_source": {"data": name, "split": "train", "optional": setting == "auto"}}

    def _fit(self, train: Any, val: Any | None = None, inter_source: Any | None = None) -> None:
        """Train every selected member on ``train`` (healthy images only; labels and masks are never read).

        ``val`` is not needed: validation is synthetic, on held-out folds of ``train``. It is ignored.
        ``inter_source``: the healthy images of another data set for the inter-dataset blending task (see
        :meth:`data_sources`; the pipeline loads it).
        """
        pool = HealthyPool.from_dataset(train, quiet=self.quiet)
        dims = pool.spatial_dims if self.params["spatial_dims"] is None else int(self.params["spatial_dims"])
        chans = pool.channels if self.params["in_channels"] is None else int(self.params["in_channels"])
        if dims != pool.spatial_dims or chans != pool.channels:
            raise ValueError(
                f"multitask: configured for {dims}D / {chans} channel(s) "
                f"but the training data is {pool.spatial_dims}D / {pool.channels} channel(s)"
            )
        self.spatial_dims_, self.in_channels_ = dims, chans
        tp = self.params["tasks"]
        n_tasks = len(tp["names"])
        folds = assign_folds(pool.case_ids, n_tasks, seed=int(self.params["fold_seed"]))
        inter = inter_source_images(tp["inter_source"], pool, "inter-blend" in tp["names"], inter_source)
        if tp["label_sigma_units"] == "foreground_std":
            self.label_sigma_effective = float(tp["label_sigma"]) * pool.foreground_std()
        else:
            self.label_sigma_effective = float(tp["label_sigma"])
        synth = SynthSpec(tp["names"], tp["params"], self.label_sigma_effective, inter)
        # what a reusable member must match: parameters, training data and external inter-blend images (the
        # contrast-inverted fallback is a function of the training data)
        key = MemberKey(self._config_hash(), data_key(pool.fingerprint, inter if inter_source is not None else None))
        self.models, self.member_info, self.train_log = [], [], []
        done_by_pos: dict[int, tuple[MultiTaskUNet, dict[str, Any], list[dict[str, Any]]]] = {}
        todo: list[tuple[int, Combination]] = []
        for pos, combo in enumerate(self.combinations()):
            member_dir = Path(self.work_dir) / combo.name if self.work_dir is not None else None
            done = load_member(member_dir, key) if (member_dir is not None and self.resume) else None
            src = self.params["reuse_members_from"]
            if done is None and src:
                if not Path(src).is_dir():
                    raise FileNotFoundError(f"multitask: reuse_members_from {src} is not a folder")
                done = load_member(Path(src) / combo.name, key)
                if done is not None:
                    done = (done[0], {**done[1], "reused_from": str(src)}, done[2])
                    if member_dir is not None:  # keep the run folder self-contained (and resumable)
                        claim_member_dir(member_dir, key)
                        save_member(member_dir, done[0], done[1], done[2], key)
            if done is not None:
                weights, info, history = done
                net = self._build_model()
                net.import_state(weights)
                done_by_pos[pos] = (net.eval(), info, history)
            else:
                todo.append((pos, combo))
        jobs = self._member_jobs(len(todo))
        if jobs <= 1:
            for pos, combo in todo:
                done_by_pos[pos] = self._train_member(combo, pool, folds, synth, key, "auto")
        else:
            done_by_pos.update(self._train_members_in_processes(todo, jobs, pool, folds, synth, key))
        for pos in sorted(done_by_pos):
            net, info, history = done_by_pos[pos]
            self.models.append(net)
            self.member_info.append(info)
            self.train_log.extend({**r, "member": info["name"]} for r in history)

    def _member_jobs(self, n_todo: int) -> int:
        """Processes to train ``n_todo`` members with (``member_jobs``; 0: members to train, at most the threads)."""
        from medanomaly.training.loop import resolve_threads

        jobs = int(self.params["member_jobs"])
        if jobs == 0:
            jobs = resolve_threads("auto")
        return max(1, min(jobs, n_todo))

    def _train_members_in_processes(self, todo: list[tuple[int, Combination]], jobs: int, pool: HealthyPool,
                                    folds: np.ndarray, synth: SynthSpec, key: MemberKey,
                                    ) -> dict[int, tuple[MultiTaskUNet, dict[str, Any], list[dict[str, Any]]]]:
        """Train the members of ``todo`` in ``jobs`` spawned processes, each with threads // jobs torch threads (a
        member's result depends only on its seed and thread count, not on which process trains it)."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from medanomaly.training.loop import resolve_threads

        threads = max(1, resolve_threads("auto") // jobs)
        state = {"params": self.params, "dims": self.spatial_dims_, "chans": self.in_channels_,
                 "sigma": self.label_sigma_effective, "context": self.context_}
        out: dict[int, tuple[MultiTaskUNet, dict[str, Any], list[dict[str, Any]]]] = {}
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = {pos: ex.submit(_train_member_process, state, combo, pool, folds, synth, key, threads)
                       for pos, combo in todo}
            for pos, fut in futures.items():
                weights, info, history = fut.result()
                net = self._build_model()
                net.import_state(weights)
                out[pos] = (net.eval(), info, history)
        return out

    def _train_member(self, combo: Combination, pool: HealthyPool, folds: np.ndarray, synth: SynthSpec,
                      key: MemberKey, threads: int | str,
                      ) -> tuple[MultiTaskUNet, dict[str, Any], list[dict[str, Any]]]:
        """Train one member (checkpoints in its member folder when the fit has a work dir) and store it."""
        from medanomaly.training.loop import TrainConfig, get_device, seed_everything, train_model

        tp = self.params["tasks"]
        tr = self.params["train"]
        member_dir = Path(self.work_dir) / combo.name if self.work_dir is not None else None
        if member_dir is not None:
            claim_member_dir(member_dir, key)
        train_idx = np.flatnonzero(np.isin(folds, combo.train_folds))
        val_idx = np.flatnonzero(np.isin(folds, combo.val_folds))
        seed = int(self.params["seed"])
        seed_everything(seed * 1000 + combo.index)
        net = self._build_model()
        device = get_device(tr["device"])
        stream = SynthStream(pool, train_idx, combo.train_tasks, synth, seed=seed, member=combo.index,
                             batch_size=int(tr["batch_size"]), flip_prob=float(self.params["flip_prob"]),
                             augment=make_augment(self.params["augment"], pool))
        batches = BatchFeeder(stream, int(self.params["num_workers"]), int(tr["steps"]))
        val_set = make_validation_set(pool, val_idx, combo.val_tasks, synth, int(self.params["val_samples"]), seed,
                                  combo.index)
        loss_kind = self.params["loss"]

        def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], _d: torch.device = device,
                    _k: str = loss_kind) -> torch.Tensor:
            x, y = batch[0].to(_d, non_blocking=True), batch[1].to(_d, non_blocking=True)
            return label_loss(model(x), y, _k)

        vbs = int(self.params["predict"]["batch_size"])
        by_ap = self.params["val_metric"] == "ap"

        val_clock = [0.0]

        def val_fn(model: nn.Module, _v: dict[str, torch.Tensor] = val_set, _d: torch.device = device,
                   _k: str = loss_kind, _ap: bool = by_ap, _bs: int = vbs, _clock: list[float] = val_clock) -> float:
            t = time.perf_counter()
            if _ap:
                ap = validation_ap(model, _v, _d, _bs)
                out = 0.0 if ap is None else ap
            else:
                out = validation_loss(model, _v, _d, _k, _bs)
            _clock[0] += time.perf_counter() - t
            return out

        cfg = TrainConfig(
            steps=int(tr["steps"]), lr=float(tr["lr"]), weight_decay=float(tr["weight_decay"]),
            warmup_steps=int(tr["warmup_steps"]), schedule=str(tr["schedule"]), min_lr_ratio=float(tr["min_lr_ratio"]),
            grad_clip=tr["grad_clip"], checkpoint_every=int(tr["checkpoint_every"]) if member_dir is not None else 0,
            val_every=int(tr["val_every"]), early_stopping_patience=int(tr["early_stopping_patience"]),
            val_mode="max" if by_ap else "min",
            seed=seed * 1000 + combo.index, device=str(tr["device"]), amp=bool(tr["amp"]), quiet=self.quiet,
            desc=f"multitask {combo.name}", threads=threads,
        )
        t0 = time.perf_counter()
        try:
            result = train_model(net, loss_fn, batches, cfg, run_dir=member_dir, val_fn=val_fn, name="unet",
                                 resume=self.resume)
        finally:
            batches.close()
        seconds = time.perf_counter() - t0
        net.eval()
        val_ap = validation_ap(net, val_set, device, vbs)
        with torch.no_grad():
            val_loss = validation_loss(net, val_set, device, loss_kind, vbs)
        train_seconds = max(seconds - val_clock[0], 1e-9)
        info = {
            "name": combo.name, "index": combo.index, "train_tasks": list(combo.train_tasks),
            "val_tasks": list(combo.val_tasks), "train_folds": list(combo.train_folds), "val_folds": list(combo.val_folds),
            "train_task_names": [tp["names"][t] for t in combo.train_tasks],
            "val_task_names": [tp["names"][t] for t in combo.val_tasks],
            "n_train_images": int(len(train_idx)), "n_val_images": int(len(val_idx)),
            "synthetic_val_loss": val_loss, "synthetic_val_ap": val_ap, "val_metric": self.params["val_metric"],
            "best_val": result.best_val, "best_step": result.best_step,
            "steps_done": result.steps_done, "stopped_early": result.stopped_early,
            # timing of this session's training (a resumed member counts only the steps run now)
            "train_seconds_this_session": seconds, "val_seconds": val_clock[0], "data_wait_seconds": batches.wait_seconds,
            "train_samples_per_s": batches.samples_served / train_seconds if batches.samples_served else None,
            "data_wait_fraction": batches.wait_seconds / train_seconds if batches.samples_served else None,
        }
        net.to("cpu")
        if member_dir is not None:
            save_member(member_dir, net.export_state(), info, result.history, key)
        return net, info, result.history


    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def _predict(self, images: torch.Tensor, foreground: torch.Tensor | None = None, member: int | None = None) -> AnomalyResult:
        """Mean map of the members (or of member ``member`` alone); image score from the map (``image_score``)."""
        if int(images.shape[1]) != int(self.in_channels_) or images.ndim - 2 != int(self.spatial_dims_):
            raise ValueError(
                f"multitask: trained on {self.spatial_dims_}D images with {self.in_channels_} channel(s), "
                f"got shape {tuple(images.shape)}"
            )
        if member is not None and not 0 <= member < len(self.models):
            raise ValueError(f"multitask: member {member} out of range, the ensemble has {len(self.models)} members")
        pp = self.params["predict"]
        chosen = range(len(self.models)) if member is None else [member]
        roi = tuple(pp["roi_size"]) if pp["roi_size"] else None
        from medanomaly.training.loop import get_device

        device = get_device(self.params["train"]["device"])
        bs = max(1, int(pp["batch_size"]))
        total = torch.zeros((images.shape[0], *images.shape[2:]), dtype=torch.float32)
        maps: list[list[torch.Tensor]] | None = [[] for _ in chosen] if pp["member_maps"] else None
        # batch by batch, member by member (the same sums, in the same order, as member by member over all
        # batches): the network input with its positional channels is built once per batch and shared by the
        # members (model.network_input), and the last member that uses it frees it after its first block
        whole = MultiTaskUNet.whole_volume(roi, images.shape[2:])
        keys = [self.models[m].input_key() for m in chosen]
        n_batches = -(-images.shape[0] // bs)
        from medanomaly.training.progress import progress_bar

        # a bar over the network blocks for 3D whole-volume predictions (a sliding window shows MONAI's own bar)
        bar = progress_bar(total=n_batches * sum(self.models[m].block_count() for m in chosen),
                           desc="multitask predict", quiet=self.quiet or not whole or images.ndim != 5, unit="block")
        try:
            for s in range(0, images.shape[0], bs):
                x = images[s:s + bs].to(device=device, dtype=torch.float32)
                shared: dict[tuple[Any, ...], list[torch.Tensor]] = {}
                for j, m in enumerate(chosen):
                    net = self.models[m].to(device).eval()
                    box = None
                    if whole:
                        if keys[j] not in shared:
                            shared[keys[j]] = [net.network_input(x)]
                        # the last member with this input takes the list itself (and frees the input)
                        box = shared[keys[j]] if keys[j] not in keys[j + 1:] else list(shared[keys[j]])
                    sc = net.predict_scores(x, roi_size=roi, sw_batch_size=int(pp["sw_batch_size"]),
                                            overlap=float(pp["overlap"]), progress=not self.quiet and not whole,
                                            inputs=box, step=lambda: bar.update(1))
                    del box
                    mp = sc[:, 0].float().cpu()
                    del sc
                    total[s:s + bs] += mp
                    if maps is not None:
                        maps[j].append(mp)
                    del mp
        finally:
            bar.close()
        members = [torch.cat(m) for m in maps] if maps is not None else None
        pixel = total / len(chosen)
        fg = foreground[:, 0].bool().cpu() if foreground is not None else None
        if fg is not None and pp["mask_foreground"]:
            pixel = pixel * fg
        extras: dict[str, Any] = {"n_members": len(chosen)}
        if members is not None:
            extras["member_maps"] = torch.stack(members)
        return AnomalyResult(pixel, image_scores(pixel, fg, **self.params["image_score"]), extras)

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, net in enumerate(self.models):
            for k, v in net.export_state().items():
                out[f"{MEMBER_PREFIX}.{i}.{k}"] = v
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        per: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            prefix, idx, rest = k.split(".", 2)
            if prefix != MEMBER_PREFIX:
                raise ValueError(f"multitask: unexpected tensor '{k}' in the weights file")
            per.setdefault(int(idx), {})[rest] = v
        if not per:
            raise ValueError("multitask: the weights file holds no member")
        first = per[min(per)]
        # the first convolution sees the image and positional channels: it tells the dimensionality and channels
        conv = first.get("net.input_block.conv1.conv.weight")
        if conv is None:
            conv = next(v for k, v in first.items() if k.endswith(".weight") and v.ndim in (4, 5))
        self.spatial_dims_ = conv.ndim - 2
        self.in_channels_ = int(conv.shape[1]) - _posenc_channels(self.params, self.spatial_dims_)
        self.models = []
        for i in sorted(per):
            net = self._build_model()
            net.import_state(per[i])
            self.models.append(net.eval())

    def extra_state(self) -> dict[str, Any]:
        return {"members": self.member_info, "config_hash": self._config_hash(),
                "label_sigma_effective": self.label_sigma_effective}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.member_info = list(state.get("members", []))
        self.label_sigma_effective = state.get("label_sigma_effective")

    def validation_table(self) -> list[dict[str, Any]]:
        """Per member: its tasks and synthetic validation scores (for the synthetic-vs-real correlation)."""
        return [dict(i) for i in self.member_info]


def _posenc_channels(params: dict[str, Any], dims: int) -> int:
    """Number of positional channels the configured encoding adds to ``dims``-D images."""
    pe = params["model"]["posenc"]
    return (dims if pe.get("coords", True) else 0) + 2 * int(pe.get("n_fourier", 0))


def _check_params(p: dict[str, Any]) -> None:
    t = p["tasks"]
    if not isinstance(t["names"], list | tuple) or len(t["names"]) < 2:
        raise ValueError(f"multitask: tasks.names must list at least 2 synthetic tasks, got {t['names']!r}")
    if not 1 <= int(t["train_count"]) < len(t["names"]):
        raise ValueError(f"multitask: tasks.train_count must be in 1..{len(t['names']) - 1}, got {t['train_count']}")
    if p["loss"] not in ("mse", "bce"):
        raise ValueError(f"multitask: loss must be 'mse' or 'bce', got {p['loss']!r}")
    check_image_score(p["image_score"], "multitask")
    if int(p["train"]["batch_size"]) < 1 or int(p["train"]["steps"]) < 1:
        raise ValueError("multitask: train.batch_size and train.steps must be >= 1")
    if t["label_sigma_units"] not in ("foreground_std", "absolute") or not float(t["label_sigma"]) > 0:
        raise ValueError("multitask: tasks.label_sigma must be > 0 and tasks.label_sigma_units foreground_std | absolute")
    if p["val_metric"] not in ("loss", "ap"):
        raise ValueError(f"multitask: val_metric must be 'loss' or 'ap', got {p['val_metric']!r}")
    if int(p["val_samples"]) < 1:
        raise ValueError("multitask: val_samples must be >= 1")
    if p["spatial_dims"] is not None and int(p["spatial_dims"]) not in (2, 3):
        raise ValueError(f"multitask: spatial_dims must be 2 or 3, got {p['spatial_dims']}")
    check_augment(p["augment"])


def _train_member_process(state: dict[str, Any], combo: Combination, pool: HealthyPool, folds: np.ndarray,
                          synth: SynthSpec, key: MemberKey, threads: int,
                          ) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[dict[str, Any]]]:
    """One member in a worker process: (weights, info, history); the member folder is written as in-process."""
    det = MultiTaskDetector(**state["params"])
    det.spatial_dims_, det.in_channels_ = state["dims"], state["chans"]
    det.label_sigma_effective = state["sigma"]
    det.set_context(state["context"])
    net, info, history = det._train_member(combo, pool, folds, synth, key, threads)
    return net.export_state(), info, history
