"""Detection evaluation: LVIS AP/APr/APc/APf identical to lvis-api, Open Images AP@0.5, per-class views.

- `lt_models.evaluation.lvis`: ``evaluate_lvis``, the numbers of lvis-api's ``LVISEval`` (bbox), vectorised;
- `lt_models.evaluation.openimages`: ``evaluate_openimages``, the Open Images challenge rules (TF Object Detection
  API evaluator) with the class hierarchy of `lt_models.data.annotations`;
- `lt_models.evaluation.per_class`: ``format_results``, ``per_class_table``, ``write_per_class_csv`` and
  ``plot_ap_by_frequency``;
- `lt_models.evaluation.inputs`: reading and checking ground truth and detections (``load_detections``).

Frequency buckets (rare / common / frequent) follow `lt_models.data.annotations`.
"""

from lt_models.evaluation.inputs import load_detections
from lt_models.evaluation.lvis import AREA_RANGES, IOU_THRS, MAX_DETS, REC_THRS, evaluate_lvis
from lt_models.evaluation.openimages import evaluate_openimages
from lt_models.evaluation.per_class import format_results, per_class_table, plot_ap_by_frequency, write_per_class_csv

__all__ = [
    "evaluate_lvis",
    "evaluate_openimages",
    "load_detections",
    "format_results",
    "per_class_table",
    "write_per_class_csv",
    "plot_ap_by_frequency",
    "IOU_THRS",
    "REC_THRS",
    "AREA_RANGES",
    "MAX_DETS",
]
