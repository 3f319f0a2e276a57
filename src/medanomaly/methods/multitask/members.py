"""Finished and unfinished multitask members on disk (``work_dir/<member>/``), and when they may be reused.

A member folder holds:

- ``settings.json``: what the folder trains with, the member key: the parameter hash (:meth:`config_hash`) and the
  fingerprint of the data it trains on (:func:`medanomaly.data.fingerprint.dataset_fingerprint` of the training
  set, plus one of the external inter-blend images when used; multitask validates on held-out folds of the training
  set, so no separate validation set enters the key);
- ``checkpoints/unet.{safetensors,json}``: the training checkpoint of :func:`medanomaly.training.train_model`;
- ``member.safetensors`` + ``member.json`` once finished (weights; info, history, member key and the sha256 of the
  weights file, written last).

A finished member is reused (resume, or ``reuse_members_from``) only when parameters AND data fingerprint match;
otherwise it is trained again, with a warning saying why. Nothing here is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medanomaly.training.atomic import atomic_write_bytes, atomic_write_text, clean_stale_tmp

__all__ = ["MemberKey", "LoadedMember", "save_member", "claim_member_dir", "load_member", "data_key",
           "CHECKPOINT_NAME", "SETTINGS_FILE", "MEMBER_JSON", "MEMBER_WEIGHTS"]

CHECKPOINT_NAME = "unet"
SETTINGS_FILE = "settings.json"
MEMBER_JSON = "member.json"
MEMBER_WEIGHTS = "member.safetensors"

LoadedMember = tuple[dict[str, torch.Tensor], dict[str, Any], list[dict[str, Any]]]


@dataclass(frozen=True)
class MemberKey:
    """What a member's training depends on: the parameter hash and the fingerprint of its data."""

    config_hash: str
    data_fingerprint: str

    def as_dict(self) -> dict[str, str]:
        return {"config_hash": self.config_hash, "data_fingerprint": self.data_fingerprint}

    def mismatch(self, d: Any) -> str | None:
        """Why the record ``d`` (a member.json / settings.json dict) is not of this key; None when it is."""
        if not isinstance(d, dict):
            return f"the record is a {type(d).__name__}, not an object"
        if d.get("config_hash") != self.config_hash:
            return f"other settings (config hash {d.get('config_hash')!r}, now {self.config_hash!r})"
        old = d.get("data_fingerprint")
        if old is None:
            return "no data fingerprint recorded (written by an older version)"
        if old != self.data_fingerprint:
            return f"other training data (fingerprint {str(old)[:12]}…, now {self.data_fingerprint[:12]}…)"
        return None


def data_key(train_fingerprint: str, inter_images: list[Any] | None) -> str:
    """The data part of a member key: the training set's fingerprint, combined with the inter-blend source images."""
    if not inter_images:
        return train_fingerprint
    from medanomaly.data.fingerprint import Fingerprinter

    fp = Fingerprinter()
    for i, im in enumerate(inter_images):
        fp.add(f"inter_{i}", im)
    return hashlib.sha256(f"{train_fingerprint}+inter:{fp.hexdigest()}".encode()).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _remove_training_files(member_dir: Path) -> bool:
    """Delete the member's checkpoint and finished files; True when a checkpoint was there."""
    from medanomaly.training.loop import checkpoint_files, remove_checkpoint

    had = any(f.exists() for f in checkpoint_files(member_dir, CHECKPOINT_NAME).all())
    remove_checkpoint(member_dir, CHECKPOINT_NAME)
    for f in (member_dir / MEMBER_JSON, member_dir / MEMBER_WEIGHTS):
        f.unlink(missing_ok=True)
    return had


def save_member(member_dir: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any], history: list[dict[str, Any]],
                key: MemberKey) -> None:
    """Store a finished member: weights file, then ``member.json`` (the commit, with the weights' sha256)."""
    from safetensors.torch import save as st_save

    data = st_save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()})
    atomic_write_bytes(member_dir / MEMBER_WEIGHTS, data)
    record = {**key.as_dict(), "weights_sha256": _sha256(data), "info": info, "history": history}
    atomic_write_text(member_dir / MEMBER_JSON, json.dumps(record))


def claim_member_dir(member_dir: Path, key: MemberKey) -> None:
    """Record the key a member folder trains with; a folder left by another key is cleared first (its checkpoint
    must not be resumed with other settings or data), with a warning when it held a checkpoint."""
    member_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(member_dir)
    marker = member_dir / SETTINGS_FILE
    why: str | None = "no settings record"
    if marker.exists():
        try:
            why = key.mismatch(json.loads(marker.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, OSError) as e:
            why = f"unreadable {SETTINGS_FILE} ({type(e).__name__})"
        if why is None:
            return
    finished = (member_dir / MEMBER_JSON).exists()  # if so, load_member has said why it is not reused
    if _remove_training_files(member_dir) and not finished:
        warnings.warn(f"multitask: {member_dir} holds a checkpoint of {why}; starting that member afresh", stacklevel=3)
    atomic_write_text(marker, json.dumps(key.as_dict()))


def load_member(member_dir: Path, key: MemberKey) -> LoadedMember | None:
    """(weights, info, history) of the finished member in ``member_dir`` when it was trained with ``key``; else None
    (with a warning saying why, when a finished member is there but cannot be reused)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    meta, weights = member_dir / MEMBER_JSON, member_dir / MEMBER_WEIGHTS
    if not meta.exists():
        return None

    def skip(why: str) -> None:
        warnings.warn(f"multitask: the finished member in {member_dir} is not reused: {why}; training it again", stacklevel=3)

    try:
        d = json.loads(meta.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as e:
        skip(f"{meta.name} is unreadable ({type(e).__name__})")
        return None
    why = key.mismatch(d)
    if why is not None:
        skip(f"trained with {why}")
        return None
    if not weights.is_file():
        skip(f"{weights.name} is missing")
        return None
    data = weights.read_bytes()
    if d.get("weights_sha256") != _sha256(data):
        skip(f"{weights.name} does not match the sha256 that {meta.name} records (torn or altered)")
        return None
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as e:
        skip(f"{weights.name} is unreadable ({e})")
        return None
    info, history = d.get("info"), d.get("history", [])
    if not isinstance(info, dict) or not isinstance(history, list):
        skip(f"{meta.name} lacks its info/history")
        return None
    return tensors, info, history
