"""Peak memory of predicting one full 240x240x155 volume with every 3D method (``cpu-small`` config).

For each method, in two subprocesses of their own (``ru_maxrss`` is per process):

1. ``fit``: the ``cpu-small`` parameters, trained for ``--steps`` real steps per stage (``train_model`` intercepted as in
   benchmarks/throughput.py; memory does not depend on how long a model trained) on 4 generated brain-like volumes of
   ``--train-shape`` (default 64x64x48; methods whose model is tied to the voxel grid, e.g. ``zscore``, on 3 volumes
   of the full 240x240x155 grid), saved to a run folder;
2. ``predict``: the run folder loaded (as ``medanomaly predict`` does) and applied to the FLAIR volume of BraTS 2018
   ``case_0`` (240x240x155, intensities scaled by the 99.5th foreground percentile to [0, 1]); peak RSS of that
   process (``ru_maxrss``), wall time and the load average are printed and written to
   ``docs/results/predict_3d_memory.json``/``.md``.

    python benchmarks/predict_3d_memory.py [--methods zscore,intensity,...] [--steps 2]
    python benchmarks/predict_3d_memory.py --methods multitask --roi 128   # row "multitask (roi 128)"

Only the rows of ``--methods`` are measured again; the other rows of the json/md are kept. ``--note`` is written in
the note column of the rows measured (an error, if any, comes first).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
METHODS = ("intensity", "zscore", "autoencoder", "patchcore", "multitask", "mim-ood", "ar-restoration", "token-critic")
FULL = (240, 240, 155)
LIMIT_GIB = 4.0
GRID_BOUND = ("zscore",)  # the model is a voxel grid: trained on the full grid
# token methods are tied to their token grid (240x240x155 zero-padded to 240x240x160 for f=8: 30x30x20 = 18,000
# tokens). Training them at that size takes hours on 2 cores, and memory does not depend on the weights, so they are
# built with random weights at that grid (as in benchmarks/mim_ood_speed.py) with thresholds that make them do full
# work: every token flagged (MIM-OOD, Token Critic: lambda 0.005; AR: NLL 0, so its loop visits all 18,000 positions).
# MIM-OOD and Token Critic run T=1 iteration: every iteration allocates the same tensors (the peak does not grow with
# T; the time is ~T x).
TOKEN = ("mim-ood", "ar-restoration", "token-critic")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def brain_volumes(n: int, shape: tuple[int, ...], seed: int) -> Any:
    """``n`` ellipsoid 'brains' with smooth texture in [0, 1] (float32, built slab by slab to stay small)."""
    from scipy.ndimage import gaussian_filter

    from medanomaly.data.dataset import ArrayDataset

    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    imgs = np.zeros((n, 1, *shape), np.float32)
    fgs = np.zeros((n, 1, *shape), bool)
    for i in range(n):
        r = rng.uniform(0.7, 0.9, 3).astype(np.float32)
        r2 = (axes[0][:, None, None] / r[0]) ** 2 + (axes[1][None, :, None] / r[1]) ** 2 + (axes[2][None, None] / r[2]) ** 2
        fg = r2 <= 1
        tex = gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3)
        imgs[i, 0] = np.clip((0.5 + 0.2 * np.cos(4 * np.sqrt(r2)) + tex) * fg, 0, 1)
        fgs[i, 0] = fg
    return ArrayDataset(imgs, fgs, name="bench3d")


def do_fit(method: str, run_dir: str, steps: int, train_shape: tuple[int, ...], roi: int = 0) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import throughput
    from medanomaly.methods import get_method_class
    from medanomaly.methods.base import RunContext

    steps = 1 if method in TOKEN else steps
    ns = argparse.Namespace(steps=steps, warm=0, threads=0, channels_last=False, bf16=False, compile=False)
    stages: list[dict[str, Any]] = []
    throughput.install_capture(ns, stages)
    cls = get_method_class(method)
    params = cls.config_set("cpu-small")
    if "device" in params:
        params["device"] = "cpu"
    shape, n, n_val = (FULL, 3, 2) if method in GRID_BOUND else (train_shape, 6, 2)
    if method in TOKEN:
        f = 2 ** len(params["tokenizer"]["channels"])
        value = 0.0 if method == "ar-restoration" else 0.005
        params["restoration"] = {**params["restoration"], "T": 1, "batch_size": 1,
                                 "threshold": {**params["restoration"]["threshold"], "mode": "fixed", "value": value}}
        det = cls(**params)
        det._build((1, *padded_full(f)))
        det.threshold = value
        det.token_used = torch.ones(int(params["tokenizer"]["num_embeddings"]), dtype=torch.bool)
        det.is_fitted = True
        det.save(run_dir)
        return
    if method == "multitask":  # one ensemble member, few synthetic validation samples: members predict one by one
        params["max_models"], params["val_samples"] = 1, 8
        if roi:  # sliding-window inference (MONAI, with its progress bar) instead of one whole-volume forward
            params["predict"] = {**params["predict"], "roi_size": [roi, roi, roi]}
    det = cls(**params)
    det.fit(brain_volumes(n, shape, 0), brain_volumes(n_val, shape, 1), context=RunContext(quiet=True))
    det.save(run_dir)


def padded_full(factor: int) -> tuple[int, ...]:
    return tuple(-(-s // factor) * factor for s in FULL)


def brats_volume() -> tuple[torch.Tensor, torch.Tensor]:
    import nibabel as nib

    from medanomaly.data.roots import find_data_root

    root, _ = find_data_root(require="brain_brats2018_3d")
    if root is None:
        raise FileNotFoundError("brain_brats2018_3d not found (set MEDANOMALY_DATA)")
    v = np.asarray(nib.load(Path(root) / "brain_brats2018_3d" / "case_0" / "FLAIR.nii.gz").dataobj, dtype=np.float32)
    fg = v > 0
    v = np.clip(v / np.percentile(v[fg], 99.5), 0, 1).astype(np.float32)
    return torch.from_numpy(v)[None, None], torch.from_numpy(fg)[None, None]


def do_predict(run_dir: str) -> dict[str, Any]:
    from medanomaly.methods.base import RunContext, load_detector

    x, fg = brats_volume()
    det = load_detector(run_dir).set_context(RunContext(quiet=False))
    want = getattr(det, "image_shape", None)
    if want is not None and tuple(want[1:]) != tuple(x.shape[2:]):  # a token method: zero-pad to its grid
        pad = [p for s, w in zip(reversed(x.shape[2:]), reversed(want[1:]), strict=True) for p in (0, w - s)]
        x, fg = torch.nn.functional.pad(x, pad), torch.nn.functional.pad(fg, pad)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def report() -> None:  # the peak so far, every 10 s: a run stopped by the time limit still tells its peak
        while True:
            time.sleep(10)
            print(f"RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}", flush=True)

    import threading

    threading.Thread(target=report, daemon=True).start()
    t0 = time.perf_counter()
    with torch.no_grad():
        res = det.predict(x, fg)
    sec = time.perf_counter() - t0
    return {"shape": list(x.shape[2:]), "seconds": sec, "rss_before_predict_mb": base,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "map_finite": bool(torch.isfinite(res.pixel_scores).all()), "load": loadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--train-shape", default="64,64,48")
    ap.add_argument("--phase", choices=["fit", "predict"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--roi", type=int, default=0, help="multitask: predict.roi_size (sliding window) of this side")
    ap.add_argument("--note", default="", help="text for the note column of the rows measured now")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.train_shape.split(","))
    if args.phase == "fit":
        do_fit(args.method, args.run_dir, args.steps, shape, args.roi)
        return
    if args.phase == "predict":
        print("RESULT " + json.dumps(do_predict(args.run_dir)), flush=True)
        return
    out_json = RESULTS / "predict_3d_memory.json"
    records = json.loads(out_json.read_text())["records"] if out_json.exists() else {}
    env = {**os.environ}
    for m in args.methods.split(","):
        rec: dict[str, Any] = {"method": m, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        if args.note:
            rec["note"] = args.note
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = str(Path(tmp) / "run")
            base = [sys.executable, __file__, "--method", m, "--run-dir", run_dir, "--steps", str(args.steps),
                    "--train-shape", args.train_shape, "--roi", str(args.roi)]
            try:
                p = subprocess.run([*base, "--phase", "fit"], capture_output=True, text=True, timeout=args.timeout,
                                   env={**env, "MEDANOMALY_QUIET": "1"})
                if p.returncode != 0:
                    rec["error"] = "fit failed: " + p.stderr.strip()[-300:]
                else:
                    p = subprocess.run([*base, "--phase", "predict"], capture_output=True, text=True,
                                       timeout=args.timeout, env=env)
                    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if line is None:
                        rec["error"] = f"predict failed (rc {p.returncode}): " + p.stderr.strip()[-300:]
                    else:
                        rec.update(json.loads(line[7:]))
                        rec["progress_bar"] = any(t in p.stderr for t in ("it/s", "%|", "pos/s", "iter/s"))
            except subprocess.TimeoutExpired as e:
                rec["error"] = f"stopped after {args.timeout} s in {e.cmd[-1]}"
                out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
                rss = [float(x.split()[1]) for x in out.splitlines() if x.startswith("RSS ")]
                if rss:  # the peak until it was stopped (e.g. the AR loop over 18,000 positions)
                    rec.update({"peak_rss_mb": rss[-1], "partial": True, "load": loadavg(),
                                "progress_bar": "it/s" in err or "%|" in err or "pos/s" in err,
                                "progress": err.replace("\r", "\n").strip().splitlines()[-1][-120:] if err else ""})
        rec["under_limit"] = rec.get("peak_rss_mb", 1e9) < LIMIT_GIB * 1024
        if rec.get("partial"):
            rec["error"] = rec["error"] + f" (peak RSS until then; progress: {rec.get('progress', '')})"
        records[m if not (args.roi and m == "multitask") else f"{m} (roi {args.roi})"] = rec
        print(json.dumps(rec), flush=True)
        if not args.no_write:
            RESULTS.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps({"limit_gib": LIMIT_GIB, "records": records}, indent=1))
    if not args.no_write:
        lines = ["# Predicting one full 240x240x155 volume (BraTS 2018 case_0 FLAIR), cpu-small config", "",
                 "`python benchmarks/predict_3d_memory.py`: peak RSS of a process that loads the run folder and predicts "
                 f"the volume (limit {LIMIT_GIB:g} GiB = {LIMIT_GIB * 1024:.0f} MB; token methods at the volume zero-padded "
                 "to 240x240x160). The machine was shared (load average beside each row), which changes the time, not the "
                 "memory.", "",
                 "| method | peak RSS MB | < 4 GiB | predict s | progress bar | load | note |", "|---|---|---|---|---|---|---|"]
        for m, r in records.items():
            lines.append(f"| {m} | {r.get('peak_rss_mb', 0):.0f} | {'yes' if r['under_limit'] else 'NO'} | "
                         f"{format(r['seconds'], '.1f') if 'seconds' in r else '–'} | "
                         f"{'yes' if r.get('progress_bar') else 'no'} | "
                         f"{r.get('load', '')} | {'; '.join(t for t in (r.get('error', '')[:160], r.get('note', '')) if t)} |")
        (RESULTS / "predict_3d_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
