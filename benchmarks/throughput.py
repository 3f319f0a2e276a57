"""Throughput of every registered method's real training step and predict step, against this machine's matmul peak.

Each case (method, config set, 2D/3D, image side) runs in a subprocess of its own (so that its peak RSS is its own):

- the detector is built from a shipped config set (``cpu-small``, ``paper``) and ``fit`` on generated brain-like
  images (:func:`medanomaly.data.toy.make_toy_dataset`, 16 images in 2D, 6 volumes in 3D). ``train_model`` is
  intercepted (every module that bound it) so that each training stage of the method runs its **real** step
  (the method's own ``loss_fn``, ``batch_fn``, model and optimiser through the training loop) for
  ``warm + steps`` steps instead of the configured count, without validation or checkpoints. Step times come from
  the loop's own history, the time inside ``batch_fn`` is the data wait, the FLOPs of one forward + backward
  are counted with ``torch.utils.flop_counter.FlopCounterMode``; a method without a gradient-trained stage reports
  its whole ``fit`` (samples per second of fit);
- ``predict`` is timed on a batch of images (one warm-up unless ``--no-warmup``; FLOPs counted on a separate call);
- the reference is a float32 matmul (``--matmul`` side, best of 3) measured in the same subprocess right before the
  case, with the same thread count: ``ratio`` = achieved GFLOP/s / matmul GFLOP/s. The machine is shared, so the
  load average (``/proc/loadavg``, as ``uptime`` prints it) is recorded beside every case and ratios are the
  comparable numbers, not absolute rates.

Variants for the optimisation study (applied inside the intercepted loop; none changes what a method computes):
``--threads N``, ``--workers N`` (multitask synthesis DataLoader workers), ``--channels-last``, ``--compile``,
``--bf16`` (CPU bf16 autocast), ``--adamw foreach|fused|single``. ``--tag`` names the run.

    python benchmarks/throughput.py --quick                       # the table in docs/results/throughput.md (~10 min)
    python benchmarks/throughput.py --cases multitask:cpu-small:2:64 --threads 1 --tag t1 --no-write
    python benchmarks/throughput.py --quick --before docs/results/throughput_before.json   # adds the before column

The Markdown table is written between ``<!-- throughput:table -->`` markers of docs/results/throughput.md (the rest
of the file, the optimisation notes, is kept) and the JSON beside it (``throughput.json``, or ``throughput_<tag>.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
MARK_START, MARK_END = "<!-- throughput:table -->", "<!-- /throughput:table -->"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def matmul_gflops(n: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


class TimedBatches:
    """``batch_fn`` wrapper that times each call (the data wait of the step); other attributes pass through."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.times, self.cpu_marks = inner, [], []

    def __call__(self, step: int) -> Any:
        self.cpu_marks.append(time.process_time())  # CPU seconds of this process (all its threads) at each step start
        t0 = time.perf_counter()
        out = self.inner(step)
        self.times.append(time.perf_counter() - t0)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def count_flops(fn: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def install_capture(args: argparse.Namespace, stages: list[dict[str, Any]]) -> None:
    """Replace ``train_model`` everywhere it is bound by a wrapper that runs the real loop for a few timed steps."""
    from medanomaly.training import loop

    real = loop.train_model

    def capture(model: Any, loss_fn: Any, batch_fn: Any, cfg: Any, run_dir: Any = None, val_fn: Any = None,
                name: str = "model", resume: bool = True, params: Any = None) -> Any:
        n_steps = args.warm + args.steps
        timed = TimedBatches(batch_fn)
        cfg2 = dataclasses.replace(cfg, steps=n_steps, val_every=0, checkpoint_every=0, early_stopping_patience=0,
                                   quiet=True, threads=args.threads if args.threads else cfg.threads,
                                   warmup_steps=min(cfg.warmup_steps, n_steps))
        net, lf = model, loss_fn
        fmt = None
        if args.channels_last:
            dims = _spatial_dims_of(model)
            fmt = torch.channels_last if dims == 2 else torch.channels_last_3d if dims == 3 else None
            if fmt is not None:
                model.to(memory_format=fmt)
        if args.bf16:
            def lf(m: Any, b: Any, _f: Any = loss_fn) -> Any:  # noqa: E306
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = _f(m, b)
                return (out[0].float(), out[1]) if isinstance(out, tuple) else out.float()
        t_compile = None
        if args.compile:
            net = torch.compile(model)
        t0 = time.perf_counter()
        res = real(net, lf, timed, cfg2, run_dir=None, val_fn=None, name=name, resume=False, params=params)
        wall = time.perf_counter() - t0
        secs = [r["seconds"] for r in res.history]
        per_step = [b - a for a, b in zip([0.0, *secs[:-1]], secs, strict=True)]
        if args.compile:
            t_compile = per_step[0]
        timed_steps = per_step[args.warm:] or per_step
        data = timed.times[args.warm:] or timed.times
        batch = batch_fn(0)
        t = _first_tensor(batch)
        bs = int(t.shape[0]) if t is not None else 0
        model.train()
        torch.set_num_threads(res.threads)

        def fwd_bwd() -> None:
            out = loss_fn(model, batch)
            (out[0] if isinstance(out, tuple) else out).backward()

        flops = count_flops(fwd_bwd)
        model.zero_grad(set_to_none=True)
        model.eval()
        step_s = sum(timed_steps) / len(timed_steps)
        marks = timed.cpu_marks[args.warm:]
        cpu_step_s = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else None
        stages.append({"stage": cfg.desc, "batch": bs, "steps_timed": len(timed_steps), "step_s": step_s,
                       "samples_per_s": bs / step_s if step_s > 0 else None, "gflop_per_step": flops / 1e9,
                       "gflops": flops / 1e9 / step_s if step_s > 0 else None,
                       "data_wait_fraction": sum(data) / max(sum(timed_steps), 1e-12),
                       "threads": res.threads, "wall_s": wall, "compile_s": t_compile, "cpu_step_s": cpu_step_s,
                       "last_loss": res.history[-1]["loss"] if res.history else None, "load": loadavg()})
        return res

    for mod in list(sys.modules.values()):
        if mod is not None and getattr(mod, "train_model", None) is real:
            mod.train_model = capture


def _spatial_dims_of(model: Any) -> int | None:
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            return 2
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            return 3
    return None


def patch_adamw(kind: str) -> None:
    orig = torch.optim.AdamW
    kw = {"foreach": {"foreach": True, "fused": False}, "fused": {"fused": True, "foreach": False},
          "single": {"foreach": False, "fused": False}}[kind]

    class AdamW(orig):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **{**k, **kw})

    torch.optim.AdamW = AdamW  # type: ignore[misc]


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process; returns its record."""
    from medanomaly.data.toy import make_toy_dataset
    from medanomaly.methods import get_method_class
    from medanomaly.methods.base import RunContext

    method, config, dims, size = args.case.split(":")
    dims, size = int(dims), int(size)
    if args.adamw:
        patch_adamw(args.adamw)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    rec: dict[str, Any] = {"case": args.case, "method": method, "config": config, "dims": dims, "size": size,
                           "threads": threads, "variant": args.tag, "load_before": loadavg()}
    rec["matmul_gflops"] = matmul_gflops(args.matmul)
    cls = get_method_class(method)
    params = cls.config_set(config)
    if args.workers is not None and "num_workers" in params:
        params["num_workers"] = args.workers
    for kv in args.set or []:  # dotted parameter overrides, values in YAML
        import yaml

        key, val = kv.split("=", 1)
        *path, last = key.split(".")
        if key.split(".")[0] not in params:  # a parameter of another method of the run
            continue
        d = params
        for k in path:
            d = d.setdefault(k, {})
        d[last] = yaml.safe_load(val)
    if "device" in params:
        params["device"] = "cpu"
    n_train = 16 if dims == 2 else 6  # 3D: at least 5 for multitask's 5 task folds
    train = make_toy_dataset(n=n_train, size=size, spatial_dims=dims, seed=0)
    val = make_toy_dataset(n=4, size=size, spatial_dims=dims, seed=1)
    stages: list[dict[str, Any]] = []
    install_capture(args, stages)
    det = cls(**params)
    t0 = time.perf_counter()
    det.fit(train, val, context=RunContext(quiet=True))
    rec["fit_s"] = time.perf_counter() - t0
    rec["stages"] = stages
    if not stages:  # no gradient-trained stage: the whole fit is the training step
        rec["fit_samples_per_s"] = n_train / rec["fit_s"]
    rec["load_train"] = loadavg()
    if not args.no_predict:
        b = args.predict_batch or (8 if dims == 2 else 1)
        test = make_toy_dataset(n=b, size=size, spatial_dims=dims, seed=2, abnormal_fraction=0.5)
        x = torch.stack([test[i]["image"] for i in range(b)])
        fg = torch.stack([test[i]["foreground"] for i in range(b)])
        torch.set_num_threads(threads)
        det.set_context(RunContext(quiet=True))
        with torch.no_grad():
            if not args.no_warmup:
                det.predict(x[:1], fg[:1])
            t0 = time.perf_counter()
            det.predict(x, fg)
            pt = time.perf_counter() - t0
            flops = count_flops(lambda: det.predict(x[:1], fg[:1])) * b if args.predict_flops else None
        rec["predict"] = {"batch": b, "seconds": pt, "samples_per_s": b / pt,
                          "gflops": flops / 1e9 / pt if flops else None, "load": loadavg()}
        rec["matmul_gflops_after"] = matmul_gflops(args.matmul)
    rec["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rec


# ------------------------------------------------------------------------------------------------ driver
#: paper-size cases of --quick (the others did not finish one step within the time limit on the shared 2 cores)
QUICK_PAPER = ("autoencoder", "multitask", "intensity")


def quick_cases(all_paper: bool = False) -> list[str]:
    from medanomaly.methods import get_method_class, list_methods

    cases = []
    for m in list_methods():
        cls = get_method_class(m)
        sets = cls.config_sets()
        cases += [f"{m}:cpu-small:2:64", f"{m}:cpu-small:2:128"]
        if "paper" in sets and (all_paper or m in QUICK_PAPER):
            cases.append(f"{m}:paper:2:128")
        if 3 in cls.spatial_dims_supported:
            cases.append(f"{m}:cpu-small:3:48")
    return cases


def child_cmd(args: argparse.Namespace, case: str) -> list[str]:
    paper = ":paper:" in case
    # paper sizes: one timed step after one warm-up step, predict on one image without warm-up
    steps, warm = (1, 1) if paper else (args.steps, args.warm)
    cmd = [sys.executable, __file__, "--case", case, "--steps", str(steps), "--warm", str(warm),
           "--matmul", str(args.matmul), "--tag", args.tag]
    if paper:
        cmd += ["--no-warmup", "--predict-batch", "1"]
    for flag in ("channels_last", "compile", "bf16", "no_predict", "predict_flops"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    if args.adamw:
        cmd += ["--adamw", args.adamw]
    for kv in args.set or []:
        cmd += ["--set", kv]
    if args.predict_batch and not paper:
        cmd += ["--predict-batch", str(args.predict_batch)]
    return cmd


def fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) >= 0.1 or v == 0 else f"{v:.2g}"
    return str(v)


def table(records: list[dict[str, Any]], before: dict[str, dict[str, Any]] | None) -> str:
    lines = ["| case | stage | batch | train samples/s | GFLOP/step | GFLOP/s | × matmul peak | data wait | predict samples/s "
             "| peak RSS MB | matmul GFLOP/s | load (1/5/15 min) |" + (" train before → after |" if before else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if before else "")]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['error']} |" + " |" * (11 if not before else 12))
            continue
        stages = r.get("stages") or [None]
        pred = r.get("predict") or {}
        for i, s in enumerate(stages):
            first = i == 0
            if s is None:
                train = f"{fmt(r.get('fit_samples_per_s'))} (whole fit)"
                cells = ["fit", "–", train, "–", "–", "–", "–"]
            else:
                ratio = s["gflops"] / r["matmul_gflops"] if s.get("gflops") else None
                cells = [s["stage"], str(s["batch"]), fmt(s["samples_per_s"]), fmt(s["gflop_per_step"], 2),
                         fmt(s["gflops"]), fmt(ratio, 3), f"{100 * s['data_wait_fraction']:.0f}%"]
            row = [r["case"] if first else "", *cells,
                   fmt(pred.get("samples_per_s"), 2) if first else "",
                   fmt(r["peak_rss_mb"], 0) if first else "", fmt(r["matmul_gflops"], 0) if first else "",
                   (s or {}).get("load", r.get("load_train", "")) if s else r.get("load_train", "")]
            if before is not None:
                b = before.get(r["case"])
                bs = None
                if b and "stages" in b:
                    for bst in b["stages"] or []:
                        if s is not None and bst["stage"] == s["stage"]:
                            bs = bst
                if s is not None and bs is not None:
                    rb = bs["gflops"] / b["matmul_gflops"] if bs.get("gflops") else None
                    ra = s["gflops"] / r["matmul_gflops"] if s.get("gflops") else None
                    row.append(f"{fmt(bs['samples_per_s'])} → {fmt(s['samples_per_s'])} (× peak {fmt(rb, 3)} → "
                               f"{fmt(ra, 3)})")
                else:
                    row.append("")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(records: list[dict[str, Any]], args: argparse.Namespace, meta: dict[str, Any]) -> None:
    name = "throughput" if args.tag == "default" else f"throughput_{args.tag}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    before = None
    if args.before:
        before = {r["case"]: r for r in json.loads(Path(args.before).read_text())["records"]}
    body = (f"{MARK_START}\n_Run `{meta['command']}` on {meta['date']} ({meta['cpu']}, {meta['threads']} thread(s)); "
            "the 2 cores were shared with other jobs (load average beside every row, as `uptime` prints it), so "
            "absolute rates are noisy: compare the **× matmul peak** column, the step's achieved GFLOP/s divided by a "
            f"{args.matmul}² float32 matmul measured in the same process just before the case. FLOPs: "
            "`torch.utils.flop_counter.FlopCounterMode` on one forward + backward of the method's real training step "
            "(optimiser excluded). Paper sizes: 1 timed step after 1 warm-up, predict on 1 image without warm-up._\n\n"
            f"{table(records, before)}\n{MARK_END}")
    md = RESULTS / f"{name}.md"
    text = md.read_text() if md.exists() else f"# Throughput ({args.tag})\n\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + body + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    md.write_text(text)
    print(f"wrote {md} and {md.with_suffix('.json')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help="method:config:dims:size (run one case in this process, print JSON)")
    ap.add_argument("--cases", help="comma-separated cases for the driver (default with --quick: every method)")
    ap.add_argument("--quick", action="store_true", help="every method at cpu-small 64/128 px, paper 128 px, 3D 48^3")
    ap.add_argument("--all-paper", action="store_true", help="with --quick: every method's paper config")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per stage")
    ap.add_argument("--warm", type=int, default=1, help="untimed warm-up steps per stage")
    ap.add_argument("--matmul", type=int, default=2048, help="side of the reference float32 matmul")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: every usable core, the loop's auto)")
    ap.add_argument("--workers", type=int, default=None, help="multitask synthesis DataLoader workers")
    ap.add_argument("--set", action="append", help="parameter override key=value (dotted keys), e.g. max_models=1; "
                    "ignored by methods without that parameter")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU around the loss")
    ap.add_argument("--adamw", choices=["foreach", "fused", "single"], default=None)
    ap.add_argument("--no-predict", action="store_true")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--predict-batch", type=int, default=0)
    ap.add_argument("--predict-flops", action="store_true", help="also count predict FLOPs (runs predict once more)")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per case")
    ap.add_argument("--tag", default="default")
    ap.add_argument("--before", help="JSON of an earlier run: adds a before -> after column")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--json-out", help="also write the records here (e.g. with --no-write for an experiment)")
    args = ap.parse_args()
    if args.case:
        try:
            rec = run_case(args)
        except Exception as e:  # noqa: BLE001 - reported in the table
            rec = {"case": args.case, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        print("RESULT " + json.dumps(rec), flush=True)
        return
    cases = args.cases.split(",") if args.cases else quick_cases(args.all_paper) if args.quick else []
    if not cases:
        ap.error("give --quick, --cases or --case")
    import platform

    meta = {"command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": platform.processor() or platform.machine(), "threads": args.threads or len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "load_start": loadavg()}
    try:
        meta["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    records = []
    for case in cases:
        t0 = time.perf_counter()
        try:
            p = subprocess.run(child_cmd(args, case), capture_output=True, text=True, timeout=args.timeout,
                               env={**os.environ, "MEDANOMALY_QUIET": "1"})
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            rec = json.loads(line[7:]) if line else {"case": case, "error": f"no result (rc {p.returncode}): "
                                                                              f"{p.stderr.strip()[-200:]}"}
        except subprocess.TimeoutExpired:
            rec = {"case": case, "error": f"over {args.timeout} s (skipped)"}
        rec["case_wall_s"] = time.perf_counter() - t0
        records.append(rec)
        short = {k: rec.get(k) for k in ("case", "error", "fit_s", "peak_rss_mb", "matmul_gflops", "load_train")}
        st = [(s["stage"], round(s["samples_per_s"] or 0, 2), round((s["gflops"] or 0) / rec["matmul_gflops"], 3),
               round(s["data_wait_fraction"], 2), round(s.get("cpu_step_s") or 0, 4)) for s in rec.get("stages", [])]
        print(json.dumps(short), st, (rec.get("predict") or {}).get("samples_per_s"), flush=True)
    meta["load_end"] = loadavg()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    if not args.no_write:
        write_report(records, args, meta)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
