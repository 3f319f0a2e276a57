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
from medanomaly.app.guards import raise_or_warn

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


def _override_preset(preset: Any, name: str | None, foreground: str | None) -> Any:
    """``--preset`` (keeping the recorded parameters the other preset knows) and ``--foreground`` on the run's preset."""
    from medanomaly.data.presets import PRESETS, get_preset

    if not name and not foreground:
        return preset
    if name and name not in PRESETS:
        raise PipelineError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    cls = PRESETS[name] if name else type(preset)
    params = {k: v for k, v in preset.params.items() if k in cls.defaults}
    if foreground:
        if "foreground" not in cls.defaults:
            raise PipelineError(f"--foreground: the preset {cls.name} has no foreground choice")
        params["foreground"] = foreground
    try:
        return get_preset(cls.name, **params)
    except ValueError as e:
        raise PipelineError(str(e)) from None


def output_stems(inputs: Sequence[str | Path]) -> list[str]:
    """The output name of each input: its file name without suffix; inputs that share one (BraTS folders all hold
    ``FLAIR.nii.gz``) are prefixed with their parent folders' names (``case_0_FLAIR``), as many as make them unique
    (then a running number)."""
    paths = [Path(p) for p in inputs]
    stems = [_stem(p) for p in paths]
    for depth in range(1, 4):
        dup = {s for s in stems if stems.count(s) > 1}
        if not dup:
            return stems
        for i, p in enumerate(paths):
            if _stem(p) in dup or stems[i] in dup:
                parents = [q.name for q in list(p.resolve().parents)[:depth] if q.name][::-1]
                stems[i] = "_".join([*parents, _stem(p)])
    seen: dict[str, int] = {}
    for i, s in enumerate(stems):
        seen[s] = seen.get(s, 0) + 1
        if stems.count(s) > 1:
            stems[i] = f"{s}_{seen[s]}"
    return stems


def _read_brain(path: Path, ld: Any, image: Path) -> np.ndarray:
    """A ``--brain-mask`` file, checked against its image's grid (shape and, for volumes, affine)."""
    from medanomaly.data.io import DataError, read_mask

    bm = read_mask(path)
    arr = bm.array
    while arr.ndim > 2 and arr.shape[-1] == 1 and arr.ndim > ld.array.ndim:
        arr = arr[..., 0]
    if arr.shape != ld.array.shape:
        raise DataError(f"{path}: brain mask shape {arr.shape} does not match image {image} shape {ld.array.shape}")
    if arr.ndim == 3 and not np.allclose(bm.affine, ld.affine, atol=1e-3):
        raise DataError(f"{path}: brain mask geometry (affine) differs from image {image}")
    return arr


def _input_guards(meta: dict[str, Any], images: np.ndarray, fg: np.ndarray, run_data: dict[str, Any],
                  path: Path) -> tuple[list[str], dict[str, Any]]:
    """The guards one input can be checked by (no lesion mask here): coverage, dropped slices, intensity shift."""
    from medanomaly.app.guards import (
        MIN_INTENSITY_VALUES,
        coverage_guard,
        dropped_guard,
        intensity_guard,
        intensity_shift,
        intensity_stats,
        summarise_records,
    )
    from medanomaly.data.presets import prep_summary

    prep = prep_summary(meta)
    summary = summarise_records({str(path): prep})
    fgb = np.asarray(fg, bool)
    vals = images[:, 0][fgb[:, 0]] if images.ndim == fgb.ndim and len(images) else np.zeros(0)
    shift = intensity_shift(intensity_stats(vals), run_data.get("intensity")) if vals.size >= MIN_INTENSITY_VALUES else None
    what = str(path)
    return coverage_guard(summary, what) + dropped_guard(summary, what) + intensity_guard(shift, what), prep


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
    brain_masks: Sequence[str | Path] | None = None,
    foreground: str | None = None,
    preset: str | None = None,
    strict: bool = False,
) -> list[Path]:
    """Anomaly maps for image files, written in each input's own geometry.

    ``brain_masks``: one brain mask file per input (same grid), used by ``foreground="brain"``/``"mask"``;
    ``foreground``/``preset`` override the run's recorded preset (as in ``evaluate``). Inputs that share a file name
    (BraTS folders all hold ``FLAIR.nii.gz``) get their parent folder's name as a prefix (:func:`output_stems`).
    The guards of :mod:`medanomaly.app.guards` (foreground coverage, dropped slices, intensity shift) warn per input,
    or fail with ``strict``; ``scores.csv`` records the foreground, the skull-stripped detection and dropped slices.

    The run's stored preset preprocesses each input. ``brain-mri-2d`` runs take 2D images (PNG/JPEG/TIFF, 2D
    NIfTI, DICOM file) or 3D volumes (processed as axial slices, the map put back on the volume's grid); 3D presets
    take volumes (NIfTI, DICOM folder); ``cxr`` takes 2D images. Writes ``<name>_anomaly.nii.gz`` for NIfTI/volume
    inputs, ``<name>_anomaly.png`` for 2D inputs (scaled from the map's min..max, recorded in ``scores.csv``),
    ``<name>_overlay.png`` for all (:mod:`medanomaly.evaluation.overlays`: the run's healthy colour scale),
    ``<name>_foreground`` (the voxels scored) and ``view.json`` for ``medanomaly view``, and ``scores.csv``
    (image score per input; when an input fails, for the
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
    preset = _override_preset(_run_preset(cfg, run), preset, foreground)
    rule, thr = _threshold(run, threshold)
    from medanomaly.evaluation.overlays import run_scale, save_case_overlay
    from medanomaly.viewer.records import add_predict_case

    scale = run_scale(run, cfg.get("method"))  # the run's healthy colour scale (None: per-image)
    want_shape = [int(s) for s in run_data.get("image_shape") or []]
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise PipelineError("no input files given")
    stems = output_stems(inputs)
    brains = [Path(b) for b in brain_masks or []]
    if brains and len(brains) != len(inputs):
        raise PipelineError(f"--brain-mask: give one brain mask per input ({len(inputs)} inputs, {len(brains)} masks)")
    if brains and preset.name == "cxr":
        raise PipelineError("--brain-mask applies to brain presets, not to the run's cxr preset")
    missing = [str(p) for p in [*inputs, *brains] if not p.exists()]
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
                                                        "abnormal" if rule is not None else "")
            + ",foreground,skull_stripped,dropped_slices,warnings"]
    try:
        for k_in, (path, stem) in enumerate(tqdm(list(zip(inputs, stems, strict=True)), desc="predict", disable=quiet,
                                                 dynamic_ncols=True, leave=False, delay=0.5)):  # no bar before a quick error
            ld = _read(path, preset, allow_irregular_spacing)
            arr, fmt = ld.array, ld.meta.get("format")
            bkw = {"brain": _read_brain(brains[k_in], ld, path)} if brains else {}
            if preset.spatial_dims == 2 and arr.ndim == 3:  # a volume through a 2D run: axial slices
                st = preset.apply_volume(ld, where=f"{path}: ", **bkw)
                _check_shape(st.images.shape[2:], want_shape, path, preset.name)
                keep = np.asarray(st.keep, bool)
                guard_msgs, prep = _input_guards(st.meta, st.images[keep], st.foreground[keep], run_data, path)
                raise_or_warn(guard_msgs, strict)
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
                pre = preset(ld, **bkw)
                guard_msgs, prep = _input_guards(pre.meta, pre.image[None], pre.foreground[None], run_data, path)
                raise_or_warn(guard_msgs, strict)
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
            add_predict_case(out, stem, ld, path, amap, fg_in, scale, thr, score, run, cfg.get("method"))  # view.json
            written.append(Path(target))
            row = f"{path},{score:.6g},{Path(target).name},{float(amap.min()):.6g},{float(amap.max()):.6g}"
            if rule is not None:
                row += "," + _threshold_outputs(thr, amap, np.asarray(fg_in) > 0.5, score, ld, out, stem)
            row += "," + _csv_fields(prep.get("foreground"), prep.get("skull_stripped"), prep.get("n_dropped"),
                                     " | ".join(guard_msgs))
            rows.append(row)
    finally:  # the inputs done before a failing one keep their scores
        if written:
            atomic_write_text(out / "scores.csv", "\n".join(rows) + "\n")
    say(f"wrote {len(written)} map(s) and scores.csv to {out}")
    return written
