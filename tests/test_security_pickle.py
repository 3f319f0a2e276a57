"""Nothing a run or work folder holds is ever unpickled.

A pickle whose unpickling writes a marker file is planted as every file the commands read from a run/work folder
(checkpoints, their JSON records, multitask member folders, ``pretrained`` weights); the real entry points run
on the toy data and the marker must never appear. Garbage gives a clear error or is ignored with a warning.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from medanomaly.data import make_toy_dataset
from medanomaly.methods import get_method, get_method_class, list_methods
from medanomaly.methods.base import RunContext

torch.set_num_threads(1)

SIZE = 32
TRAIN = make_toy_dataset(12, SIZE, seed=0)
VAL = make_toy_dataset(4, SIZE, seed=1)
SRC = Path(__file__).resolve().parents[1] / "src" / "medanomaly"


class _Payload:
    """Unpickling it runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    m = tmp_path / "PWNED"
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))  # noqa: S301 - the payload works: unpickling it does run code
    assert probe.exists()
    return m


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".pt", ".pth"):
        torch.save({"model": _Payload(marker)}, path)  # what torch.load(weights_only=False) would execute
    else:
        path.write_bytes(pickle.dumps({"model": _Payload(marker)}))


def _targets(clean: Path) -> list[Path]:
    """Every file a finished fit left in ``clean`` plus the other names a checkpoint can take (relative paths)."""
    rel = {p.relative_to(clean) for p in clean.rglob("*") if p.is_file()}
    for p in list(rel):
        if p.parent.name == "checkpoints" and p.suffix == ".json":
            stem = p.name[: -len(".json")]
            rel |= {p.with_name(f"{stem}{s}") for s in (".pt", ".safetensors", ".prev.json", ".prev.safetensors")}
    return sorted(rel)


def _quiet_fit(method: str, data: Any, work: Path, **over: Any) -> Any:
    params = {**get_method_class(method).config_set("test"), **over}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_method(method, **params).fit(data, VAL, context=RunContext(work_dir=work, resume=True, quiet=True))


@pytest.mark.parametrize("method", [m for m in list_methods() if m not in ("intensity", "zscore")])  # no training loop
def test_fit_with_planted_work_dir_never_unpickles(method: str, marker: Path, tmp_path: Path) -> None:
    _quiet_fit(method, TRAIN, tmp_path / "clean")
    targets = _targets(tmp_path / "clean")
    assert any(t.parent.name == "checkpoints" for t in targets), f"{method} wrote no checkpoint"
    evil = tmp_path / "evil"
    for t in targets:
        if t.name != "fit_key.json":  # a planted key only stops the resume (next test); plant everything else
            _plant(evil / t, marker)
    (evil / "fit_key.json").write_text((tmp_path / "clean" / "fit_key.json").read_text())  # as if the same fit
    with pytest.warns(UserWarning) as rec:  # every planted file is reported, then training starts afresh
        det = get_method(method, **get_method_class(method).config_set("test")).fit(
            TRAIN, VAL, context=RunContext(work_dir=evil, resume=True, quiet=True))
    assert det.is_fitted and not marker.exists()
    said = " ".join(str(w.message) for w in rec)
    if method not in ("multitask", "patchcore"):  # a multitask member folder (patchcore's backbone is one) of unknown
        # settings is cleared before training looks at it
        assert "pickle checkpoint" in said and "never loaded" in said


def test_planted_fit_key_stops_the_resume(marker: Path, tmp_path: Path) -> None:
    _quiet_fit("autoencoder", TRAIN, tmp_path / "clean")
    evil = tmp_path / "evil"
    for t in _targets(tmp_path / "clean"):
        _plant(evil / t, marker)
    with pytest.warns(UserWarning, match="not resuming.*fit_key.json is unreadable"):
        get_method("autoencoder", **get_method_class("autoencoder").config_set("test")).fit(
            TRAIN, VAL, context=RunContext(work_dir=evil, resume=True, quiet=True))
    assert not marker.exists()


def test_train_run_resume_on_planted_checkpoints(marker: Path, tmp_path: Path) -> None:
    from medanomaly.app.train import train_run

    run = tmp_path / "run"
    for n in ("autoencoder.pt", "autoencoder.json", "autoencoder.safetensors", "autoencoder.prev.json"):
        _plant(run / "checkpoints" / n, marker)
    with pytest.warns(UserWarning, match="pickle checkpoint.*never loaded"):
        train_run("autoencoder", TRAIN, run, val_split=None, config_set="test", resume=True, quiet=True)
    assert not marker.exists() and (run / "weights.safetensors").is_file()


def test_benchmark_reusing_a_planted_output_folder(marker: Path, tmp_path: Path) -> None:
    from medanomaly.app.benchmark import run_benchmark

    out = tmp_path / "bench"
    for n in ("autoencoder.pt", "autoencoder.json", "autoencoder.safetensors"):
        _plant(out / "runs" / "autoencoder" / "checkpoints" / n, marker)
    mt = out / "runs" / "multitask"
    (mt / "checkpoints").mkdir(parents=True)  # an interrupted run, its member folders planted
    members = [c.name for c in get_method("multitask", **get_method_class("multitask").config_set("test")).combinations()]
    for n in ("member.json", "member.safetensors", "settings.json", "checkpoints/unet.pt", "checkpoints/unet.json",
              "checkpoints/unet.safetensors"):
        for member in members:
            _plant(mt / member / n, marker)
    test = make_toy_dataset(6, SIZE, abnormal_fraction=0.5, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = run_benchmark(["autoencoder", "multitask"], test, out, train_data=TRAIN, config_set="test", resume=True,
                             quiet=True)
    assert len(rows) == 2 and not marker.exists()


def test_multitask_garbage_member_files_are_retrained_with_a_message(marker: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    ref = _quiet_fit("multitask", TRAIN, work)
    names = [c.name for c in ref.combinations()]
    _plant(work / names[0] / "member.json", marker)
    _plant(work / names[1] / "member.safetensors", marker)
    params = get_method_class("multitask").config_set("test")
    with pytest.warns(UserWarning, match="not reused") as rec:
        det = get_method("multitask", **params).fit(TRAIN, VAL, context=RunContext(work_dir=work, resume=True, quiet=True))
    said = " ".join(str(w.message) for w in rec)
    assert "member.json is unreadable" in said and "does not match the sha256" in said
    assert not marker.exists()
    a, b = ref.state_tensors(), det.state_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # retrained, same result


def test_mae_pretrained_accepts_safetensors_or_run_folder_only(marker: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from medanomaly.nets.mae import MAE, load_mae_weights, pretrain_mae

    params = get_method_class("mae").config_set("test")
    for name in ("evil.pt", "evil.pth", "evil.pkl"):
        _plant(tmp_path / name, marker)
        with pytest.raises(ValueError, match=r"pickle file, which is never loaded.*safetensors\.torch\.save_file"):
            get_method("mae", **{**params, "pretrained": str(tmp_path / name)}).fit(TRAIN, VAL)
    _plant(tmp_path / "evil_run" / "weights.safetensors", marker)
    with pytest.raises(ValueError, match="cannot read"):
        get_method("mae", **{**params, "pretrained": str(tmp_path / "evil_run")}).fit(TRAIN, VAL)
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="run folder or a .safetensors file"):
        load_mae_weights(MAE(**params["mae"]), tmp_path / "w.npz")
    assert not marker.exists()
    # a pre-training checkpoint of train_model (best weights) works as pretrained weights
    src = MAE(**params["mae"])
    x = torch.stack([TRAIN[i]["image"] for i in range(len(TRAIN))])
    pretrain_mae(src, x, {"steps": 4, "batch_size": 4, "val_every": 2}, val_images=x[:4], run_dir=tmp_path / "pre",
                 quiet=True)
    dst = MAE(**params["mae"])
    load_mae_weights(dst, tmp_path / "pre" / "checkpoints" / "mae.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    load_mae_weights(MAE(**params["mae"]), tmp_path / "plain.safetensors")


def test_no_pickle_loading_in_the_package() -> None:
    """No torch.load / pickle.load / unsafe yaml anywhere in src/ (grep)."""
    bad = re.compile(r"torch\.load\(|weights_only\s*=\s*False|pickle\.loads?\(|allow_pickle\s*=\s*True|"
                     r"yaml\.(unsafe_)?load\((?!.*Loader=\w*Safe)")
    hits = [f"{p.relative_to(SRC)}:{i}: {line.strip()}" for p in SRC.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert not hits, hits
