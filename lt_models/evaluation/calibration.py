"""Calibration of detection scores per frequency bucket: reliability diagram and expected calibration error (ECE).

A detection's score claims a probability that it is right. Here "right" is a true positive at IoU 0.5 under the
LVIS matching (the same matching as AP: federated ignores and duplicate rules included); detections ignored at
IoU 0.5 are left out. Scores are binned into ``bins`` equal-width bins over [0, 1]; a bin's precision (share of
true positives) against its mean score is the reliability diagram, and

    ECE = sum_b (n_b / N) * | precision_b - mean score_b |

over the non-empty bins, with N the detections counted. It is computed for every detection and per r / c / f
bucket of the detection's category: long-tail methods move rare-class scores, and a sweep that compares them by
pooled AP is comparing calibration.
"""

from __future__ import annotations

import numpy as np

from lt_models.data.annotations import FREQ_LABELS
from lt_models.evaluation.matches import Matches

BINS = 10


def _binned(score: np.ndarray, correct: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin over [0, 1] (a score of 1 in the last): count, sum of scores, true positives."""
    b = np.clip((score * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(b, minlength=bins).astype(np.float64)
    return count, np.bincount(b, weights=score, minlength=bins), np.bincount(b, weights=correct, minlength=bins)


def reliability(score: np.ndarray, correct: np.ndarray, bins: int = BINS) -> dict[str, list]:
    """Per bin: ``count``, ``confidence`` (mean score) and ``precision`` (share correct); empty bins hold None."""
    count, conf, hits = _binned(score, correct.astype(np.float64), bins)
    return {
        "edges": np.linspace(0.0, 1.0, bins + 1).tolist(),
        "count": count.astype(np.int64).tolist(),
        "confidence": [float(c / n) if n else None for c, n in zip(conf, count)],
        "precision": [float(h / n) if n else None for h, n in zip(hits, count)],
    }


def ece(score: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error of detection scores (module docstring); -1 without detections."""
    if len(score) == 0:
        return -1.0
    count, conf, hits = _binned(score, correct.astype(np.float64), bins)
    full = count > 0
    return float(np.abs(hits[full] - conf[full]).sum() / count.sum())


def calibration(m: Matches, bins: int = BINS, iou_index: int = 0) -> dict:
    """``ECE``, ``ECEr``, ``ECEc``, ``ECEf`` (-1 for a bucket without detections) and ``reliability``
    {"all" | "r" | "c" | "f": :func:`reliability`} of a matching, at IoU threshold ``IOU_THRS[iou_index]``."""
    score = m.scores()
    bit = np.uint16(1 << iou_index)
    counted = ((m.tp | m.fp) & bit) != 0
    correct = (m.tp & bit) != 0
    bucket = m.frequency[m.det_cat]
    out: dict = {"reliability": {}}
    for name in ("all", *FREQ_LABELS):
        sel = counted if name == "all" else counted & (bucket == name)
        key = "ECE" if name == "all" else f"ECE{name}"
        out[key] = ece(score[sel], correct[sel], bins)
        out["reliability"][name] = reliability(score[sel], correct[sel], bins)
    return out
