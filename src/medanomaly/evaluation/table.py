"""Benchmark comparison tables: one row per method, written as Markdown, CSV and HTML with the best value of each
metric column in bold; :func:`aggregate_seeds` turns per-seed rows into mean / std rows."""

from __future__ import annotations

import csv
import html
import io
import math
import statistics
from pathlib import Path
from typing import Any

from medanomaly.evaluation._output import REPORT_CSS, atomic_write, format_value, is_number, json_safe

__all__ = ["STD_SUFFIX", "aggregate_seeds", "write_comparison_table"]

_HIGHER = {"ap", "auroc", "dice", "f1", "auprc", "accuracy", "precision", "recall", "sensitivity", "specificity"}
_LOWER = {"seconds", "second", "time", "s", "sec", "loss", "fpr"}
#: a column ``X`` with a companion ``X + STD_SUFFIX`` is shown as ``X ± std`` in Markdown and HTML
STD_SUFFIX = "_std"
#: numeric columns not averaged over seeds (they describe the run, not a measurement; kept when equal)
_NOT_AVERAGED = {"seed", "n_test"}


def aggregate_seeds(rows: list[dict[str, Any]], by: str = "method") -> list[dict[str, Any]]:
    """One row per value of ``by`` (order of first appearance) from rows of several seeds.

    A numeric column (bools are not numbers) becomes its mean over the rows' finite values and ``<col>_std`` their
    sample standard deviation (ddof=1; 0 for one value; None when no value is finite). Other columns are kept when
    equal in every row of the group, else left out. Adds ``n_seeds`` and ``seeds`` (the rows' ``seed`` values).
    """
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        if by not in r:
            raise ValueError(f"aggregate_seeds: a row has no '{by}' column")
        groups.setdefault(r[by], []).append(r)
    out: list[dict[str, Any]] = []
    for key, grp in groups.items():
        cols: list[str] = []
        for r in grp:
            cols += [c for c in r if c not in cols]
        agg: dict[str, Any] = {by: key, "n_seeds": len(grp),
                               "seeds": ",".join(str(r["seed"]) for r in grp if r.get("seed") is not None)}
        for c in cols:
            if c in (by, "seed"):
                continue
            vals = [r.get(c) for r in grp]
            present = [v for v in vals if v is not None]
            if present and all(is_number(v) for v in present) and c not in _NOT_AVERAGED:
                fin = [float(v) for v in present if math.isfinite(float(v))]
                agg[c] = statistics.fmean(fin) if fin else None
                agg[c + STD_SUFFIX] = (statistics.stdev(fin) if len(fin) > 1 else 0.0) if fin else None
            elif all(v == vals[0] for v in vals):
                agg[c] = vals[0]
        out.append(agg)
    return out


def _direction(col: str) -> int:
    tokens = set(col.lower().replace("-", "_").split("_"))
    if tokens & _LOWER:
        return -1
    if tokens & _HIGHER and not tokens & {"std", "threshold"}:
        return 1
    return 0


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _best_rows(rows: list[dict[str, Any]], cols: list[str]) -> dict[str, set[int]]:
    best: dict[str, set[int]] = {}
    for c in cols:
        d = _direction(c)
        vals = [(i, float(r[c])) for i, r in enumerate(rows) if is_number(r.get(c)) and math.isfinite(float(r[c]))]
        if d and len(vals) > 1:
            target = max(v for _, v in vals) if d > 0 else min(v for _, v in vals)
            best[c] = {i for i, v in vals if v == target}
    return best


def write_comparison_table(
    rows: list[dict[str, Any]], out_dir: str | Path, name: str = "comparison", title: str = "medanomaly benchmark",
    csv_rows: list[dict[str, Any]] | None = None,
) -> tuple[Path, Path, Path]:
    """Write ``rows`` (one dict per method) as ``<name>.md``, ``<name>.csv`` and ``<name>.html``.

    Columns are the union of the rows' keys in order of first appearance; missing cells are empty. In Markdown and
    HTML the best value of each metric column is bold (higher is better for AP/AUROC/DICE columns, lower for
    time/seconds columns) and a column ``X`` with a companion ``X_std`` (see :func:`aggregate_seeds`) shows
    ``mean ± std``. CSV keeps full precision, every column, and holds ``csv_rows`` when given (e.g. the per-seed
    rows behind an aggregated table). Returns the three paths.
    """
    if not rows:
        raise ValueError("write_comparison_table: no rows")
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError("write_comparison_table: every row must be a dict")
    all_cols = _columns(rows)
    cols = [c for c in all_cols if not (c.endswith(STD_SUFFIX) and c.removesuffix(STD_SUFFIX) in all_cols)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best = _best_rows(rows, cols)

    def cell(i: int, c: str, bold: tuple[str, str], escape: bool = False) -> str:
        if c not in rows[i] or rows[i][c] is None:
            return ""
        t = format_value(rows[i][c])
        if rows[i].get(c + STD_SUFFIX) is not None:
            t += f" ± {format_value(rows[i][c + STD_SUFFIX])}"
        t = html.escape(t) if escape else t
        return f"{bold[0]}{t}{bold[1]}" if i in best.get(c, set()) else t

    md = [f"| {' | '.join(cols)} |", "|" + "|".join("---" for _ in cols) + "|"]
    md += ["| " + " | ".join(cell(i, c, ("**", "**")).replace("|", "\\|") for c in cols) + " |" for i in range(len(rows))]
    md_path = out / f"{name}.md"
    atomic_write(md_path, "\n".join(md) + "\n")

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    flat = rows if csv_rows is None else csv_rows
    flat_cols = _columns(flat)
    w.writerow(flat_cols)
    for r in flat:
        w.writerow(["" if json_safe(r.get(c)) is None else json_safe(r.get(c)) for c in flat_cols])
    csv_path = out / f"{name}.csv"
    atomic_write(csv_path, buf.getvalue())

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(i, c, ('<b>', '</b>'), escape=True)}</td>" for c in cols) + "</tr>"
        for i in range(len(rows))
    )
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{REPORT_CSS}</style>"
            f"</head><body><h1>{html.escape(title)}</h1><table><tr>{head}</tr>{body}</table>"
            "<p class='note'>Bold: best in the column (higher AP/AUROC/DICE, lower time); mean ± std over seeds where "
            "there are several.</p></body></html>\n")
    html_path = out / f"{name}.html"
    atomic_write(html_path, page)
    return md_path, csv_path, html_path
