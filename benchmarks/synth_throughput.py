"""Throughput of the synthetic anomaly tasks, and our Poisson solver against pie-torch's ``blend_dst_numpy``.

    OMP_NUM_THREADS=1 python benchmarks/synth_throughput.py [--tasks sink,source] [--n2d 200] [--n3d 20] [--workers 2]

Prints samples/s per task for 2D 256x256 slices and 3D 80x112x80 volumes, in one process (task calls only) and
through a DataLoader over :class:`SynthDataset` with worker processes; then the Poisson comparison (time per blend,
ratio pie-torch / ours measured in the same run, and the largest difference of the two results on identical inputs).
The pie-torch part is skipped with a message when ``pietorch`` is not installed (``pip install --no-deps pie-torch``).
Images are generated (brain-like ellipses), so no data is needed.
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from medanomaly.data import ArrayDataset
from medanomaly.synth import SynthDataset, get_task, list_tasks, poisson_blend

SOURCE_TASKS = ("inter-blend", "fpi")


def brain_like(n: int, shape: tuple[int, ...], seed: int) -> ArrayDataset:
    """``n`` ellipsoid 'brains' with smooth texture in [0, 1]."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij"))
    imgs = np.zeros((n, 1, *shape), np.float32)
    fgs = np.zeros((n, 1, *shape), bool)
    for i in range(n):
        r = rng.uniform(0.7, 0.9, len(shape)).astype(np.float32)
        r2 = sum((grid[d] / r[d]) ** 2 for d in range(len(shape)))
        fg = r2 <= 1
        tex = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3)
        imgs[i, 0] = np.clip((0.5 + 0.2 * np.cos(4 * np.sqrt(r2)) + tex) * fg, 0, 1)
        fgs[i, 0] = fg
    return ArrayDataset(imgs, fgs, name="bench")


def bench_single(task: str, ds: ArrayDataset, src: ArrayDataset, n: int) -> tuple[float, float]:
    """Samples per wall-clock second and per CPU second of this process (the latter is robust to a shared machine)."""
    fn = get_task(task)
    samples = [(ds[i % len(ds)]["image"].numpy(), ds[i % len(ds)]["foreground"].numpy()) for i in range(min(n, len(ds)))]
    extra = {"source_image": src[0]["image"].numpy()} if task in SOURCE_TASKS else {}
    if task == "intra-blend":
        extra = {"source_image": src[1 % len(src)]["image"].numpy()}
    fn(*samples[0], 0, channels=True, **extra)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        img, fg = samples[i % len(samples)]
        fn(img, fg, np.random.default_rng(i), channels=True, **extra)
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def bench_loader(task: str, ds: ArrayDataset, src: ArrayDataset, n: int, workers: int, batch: int) -> float:
    sd = SynthDataset(ds, [task], p_anomaly=1.0, seed=0, source=src if task == "inter-blend" else None)
    idx = [i % len(ds) for i in range(n)]
    loader = DataLoader(torch.utils.data.Subset(sd, idx), batch_size=batch, num_workers=workers,
                        persistent_workers=False)
    t0 = time.perf_counter()
    count = 0
    for b in loader:
        count += b["image"].shape[0]
    return count / (time.perf_counter() - t0)


def poisson_case(shape: tuple[int, ...], radius: tuple[float, ...], seed: int):
    """Target, source (differs from the target only inside the mask eroded by one voxel) and an ellipsoid mask."""
    rng = np.random.default_rng(seed)
    target = ndimage.gaussian_filter(rng.random(shape), 2).astype(np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    c = np.asarray(shape) / 2 + rng.uniform(-5, 5, len(shape))
    mask = sum(((grid[d] - c[d]) / radius[d]) ** 2 for d in range(len(shape))) <= 1
    core = ndimage.binary_erosion(mask)
    other = ndimage.gaussian_filter(rng.random(shape), 1) * 2.0
    source = np.where(core, other, target)
    return target, source, mask


def _pie(pietorch, target, patch, pmask, corner):  # noqa: ANN001, ANN202
    return pietorch.blend_dst_numpy(target, patch, pmask.copy(), corner, False)  # it zeroes the mask's edges in place


def bench_poisson(reps: int) -> None:
    try:
        import pietorch
    except ImportError:
        pietorch = None
        print("pie-torch not installed: skipping the comparison (pip install --no-deps pie-torch)")
    print("\nPoisson blend, best of --reps interleaved runs")
    print("| case | ours ms/blend | pie-torch ms/blend | ratio pie-torch/ours | max abs diff |")
    print("|---|---|---|---|---|")
    for name, shape, radius in [("2D 256x256, mask 60x45", (256, 256), (30.0, 22.5)),
                                ("3D 80x112x80, mask 30x36x24", (80, 112, 80), (15.0, 18.0, 12.0))]:
        t, s, m = poisson_case(shape, radius, 0)
        # pie-torch blends a patch placed at a corner: give it the mask's bounding box grown by one voxel
        nz = np.nonzero(m)
        lo = np.array([max(a.min() - 1, 0) for a in nz])
        hi = np.array([min(a.max() + 2, n) for a, n in zip(nz, shape, strict=True)])
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        patch, pmask = s[box], m[box].astype(np.float64)
        runners = {"tight": partial(poisson_blend, t, s, m, box="tight"), "fast": partial(poisson_blend, t, s, m, box="fast")}
        if pietorch is not None:
            runners["pie"] = partial(_pie, pietorch, t, patch, pmask, lo)
        results = {k: np.asarray(f()) for k, f in runners.items()}
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(reps):  # interleaved, best of ``reps`` (robust to other load on the machine)
            for k, f in runners.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in times.items()}
        for mode in ("tight", "fast"):
            if pietorch is None:
                print(f"| {name}, ours box={mode} | {best[mode] * 1e3:.2f} | - | - | - |")
                continue
            diff = float(np.abs(results["pie"] - results[mode]).max())
            print(f"| {name}, ours box={mode} | {best[mode] * 1e3:.2f} | {best['pie'] * 1e3:.2f} | "
                  f"{best['pie'] / best[mode]:.2f} | {diff:.2e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--n2d", type=int, default=200)
    ap.add_argument("--n3d", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--skip-tasks", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"cores visible: {os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    tasks = list_tasks() if args.tasks == "all" else args.tasks.split(",")
    if not args.skip_tasks:
        for label, shape, n, batch in [("2D 256x256", (256, 256), args.n2d, 16), ("3D 80x112x80", (80, 112, 80), args.n3d, 2)]:
            ds = brain_like(8 if len(shape) == 2 else 4, shape, 0)
            src = brain_like(2, shape, 1)
            print(f"\n{label}: samples/s\n| task | 1 process (wall) | 1 process (per CPU s) | DataLoader, {args.workers} "
                  "workers (wall) |\n|---|---|---|---|")
            for t in tasks:
                wall, cpu = bench_single(t, ds, src, n)
                loader = bench_loader(t, ds, src, n, args.workers, batch)
                print(f"| {t} | {wall:.1f} | {cpu:.1f} | {loader:.1f} |", flush=True)
    bench_poisson(args.reps)


if __name__ == "__main__":
    main()
