"""One evaluation protocol for every method: metrics (exact and streaming), post-processing, reports.

See :mod:`medanomaly.evaluation.metrics` for the conventions (foreground pooling, best-achievable DICE, undefined
metrics) and :mod:`medanomaly.evaluation.report` for the report folder.
"""

from medanomaly.evaluation.metrics import (
    MetricWarning,
    StreamingPixelMetrics,
    per_case_dice,
    pixel_curves,
    pixel_metrics,
    reduce_map,
    sample_curves,
    sample_metrics,
    slice_labels,
    token_labels,
    token_metrics,
)
from medanomaly.evaluation.postprocess import gaussian_smooth, mask_foreground, smooth_min_avg

__all__ = [
    "MetricWarning",
    "StreamingPixelMetrics",
    "gaussian_smooth",
    "mask_foreground",
    "per_case_dice",
    "pixel_curves",
    "pixel_metrics",
    "reduce_map",
    "sample_curves",
    "sample_metrics",
    "slice_labels",
    "smooth_min_avg",
    "token_labels",
    "token_metrics",
    "write_comparison_table",
    "write_report",
]


def __getattr__(name: str):  # noqa: ANN202 - lazy import keeps matplotlib out of plain metric use
    if name in ("write_report", "write_comparison_table"):
        from medanomaly.evaluation import report

        return getattr(report, name)
    raise AttributeError(f"module 'medanomaly.evaluation' has no attribute {name!r}")
