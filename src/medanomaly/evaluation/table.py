"""Benchmark comparison tables: one row per method, written as Markdown, CSV and HTML with the best value of each
metric column in bold."""

from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path
from typing import Any

from medanomaly.evaluation._output import REPORT_CSS, atomic_write, format_value, is_number, json_safe

__all__ = ["write_comparison_table"]

_HIGHER = {"ap", "auroc", "dice", "f1", "auprc", "accuracy"}
_LOWER = {"seconds", "second", "time", "s", "sec", "loss"}


def _direction(col: str) -> int:
    tokens = set(col.lower().replace("-", "_").split("_"))
    if tokens & _LOWER:
        return -1
    if tokens & _HIGHER and not tokens & {"std", "threshold"}:
        return 1
    return 0


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
    rows: list[dict[str, Any]], out_dir: str | Path, name: str = "comparison", title: str = "medanomaly benchmark"
) -> tuple[Path, Path, Path]:
    """Write ``rows`` (one dict per method) as ``<name>.md``, ``<name>.csv`` and ``<name>.html``.

    Columns are the union of the rows' keys in order of first appearance; missing cells are empty. In Markdown and
    HTML the best value of each metric column is bold (higher is better for AP/AUROC/DICE columns, lower for
    time/seconds columns). CSV keeps full precision. Returns the three paths.
    """
    if not rows:
        raise ValueError("write_comparison_table: no rows")
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError("write_comparison_table: every row must be a dict")
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best = _best_rows(rows, cols)

    def cell(i: int, c: str, bold: tuple[str, str], escape: bool = False) -> str:
        if c not in rows[i] or rows[i][c] is None:
            return ""
        t = html.escape(format_value(rows[i][c])) if escape else format_value(rows[i][c])
        return f"{bold[0]}{t}{bold[1]}" if i in best.get(c, set()) else t

    md = [f"| {' | '.join(cols)} |", "|" + "|".join("---" for _ in cols) + "|"]
    md += ["| " + " | ".join(cell(i, c, ("**", "**")).replace("|", "\\|") for c in cols) + " |" for i in range(len(rows))]
    md_path = out / f"{name}.md"
    atomic_write(md_path, "\n".join(md) + "\n")

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if json_safe(r.get(c)) is None else json_safe(r.get(c)) for c in cols])
    csv_path = out / f"{name}.csv"
    atomic_write(csv_path, buf.getvalue())

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(i, c, ('<b>', '</b>'), escape=True)}</td>" for c in cols) + "</tr>"
        for i in range(len(rows))
    )
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{REPORT_CSS}</style>"
            f"</head><body><h1>{html.escape(title)}</h1><table><tr>{head}</tr>{body}</table>"
            "<p class='note'>Bold: best in the column (higher AP/AUROC/DICE, lower time).</p></body></html>\n")
    html_path = out / f"{name}.html"
    atomic_write(html_path, page)
    return md_path, csv_path, html_path
