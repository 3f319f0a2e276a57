"""``medanomaly``: the command line. Each command parses options and calls one function of
:mod:`medanomaly.app` (one module per verb); heavy imports happen inside the commands so ``--help`` stays fast.

Errors a user can fix (wrong method name, bad run folder, unknown parameter, existing output) print one line
``error: ...`` and exit with code 1. Set ``MEDANOMALY_DEBUG=1`` to see the full traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="medanomaly",
    help="Unsupervised anomaly detection and localisation in medical images: train on healthy scans, "
    "get anomaly maps and scores.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


_OS_HINTS: dict[type[OSError], str] = {
    FileExistsError: "already exists (a file where a folder is needed?); choose another path or remove it",
    PermissionError: "permission denied; choose a place you can write to or fix its permissions",
    NotADirectoryError: "a part of this path is a file, not a folder",
    IsADirectoryError: "is a folder where a file is expected",
    FileNotFoundError: "no such file or folder",
}


def _os_message(e: OSError) -> str | None:
    """``<file>: <cause>`` for an OSError that carries its file name (None when it carries none)."""
    if e.filename is None:
        return None
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
    hint = next((h for t, h in _OS_HINTS.items() if isinstance(e, t)), None)
    return f"{where}: {hint or (e.strerror or str(e))} ({type(e).__name__})"


def error_message(e: BaseException) -> str:
    """The one-line text of an error: our own errors as they are, OSErrors as ``<file>: <cause>``."""
    if isinstance(e, OSError) and (named := _os_message(e)) is not None:
        return named
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = str(msg).strip().replace("\n", " ")
    # our own errors (all ValueError subclasses: PipelineError, RunFolderError, DataError, ParameterError ...)
    # and missing keys/files read as a plain sentence; anything else says what it is
    return msg if isinstance(e, ValueError | KeyError | FileNotFoundError) else f"{type(e).__name__}: {msg}"


def _one_line_warnings() -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints each distinct warning once, as one line ``warning: ...``."""
    seen: set[str] = set()

    def show(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
        text = str(message).strip().replace("\n", " ")
        if text not in seen:
            seen.add(text)
            typer.echo(f"warning: {text}", err=True)

    return show


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn any failure into one line on stderr and a non-zero exit code (traceback with MEDANOMALY_DEBUG=1);
    warnings (a run written by other versions, a skipped log line) print once each as ``warning: ...``."""
    try:
        with warnings.catch_warnings():
            if not os.environ.get("MEDANOMALY_DEBUG"):
                warnings.showwarning = _one_line_warnings()
            yield
    except typer.Exit:
        raise
    except KeyboardInterrupt as e:
        typer.echo(f"interrupted{': ' + str(e) if str(e) else ''}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as e:
        if os.environ.get("MEDANOMALY_DEBUG"):
            raise
        typer.echo(f"error: {error_message(e)}", err=True)
        raise typer.Exit(EXIT_ERROR) from None


def _fmt(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing output.")]


@app.command()
def train(
    method: Annotated[str, typer.Argument(help="Method name (see `medanomaly list`).")],
    data: Annotated[str, typer.Option("--data", "-d", help="Built-in dataset name or a manifest CSV.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create.")],
    split: Annotated[str, typer.Option(help="Split to train on (healthy images only).")] = "train",
    config: Annotated[Path | None, typer.Option("--config", help="YAML file of parameters.")] = None,
    config_set: Annotated[str | None, typer.Option("--config-set", help="cpu-small | cpu-long | paper.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: key=value (YAML value), repeatable.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: the config's, else 0).")] = None,
    preset: Annotated[str | None, typer.Option(help="Preprocessing preset (default: the dataset's).")] = None,
    size: Annotated[int | None, typer.Option(help="Image size for the preset (default: the dataset's).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run from its checkpoints.")] = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train METHOD on the healthy images of a dataset and save a run folder.

    The validation split (healthy images, no lesion labels) is used for early stopping when the method has it.

    Examples:

        medanomaly train intensity --data lgg-flair-2d --out runs/intensity

        medanomaly train autoencoder --data lgg-flair-2d --config-set cpu-small --set train.steps=200 --out runs/ae

        medanomaly train autoencoder --data my_manifest.csv --out runs/ae --resume
    """
    from medanomaly.app.config import parse_overrides
    from medanomaly.app.train import train_run

    if config is not None and config_set is not None:
        typer.echo("error: give either --config or --config-set, not both", err=True)
        raise typer.Exit(EXIT_ERROR)
    with _errors():
        overrides = parse_overrides(set_)
        s = train_run(method, data, out, split=split, config_set=config_set, config_file=config,
                      overrides=overrides, seed=seed, preset=preset, size=size, resume=resume, force=force, quiet=quiet)
        typer.echo(f"trained {s.method} on {s.n_train} images in {s.seconds:.1f} s -> {s.run_dir}")


ForegroundOpt = Annotated[str | None, typer.Option(
    "--foreground", help="Override the run preset's foreground: brain (a given brain mask, else the head itself on a "
    "skull-stripped scan, else an unsupervised skull strip), head, mask (needs a brain mask), all.")]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="Override the run's preprocessing preset (keeps the "
                                               "recorded parameters it knows, e.g. size).")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Fail (one line, exit 1) when a preprocessing guard fires "
                                         "instead of warning.")]


@app.command()
def predict(
    run: Annotated[Path | None, typer.Argument(help="Run folder written by `medanomaly train` (with --model: the first "
                                               "input).", show_default=False)] = None,
    inputs: Annotated[list[Path] | None, typer.Argument(help="Images or volumes: NIfTI, DICOM (file or folder), PNG.",
                                                        show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the maps and overlays.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="A shipped model (see `medanomaly models`) instead of a "
                                              "run folder.")] = None,
    bids: Annotated[Path | None, typer.Option("--bids", help="A BIDS dataset: predict the model's scans into "
                                              "ROOT/derivatives/medanomaly (needs --model).")] = None,
    allow_irregular_spacing: Annotated[bool, typer.Option(
        "--allow-irregular-spacing", help="Resample a DICOM series with uneven slice steps onto its median step "
        "instead of refusing it.")] = False,
    threshold: Annotated[str | None, typer.Option(
        "--threshold", "-t", help="fpr=P (voxel false-positive rate on the healthy validation images), image-fpr=P "
        "(image decision), a number, or fpr=P,image-fpr=Q: writes <name>_mask and <name>_components.csv.")] = None,
    brain_mask: Annotated[list[Path] | None, typer.Option(
        "--brain-mask", help="A brain mask on the input's grid (repeat once per input, in order).")] = None,
    foreground: ForegroundOpt = None,
    preset: PresetOpt = None,
    strict: StrictOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Anomaly maps for new images, written in each input's own geometry.

    A 3D input gives `<name>_anomaly.nii.gz` (same affine); a 2D input `<name>_anomaly.png` (and `.nii.gz` for
    NIfTI input); every input also an overlay `<name>_overlay.png` (most anomalous slice + montage, colours on the
    run's healthy scale). Image scores go to `scores.csv`; `view.json` lets `medanomaly view OUT` show them.

    Examples:

        medanomaly predict runs/ae scan1.nii.gz scan2.nii.gz --out maps/

        medanomaly predict runs/ae slice_012.png --out maps/

        medanomaly predict runs/ae scan1.nii.gz --out maps/ --threshold fpr=0.01,image-fpr=0.05

        medanomaly predict --model brain-flair-2d scan.nii.gz dicom_series/ --out maps/ --threshold fpr=0.01

        medanomaly predict --model brain-flair-2d --bids /data/my_bids --threshold fpr=0.01

    A DICOM series folder also gives `<name>_anomaly_pmap.dcm` (Parametric Map) and, with a voxel threshold,
    `<name>_mask_seg.dcm` (Segmentation), referencing the source series.
    """
    from medanomaly.app.outputs import predict_command

    with _errors():
        extra = {k: v for k, v in (("brain_masks", brain_mask), ("foreground", foreground), ("preset", preset),
                                   ("strict", strict)) if v}
        written = predict_command(run, inputs or [], out, model=model, bids=bids, force=force, quiet=quiet,
                                  allow_irregular_spacing=allow_irregular_spacing, threshold=threshold, **extra)
        typer.echo(f"wrote {len(written)} file(s) to {out if bids is None else Path(bids) / 'derivatives' / 'medanomaly'}")


@app.command()
def evaluate(
    run: Annotated[Path | None, typer.Argument(help="Run folder written by `medanomaly train`.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for metrics.json and report.html.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="A shipped model (see `medanomaly models`) instead of a "
                                              "run folder.")] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Dataset name or manifest (default: the run's).")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per predict call.")] = 16,
    threshold: Annotated[str | None, typer.Option(
        "--threshold", "-t", help="The calibrated rule for the calibrated_* metrics (default fpr=0.01,image-fpr=0.05).")] = None,
    foreground: ForegroundOpt = None,
    preset: PresetOpt = None,
    lesion_labels: Annotated[str | None, typer.Option(
        "--lesion-labels", help="Multi-class lesion masks: the labels that are lesion, e.g. 1,2,4 or '>0'.")] = None,
    strict: StrictOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Predict a whole split and write `metrics.json` and `report.html`.

    Pixel metrics (AP, AUROC, best DICE) are over foreground pixels; sample metrics use the image score.

    Examples:

        medanomaly evaluate runs/ae --data lgg-flair-2d --split test --out eval/ae

        medanomaly evaluate runs/ae --data my_manifest.csv --split val --out eval/ae-val

        medanomaly evaluate --model brain-flair-2d --data lgg-flair-2d --split test --out eval/shipped
    """
    from medanomaly.app.errors import PipelineError
    from medanomaly.app.evaluate import evaluate_run
    from medanomaly.app.outputs import resolve_run

    with _errors():
        if out is None:
            raise PipelineError("--out is required: the folder for metrics.json and report.html")
        run, _ = resolve_run(run, model)
        m = evaluate_run(run, data, out, split=split, batch_size=batch_size, force=force, quiet=quiet, threshold=threshold,
                         preset=preset, foreground=foreground, lesion_labels=lesion_labels, strict=strict)
        keys = ("pixel_ap", "pixel_auroc", "best_dice", "calibrated_dice", "sample_ap", "sample_auroc", "seconds_per_image",
                "device")
        typer.echo("  ".join(f"{k}={_fmt(m.get(k))}" for k in keys))
        if m.get("report"):
            typer.echo(f"report: {m['report']}")


@app.command()
def validate(
    run: Annotated[Path | None, typer.Argument(help="Run folder written by `medanomaly train`.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for synthetic_validation.json and "
                                             "synthetic_examples.png (default: print only).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="A shipped model instead of a run folder.")] = None,
    tasks: Annotated[str, typer.Option(help="Synthetic tasks, comma-separated (see `medanomaly list`).")] =
        "intra-blend,sink,source,smooth-intensity,fpi,cutpaste",
    draws: Annotated[int, typer.Option(help="Anomalous copies of every image per task.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic anomalies.")] = 0,
    max_images: Annotated[int | None, typer.Option("--max-images", help="Use this many validation images, evenly "
                                                   "spaced (default: all).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per predict call.")] = 16,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Label-free validation: the run's maps on synthetic anomalies in its own healthy validation images.

    No lesion label is read, so the numbers may choose between runs, settings, seeds and methods. Compare methods
    on `unseen_pixel_ap` (tasks no method here trains on), runs of one method on `mean_pixel_ap`.

    Examples:

        medanomaly validate runs/mt --out val/mt

        medanomaly validate runs/mim --tasks fpi,cutpaste --draws 3 --max-images 200
    """
    from medanomaly.app.outputs import resolve_run
    from medanomaly.app.validate import validate_run

    with _errors():
        run, _ = resolve_run(run, model)
        r = validate_run(run, out, tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()), draws=draws,
                         seed=seed, max_images=max_images, batch_size=batch_size, force=force, quiet=quiet)
        typer.echo("  ".join(f"{k}={_fmt(r.get(k))}" for k in ("mean_pixel_ap", "unseen_pixel_ap", "mean_image_auroc",
                                                                 "n_images")))
        for name, v in r["per_task"].items():
            typer.echo(f"  {name}: pixel_ap={_fmt(v['pixel_ap'])}  pixel_auroc={_fmt(v['pixel_auroc'])}  "
                       f"best_dice={_fmt(v['best_dice'])}  image_auroc={_fmt(v['image_auroc'])}")
        if out is not None:
            typer.echo(f"written: {Path(out) / 'synthetic_validation.json'}")


@app.command()
def benchmark(
    methods: Annotated[str, typer.Option("--methods", "-m", help="Comma-separated method names or LABEL=METHOD variants.")],
    data: Annotated[str, typer.Option("--data", "-d", help="Dataset name (with options: NAME:key=value,...) or manifest.")],
    config_set: Annotated[str | None, typer.Option("--config-set", help="cpu-small | cpu-long | paper.")] = "cpu-small",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (runs/, eval/, comparison.*).")] = Path("benchmark"),
    split: Annotated[str, typer.Option(help="Split to evaluate on.")] = "test",
    train_data: Annotated[str | None, typer.Option("--train-data", help="Train on these data instead of --data.")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="LABEL.key=value for one method (repeatable).")] = None,
    share: Annotated[bool, typer.Option("--share/--no-share", help="Share tokenizer / pre-trained MAE within a family.")] = True,
    seed: Annotated[int | None, typer.Option(help="Random seed for every method.")] = None,
    seeds: Annotated[str | None, typer.Option("--seeds", help="Comma-separated seeds (0,1,2): every method once per "
                                              "seed, the table shows mean ± std.")] = None,
    size: Annotated[int | None, typer.Option(help="Image size for the preset (default: the dataset's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 16,
    resume: Annotated[bool, typer.Option("--resume", help="Continue unfinished (killed) runs from their checkpoints.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Retrain even when finished runs exist.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train (or reuse) and evaluate several methods on the same split; write one comparison table.

    Finished runs in OUT/runs/<label> trained with the same settings on the same images are reused; an unfinished
    one needs --resume (or --force). Methods declare the parts they can share: within the MIM family the first
    method trains the VQ-VAE the others reuse; within the MAE family `mae` pre-trains the MAE the others start
    from (--no-share: each trains its own).

    Examples:

        medanomaly benchmark --methods intensity,autoencoder --data lgg-flair-2d --size 64

        medanomaly benchmark -m mim-ood,mim-ood-r8=mim-ood,ar-restoration,token-critic -d lgg-flair-2d --size 64 \\
            --set mim-ood-r8.restoration.R=8

        medanomaly benchmark -m intensity,multitask --train-data ixi-t1-3d:spacing=6 -d brats2018-3d:modality=t1

        medanomaly benchmark -m intensity,patchcore -d lgg-flair-2d --size 64 --seeds 0,1,2   # runs/seed-<k>/<label>
    """
    from medanomaly.app.benchmark import parse_benchmark_methods, parse_benchmark_overrides, parse_seeds, run_benchmark

    with _errors():
        labels = [lab for lab, _ in parse_benchmark_methods(methods.split(","))]
        overrides = parse_benchmark_overrides(sets, labels)
        rows = run_benchmark(methods.split(","), data, out, config_set=config_set, overrides=overrides, split=split,
                             train_data=train_data, seed=seed, seeds=parse_seeds(seeds), size=size,
                             batch_size=batch_size, share=share, resume=resume, force=force, quiet=quiet)
        for r in rows:
            typer.echo("  ".join(f"{k}={_fmt(r.get(k))}" for k in ("method", "seed", "pixel_ap", "best_dice",
                                                                   "calibrated_dice", "sample_auroc",
                                                                   "seconds_per_image") if k in r))
        typer.echo(f"table: {out / 'comparison.md'}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("medanomaly-demo"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed demo run from its checkpoints.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Retrain even when a finished demo run exists.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a small model on the real 2D brain MRI data (lgg-flair-2d), evaluate it, write the report.

    Needs the shared data: found via `MEDANOMALY_DATA` or a `shared/data` folder beside the repository.

    Examples:

        medanomaly demo

        MEDANOMALY_DATA=/data/medanomaly medanomaly demo --out /tmp/demo
    """
    from medanomaly.app.demo import run_demo

    with _errors():
        m = run_demo(out, resume=resume, force=force, quiet=quiet)
        keys = ("method", "pixel_ap", "pixel_auroc", "best_dice", "sample_ap", "sample_auroc", "seconds_per_image")
        typer.echo("  ".join(f"{k}={_fmt(m.get(k))}" for k in keys))
        typer.echo(f"demo finished in {m['total_seconds']:.0f} s")
        typer.echo(f"report: {m.get('report', out / 'eval' / 'report.html')}")


@app.command("models")
def models(
    name: Annotated[str | None, typer.Argument(help="A model name: print its model card.", show_default=False)] = None,
) -> None:
    """The trained models medanomaly ships (no training, no network needed), or one model's card.

    Examples:

        medanomaly models

        medanomaly models brain-flair-2d

        medanomaly predict --model brain-flair-2d scan.nii.gz --out maps/
    """
    from medanomaly.app.models import get_model, list_models

    with _errors():
        if name is not None:
            typer.echo(get_model(name).card())
            return
        found = list_models()
        if not found:
            typer.echo("no shipped models found")
        for m in found.values():
            typer.echo(f"{m.name:<18} {m.summary}")


@app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Methods (with their config sets), datasets, presets and synthetic-anomaly tasks.

    Examples:

        medanomaly list

        medanomaly list --json
    """
    from medanomaly.app.listing import list_everything

    with _errors():
        info = list_everything()
        if as_json:
            typer.echo(json.dumps(info, indent=1))
            return
        typer.echo("methods:")
        for name, sets in info["methods"].items():
            typer.echo(f"  {name:<18} config sets: {', '.join(sets) or '-'}")
        for key in ("datasets", "presets", "synth_tasks"):
            typer.echo(f"{key.replace('_', ' ')}: {', '.join(info[key]) or '-'}")


@app.command()
def synth(
    task: Annotated[str, typer.Argument(help="Task name, comma-separated names, or 'all' (see `medanomaly list`).")],
    data: Annotated[str, typer.Option("--data", "-d", help="Dataset name, manifest, or toy / toy-3d.")] = "lgg-flair-2d",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the grids.")] = Path("synth_grids"),
    n: Annotated[int, typer.Option("-n", help="Images per grid.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    source: Annotated[str | None, typer.Option(help="Patch source dataset for inter-blend.")] = None,
    max_cases: Annotated[int, typer.Option("--max-cases", help="Patients/cases to read.")] = 4,
    quiet: QuietOpt = False,
) -> None:
    """Make synthetic anomalies from healthy images and save before/after/label grids as PNG.

    Examples:

        medanomaly synth cutpaste --data toy --out synth/ -n 4

        medanomaly synth all --data lgg-flair-2d --out synth/
    """
    with _errors():
        from medanomaly.synth.cli import run_synth_cli

        paths = run_synth_cli(task, data=data, out=out, n=n, seed=seed, source=source, max_cases=max_cases, quiet=quiet)
        for pth in paths:
            typer.echo(str(pth))


@app.command()
def view(
    folder: Annotated[Path, typer.Argument(help="A `predict --out` folder (maps) or an `evaluate --out` folder (report).")],
    port: Annotated[int, typer.Option("--port", "-p", help="Port on 127.0.0.1 (default: a free one).")] = 0,
    case: Annotated[str | None, typer.Option("--case", help="Open this case first (its id).")] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in the default browser.")] = False,
) -> None:
    """Look at scans with their anomaly maps in a local web page.

    Each scan with its map as a colour overlay (on the run's healthy scale), the calibrated mask as an outline, a
    threshold slider, the connected components and the image score; volumes scroll through axial slices. The page
    is served on 127.0.0.1 only, at a URL with a random token; Ctrl-C stops it.

    Examples:

        medanomaly predict runs/ae scan.nii.gz --out maps/ --threshold fpr=0.01,image-fpr=0.05

        medanomaly view maps/

        medanomaly view eval/ae --case best-TCGA_CS_4941
    """
    from medanomaly.viewer.server import serve

    with _errors():
        try:
            serve(folder, port=port, open_browser=open_browser, case=case, echo=typer.echo)
        except KeyboardInterrupt:
            typer.echo("viewer stopped")


if __name__ == "__main__":  # pragma: no cover
    app()
