"""Open Images challenge-style AP@0.5, the rules of the TF Object Detection API evaluator.

``evaluate_openimages`` follows ``OpenImagesDetectionChallengeEvaluator``: AP@0.5 per class (VOC area under the
monotone PR curve), gt boxes and positive image labels expanded up the hierarchy, negative labels down, detections
of classes not verified in the image ignored, group-of boxes matched by IoA.

The hierarchy is read by `lt_models.data.annotations.load_hierarchy`, the same parser the converter and the dataset
use: its LabelNames may be category names or Open Images MIDs (kept in each category's `mid` by
`lt_models.data.openimages.convert.convert_openimages`), so the official MID-keyed hierarchy file that converted a
dataset also evaluates it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lt_models.data.annotations import (
    FREQ_LABELS,
    hierarchy_ancestors,
    hierarchy_descendants,
    load_hierarchy,
    name_to_cat_id,
)
from lt_models.errors import AnnotationError
from lt_models.evaluation.inputs import Detections, Frequency, GroundTruth, detection_arrays


def _closures(hierarchy: str | Path | Mapping, g: GroundTruth) -> tuple[dict[int, set], dict[int, set]]:
    """(ancestors, descendants) of every category index of `g`, from a hierarchy JSON / tree / ready mapping."""
    if isinstance(hierarchy, Mapping) and "LabelName" not in hierarchy:
        direct = {p: list(cs) for p, cs in hierarchy.items()}
    else:
        direct = load_hierarchy(hierarchy, name_to_cat_id(g.data["categories"]))
    for p, cs in direct.items():
        for c in [p, *cs]:
            if c not in g.cat_index:
                raise AnnotationError(
                    f"hierarchy: category id {c!r} is not in {g.source}; fix: build the "
                    f"hierarchy from the same category list"
                )
    up, down = hierarchy_ancestors(direct), hierarchy_descendants(direct)
    anc = {k: {g.cat_index[a] for a in up.get(cid, ())} for k, cid in enumerate(g.cat_ids)}
    desc = {k: {g.cat_index[d] for d in down.get(cid, ())} for k, cid in enumerate(g.cat_ids)}
    return anc, desc


def _expanded_ground_truth(g: GroundTruth, anc: dict[int, set], desc: dict[int, set], group_of_weight: float):
    """The challenge's hierarchical label expansion of the ground truth.

    Returns (gt box rows per (image, class), the verified (image, class) pairs, num_gt per class): boxes and
    positive image labels count for every ancestor class too, negative labels for every descendant.
    """
    gt_boxes: dict[tuple[int, int], list[int]] = {}
    pos: set[tuple[int, int]] = set()
    for j in range(len(g.ann_img)):
        i = int(g.ann_img[j])
        for c in (int(g.ann_cat[j]), *anc[int(g.ann_cat[j])]):
            gt_boxes.setdefault((i, c), []).append(j)
            pos.add((i, c))
    for key in g.pos_label_keys:
        c, i = divmod(int(key), g.n_img)
        pos.update((i, a) for a in (c, *anc[c]))
    neg: set[tuple[int, int]] = set()
    for key in g.neg_keys:
        c, i = divmod(int(key), g.n_img)
        neg.update((i, d) for d in (c, *desc[c]))
    num_gt = np.zeros(g.n_cat)
    for (_, c), js in gt_boxes.items():
        grp = g.ann_group_of[js]
        num_gt[c] += np.sum(~grp) + group_of_weight * np.sum(grp)
    return gt_boxes, pos | neg, num_gt


def _copy_to_ancestors(img, cat, score, box, anc: dict[int, set]):
    """Every detection plus one copy per ancestor class of its class, with the same score."""
    reps = [np.arange(len(img))]
    cats = [cat]
    for c in np.unique(cat):
        idx = np.flatnonzero(cat == c)
        for a in anc[int(c)]:
            reps.append(idx)
            cats.append(np.full(len(idx), a, np.int64))
    rep = np.concatenate(reps)
    return img[rep], np.concatenate(cats), score[rep], box[rep]


def _xyxy(b: np.ndarray) -> np.ndarray:
    return np.stack([b[..., 0], b[..., 1], b[..., 0] + b[..., 2], b[..., 1] + b[..., 3]], -1)


def _overlap(d: np.ndarray, g: np.ndarray, ioa: bool = False) -> np.ndarray:
    """[n, m] IoU (or intersection over the detection's area) of xyxy boxes."""
    iw = np.minimum(d[:, None, 2], g[None, :, 2]) - np.maximum(d[:, None, 0], g[None, :, 0])
    ih = np.minimum(d[:, None, 3], g[None, :, 3]) - np.maximum(d[:, None, 1], g[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    da = ((d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1]))[:, None]
    ga = ((g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]))[None, :]
    denom = da if ioa else da + ga - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, inter / denom, 0.0)


def _tp_fp_open_images(dscore, dbox, gbox, ggroup, iou_thr: float, group_of_weight: float):
    """One image and class, TF OD API challenge rules. Returns (scores, tp weights) of the counted entries.

    Detections (score desc) first match non-group-of boxes: each takes the gt of highest IoU (first on ties); if
    that IoU >= thr and the gt is free it is a TP, otherwise a FP (no second choice). Detections that are not
    TPs then try group-of boxes by IoA (intersection / detection area): if their best IoA >= thr they are
    dropped, and each group-of box hit this way adds one TP (weight group_of_weight) at the highest score.
    """
    n = len(dscore)
    tp = np.zeros(n, bool)
    if len(gbox) == 0:
        return dscore, tp.astype(float)
    regular, group = gbox[~ggroup], gbox[ggroup]
    if len(regular):
        iou = _overlap(dbox, regular)
        best = np.argmax(iou, axis=1)
        taken = np.zeros(len(regular), bool)
        for i in range(n):
            j = best[i]
            if iou[i, j] >= iou_thr and not taken[j]:
                tp[i] = taken[j] = True
    in_group = np.zeros(n, bool)
    extra_scores, extra_w = np.zeros(0), np.zeros(0)
    if len(group):
        ioa = _overlap(dbox, group, ioa=True)
        best = np.argmax(ioa, axis=1)
        gscore = np.zeros(len(group))
        for i in range(n):
            j = best[i]
            if not tp[i] and ioa[i, j] >= iou_thr:
                in_group[i] = True
                gscore[j] = max(gscore[j], dscore[i])
        hit = gscore > 0
        if group_of_weight > 0:
            extra_scores, extra_w = gscore[hit], np.full(int(hit.sum()), group_of_weight)
    keep = ~in_group
    return np.concatenate([dscore[keep], extra_scores]), np.concatenate([tp[keep].astype(float), extra_w])


def _voc_ap(scores: np.ndarray, weights: np.ndarray, num_gt: float) -> float:
    """Area under the monotone precision/recall curve (object_detection.utils.metrics, VOC style)."""
    if len(scores) == 0:
        return 0.0
    o = np.argsort(-scores, kind="stable")
    tpw = weights[o]
    ctp = np.cumsum(tpw)
    cfp = np.cumsum((tpw <= 0).astype(float))
    precision = ctp / (ctp + cfp)
    recall = ctp / num_gt
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[idx] - recall[idx - 1]) * precision[idx]))


def _summary(
    g: GroundTruth, per_cls_scores: list[list[np.ndarray]], per_cls_w: list[list[np.ndarray]], num_gt: np.ndarray
) -> dict[str, Any]:
    """AP per class from its scored (score, TP weight) entries, the mean over classes with gt and per bucket."""
    K = g.n_cat
    per_class, aps = {}, np.full(K, np.nan)
    for c in range(K):
        if num_gt[c] <= 0:
            per_class[g.cat_ids[c]] = -1.0
            continue
        sc = np.concatenate(per_cls_scores[c]) if per_cls_scores[c] else np.zeros(0)
        w = np.concatenate(per_cls_w[c]) if per_cls_w[c] else np.zeros(0)
        aps[c] = _voc_ap(sc, w, num_gt[c])
        per_class[g.cat_ids[c]] = float(aps[c])
    defined = ~np.isnan(aps)
    m = float(np.mean(aps[defined])) if defined.any() else -1.0
    res: dict[str, Any] = {"AP": m, "AP50": m}
    if g.frequency is not None:
        for lbl in FREQ_LABELS:
            msk = defined & (np.array(g.frequency) == lbl)
            res[f"AP{lbl}"] = float(np.mean(aps[msk])) if msk.any() else -1.0
    res["num_classes_evaluated"] = int(defined.sum())
    res["per_class"] = per_class
    return res


def evaluate_openimages(
    gt: str | Path | Mapping[str, Any],
    detections: Detections,
    hierarchy: str | Path | Mapping,
    expand_detections: bool = False,
    frequency: Frequency = None,
    iou_thr: float = 0.5,
    group_of_weight: float = 1.0,
) -> dict[str, Any]:
    """Open Images challenge-style AP@0.5 (TF Object Detection API ``OpenImagesDetectionChallengeEvaluator``).

    gt: LVIS-format JSON/dict. Annotations may carry ``isgroupof``. Images list verified absent classes in
    ``neg_category_ids`` and may list verified present classes without boxes in ``pos_category_ids``.
    hierarchy: Open Images hierarchy JSON (LabelName = category name or MID, see the module docstring), its parsed
    tree, or {parent_cat_id: [child ids]}.

    - gt boxes and positive image labels are expanded to every ancestor class, negative labels to every
      descendant (the challenge's hierarchical label expansion);
    - a class is verified in an image when it is positive there (box or label) or negative; detections of
      unverified classes are ignored;
    - with ``expand_detections``, every detection is also copied to each ancestor class, with the same score;
    - matching per image and class follows ``_tp_fp_open_images``; zero-area detections are dropped;
    - AP per class is the VOC area under the PR curve, with num_gt = regular boxes + group_of_weight x group-of
      boxes. Classes without gt get -1 in per_class and are left out of the mean.

    Returns AP50 (the challenge mAP), AP (the same number, so pipelines can read one key in both modes),
    APr/APc/APf when buckets are known (frequency override, `frequency` or `image_count` fields),
    per_class and num_classes_evaluated. Score ties are broken by input order (the TF evaluator leaves them to
    an unstable sort).
    """
    g = GroundTruth(gt, frequency, require_frequency=False)
    anc, desc = _closures(hierarchy, g)
    gt_boxes, verified, num_gt = _expanded_ground_truth(g, anc, desc, group_of_weight)
    K = g.n_cat

    img, cat, score, box = detection_arrays(detections, g, "detections")
    if expand_detections and len(img):
        img, cat, score, box = _copy_to_ancestors(img, cat, score, box, anc)
    ok = (box[:, 2] > 0) & (box[:, 3] > 0)
    ok &= np.fromiter(((int(i), int(c)) in verified for i, c in zip(img, cat)), bool, len(img))
    sel = np.flatnonzero(ok)
    sel = sel[np.lexsort((sel, -score[sel], img[sel] * K + cat[sel]))]
    key = img[sel] * K + cat[sel]
    per_cls_scores: list[list[np.ndarray]] = [[] for _ in range(K)]
    per_cls_w: list[list[np.ndarray]] = [[] for _ in range(K)]
    ukey, start, count = np.unique(key, return_index=True, return_counts=True)
    xyxy = _xyxy(box[sel])
    gxyxy = _xyxy(g.ann_box)
    for uk, s, n in zip(ukey.tolist(), start.tolist(), count.tolist()):
        i, c = divmod(uk, K)
        js = gt_boxes.get((i, c), [])
        sc, w = _tp_fp_open_images(
            score[sel[s : s + n]],
            xyxy[s : s + n],
            gxyxy[js].reshape(-1, 4),
            g.ann_group_of[js],
            iou_thr,
            group_of_weight,
        )
        per_cls_scores[c].append(sc)
        per_cls_w[c].append(w)
    return _summary(g, per_cls_scores, per_cls_w, num_gt)
