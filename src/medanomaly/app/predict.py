"""``medanomaly predict``: anomaly maps for image files, in each input's own geometry; and the one predict loop
that ``evaluate`` uses too.

Each input is read once, preprocessed by the run's stored preset, scored, and its map put back on the input's own
grid by the preset's ``invert`` (the inverse of every geometry step, beside its forward step), then written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.app.errors import Echo, PipelineError, make_echo

__all__ = ["iter_predictions", "load_run", "predict_arrays", "predict_files"]

_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npz")


def load_run(run_dir: str | Path, expect_method: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Load a finished run folder: (detector, its full config dict)."""
    from medanomaly.methods import load_detector
    from medanomaly.run_folder import RunFolder, RunFolderError

    folder = RunFolder(run_dir)
    cfg = folder.read_config()
    if expect_method and cfg["method"] != expect_method:
        raise RunFolderError(f"{run_dir} holds a '{cfg['method']}' run, not '{expect_method}'")
    return load_detector(folder.path), cfg


def iter_predictions(det: Any, batches: Any) -> Iterator[tuple[Any, Any, float]]:
    """The one predict loop: for each ``batch`` dict (``image``, ``foreground`` tensors) yields
    (batch, AnomalyResult, seconds spent in ``predict``), under ``torch.no_grad``; CUDA is synchronised for timing."""
    import time

    import torch

    cuda = torch.cuda.is_available()
    for batch in batches:
        t0 = time.perf_counter()
        with torch.no_grad():
            res = det.predict(batch["image"], batch["foreground"])
        if cuda:
            torch.cuda.synchronize()
        yield batch, res, time.perf_counter() - t0


def predict_arrays(det: Any, images: np.ndarray, fg: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Maps (N, *S) and image scores (N,) for preprocessed arrays, ``batch_size`` at a time."""
    import torch

    def batches() -> Iterator[dict[str, Any]]:
        for i in range(0, len(images), batch_size):
            yield {"image": torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32)),
                   "foreground": torch.from_numpy(np.ascontiguousarray(fg[i:i + batch_size], dtype=bool))}

    maps, scores = [], []
    for _, res, _ in iter_predictions(det, batches()):
        maps.append(res.pixel_scores.detach().float().cpu().numpy())
        scores.append(res.image_scores.detach().float().cpu().numpy())
    return np.concatenate(maps), np.concatenate(scores)


def _stem(path: Path) -> str:
    name = path.name
    for suf in _SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _display(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float32)
    lo, hi = np.percentile(a, [0.5, 99.5])
    return np.clip((a - lo) / max(float(hi - lo), 1e-6), 0, 1)


def _check_shape(shape: Sequence[int], want: list[int], path: Path, preset_name: str) -> None:
    if want and [int(s) for s in shape] != want:
        raise PipelineError(f"{path}: after the run's preset ({preset_name}) the image is {tuple(int(s) for s in shape)}, "
                            f"but the run was trained on {tuple(want)}")


def _run_preset(cfg: dict[str, Any], run: str | Path) -> Any:
    from medanomaly.data.presets import get_preset

    pc = (cfg.get("data") or {}).get("preset_config")
    if not pc:
        raise PipelineError(f"{run} records no preprocessing preset (it was not trained with `medanomaly train` on files); "
                            "cannot predict files")
    pc = dict(pc)
    try:
        return get_preset(pc.pop("name"), **pc)
    except (KeyError, ValueError, TypeError) as e:
        raise PipelineError(f"{run}: its recorded preset does not load ({e})") from e


def _read(path: Path, preset: Any, allow_irregular_spacing: bool = False) -> Any:
    from medanomaly.data.io import read_image

    ld = read_image(path, allow_irregular_spacing=allow_irregular_spacing)
    arr = ld.array
    while arr.ndim > 2 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and ld.meta.get("format") == "pil" and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(-1)
    if arr.ndim not in (2, 3):
        raise PipelineError(f"{path}: expected a 2D image or a 3D volume, got shape {tuple(ld.array.shape)}")
    if preset.spatial_dims == 3 and arr.ndim != 3:
        raise PipelineError(f"{path}: the run expects 3D volumes (preset {preset.name}), got a 2D image {arr.shape}")
    if preset.spatial_dims == 2 and arr.ndim == 3 and preset.name != "brain-mri-2d":
        raise PipelineError(f"{path}: preset {preset.name} takes 2D images, got a 3D volume {arr.shape}")
    ld.array = arr
    return ld


def _threshold(run: str | Path, spec: str | None) -> tuple[Any, dict[str, Any]]:
    """The parsed ``--threshold`` and its numbers from the run's calibration ((None, {}) without one)."""
    if spec is None:
        return None, {}
    from medanomaly.evaluation.calibration import parse_threshold, resolve_threshold
    from medanomaly.run_folder import RunFolder

    try:
        rule = parse_threshold(spec)
        return rule, resolve_threshold(rule, RunFolder(run).read_calibration(), where=str(run))
    except ValueError as e:
        raise PipelineError(str(e)) from None


def _csv_fields(*values: Any) -> str:
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(["" if v is None else v for v in values])
    return buf.getvalue()


def _threshold_outputs(thr: dict[str, Any], amap: np.ndarray, fg: np.ndarray, score: float, ld: Any, out: Path,
                       stem: str) -> str:
    """Write the mask and components table of one input (with a voxel rule); the scores.csv fields."""
    from medanomaly.data.io import write_nifti_mask
    from medanomaly.evaluation.calibration import components_table
    from medanomaly.training.atomic import atomic_write_text

    t, n_above = thr["voxel_threshold"], None
    if t is not None:
        mask = (amap > t) & fg
        n_above = int(mask.sum())
        if amap.ndim == 3 or ld.meta.get("format") == "nifti":
            write_nifti_mask(mask, ld, out / f"{stem}_mask.nii.gz")
        if amap.ndim == 2:
            from PIL import Image

            Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"{stem}_mask.png")
        table = components_table(mask, amap, ld.affine)
        cols = ["component", "voxels", "volume_ml", "peak_score", "mean_score", "centroid_x_mm", "centroid_y_mm",
                "centroid_z_mm"]
        lines = [",".join(cols)] + [",".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in cols)
                                    for r in table]
        atomic_write_text(out / f"{stem}_components.csv", "\n".join(lines) + "\n")
    it = thr["image_threshold"]
    return _csv_fields("" if t is None else f"{t:.6g}", thr["voxel_rule"], n_above, "" if it is None else f"{it:.6g}",
                       thr["image_rule"], "" if it is None else str(score > it).lower())


def predict_files(
    run: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    batch_size: int = 16,
    force: bool = False,
    quiet: bool = False,
    echo: Echo | None = None,
    allow_irregular_spacing: bool = False,
    threshold: str | None = None,
) -> list[Path]:
    """Anomaly maps for image files, written in each input's own geometry.

    The run's stored preset preprocesses each input. ``brain-mri-2d`` runs take 2D images (PNG/JPEG/TIFF, 2D
    NIfTI, DICOM file) or 3D volumes (processed as axial slices, the map put back on the volume's grid); 3D presets
    take volumes (NIfTI, DICOM folder); ``cxr`` takes 2D images. Writes ``<name>_anomaly.nii.gz`` for NIfTI/volume
    inputs, ``<name>_anomaly.png`` for 2D inputs (scaled from the map's min..max, recorded in ``scores.csv``),
    ``<name>_overlay.png`` for all, and ``scores.csv`` (image score per input; when an input fails, for the
    inputs done before it). ``allow_irregular_spacing``: a DICOM series with uneven slice steps is resampled onto
    its median step (the map is written on that regular grid) instead of refused. Returns the map paths.

    ``threshold`` (:func:`medanomaly.evaluation.calibration.parse_threshold`): ``fpr=P`` or a number gives the voxel
    threshold; beside each map go ``<name>_mask.nii.gz`` (NIfTI/volume inputs, the input's affine, uint8) or
    ``<name>_mask.png`` (2D) and ``<name>_components.csv``; ``image-fpr=P`` gives the image decision (``abnormal``
    in ``scores.csv``). A voxel is in the mask when its score is ``>`` the threshold *and* it is in the preset's
    foreground put back on the input's grid (the voxels the calibration counted): background and the slices a 2D
    run drops are never in the mask, also for thresholds <= 0.
    """
    from tqdm.auto import tqdm

    from medanomaly.data.io import write_nifti_map, write_png_map

    say = make_echo(quiet, echo)
    if batch_size < 1:
        raise PipelineError(f"batch size must be >= 1, got {batch_size}")
    det, cfg = load_run(run)
    run_data = cfg.get("data") or {}
    preset = _run_preset(cfg, run)
    rule, thr = _threshold(run, threshold)
    from medanomaly.evaluation.overlays import run_scale, save_case_overlay

    scale = run_scale(run, cfg.get("method"))  # the run's healthy colour scale (None: per-image)
    want_shape = [int(s) for s in run_data.get("image_shape") or []]
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise PipelineError("no input files given")
    stems = [_stem(p) for p in inputs]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise PipelineError(f"several inputs share the name {dup[0]!r}; predict them into different --out folders")
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise PipelineError(f"input(s) not found: {', '.join(missing)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} exists and is not a folder")
    planned = [out / "scores.csv"]
    for s in stems:
        planned += [out / f"{s}_anomaly.nii.gz", out / f"{s}_anomaly.png", out / f"{s}_overlay.png"]
        if rule is not None and rule.has_voxel:
            planned += [out / f"{s}_mask.nii.gz", out / f"{s}_mask.png", out / f"{s}_components.csv"]
    existing = [q for q in planned if q.exists()]
    if existing and not force:
        raise PipelineError(f"{existing[0]} already exists; use --force to overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    from medanomaly.training.atomic import atomic_write_text

    written: list[Path] = []
    rows = ["input,image_score,map,map_min,map_max" + (",threshold,threshold_rule,voxels_above,image_threshold,image_rule,"
                                                        "abnormal" if rule is not None else "")]
    try:
        for path, stem in tqdm(list(zip(inputs, stems, strict=True)), desc="predict", disable=quiet, dynamic_ncols=True,
                               leave=False, delay=0.5):  # delay: a quick error prints no bar before it
            ld = _read(path, preset, allow_irregular_spacing)
            arr, fmt = ld.array, ld.meta.get("format")
            if preset.spatial_dims == 2 and arr.ndim == 3:  # a volume through a 2D run: axial slices
                st = preset.apply_volume(ld, where=f"{path}: ")
                _check_shape(st.images.shape[2:], want_shape, path, preset.name)
                keep = np.asarray(st.keep, bool)
                if not keep.any():
                    raise PipelineError(f"{path}: no slice of this volume passes the preset's slice filter (preset "
                                        f"{preset.name}: foreground fraction >= {preset.params.get('min_fg_fraction')})")
                # only the slices the preset keeps are scored (datasets drop the others from every split)
                maps, scores = predict_arrays(det, st.images[keep], st.foreground[keep], batch_size)
                amap = preset.invert(maps, st.meta)  # the input volume's grid; dropped slices get 0
                fg_in = preset.invert(st.foreground[keep].astype(bool), st.meta, mode="nearest")
                score = float(scores.max())
                target = write_nifti_map(amap, ld, out / f"{stem}_anomaly.nii.gz")
            else:
                pre = preset(ld)
                _check_shape(pre.image.shape[1:], want_shape, path, preset.name)
                if run_data.get("channels") is not None and pre.image.shape[0] != run_data["channels"]:
                    raise PipelineError(f"{path}: {pre.image.shape[0]} channel(s) after the preset, the run expects "
                                        f"{run_data['channels']}")
                maps, scores = predict_arrays(det, pre.image[None], pre.foreground[None], 1)
                score = float(scores[0])
                amap = preset.invert(maps[0], pre.meta)
                fg_in = preset.invert(np.asarray(pre.foreground, bool), pre.meta, mode="nearest")
                if arr.ndim == 3:
                    target = write_nifti_map(amap, ld, out / f"{stem}_anomaly.nii.gz")
                else:
                    if fmt == "nifti":
                        write_nifti_map(amap, ld, out / f"{stem}_anomaly.nii.gz")
                    target = write_png_map(amap, out / f"{stem}_anomaly.png")
            save_case_overlay(out / f"{stem}_overlay.png", ld, amap, fg_in, scale, thr, title=stem, image_score=score,
                              method=cfg.get("method"))
            written.append(Path(target))
            row = f"{path},{score:.6g},{Path(target).name},{float(amap.min()):.6g},{float(amap.max()):.6g}"
            if rule is not None:
                row += "," + _threshold_outputs(thr, amap, np.asarray(fg_in) > 0.5, score, ld, out, stem)
            rows.append(row)
    finally:  # the inputs done before a failing one keep their scores
        if written:
            atomic_write_text(out / "scores.csv", "\n".join(rows) + "\n")
    say(f"wrote {len(written)} map(s) and scores.csv to {out}")
    return written
