"""What ``medanomaly predict`` runs: a run folder or a shipped model (``--model``), plain inputs or a BIDS dataset
(``--bids``), and, for DICOM series inputs, DICOM Parametric Map / Segmentation outputs beside the NIfTI ones.

Everything that can be refused is checked before the first prediction: the model name and its weights' hash, that
each input fits the model (dimensionality, DICOM Modality, BIDS suffix), that a DICOM series carries the tags its
DICOM outputs need, and that no output exists already (without ``--force``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medanomaly.app.errors import Echo, PipelineError

__all__ = ["predict_command", "resolve_run"]


def resolve_run(run: str | Path | None, model: str | None) -> tuple[Path, str]:
    """(run folder, display name) for ``RUN`` or ``--model NAME`` (exactly one of them)."""
    if model is not None:
        if run is not None:
            raise PipelineError("give either a run folder or --model, not both")
        from medanomaly.app.models import get_model

        m = get_model(model)
        return m.path, m.name
    if run is None:
        raise PipelineError("give a run folder (from `medanomaly train`) or --model NAME (see `medanomaly models`)")
    return Path(run), Path(run).name


def _is_series(p: Path) -> bool:
    from medanomaly.data.io import detect_format

    try:
        return p.is_dir() and detect_format(p) == "dicom-series"
    except ValueError:
        return False


def predict_command(
    run: str | Path | None,
    inputs: Sequence[str | Path],
    out: str | Path | None,
    *,
    model: str | None = None,
    bids: str | Path | None = None,
    threshold: str | None = None,
    allow_irregular_spacing: bool = False,
    force: bool = False,
    quiet: bool = False,
    echo: Echo | None = None,
    batch_size: int = 16,
    **predict_options: Any,
) -> list[Path]:
    """``medanomaly predict``. With ``model``, ``run`` is the first input (the CLI's first positional argument).
    ``bids``: predict the model's scans of a BIDS dataset into its ``derivatives/medanomaly`` (no inputs, no
    ``out``). Returns the map paths (plus the DICOM files written for series inputs)."""
    inputs = [Path(p) for p in inputs]
    if model is not None and run is not None:
        inputs, run = [Path(run), *inputs], None
    run_dir, name = resolve_run(run, model)
    shipped = None
    if model is not None:
        from medanomaly.app.models import get_model

        shipped = get_model(model)  # verified in resolve_run already; cheap to look up again
    if bids is not None:
        if inputs or out is not None:
            raise PipelineError("--bids writes into ROOT/derivatives/medanomaly: give no input files and no --out")
        if shipped is None or not shipped.bids_suffix:
            raise PipelineError("--bids needs --model NAME (the model says which scans it reads, e.g. FLAIR or T1w)")
        from medanomaly.app.bids import predict_bids

        return predict_bids(run_dir, bids, shipped.bids_suffix, model_name=name, threshold=threshold, force=force,
                            quiet=quiet, echo=echo, batch_size=batch_size)
    if out is None:
        raise PipelineError("--out is required (or --bids ROOT with --model)")
    if not inputs:
        raise PipelineError("no input files given")
    out = Path(out)
    if shipped is not None:
        from medanomaly.app.models import check_inputs_fit

        check_inputs_fit(shipped, inputs)
    series = [p for p in inputs if _is_series(p)]
    with_mask = False
    if series:
        from medanomaly.app.dicom_out import check_series, dicom_output_paths

        if threshold is not None:
            from medanomaly.evaluation.calibration import parse_threshold

            try:
                with_mask = parse_threshold(threshold).has_voxel
            except ValueError as e:
                raise PipelineError(str(e)) from None
        from medanomaly.data.io import read_dicom_series

        for p in series:
            # the input's own problems (geometry) are reported before what the DICOM outputs need
            read_dicom_series(p, allow_irregular_spacing=allow_irregular_spacing)
            check_series(p)
            existing = [q for q in dicom_output_paths(out, p.name, with_mask) if q.exists()]
            if existing and not force:
                raise PipelineError(f"{existing[0]} already exists; use --force to overwrite or choose another --out")
    from medanomaly.app.predict import predict_files

    written = predict_files(run_dir, inputs, out, batch_size=batch_size, force=force, quiet=quiet, echo=echo,
                            allow_irregular_spacing=allow_irregular_spacing, threshold=threshold,
                            **predict_options)  # brain_masks, foreground, preset, strict (issue 13 preprocessing)
    if series:
        from medanomaly.app.dicom_out import write_dicom_outputs

        for p in series:
            mask = out / f"{p.name}_mask.nii.gz" if with_mask else None
            written += write_dicom_outputs(p, out / f"{p.name}_anomaly.nii.gz", mask, out, p.name, model_name=name,
                                           allow_irregular_spacing=allow_irregular_spacing)
    return written
