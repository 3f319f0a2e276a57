"""Restoration throughput of MIM-OOD against the AR baseline (and MVTM + Token Critic), measured in one run.

Random weights (speed does not depend on training): each detector is built from a shipped config set
(``paper``: 160x160 slices, K=256, D=256, f=8 -> 20x20 tokens, depth-12 width-512 transformers), then
``predict`` (encode, T detector+MVTM iterations or the AR position loop, decode, residual, smoothing) is timed on
a batch of slices. The AR loop over token positions is inherent to the method; MIM-OOD runs T iterations over the
whole (B*R, N) batch. Seconds per 32 slices are scaled linearly from the measured batch when ``--batch`` is
smaller than 32 (CPU runs). The thresholds are set so that both procedures run at full cost (all T iterations; the
AR loop over every position).

``--ar-estimate K`` (for CPU runs of the paper-size AR model, which would take hours): AR cost is measured in parts
and summed instead of run whole: ``predict`` with no flagged token (encode, scoring, decode, residual, smoothing)
plus one step of the AR loop (a forward pass of the (B*R)-row batch on the prefix, NLL test, sampling) at K prefix
lengths spread over 1..N, interpolated linearly and summed over all N positions. ``--check-estimate`` also runs the
real loop and prints both. The AR baseline is timed twice: ``ar-restoration-naive`` (a forward over the whole prefix
at every position, as in the paper's comparison) and ``ar-restoration`` (key/value cache: one token per position, the
fair comparison; same tokens). ``--threads 0``: torch's default (all cores). Example::

    OMP_NUM_THREADS=1 python benchmarks/mim_ood_speed.py --config cpu-small --size 64 --batch 32
    OMP_NUM_THREADS=1 python benchmarks/mim_ood_speed.py --config paper --size 160 --batch 1 --no-warmup --ar-estimate 12
    python benchmarks/mim_ood_speed.py --config paper --size 160 --batch 32 --device cuda   # bf16 autocast on CUDA
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from medanomaly.methods.base import RunContext


def build(method: str, config: str, size: int, device: str, r: int, t: int) -> object:
    from medanomaly.methods import get_method_class

    naive = method == "ar-restoration-naive"
    method = "ar-restoration" if naive else method
    cls = get_method_class(method)
    params = cls.config_set(config)
    params["device"] = device
    # full cost for every method: with random weights every ATD/critic score exceeds lambda=0.005 (all T iterations
    # run) and an AR threshold of 0 flags the first position, so the AR loop visits every position
    value = 0.0 if method == "ar-restoration" else 0.005
    params["restoration"] = {**params.get("restoration", {}), "R": r, "T": t, "batch_size": 32,
                             "threshold": {"mode": "fixed", "quantile": 0.98, "value": value}}
    det = cls(**params)
    det._build((1, size, size))
    det.threshold = float(params["restoration"]["threshold"]["value"])
    det.token_used = torch.ones(int(det.params["tokenizer"]["num_embeddings"]), dtype=torch.bool)
    det.is_fitted = True
    det.set_context(RunContext(quiet=True))
    if naive:
        det.kv_cache = False
    return det


def time_predict(det: object, x: torch.Tensor, repeats: int, warmup: bool = True) -> float:
    if warmup:
        det.predict(x[:2])  # warm-up (allocations, kernels)
    if x.device.type == "cuda" or str(det.device).startswith("cuda"):
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        det.predict(x)
        if str(det.device).startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def estimate_ar(det: object, x: torch.Tensor, positions: int) -> dict[str, float]:
    """AR ``predict`` time estimated from its parts (see module docstring)."""
    import numpy as np

    from medanomaly.nets.tokens import gumbel_sample

    if positions < 2:
        raise ValueError(f"--ar-estimate needs at least 2 prefix lengths, got {positions}")

    thr = det.threshold
    det.threshold = float("inf")  # nothing flagged: everything but the position loop
    base = time_predict(det, x, 1, warmup=False)
    det.threshold = thr
    ar, dev = det.nets["ar"], det.device
    n = int(np.prod(det.token_shape))
    rows = x.shape[0] * int(det.params["restoration"]["R"])
    lengths = np.unique(np.linspace(1, n, positions).round().astype(int))
    secs = []
    y = torch.randint(0, ar.special_id, (rows, n), device=dev)
    bos = torch.full_like(y[:, :1], ar.special_id)
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for length in lengths:  # the body of nets.tokens.ar_restore at position i = length - 1
            i = int(length) - 1
            t0 = time.perf_counter()
            logits = ar(torch.cat([bos, y[:, :i]], 1))[:, -1].float()
            nll = -logits.log_softmax(-1).gather(-1, y[:, i : i + 1]).squeeze(-1)
            y[:, i] = torch.where(nll > 0, gumbel_sample(logits, 1.0, gen), y[:, i])
            if str(dev).startswith("cuda"):
                torch.cuda.synchronize()
            secs.append(time.perf_counter() - t0)
    # sum over prefix lengths 1..n of the per-forward time, by linear interpolation between the timed lengths
    loop = float(np.interp(np.arange(1, n + 1), lengths, secs).sum())
    return {"seconds": base + loop, "base_seconds": base, "loop_seconds": loop, "timed_lengths": lengths.tolist(),
            "timed_seconds": [round(v, 4) for v in secs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="paper")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--batch", type=int, default=32, help="slices timed for MIM-OOD / Token Critic")
    p.add_argument("--ar-batch", type=int, default=0, help="slices timed for AR (default: --batch)")
    p.add_argument("--R", type=int, default=4)
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up predict (slow CPU runs of big models)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--skip-ar", action="store_true")
    p.add_argument("--ar-estimate", type=int, default=0, metavar="K",
                   help="estimate AR time from forward passes at K prefix lengths instead of running the loop")
    p.add_argument("--check-estimate", action="store_true", help="with --ar-estimate: also time the real AR loop")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = {}
    for method in ("mim-ood", "token-critic", "ar-restoration", "ar-restoration-naive"):
        is_ar = method.startswith("ar-")
        if is_ar and args.skip_ar:
            continue
        det = build(method, args.config, args.size, args.device, args.R, args.T)
        n = (args.ar_batch or args.batch) if is_ar else args.batch
        x = torch.rand(n, 1, args.size, args.size)
        extra: dict = {}
        if method == "ar-restoration-naive" and args.ar_estimate:
            extra = estimate_ar(det, x, args.ar_estimate)
            sec = extra.pop("seconds")
            extra["estimated"] = True
            if args.check_estimate:
                extra["measured_seconds"] = time_predict(det, x, args.repeats, warmup=not args.no_warmup)
        else:
            sec = time_predict(det, x, args.repeats, warmup=not args.no_warmup)
        rows[method] = {"slices": n, "seconds": sec, "seconds_per_32": sec / n * 32, "slices_per_s": n / sec,
                        "tokens": list(det.token_shape), "R": args.R, "T": None if is_ar else args.T, **extra}
        print(method, json.dumps(rows[method]), flush=True)
    if "ar-restoration" in rows:
        mim = rows["mim-ood"]["seconds_per_32"]
        rows["ratio_naive_ar_over_mim"] = rows["ar-restoration-naive"]["seconds_per_32"] / mim
        rows["ratio_cached_ar_over_mim"] = rows["ar-restoration"]["seconds_per_32"] / mim
        rows["ratio_naive_over_cached_ar"] = (rows["ar-restoration-naive"]["seconds_per_32"]
                                              / rows["ar-restoration"]["seconds_per_32"])
    cpu = f"cpu x{torch.get_num_threads()}"
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else cpu
    print(json.dumps({"config": args.config, "size": args.size, "device": dev, **rows}, indent=1))


if __name__ == "__main__":
    main()
