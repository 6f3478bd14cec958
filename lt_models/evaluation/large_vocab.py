"""Fixed AP and pooled AP (Dave et al. 2021, "Evaluating Large-Vocabulary Object Detectors: The Devil is in the
Details"): LVIS AP without the per-image cap, and one precision-recall curve over a pool of categories.

- **AP-fixed** ranks the top ``k`` detections of each category over the whole validation set (k = 10,000 for LVIS)
  and drops LVIS's cap of 300 detections per image. The cap lets a detector gain AP by spending its 300 slots on
  likely classes, and hides the detections of rare classes that rank low in their image. Everything else is LVIS
  AP: the same matching, the same federated ignores, the mean over IoU 0.50:0.95 and 101 recall points.
- **AP-pool** matches per category exactly as LVIS AP, then ranks the detections of every category of a pool
  (all, rare, common, frequent) together by score: one curve per pool instead of one per category. It rewards
  scores that are comparable across classes (calibrated), which per-category AP never sees. Like the authors'
  script it is computed on the fixed detections (top ``k`` per category, no per-image cap).

Both are computed on the same ``Matches`` machinery as LVIS AP (``lt_models.evaluation.lvis``), so they are
identical to lvis-api's ``LVISEval`` run with ``max_dets = -1`` on the top-``k`` detections, which is what the
authors' reference scripts do; ``tests/test_large_vocab.py`` checks both against that logic on hand-made cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lt_models.data.annotations import FREQ_LABELS
from lt_models.evaluation.inputs import Frequency
from lt_models.evaluation.lvis import IOU_THRS, REC_THRS, evaluate_lvis
from lt_models.evaluation.matches import Matches

DETS_PER_CLASS = 10_000  # the authors' k for LVIS
#: detections per image the validation pass keeps (``lt_models.engine.validation``): more than LVIS AP's 300, so
#: that AP-fixed ranks the detections the per-image cap would drop
PREDICT_DETS_PER_IMAGE = 1000
#: the pools of AP-pool and their metric-name suffixes: every category, then each frequency bucket
POOLS: tuple[tuple[str, str | None], ...] = (("", None), *((b, b) for b in FREQ_LABELS))


def top_per_class(detections: Sequence[Mapping[str, Any]], k: int = DETS_PER_CLASS) -> list[Mapping[str, Any]]:
    """The ``k`` highest-scoring detections of every category (ties: input order), in input order."""
    if k < 1:
        raise ValueError(f"k = {k}: keep at least one detection per category")
    n = len(detections)
    if n == 0:
        return []
    cat = np.fromiter((d["category_id"] for d in detections), np.int64, n)
    score = np.fromiter((d["score"] for d in detections), np.float64, n)
    order = np.lexsort((np.arange(n), -score, cat))  # per category: score desc, then input order
    sc = cat[order]
    rank = np.arange(n) - np.searchsorted(sc, sc, side="left")
    keep = np.sort(order[rank < k])
    return [detections[i] for i in keep]


def evaluate_fixed(
    gt: str | Path | Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    frequency: Frequency = None,
    k: int = DETS_PER_CLASS,
) -> dict[str, Any]:
    """AP-fixed (Dave et al. 2021, §4): LVIS AP of the top ``k`` detections per category, with no cap per image.

    Returns ``AP_fixed``, ``APr_fixed``, ``APc_fixed``, ``APf_fixed``, the pooled APs of :func:`pooled_ap` on the
    same detections, and ``matches_fixed`` (the matching, for calibration and the error breakdown)."""
    res = evaluate_lvis(gt, top_per_class(detections, k), frequency=frequency, max_dets=-1, keep_matches=True)
    m: Matches = res["matches"]
    out: dict[str, Any] = {f"{name}_fixed": res[name] for name in ("AP", "APr", "APc", "APf")}
    out.update(pooled_ap(m))
    out["matches_fixed"] = m
    return out


def pool_precision(tp: np.ndarray, fp: np.ndarray, num_gt: int) -> np.ndarray:
    """Interpolated precision [T, R] of one ranked list (LVISEval.accumulate on a single curve).

    ``tp`` / ``fp``: per detection in rank order, bit t set = true / false positive at IoU threshold t (neither:
    ignored at t). Precision at recall r is the maximum precision from the first rank whose recall reaches r
    (0 beyond the last detection)."""
    T, R = len(IOU_THRS), len(REC_THRS)
    out = np.zeros((T, R))
    eps = np.spacing(1)
    for t in range(T):
        bit = np.uint16(1 << t)
        is_tp, is_fp = (tp & bit) != 0, (fp & bit) != 0
        counted = is_tp | is_fp
        tp_sum = np.cumsum(is_tp[counted]).astype(np.float64)
        fp_sum = np.cumsum(is_fp[counted]).astype(np.float64)
        if len(tp_sum) == 0:
            continue
        rc = tp_sum / num_gt
        pr = np.maximum.accumulate((tp_sum / (fp_sum + tp_sum + eps))[::-1])[::-1]
        idx = np.searchsorted(rc, REC_THRS, side="left")
        out[t] = np.where(idx < len(pr), pr[np.minimum(idx, len(pr) - 1)], 0.0)
    return out


def pooled_ap(m: Matches) -> dict[str, float]:
    """AP-pool (Dave et al. 2021, §5): per pool (every category, then rare / common / frequent), the detections of
    all its categories ranked together by score, one precision-recall curve, AP = its mean over the 10 IoU
    thresholds and 101 recall points. Keys ``AP_pool``, ``APr_pool``, ``APc_pool``, ``APf_pool``; -1 for a pool
    without ground truth.

    Ties in score keep the reference order: image, then category, then the order inside the image's category."""
    score = m.scores()
    order = np.lexsort((np.arange(len(score)), m.det_cat, m.det_img, -score))
    num_gt = m.num_gt()
    out: dict[str, float] = {}
    for suffix, bucket in POOLS:
        in_pool = np.ones(m.n_categories, bool) if bucket is None else (m.frequency == bucket)
        n = int(num_gt[in_pool].sum())
        rows = order[in_pool[m.det_cat[order]]]
        out[f"AP{suffix}_pool"] = float(pool_precision(m.tp[rows], m.fp[rows], n).mean()) if n else -1.0
    return out
