"""One evaluation protocol for every method.

- :mod:`~medanomaly.evaluation.metrics`: exact pixel/sample AP, AUROC, best DICE, per-case DICE (the conventions);
- :mod:`~medanomaly.evaluation.streaming`: the same pixel metrics from histograms, with bounds;
- :mod:`~medanomaly.evaluation.tokens`: token-level labels and metrics;
- :mod:`~medanomaly.evaluation.scoring`: the one rule from an anomaly map to an image score;
- :mod:`~medanomaly.evaluation.postprocess`: map smoothing and foreground masking;
- :mod:`~medanomaly.evaluation.figures`, :mod:`~medanomaly.evaluation.html`: the report folder and page;
- :mod:`~medanomaly.evaluation.table`: benchmark comparison tables.

matplotlib is imported only when a figure is drawn.
"""

from medanomaly.evaluation._output import json_safe
from medanomaly.evaluation.html import write_report
from medanomaly.evaluation.metrics import (
    MetricWarning,
    per_case_dice,
    pixel_curves,
    pixel_metrics,
    sample_curves,
    sample_metrics,
    slice_labels,
)
from medanomaly.evaluation.postprocess import gaussian_smooth, mask_foreground, smooth_min_avg
from medanomaly.evaluation.scoring import IMAGE_SCORE_DEFAULTS, check_image_score, image_scores
from medanomaly.evaluation.streaming import StreamingPixelMetrics
from medanomaly.evaluation.table import write_comparison_table
from medanomaly.evaluation.tokens import token_labels, token_metrics

__all__ = [
    "IMAGE_SCORE_DEFAULTS",
    "MetricWarning",
    "StreamingPixelMetrics",
    "check_image_score",
    "gaussian_smooth",
    "image_scores",
    "json_safe",
    "mask_foreground",
    "per_case_dice",
    "pixel_curves",
    "pixel_metrics",
    "sample_curves",
    "sample_metrics",
    "slice_labels",
    "smooth_min_avg",
    "token_labels",
    "token_metrics",
    "write_comparison_table",
    "write_report",
]
