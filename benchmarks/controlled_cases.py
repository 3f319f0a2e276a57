"""Controlled cases for the MIM-OOD and MAE families on LGG FLAIR slices (issue 14): does each part behave as in
its paper on a case where the answer is known?

For already-trained runs (``medanomaly train`` / ``benchmark`` run folders), on HEALTHY validation slices of the
run's own data (``lgg-flair-2d``, split ``val``, ``normal_only``, at the run's recorded preset and size, loaded as
``medanomaly evaluate`` loads them) and on tumour slices of the ``test`` split:

1. ATD (mim-ood): healthy token grids corrupted by exactly the ATD's training corruption (the run's own brush-mask
   bank, ``MaskBank(..., "uniform", corrupt_low, corrupt_high)`` rebuilt from the run's seed as in ``_fit_latent``,
   tokens inside the mask replaced by random *different* used codebook entries,
   :func:`medanomaly.methods.mim_ood.common.random_token_corruption`); the corrupted positions are recorded and
   the ATD's token AP/AUROC (sklearn) for finding them is reported next to the same for random scores (floor),
   plus recall/FPR at the run's calibrated threshold and at the paper's lambda = 0.005, and the same AP after
   decoding the corrupted tokens to an image and re-encoding it (the path ``predict`` takes). Report only: the
   ATD's token AP on real tumour slices (tokens overlapping the tumour mask).
2. MVTM: accuracy of its in-painting of masked healthy tokens (argmax, top-5 and a temperature sample; floor:
   always the most frequent healthy token; NLL against the unigram NLL), what the restoration does to corrupted
   tokens (re-sampled? restored to the original?), and the method's anomaly map (``predict``'s pixel scores) on
   clean healthy slices, on their VQ-VAE reconstructions and on the decoded corrupted slices inside / outside the
   corrupted region. Report only, on tumour slices: the same map with the token selection replaced (the run's
   threshold = ``predict``; lower healthy quantiles of the ATD scores; the paper's lambda; no re-sampling, i.e. the
   smoothed VQ-VAE residual; an oracle re-sampling exactly the tokens that overlap the tumour).
3. MAE family (mae, mae-pseudo): reconstruction error per patch (mean over the patch's foreground pixels, patches
   at least half foreground) with the run's own reconstruction settings, on healthy validation slices, on
   non-tumour patches of test tumour slices and on tumour patches (> 50 % tumour pixels); ratios and the patch
   AUROC, with the patch's mean intensity as the competitor (plain intensity is what these methods lose to).
   Report only: pixel AP of the map and of intensity on the tumour slices, over the whole foreground and over its
   interior (eroded by 4 px), of the map after mim-ood's min/avg pooling, and where the highest errors lie.
4. The VQ-VAE tokenizer alone: |decode(encode(x)) - x| on healthy slices vs inside / outside the tumours, and
   how common the tokens at tumour positions are among healthy tokens.

Lesion labels (test masks) are used ONLY for the reported diagnostics; no setting, threshold or choice of slices
depends on them (tumour slices are picked at random among test slices whose mask is non-empty; every threshold
that is not the oracle is label-free: the run's own healthy-calibrated one, other quantiles of healthy scores, or
the paper's fixed lambda). Healthy = the validation slices the run's threshold was calibrated on: the run's
threshold flags 2 % of their foreground tokens by construction.

Commands (1 thread). The default ``--n 64`` takes under 2 minutes for the four runs; the numbers in
docs/results/controlled_cases.md use every healthy val slice (186) and every tumour test slice (281), about 6
minutes on a busy 2-core machine::

    cd /work/main && . .venv/bin/activate
    OMP_NUM_THREADS=1 MEDANOMALY_THREADS=1 python benchmarks/controlled_cases.py \\
        --mim out/lgg_to_brats_all/runs/seed-0/mim-ood out/scale/mim_steps4x \\
        --mae out/lgg_to_brats_all/runs/seed-0/mae out/lgg_to_brats_all/runs/seed-0/mae-pseudo \\
        --n 281 --seed 0 --out out/controlled_cases

Writes ``OUT/controlled_cases.json`` and prints the Markdown tables (also in ``OUT/controlled_cases.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

#: the paper's ATD threshold (MIM-OOD, table 1: lambda = 0.005)
PAPER_LAMBDA = 0.005


# -- pure helpers (unit-tested in tests/test_controlled_cases.py) ----------------------------------------------
def ap_auroc(scores: Any, labels: Any) -> dict[str, float]:
    """sklearn AP and AUROC of ``scores`` for binary ``labels`` (any shapes, flattened); NaN when a class is
    missing. Also ``n``, ``n_pos`` and ``prevalence`` (the expected AP of random scores)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.shape} vs {y.shape}")
    n, npos = int(y.size), int(y.sum())
    out: dict[str, float] = {"n": n, "n_pos": npos, "prevalence": npos / n if n else math.nan}
    if npos == 0 or npos == n:
        out.update(ap=math.nan, auroc=math.nan)
    else:
        out.update(ap=float(average_precision_score(y, s)), auroc=float(roc_auc_score(y, s)))
    return out


def random_floor(labels: Any, rng: np.random.Generator) -> dict[str, float]:
    """:func:`ap_auroc` of uniform random scores: the floor a detector must beat."""
    y = np.asarray(labels).astype(bool).ravel()
    return ap_auroc(rng.random(y.size), y)


def corrupt_healthy_tokens(tokens: torch.Tensor, corrupt: Callable[..., tuple[torch.Tensor, torch.Tensor]],
                           rng: np.random.Generator, draws: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row of ``tokens`` (N, L) corrupted ``draws`` times by ``corrupt(y, rng) -> (tokens, mask)`` (the ATD's
    training corruption). Returns (corrupted (N*draws, L), the corrupted positions (N*draws, L) bool, the source
    row of each output (N*draws,)). Row ``i*draws + k`` is draw k of row i."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    src = torch.arange(tokens.shape[0]).repeat_interleave(draws)
    y = tokens[src]
    out, mask = corrupt(y, rng)
    return out, mask.bool(), src


def tokens_to_pixels(mask: Any, factor: int) -> np.ndarray:
    """A token-grid mask (N, h, w) to pixels (N, h*factor, w*factor): every token covers a factor x factor block."""
    m = np.asarray(mask)
    for ax in range(1, m.ndim):
        m = np.repeat(m, factor, axis=ax)
    return m


def patch_fraction(mask: Any, patch: int) -> np.ndarray:
    """Fraction of True pixels of each non-overlapping patch x patch block: (N, H, W) -> (N, H/patch, W/patch)."""
    m = np.asarray(mask, dtype=np.float64)
    n, h, w = m.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {patch}")
    return m.reshape(n, h // patch, patch, w // patch, patch).mean(axis=(2, 4))


def patch_means(values: Any, weight: Any, patch: int) -> np.ndarray:
    """Mean of ``values`` (N, H, W) over the pixels of each patch where ``weight`` (bool, same shape) is True;
    NaN for a patch without such pixels."""
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weight, dtype=bool)
    if v.shape != w.shape:
        raise ValueError(f"values {v.shape} and weight {w.shape} differ in shape")
    n, h, wd = v.shape
    s = np.where(w, v, 0.0).reshape(n, h // patch, patch, wd // patch, patch).sum(axis=(2, 4))
    c = w.reshape(n, h // patch, patch, wd // patch, patch).sum(axis=(2, 4))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, s / np.maximum(c, 1), np.nan)


def erode(mask: Any, r: int) -> np.ndarray:
    """Binary erosion of (N, H, W) masks by a (2r+1) square (pixels within r of the border or the outside are
    dropped; the image border counts as outside)."""
    m = torch.as_tensor(np.asarray(mask, dtype=bool)).float().unsqueeze(1)
    e = -torch.nn.functional.max_pool2d(-torch.nn.functional.pad(m, (r, r, r, r)), 2 * r + 1, stride=1)
    return e[:, 0].numpy() > 0.5


def top_share(values: Any, fg: Any, mask: Any, band: Any) -> dict[str, float]:
    """Of the k highest ``values`` over the ``fg`` pixels, k = the number of ``mask`` pixels in ``fg``: the
    fraction inside ``mask`` (the precision at k) and inside ``band``."""
    fgb = np.asarray(fg, dtype=bool)
    v = np.asarray(values, dtype=np.float64)[fgb]
    m, b = np.asarray(mask, dtype=bool)[fgb], np.asarray(band, dtype=bool)[fgb]
    k = int(m.sum())
    if k == 0:
        return {"in_mask": math.nan, "in_band": math.nan}
    top = np.argsort(v, kind="stable")[-k:]
    return {"in_mask": float(m[top].mean()), "in_band": float(b[top].mean())}


def masked_mean(values: Any, where: Any) -> float:
    """Mean of ``values`` where ``where`` is True (NaN when nowhere)."""
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(where, dtype=bool)
    return float(v[w].mean()) if w.any() else math.nan


def patch_groups(healthy: dict[str, np.ndarray], tumour: dict[str, np.ndarray], patch: int,
                 min_fg: float = 0.5, tumour_min: float = 0.5) -> dict[str, Any]:
    """Per-patch comparison of one pixel quantity (e.g. a reconstruction error) between healthy slices and tumour
    slices. ``healthy``/``tumour``: ``value`` (N, H, W), ``fg`` (N, H, W) bool; ``tumour`` also ``mask``.

    A patch counts when at least ``min_fg`` of it is foreground; its value is the mean over its foreground pixels.
    Groups: ``healthy`` (all counted patches of healthy slices), ``non_tumour`` (patches of tumour slices without a
    tumour pixel), ``partial`` (tumour fraction in (0, tumour_min]) and ``tumour`` (tumour fraction > tumour_min).
    Returns each group's mean and count, the ratios tumour/healthy and tumour/non_tumour and the AUROCs of
    tumour patches against healthy and against non-tumour patches (tumour = positive)."""
    def per_patch(d: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        fg = np.asarray(d["fg"], dtype=bool)
        return patch_means(d["value"], fg, patch), patch_fraction(fg, patch) >= min_fg

    hv, hk = per_patch(healthy)
    tv, tk = per_patch(tumour)
    tf = patch_fraction(np.asarray(tumour["mask"], dtype=bool), patch)
    groups = {"healthy": hv[hk], "non_tumour": tv[tk & (tf == 0)], "partial": tv[tk & (tf > 0) & (tf <= tumour_min)],
              "tumour": tv[tk & (tf > tumour_min)]}
    out: dict[str, Any] = {f"{g}_mean": float(v.mean()) if v.size else math.nan for g, v in groups.items()}
    out.update({f"n_{g}": int(v.size) for g, v in groups.items()})
    out["ratio_tumour_healthy"] = out["tumour_mean"] / out["healthy_mean"] if out["healthy_mean"] else math.nan
    out["ratio_tumour_non_tumour"] = out["tumour_mean"] / out["non_tumour_mean"] if out["non_tumour_mean"] else math.nan
    for other in ("healthy", "non_tumour"):
        a, b = groups["tumour"], groups[other]
        out[f"auroc_tumour_vs_{other}"] = ap_auroc(np.concatenate([a, b]),
                                                   np.r_[np.ones(a.size, bool), np.zeros(b.size, bool)])["auroc"]
    return out


# -- data ------------------------------------------------------------------------------------------------------
_DATA_CACHE: dict[str, Any] = {}


def open_run_split(cfg: dict[str, Any], split: str, normal_only: bool, data: str | None = None) -> Any:
    """A split of the run's data (or of ``data``, another dataset spec), preprocessed as the run's training data
    were (as ``medanomaly evaluate`` opens it)."""
    from medanomaly.app.datasets import open_dataset

    rd = cfg.get("data") or {}
    name = data or rd["name"]
    key = json.dumps([name, split, normal_only, rd.get("preset"), rd.get("size"), rd.get("preset_config")],
                     sort_keys=True, default=str)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = open_dataset(name, split, normal_only=normal_only, preset=rd.get("preset"),
                                        size=rd.get("size"), preset_config=rd.get("preset_config"))
    return _DATA_CACHE[key]


def stack_slices(ds: Any, idx: list[int]) -> dict[str, torch.Tensor]:
    """``image`` (n, C, H, W) float, ``fg`` and ``mask`` (n, 1, H, W) bool of the samples ``idx``."""
    imgs, fgs, masks = [], [], []
    for i in idx:
        s = ds[i]
        imgs.append(torch.as_tensor(s["image"], dtype=torch.float32))
        fgs.append(torch.as_tensor(s["foreground"]).bool())
        m = s.get("mask")
        masks.append(torch.zeros_like(fgs[-1]) if m is None else torch.as_tensor(m).bool())
    return {"image": torch.stack(imgs), "fg": torch.stack(fgs), "mask": torch.stack(masks)}


Slices = dict[str, torch.Tensor]


def pick_slices(cfg: dict[str, Any], n: int, seed: int,
                test_data: str | None = None) -> tuple[Slices, Slices, dict[str, Any]]:
    """(healthy val slices, tumour test slices, record): ``n`` of each at random (seeded); a test slice is a tumour
    slice when its label is 1 and its mask has a foreground pixel (the label is used for this report only). The
    tumour slices come from the run's own data, or from ``test_data`` (a dataset spec: a domain-shift test)."""
    val = open_run_split(cfg, "val", True)
    test = open_run_split(cfg, "test", False, test_data)
    rng = np.random.default_rng([seed, 14])
    hv = sorted(rng.choice(len(val), size=min(n, len(val)), replace=False).tolist())
    tumour = [i for i in range(len(test))
              if int(test[i]["label"]) == 1 and bool((np.asarray(test[i]["mask"]).astype(bool)
                                                      & np.asarray(test[i]["foreground"]).astype(bool)).any())]
    tv = sorted(rng.choice(tumour, size=min(n, len(tumour)), replace=False).tolist())
    h, t = stack_slices(val, hv), stack_slices(test, tv)
    rec = {"test_data": test_data or (cfg.get("data") or {}).get("name"), "val_slices": len(val),
           "test_tumour_slices": len(tumour), "n_healthy": len(hv), "n_tumour": len(tv),
           "fg_fraction_healthy": float(h["fg"].float().mean()), "fg_fraction_tumour": float(t["fg"].float().mean()),
           "tumour_fraction_of_fg": float((t["mask"] & t["fg"]).sum() / t["fg"].sum())}
    return h, t, rec


# -- MIM-OOD ---------------------------------------------------------------------------------------------------
def _entropy(tokens: torch.Tensor) -> float:
    p = torch.bincount(tokens.flatten()).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def _at_threshold(scores: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, thr: float) -> dict[str, float]:
    hit = scores > thr
    return {"threshold": float(thr), "recall": masked_mean(hit.numpy(), pos.numpy()),
            "fpr": masked_mean(hit.numpy(), neg.numpy())}


@torch.no_grad()
def restoration_maps(det: Any, x: torch.Tensor, fg: torch.Tensor, threshold: float | None = None,
                     oracle: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The method's anomaly map, computed as ``_predict`` computes it (R restorations of T iterations, residual,
    min- then average-pooling, foreground), with the token selection replaced: ``threshold`` on the ATD
    probability (the run's own threshold gives ``predict``'s map; ``inf``: nothing re-sampled, i.e. the smoothed
    VQ-VAE residual), or ``oracle`` (n, L) bool: exactly these tokens re-sampled in every iteration (a diagnostic
    upper bound; with lesion masks, for the report only). Returns (maps (n, H, W), re-sampled positions (n, R, L))."""
    from medanomaly.evaluation.postprocess import smooth_min_avg
    from medanomaly.methods.mim_ood.common import decode_rows
    from medanomaly.nets.tokens import mim_restore

    tok, rp, dev = det.tokenizer, det.params["restoration"], det.device
    r, tshape = int(rp["R"]), det.token_shape
    bs = int(rp["batch_size"])
    maps, resampled = [], []
    for i in range(0, len(x), bs):
        xb = x[i:i + bs].to(dev).float()
        b = xb.shape[0]
        t = tok.encode(xb).view(b, -1)
        if oracle is not None:
            ob = oracle[i:i + bs].to(dev).bool()

            def score_fn(rows: torch.Tensor, ob: torch.Tensor = ob, b: int = b) -> torch.Tensor:
                return (ob if rows.shape[0] == b else ob.repeat_interleave(r, 0)).float()

            thr = 0.5
        else:
            score_fn, thr = det._token_scores, float(det.threshold if threshold is None else threshold)
        if math.isinf(thr):
            restored, changed = t.unsqueeze(1).expand(b, r, -1), torch.zeros(b, r, t.shape[1], dtype=torch.bool)
        else:
            restored, changed = mim_restore(t, score_fn, det.nets["mvtm"], thr, int(rp["T"]), r, float(rp["temperature"]),
                                            int(rp["seed"]), det.logit_bias(dev))
        dec = decode_rows(tok, restored.reshape(b * r, *tshape)).view(b, r, *xb.shape[1:])
        ref = xb if rp["residual_to"] == "input" else tok.decode(t.view(b, *tshape)).float()
        res = (dec - ref.unsqueeze(1)).abs().mean(dim=(1, 2))
        m = smooth_min_avg(res, int(rp["min_pool"]), int(rp["avg_pool"])) * fg[i:i + bs, 0].to(dev)
        maps.append(m.cpu())
        resampled.append(changed.cpu())
    return torch.cat(maps).numpy(), torch.cat(resampled).numpy()


@torch.no_grad()
def mim_checks(run: str, n: int, seed: int, draws: int, test_data: str | None = None) -> dict[str, Any]:
    """Checks 1, 2 and 4 for one mim-ood run (see the module docstring)."""
    from medanomaly.app.predict import load_run
    from medanomaly.methods.base import RunContext
    from medanomaly.methods.mim_ood.common import decode_rows, encode_images, random_token_corruption
    from medanomaly.nets.tokens import MaskBank, gumbel_sample

    t0 = time.perf_counter()
    det, cfg = load_run(run)
    if cfg["method"] != "mim-ood":
        raise SystemExit(f"{run}: --mim needs a mim-ood run, this is {cfg['method']}")
    det.set_context(RunContext(quiet=True))
    healthy, tumour, rec = pick_slices(cfg, n, seed, test_data)
    tok, p = det.tokenizer, det.params
    f, tshape = tok.factor, det.token_shape
    nt = int(np.prod(tshape))
    thr = float(det.threshold)
    out: dict[str, Any] = {"run": run, "method": cfg["method"], "data": rec, "threshold": thr,
                           "token_grid": list(tshape), "factor": f, "codebook_used": int(det.token_used.sum())}

    def score(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([det._score_batch(t[i:i + 256]) for i in range(0, len(t), 256)])

    x, fg = healthy["image"], healthy["fg"]
    y = encode_images(tok, x).view(-1, nt)
    tfg = det._token_fg(fg)

    # the ATD's and MVTM's training mask banks, rebuilt exactly as MIMOOD._fit_latent builds them
    mp = p["masks"]
    brng = np.random.default_rng([int(p["seed"]), 7])
    MaskBank(tshape, int(mp["bank_size"]), brng, "cosine")  # the MVTM's bank (drawn first, advances the rng)
    cbank = MaskBank(tshape, int(mp["bank_size"]), brng, "uniform", float(mp["corrupt_low"]), float(mp["corrupt_high"]))
    corrupt = random_token_corruption(cbank, det.used_ids)
    crng = np.random.default_rng([seed, 1401])
    yc, cm, src = corrupt_healthy_tokens(y, corrupt, crng, draws)
    y_rep, fg_rep = y[src], tfg[src]
    frng = np.random.default_rng([seed, 1402])

    # 1. ATD on its own training corruption
    sc, s_clean = score(yc), score(y)
    atd: dict[str, Any] = {
        "n_images": int(len(yc)), "corrupted_fraction": float(cm.float().mean()),
        "changed_equals_mask": bool(((yc != y_rep) == cm).all()),
        "all_tokens": ap_auroc(sc, cm), "all_tokens_random": random_floor(cm, frng),
        "fg_tokens": ap_auroc(sc[fg_rep], cm[fg_rep]), "fg_tokens_random": random_floor(cm[fg_rep], frng),
        "mean_prob_corrupted": masked_mean(sc.numpy(), cm.numpy()),
        "mean_prob_uncorrupted": masked_mean(sc.numpy(), (~cm).numpy()),
        "mean_prob_clean_fg": masked_mean(s_clean.numpy(), tfg.numpy()),
        "at_run_threshold": _at_threshold(sc, cm & fg_rep, ~cm & fg_rep, thr),
        "clean_fpr_at_run_threshold": masked_mean((s_clean > thr).numpy(), tfg.numpy()),
        "at_paper_lambda": _at_threshold(sc, cm & fg_rep, ~cm & fg_rep, PAPER_LAMBDA),
        "clean_fpr_at_paper_lambda": masked_mean((s_clean > PAPER_LAMBDA).numpy(), tfg.numpy()),
    }
    # through pixel space: decode the corrupted tokens and re-encode (what predict sees)
    dec_c = decode_rows(tok, yc.view(-1, *tshape)).cpu()
    yre = encode_images(tok, dec_c).view(-1, nt)
    dec_y = decode_rows(tok, y.view(-1, *tshape)).cpu()
    y_idem = encode_images(tok, dec_y).view(-1, nt)
    atd["reencode"] = {
        "clean_tokens_kept": float((y_idem == y)[tfg].float().mean()),
        "corrupted_tokens_kept": float((yre == yc)[cm & fg_rep].float().mean()),
        "corrupted_tokens_back_to_original": float((yre == y_rep)[cm & fg_rep].float().mean()),
        "fg_tokens": ap_auroc(score(yre)[fg_rep], cm[fg_rep]),
    }
    out["atd"] = atd

    # 2a. MVTM in-painting of the same brush-masked healthy tokens
    mvtm = det.nets["mvtm"]
    dev = det.device
    bias = det.logit_bias(dev)
    logits = torch.cat([mvtm(torch.where(cm[i:i + 256], torch.full_like(y_rep[i:i + 256], mvtm.special_id),
                                         y_rep[i:i + 256]).to(dev)).float().cpu() for i in range(0, len(y_rep), 256)])
    logits = logits + bias.cpu()
    pred = logits.argmax(-1)
    top5 = logits.topk(5, -1).indices
    g = torch.Generator().manual_seed(seed)
    samp = gumbel_sample(logits, float(p["restoration"]["temperature"]), g)
    nll = -logits.log_softmax(-1).gather(-1, y_rep.unsqueeze(-1)).squeeze(-1)
    mode_all = int(torch.bincount(y.flatten()).argmax())
    mode_fg = int(torch.bincount(y[tfg]).argmax())
    sel = cm & fg_rep
    inp = torch.where(cm, pred, y_rep)
    dec_inp = decode_rows(tok, inp.view(-1, *tshape)).cpu()
    pix_c = torch.from_numpy(tokens_to_pixels(cm.view(-1, *tshape).numpy(), f)).unsqueeze(1) & fg[src]
    mvtm_res: dict[str, Any] = {
        "masked_fraction": float(cm.float().mean()),
        "acc_argmax_fg": float((pred == y_rep)[sel].float().mean()),
        "acc_top5_fg": float((top5 == y_rep.unsqueeze(-1)).any(-1)[sel].float().mean()),
        "acc_sample_fg": float((samp == y_rep)[sel].float().mean()),
        "acc_floor_mode_fg": float((y_rep == mode_fg)[sel].float().mean()),
        "acc_argmax_all": float((pred == y_rep)[cm].float().mean()),
        "acc_floor_mode_all": float((y_rep == mode_all)[cm].float().mean()),
        "nll_fg": masked_mean(nll.numpy(), sel.numpy()),
        "uniform_nll": float(math.log(int(det.token_used.sum()))),
        # the NLL of always predicting the healthy foreground token frequencies (measured on these same tokens)
        "unigram_nll_fg": _entropy(y[tfg]),
        # pixel error of the argmax in-painting vs of the corruption, against decode(original tokens), inside the
        # corrupted foreground pixels
        "pixel_err_inpainted": masked_mean((dec_inp - dec_y[src]).abs().numpy(), pix_c.numpy()),
        "pixel_err_corrupted": masked_mean((dec_c - dec_y[src]).abs().numpy(), pix_c.numpy()),
    }

    # 2b. the restoration (ATD + MVTM, T x R) on the corrupted token grids, token level
    rp = p["restoration"]
    restored, changed = [], []
    for i in range(0, len(yc), 64):
        r_, c_ = det._restore(yc[i:i + 64].to(dev), int(rp["seed"]))
        restored.append(r_.cpu())
        changed.append(c_.cpu())
    rst, chg = torch.cat(restored), torch.cat(changed)  # (B, R, L)
    cm3, fg3 = cm.unsqueeze(1).expand_as(chg), fg_rep.unsqueeze(1).expand_as(chg)
    r_clean, c_clean = det._restore(y.to(dev), int(rp["seed"]))
    mvtm_res["restoration_tokens"] = {
        "corrupted_resampled": float(chg[cm3 & fg3].float().mean()),
        "corrupted_restored_to_original": float((rst == y_rep.unsqueeze(1))[cm3 & fg3].float().mean()),
        "corrupted_still_corrupted_value": float((rst == yc.unsqueeze(1))[cm3 & fg3].float().mean()),
        "uncorrupted_resampled": float(chg[~cm3 & fg3].float().mean()),
        "uncorrupted_changed": float((rst != y_rep.unsqueeze(1))[~cm3 & fg3].float().mean()),
        "clean_images_resampled": float(c_clean.cpu()[tfg.unsqueeze(1).expand_as(c_clean.cpu())].float().mean()),
    }

    # 2c. the method's anomaly map (predict) on clean, VQ-reconstructed and corrupted healthy slices
    def maps(images: torch.Tensor, fgs: torch.Tensor) -> np.ndarray:
        return torch.cat([det.predict(images[i:i + 64], fgs[i:i + 64]).pixel_scores.float()
                          for i in range(0, len(images), 64)]).numpy()

    fg_np = fg[:, 0].numpy()
    m_clean, m_dec = maps(x, fg), maps(dec_y, fg)
    m_cor = maps(dec_c, fg[src])
    pc = pix_c[:, 0].numpy()
    fgs = fg[src][:, 0].numpy()
    inside, outside = masked_mean(m_cor, pc), masked_mean(m_cor, fgs & ~pc)
    m_cor_oracle = restoration_maps(det, dec_c, fg[src], oracle=cm)[0]
    m_cor_check = restoration_maps(det, dec_c, fg[src])[0]
    mvtm_res["map"] = {
        "corrupted_inside_oracle": masked_mean(m_cor_oracle, pc),
        "corrupted_outside_oracle": masked_mean(m_cor_oracle, fgs & ~pc),
        "pixel_ap_corrupted_region_oracle": ap_auroc(m_cor_oracle[fgs], pc[fgs]),
        "replicated_map_max_abs_diff": float(np.abs(m_cor_check - m_cor).max()),
        "clean_fg": masked_mean(m_clean, fg_np), "clean_decoded_fg": masked_mean(m_dec, fg_np),
        "corrupted_inside": inside, "corrupted_outside": outside,
        "ratio_inside_clean": inside / masked_mean(m_clean, fg_np),
        "ratio_inside_outside": inside / outside,
        "pixel_ap_corrupted_region": ap_auroc(m_cor[fgs], pc[fgs]),
    }
    out["mvtm"] = mvtm_res

    # 1b (report only). ATD and map on real tumour slices; 4. the tokenizer alone
    from medanomaly.evaluation.tokens import token_labels

    xt, fgt, mt = tumour["image"], tumour["fg"], tumour["mask"] & tumour["fg"]
    yt = encode_images(tok, xt).view(-1, nt)
    st = score(yt)
    tfg_t = det._token_fg(fgt)
    lab_any = torch.from_numpy(token_labels(mt[:, 0].numpy(), f)).reshape(-1, nt)
    lab_half = torch.from_numpy(token_labels(mt[:, 0].numpy(), f, 0.5)).reshape(-1, nt)
    freq = torch.bincount(y[tfg], minlength=len(det.token_used)).double() / float(tfg.sum())
    ft = freq[yt]
    m_t = maps(xt, fgt)
    mt_np, fgt_np = mt[:, 0].numpy(), fgt[:, 0].numpy()
    # the map with the token selection replaced (diagnostic; the oracle uses the lesion masks)
    variants: dict[str, Any] = {}
    tum_tok = (lab_any & tfg_t).unsqueeze(1)
    # label-free alternatives: lower quantiles of the ATD scores of the healthy slices' foreground tokens (the
    # calibration rule of _calibrate with another quantile; q = 0.98 on all val slices is the run's threshold)
    qs = {q: float(torch.quantile(s_clean[tfg].double(), q)) for q in (0.98, 0.95, 0.9, 0.8, 0.5)}
    out["healthy_quantile_thresholds"] = {str(q): v for q, v in qs.items()}
    choices: list[tuple[str, dict[str, Any]]] = [("run_threshold", {})]
    choices += [(f"healthy_q{q}", {"threshold": v}) for q, v in qs.items() if q != 0.98]
    choices += [("paper_lambda", {"threshold": PAPER_LAMBDA}), ("no_resampling", {"threshold": math.inf}),
                ("oracle_tumour_tokens", {"oracle": lab_any & tfg_t})]
    for name, kw in choices:
        mv, rs = restoration_maps(det, xt, fgt, **kw)
        rs = torch.from_numpy(rs)
        variants[name] = {
            "pixel": ap_auroc(mv[fgt_np], mt_np[fgt_np]), "inside": masked_mean(mv, mt_np),
            "outside": masked_mean(mv, fgt_np & ~mt_np),
            "tumour_tokens_resampled": float(rs[tum_tok.expand_as(rs)].float().mean()),
            "other_fg_tokens_resampled": float(rs[((~lab_any) & tfg_t).unsqueeze(1).expand_as(rs)].float().mean()),
        }
        if name == "run_threshold":
            variants[name]["max_abs_diff_to_predict"] = float(np.abs(mv - m_t).max())
    out["tumour"] = {
        "atd_any_overlap": ap_auroc(st[tfg_t], lab_any[tfg_t]),
        "atd_any_overlap_random": random_floor(lab_any[tfg_t], frng),
        "atd_majority": ap_auroc(st[tfg_t], lab_half[tfg_t]),
        "at_run_threshold": _at_threshold(st, lab_any & tfg_t, ~lab_any & tfg_t, thr),
        "at_paper_lambda": _at_threshold(st, lab_any & tfg_t, ~lab_any & tfg_t, PAPER_LAMBDA),
        "mean_prob_tumour_tokens": masked_mean(st.numpy(), (lab_half & tfg_t).numpy()),
        # how common the tokens at tumour positions are among healthy foreground tokens
        "healthy_freq_median_tumour_tokens": float(ft[lab_half & tfg_t].median()) if (lab_half & tfg_t).any() else math.nan,
        "healthy_freq_median_other_tokens": float(ft[~lab_any & tfg_t].median()),
        "tumour_tokens_unseen_in_healthy": float((ft[lab_half & tfg_t] == 0).double().mean()),
        "map_inside_tumour": masked_mean(m_t, mt_np), "map_outside_tumour": masked_mean(m_t, fgt_np & ~mt_np),
        "map_pixel": ap_auroc(m_t[fgt_np], mt_np[fgt_np]),
        "intensity_pixel": ap_auroc(xt[:, 0].numpy()[fgt_np], mt_np[fgt_np]),
        "map_variants": variants,
    }
    rec_h = (decode_rows(tok, y.view(-1, *tshape)).cpu() - x).abs().mean(1).numpy()
    rec_t = (decode_rows(tok, yt.view(-1, *tshape)).cpu() - xt).abs().mean(1).numpy()
    tk: dict[str, Any] = {
        "healthy_fg": masked_mean(rec_h, fg_np), "tumour": masked_mean(rec_t, mt_np),
        "tumour_slices_non_tumour_fg": masked_mean(rec_t, fgt_np & ~mt_np),
        "intensity_healthy_fg": masked_mean(x[:, 0].numpy(), fg_np), "intensity_tumour": masked_mean(xt[:, 0].numpy(), mt_np),
    }
    tk["ratio_tumour_healthy"] = tk["tumour"] / tk["healthy_fg"]
    tk.update(codebook_redundancy(det))
    hd = {"fg": fg_np}
    td = {"fg": fgt_np, "mask": mt_np}
    tk["patches_error"] = patch_groups({**hd, "value": rec_h}, {**td, "value": rec_t}, f)
    tk["patches_intensity"] = patch_groups({**hd, "value": x[:, 0].numpy()}, {**td, "value": xt[:, 0].numpy()}, f)
    out["tokenizer"] = tk
    out["seconds"] = time.perf_counter() - t0
    return out


@torch.no_grad()
def codebook_redundancy(det: Any, tol: float = 0.01) -> dict[str, float]:
    """How alike the used codebook entries look: each entry decoded as a uniform token grid, compared (mean |diff|
    over the central half of the image, away from the zero-padded border) with the nearest other entry's. Returns
    the median nearest distance and the fraction of entries with a nearest other entry within ``tol``."""
    from medanomaly.methods.mim_ood.common import decode_rows

    ids = det.used_ids.cpu()
    grid = ids.view(-1, *([1] * len(det.token_shape))).expand(-1, *det.token_shape).contiguous()
    dec = decode_rows(det.tokenizer, grid.to(det.device)).cpu()[:, 0]
    h, w = dec.shape[-2:]
    d = dec[:, h // 4: 3 * h // 4, w // 4: 3 * w // 4].flatten(1)
    dist = torch.cdist(d.double(), d.double(), p=1) / d.shape[1]
    dist.fill_diagonal_(math.inf)
    near = dist.min(1).values
    return {"codes_nearest_decoded_l1_median": float(near.median()), f"codes_within_{tol}": float((near < tol).double().mean())}


# -- MAE family ------------------------------------------------------------------------------------------------
@torch.no_grad()
def mae_checks(run: str, n: int, seed: int, test_data: str | None = None) -> dict[str, Any]:
    """Check 3 for one mae / mae-pseudo run (see the module docstring)."""
    from medanomaly.app.predict import load_run
    from medanomaly.methods.base import RunContext

    t0 = time.perf_counter()
    det, cfg = load_run(run)
    if cfg["method"] not in ("mae", "mae-pseudo", "amae"):
        raise SystemExit(f"{run}: --mae needs an MAE-family run, this is {cfg['method']}")
    det.set_context(RunContext(quiet=True))
    healthy, tumour, rec = pick_slices(cfg, n, seed, test_data)
    key = "score" if "score" in det.params else "recon"
    rp = det.params.get(key) or det.params["score"]
    patch = det.mae.patch_size[0]

    def recon(d: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        x, fg = det._prepare(d["image"], d["fg"])
        g = torch.Generator().manual_seed(int(rp["seed"]))
        r = det.mae.reconstruct(x, float(rp["mask_ratio"]), int(rp["n_masks"]), g, int(det.params["batch_size"]))
        err = (x - r).abs().mean(1).cpu().numpy()
        res = det.predict(d["image"], d["fg"])
        return err, fg[:, 0].cpu().numpy(), res.pixel_scores.float().numpy(), res.image_scores.float().numpy()

    eh, fh, mh, ih = recon(healthy)
    et, ft, mtp, it = recon(tumour)
    mt = (tumour["mask"] & tumour["fg"])[:, 0].numpy()
    if mt.shape != et.shape:
        raise SystemExit(f"{run}: model size {et.shape[1:]} differs from the data size {mt.shape[1:]}; not supported")
    hd, td = {"fg": fh}, {"fg": ft, "mask": mt}
    xt_np = tumour["image"][:, 0].numpy()
    inner = erode(ft, 4)
    from medanomaly.evaluation.postprocess import smooth_min_avg

    smoothed = (smooth_min_avg(torch.from_numpy(mtp), 3, 5) * torch.from_numpy(ft)).numpy()
    out: dict[str, Any] = {
        "run": run, "method": cfg["method"], "data": rec, "patch_size": int(patch), "recon": dict(rp, source=key),
        "patches_error": patch_groups({**hd, "value": eh}, {**td, "value": et}, patch),
        "patches_map": patch_groups({**hd, "value": mh}, {**td, "value": mtp}, patch),
        "patches_intensity": patch_groups({**hd, "value": healthy["image"][:, 0].numpy()},
                                          {**td, "value": tumour["image"][:, 0].numpy()}, patch),
        "pixel_error": {"healthy_fg": masked_mean(eh, fh), "tumour": masked_mean(et, mt),
                        "tumour_slices_non_tumour_fg": masked_mean(et, ft & ~mt),
                        # the brain's border band (foreground within 4 px of its edge) vs its interior
                        "healthy_border_band": masked_mean(eh, fh & ~erode(fh, 4)),
                        "healthy_interior": masked_mean(eh, erode(fh, 4)),
                        "tumour_slices_border_band_non_tumour": masked_mean(et, ft & ~inner & ~mt),
                        "tumour_slices_interior_non_tumour": masked_mean(et, inner & ~mt)},
        # where the highest-scoring foreground pixels of the tumour slices lie (as many as there are tumour pixels)
        "top_pixels": {"border_band_share_of_fg": masked_mean(ft & ~inner, ft),
                       "map": top_share(mtp, ft, mt, ft & ~inner), "intensity": top_share(xt_np, ft, mt, ft & ~inner)},
        "pixel_map_tumour_slices": ap_auroc(mtp[ft], mt[ft]),
        "pixel_intensity_tumour_slices": ap_auroc(xt_np[ft], mt[ft]),
        # the same AP over the brain interior only (foreground eroded by 4 px): is the border what hurts?
        "pixel_map_interior": ap_auroc(mtp[inner], mt[inner]),
        "pixel_intensity_interior": ap_auroc(xt_np[inner], mt[inner]),
        # the map post-processed as mim-ood's (min-pooling 3 then average-pooling 5, foreground): thin edges removed
        "pixel_map_min_avg_pooled": ap_auroc(smoothed[ft], mt[ft]),
        # the map averaged over each MAE patch (patch-level localisation only)
        "pixel_patch_mean_map": ap_auroc(np.nan_to_num(tokens_to_pixels(patch_means(mtp, ft, patch), patch))[ft], mt[ft]),
        "image_score_healthy_val_vs_tumour_test": ap_auroc(np.r_[ih, it], np.r_[np.zeros(len(ih)), np.ones(len(it))]),
    }
    out["seconds"] = time.perf_counter() - t0
    return out


# -- report ----------------------------------------------------------------------------------------------------
def _f(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _name(run: str) -> str:
    parts = Path(run).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else run


def markdown(res: dict[str, Any]) -> str:
    """The Markdown tables of a result dict (as written to controlled_cases.json)."""
    lines: list[str] = []
    mims, maes = res.get("mim", []), res.get("mae", [])
    if mims:
        lines += ["### 1. ATD on its own training corruption (healthy val slices; foreground tokens)", "",
                  "| run | corrupted | AP | AUROC | random AP | random AUROC | recall@thr | FPR@thr | thr | "
                  "recall@0.005 | FPR@0.005 | AP after decode+re-encode | corrupted tokens kept by re-encode | "
                  "clean tokens kept |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mims:
            a = r["atd"]
            lines.append("| " + " | ".join([
                _name(r["run"]), _f(a["corrupted_fraction"]), _f(a["fg_tokens"]["ap"]), _f(a["fg_tokens"]["auroc"]),
                _f(a["fg_tokens_random"]["ap"]), _f(a["fg_tokens_random"]["auroc"]),
                _f(a["at_run_threshold"]["recall"]), _f(a["at_run_threshold"]["fpr"]), _f(r["threshold"]),
                _f(a["at_paper_lambda"]["recall"]), _f(a["at_paper_lambda"]["fpr"]), _f(a["reencode"]["fg_tokens"]["ap"]),
                _f(a["reencode"]["corrupted_tokens_kept"]), _f(a["reencode"]["clean_tokens_kept"])]) + " |")
        lines += ["", "### 1b. ATD on real tumour slices (test; foreground tokens; report only)", "",
                  "| run | AP (any overlap) | AUROC | random AP | AP (majority) | recall@thr | FPR@thr | recall@0.005 | "
                  "FPR@0.005 | mean ATD prob of tumour tokens | tumour tokens unseen in healthy | healthy freq. "
                  "tumour / other tokens (median) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mims:
            t = r["tumour"]
            lines.append("| " + " | ".join([
                _name(r["run"]), _f(t["atd_any_overlap"]["ap"]), _f(t["atd_any_overlap"]["auroc"]),
                _f(t["atd_any_overlap_random"]["ap"]), _f(t["atd_majority"]["ap"]), _f(t["at_run_threshold"]["recall"]),
                _f(t["at_run_threshold"]["fpr"]), _f(t["at_paper_lambda"]["recall"]), _f(t["at_paper_lambda"]["fpr"]),
                _f(t["mean_prob_tumour_tokens"]), _f(t["tumour_tokens_unseen_in_healthy"]),
                f"{_f(t['healthy_freq_median_tumour_tokens'], 4)} / {_f(t['healthy_freq_median_other_tokens'], 4)}"]) + " |")
        lines += ["", "### 2. MVTM in-painting and restoration (healthy val slices, same brush masks)", "",
                  "| run | token acc (argmax) | top-5 | sample | floor (mode) | NLL / unigram / uniform | pixel err in-painted / "
                  "corrupted | corrupted resampled | restored to original | uncorrupted changed | clean resampled |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mims:
            m = r["mvtm"]
            rt = m["restoration_tokens"]
            lines.append("| " + " | ".join([
                _name(r["run"]), _f(m["acc_argmax_fg"]), _f(m["acc_top5_fg"]), _f(m["acc_sample_fg"]),
                _f(m["acc_floor_mode_fg"]), f"{_f(m['nll_fg'], 2)} / {_f(m['unigram_nll_fg'], 2)} / {_f(m['uniform_nll'], 2)}",
                f"{_f(m['pixel_err_inpainted'])} / {_f(m['pixel_err_corrupted'])}", _f(rt["corrupted_resampled"]),
                _f(rt["corrupted_restored_to_original"]), _f(rt["uncorrupted_changed"]),
                _f(rt["clean_images_resampled"])]) + " |")
        lines += ["", "#### 2c. The method's anomaly map (mean over foreground pixels)", "",
                  "| run | clean slices | their VQ reconstructions | corrupted: inside | corrupted: outside | "
                  "inside / clean | inside / outside | pixel AP of corrupted region (prevalence) | same, oracle "
                  "selection | tumour slices: inside / outside tumour | tumour pixel AP (prevalence) | intensity pixel AP |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mims:
            mm, t = r["mvtm"]["map"], r["tumour"]
            lines.append("| " + " | ".join([
                _name(r["run"]), _f(mm["clean_fg"], 4), _f(mm["clean_decoded_fg"], 4), _f(mm["corrupted_inside"], 4),
                _f(mm["corrupted_outside"], 4), _f(mm["ratio_inside_clean"], 2), _f(mm["ratio_inside_outside"], 2),
                f"{_f(mm['pixel_ap_corrupted_region']['ap'])} ({_f(mm['pixel_ap_corrupted_region']['prevalence'])})",
                _f(mm["pixel_ap_corrupted_region_oracle"]["ap"]),
                f"{_f(t['map_inside_tumour'], 4)} / {_f(t['map_outside_tumour'], 4)}",
                f"{_f(t['map_pixel']['ap'])} ({_f(t['map_pixel']['prevalence'])})", _f(t["intensity_pixel"]["ap"])]) + " |")
        lines += ["", "#### 2d. Tumour slices (test): the map with the token selection replaced (diagnostic; the "
                  "oracle re-samples exactly the tokens overlapping the tumour)", "",
                  "| run | selection | tumour tokens re-sampled | other fg tokens re-sampled | map inside / outside tumour | "
                  "pixel AP | pixel AUROC |",
                  "|---|---|---|---|---|---|---|"]
        for r in mims:
            for name, v in r["tumour"]["map_variants"].items():
                lines.append("| " + " | ".join([
                    _name(r["run"]), name, _f(v["tumour_tokens_resampled"]), _f(v["other_fg_tokens_resampled"]),
                    f"{_f(v['inside'], 4)} / {_f(v['outside'], 4)}", _f(v["pixel"]["ap"]), _f(v["pixel"]["auroc"])]) + " |")
        lines += ["", "### 4. The VQ-VAE tokenizer alone: |decode(encode(x)) - x|", "",
                  "| run | healthy fg | tumour pixels | non-tumour fg (tumour slices) | ratio tumour / healthy | "
                  "patch AUROC tumour vs healthy: error | : intensity | intensity healthy / tumour | codes: nearest "
                  "decoded L1 (median) / share within 0.01 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in mims:
            k = r["tokenizer"]
            lines.append("| " + " | ".join([
                _name(r["run"]), _f(k["healthy_fg"], 4), _f(k["tumour"], 4), _f(k["tumour_slices_non_tumour_fg"], 4),
                _f(k["ratio_tumour_healthy"], 2), _f(k["patches_error"]["auroc_tumour_vs_healthy"]),
                _f(k["patches_intensity"]["auroc_tumour_vs_healthy"]),
                f"{_f(k['intensity_healthy_fg'])} / {_f(k['intensity_tumour'])}",
                f"{_f(k['codes_nearest_decoded_l1_median'], 4)} / {_f(k['codes_within_0.01'], 2)}"]) + " |")
    if maes:
        lines += ["", "### 3. MAE family: reconstruction error per patch (patches >= 50 % foreground)", "",
                  "| run | mask ratio x masks | healthy | non-tumour (tumour slices) | tumour (>50 %) | n tumour patches | "
                  "tumour / healthy | tumour / non-tumour | AUROC err vs healthy / vs non-tumour | AUROC intensity "
                  "vs healthy / vs non-tumour | AUROC map vs healthy / vs non-tumour | pixel AP map / intensity "
                  "(tumour slices) | same, brain interior | pixel AP of the map min/avg-pooled (3/5) | pixel AP of the "
                  "patch-mean map | image AUROC healthy val vs tumour test |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in maes:
            e = r["patches_error"]
            lines.append("| " + " | ".join([
                _name(r["run"]), f"{r['recon']['mask_ratio']} x {r['recon']['n_masks']}", _f(e["healthy_mean"], 4),
                _f(e["non_tumour_mean"], 4), _f(e["tumour_mean"], 4), str(e["n_tumour"]), _f(e["ratio_tumour_healthy"], 2),
                _f(e["ratio_tumour_non_tumour"], 2)] + [
                f"{_f(r[k]['auroc_tumour_vs_healthy'])} / {_f(r[k]['auroc_tumour_vs_non_tumour'])}"
                for k in ("patches_error", "patches_intensity", "patches_map")] + [
                f"{_f(r['pixel_map_tumour_slices']['ap'])} / {_f(r['pixel_intensity_tumour_slices']['ap'])}",
                f"{_f(r['pixel_map_interior']['ap'])} / {_f(r['pixel_intensity_interior']['ap'])}",
                _f(r["pixel_map_min_avg_pooled"]["ap"]),
                _f(r["pixel_patch_mean_map"]["ap"]),
                _f(r["image_score_healthy_val_vs_tumour_test"]["auroc"])]) + " |")
    if maes:
        lines += ["", "#### 3b. Where the MAE error lies (per pixel; border band = foreground within 4 px of its edge)", "",
                  "| run | healthy: band / interior | tumour slices, non-tumour: band / interior | tumour pixels | band "
                  "share of fg | top-k pixels (k = tumour pixels) in tumour / in band: map | : intensity |",
                  "|---|---|---|---|---|---|---|"]
        for r in maes:
            e, t = r["pixel_error"], r["top_pixels"]
            lines.append("| " + " | ".join([
                _name(r["run"]), f"{_f(e['healthy_border_band'], 4)} / {_f(e['healthy_interior'], 4)}",
                f"{_f(e['tumour_slices_border_band_non_tumour'], 4)} / {_f(e['tumour_slices_interior_non_tumour'], 4)}",
                _f(e["tumour"], 4), _f(t["border_band_share_of_fg"]),
                f"{_f(t['map']['in_mask'])} / {_f(t['map']['in_band'])}",
                f"{_f(t['intensity']['in_mask'])} / {_f(t['intensity']['in_band'])}"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mim", nargs="*", default=[], metavar="RUN", help="mim-ood run folders")
    ap.add_argument("--mae", nargs="*", default=[], metavar="RUN", help="mae / mae-pseudo run folders")
    ap.add_argument("--n", type=int, default=64, help="healthy val slices and tumour test slices, at most (default 64)")
    ap.add_argument("--draws", type=int, default=4, help="corruptions per healthy slice (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="slice choice, corruptions, random floors (default 0)")
    ap.add_argument("--out", default="out/controlled_cases", help="output folder (default out/controlled_cases)")
    ap.add_argument("--test-data", default=None, metavar="SPEC",
                    help="take the tumour slices from this dataset spec (e.g. brats2018-3d:modality=t1,view=slices,"
                         "foreground=brain for runs trained on IXI T1); default: the run's own data")
    args = ap.parse_args(argv)
    if not args.mim and not args.mae:
        ap.error("give --mim and/or --mae run folders")
    if args.n < 2:
        ap.error("--n must be >= 2")
    from medanomaly.training.loop import resolve_threads

    torch.set_num_threads(resolve_threads("auto"))
    t0 = time.perf_counter()
    res: dict[str, Any] = {"command": {"mim": args.mim, "mae": args.mae, "n": args.n, "draws": args.draws,
                                       "seed": args.seed, "test_data": args.test_data},
                           "threads": torch.get_num_threads(), "mim": [], "mae": []}
    jobs = [("mim", run, lambda r: mim_checks(r, args.n, args.seed, args.draws, args.test_data)) for run in args.mim]
    jobs += [("mae", run, lambda r: mae_checks(r, args.n, args.seed, args.test_data)) for run in args.mae]
    for kind, run, check in jobs:
        try:
            res[kind].append(check(run))
        except (OSError, ValueError, KeyError) as e:  # unreadable run, unknown --test-data spec, ...
            ap.error(f"{run}: {e}")
        print(f"{run}: {res[kind][-1]['seconds']:.0f} s", flush=True)
    res["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "controlled_cases.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / "controlled_cases.md").write_text(md)
    print(md)
    print(f"total {res['seconds']:.0f} s; wrote {out / 'controlled_cases.json'}")
    return res


if __name__ == "__main__":
    main()
