"""Where the AP goes: TIDE's error breakdown (Bolya et al. 2020, "TIDE: A General Toolbox for Identifying Object
Detection Errors"), per frequency bucket.

TIDE matches the detections of each image once, at IoU t_f = 0.5, greedily in score order (300 per image, LVIS's
cap), and files every false positive under one error type, checked in this order:

- **Loc**: its best IoU with a box of its own class is in [t_b, t_f] (t_b = 0.1, the background threshold);
- **Cls**: its best IoU with a box of another class is at least t_f;
- **Dupe**: that box of its own class (IoU >= t_f) was already taken by a higher-scoring detection;
- **Bkg**: it overlaps every box by at most t_b;
- **Both**: anything else (wrong class and poorly localised).

A ground-truth box no detection matched and no Cls / Loc error points at is **Miss**. Each type's dAP is AP50 after
fixing every error of that type, minus AP50: a Cls or Loc error becomes a true positive of the box it points at (the
highest-scoring one per box; the others are dropped), a Dupe, Bkg or Both error is dropped, a Miss leaves the
count of boxes to find. TIDE's AP is its own: AP50 with 101 recall points, averaged over the classes that have
boxes or detections.

LVIS's federated labels follow TIDE's LVIS loader: detections of a class neither annotated nor verified absent in
an image are dropped, and unmatched detections of a class marked not exhaustively annotated are ignored.

Per bucket: the AP50 and dAPs averaged over the bucket's classes (a Cls fix moves AP between classes, and each
class counts in its own bucket), and the error counts by the class of the detection (Miss: of the box).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lt_models.data.annotations import FREQ_LABELS
from lt_models.evaluation.inputs import Detections, Frequency, GroundTruth, detection_arrays
from lt_models.evaluation.lvis import MAX_DETS, _iou_xywh

ERROR_TYPES = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
POS_THRESH, BG_THRESH = 0.5, 0.1
_RECALLS = np.arange(101) / 100


class _Run:
    """TIDE's per-image pass over the whole validation set: AP data points, errors and Cls / Loc targets."""

    def __init__(self, g: GroundTruth, img, cat, score, box, max_dets: int):
        self.points: list[dict[int, tuple[float, bool]]] = [{} for _ in range(g.n_cat)]  # per class, push order
        self.gt_pos = np.zeros(g.n_cat, np.int64)
        self.errors: list[tuple] = []  # (type, class, id, score, fix); fix = (class, True) | None | -1 (a Miss)
        self.best: dict[int, tuple[float, int]] = {}  # gt index -> (best score, pred id) of its Cls / Loc errors
        self._gt_class = g.ann_cat
        by_img = np.argsort(img, kind="stable")
        starts = np.searchsorted(img[by_img], np.arange(g.n_img + 1))
        by_gt_img = np.argsort(g.ann_img, kind="stable")
        gts_of = np.split(by_gt_img, np.searchsorted(g.ann_img[by_gt_img], np.arange(1, g.n_img)))
        neg = set(g.neg_keys.tolist())
        nel = set(g.nel_keys.tolist())
        for i in (g.img_index[im["id"]] for im in g.data["images"]):
            preds = by_img[starts[i] : starts[i + 1]]
            gts = gts_of[i]
            present = set(g.ann_cat[gts].tolist())
            keep = [p for p in preds if int(cat[p]) in present or int(cat[p]) * g.n_img + i in neg]
            keep = sorted(keep, key=lambda p: -score[p])[:max_dets]
            nel_here = {c for c in present if c * g.n_img + i in nel}
            self._image(g, np.asarray(keep, np.int64), gts, cat, score, box, nel_here)
        self.fixes = self._resolve_fixes()

    def _image(self, g, preds, gts, cat, score, box, nel_here) -> None:
        gcls = g.ann_cat[gts]
        np.add.at(self.gt_pos, gcls, 1)
        used_gt = np.zeros(len(gts), bool)
        usable = np.zeros(len(gts), bool)
        if len(preds) == 0:
            self.errors += [("Miss", int(c), -1, 0.0, -1) for c in gcls]
            return
        pcls = cat[preds]
        iou = _iou_xywh(box[preds][:, None, :], g.ann_box[gts][None, :, :]) if len(gts) else np.zeros((len(preds), 0))
        same = pcls[:, None] == gcls[None, :]
        cls_iou = iou * same
        used: list[bool | None] = [False] * len(preds)
        buf = cls_iou.copy()
        for k in range(len(preds) if len(gts) else 0):
            j = int(np.argmax(buf[k]))
            if buf[k, j] >= POS_THRESH:
                used[k], used_gt[j] = True, True
                buf[:, j] = 0
        for k in range(len(preds)):
            if not used[k] and int(pcls[k]) in nel_here:
                used[k] = None  # an unmatched detection of a not-exhaustively annotated class
        for k, p in enumerate(preds):
            c, pid, s = int(pcls[k]), int(p), float(score[p])
            if used[k] is not None:
                self.points[c][pid] = (s, bool(used[k]))
            if used[k] is False:
                self._classify(k, c, pid, s, gts, used_gt, usable, iou, same, cls_iou)
        self.errors += [("Miss", int(c), -1, 0.0, -1) for c in gcls[~used_gt & ~usable]]

    def _classify(self, k, c, pid, s, gts, used_gt, usable, iou, same, cls_iou) -> None:
        """File the false positive k (class c) under its TIDE error type."""
        if len(gts) == 0:
            self.errors.append(("Bkg", c, pid, s, None))
            return
        j = int(np.argmax(cls_iou[k]))
        if BG_THRESH <= cls_iou[k, j] <= POS_THRESH:
            self._target("Loc", c, c, pid, s, gts, j, used_gt, usable)
            return
        other = iou[k] * ~same[k]
        j = int(np.argmax(other))
        if other[j] >= POS_THRESH:
            self._target("Cls", c, None, pid, s, gts, j, used_gt, usable)
            return
        taken = cls_iou[k] * used_gt
        if taken.max() >= POS_THRESH:
            self.errors.append(("Dupe", c, pid, s, None))
        elif iou[k].max() <= BG_THRESH:
            self.errors.append(("Bkg", c, pid, s, None))
        else:
            self.errors.append(("Both", c, pid, s, None))

    def _target(self, kind, c, fixed_class, pid, s, gts, j, used_gt, usable) -> None:
        """A Cls / Loc error pointing at gt j: fixable only if j is free, and then only by its best-scoring error."""
        gt = int(gts[j])
        if used_gt[j]:
            self.errors.append((kind, c, pid, s, None))
            return
        usable[j] = True
        if gt not in self.best or self.best[gt][0] < s:
            self.best[gt] = (s, pid)
        self.errors.append((kind, c, pid, s, ("gt", gt, fixed_class)))

    def _resolve_fixes(self) -> list:
        """Each error's fixed form: (class, True) for the best Cls / Loc error of a free box, -1 for a Miss, else
        None (the error is dropped)."""
        out: list = []
        for _kind, _c, pid, _s, fix in self.errors:
            if not isinstance(fix, tuple):
                out.append(fix)
                continue
            _, gt, fixed_class = fix
            if self.best[gt][1] != pid:
                out.append(None)
            else:
                out.append((int(self._gt_class[gt]) if fixed_class is None else fixed_class, True))
        return out


def _ap50(points: Mapping[int, tuple[float, bool]], n_gt: int) -> float:
    """TIDE's AP of one class: precision suffix maximum at 101 recall points (COCO's interpolation)."""
    if n_gt <= 0 or not points:
        return 0.0
    vals = list(points.values())
    order = sorted(range(len(vals)), key=lambda i: -vals[i][0])
    correct = np.array([vals[i][1] for i in order], bool)
    tp = np.cumsum(correct)
    prec = tp / np.arange(1, len(correct) + 1)
    prec = np.maximum.accumulate(prec[::-1])[::-1]
    idx = np.searchsorted(tp / n_gt, _RECALLS, side="left")
    return float(np.where(idx < len(prec), prec[np.minimum(idx, len(prec) - 1)], 0.0).sum() / 101)


def _fixed(run: _Run, kind: str) -> tuple[list[dict[int, tuple[float, bool]]], np.ndarray]:
    """The AP data with every error of ``kind`` fixed (TIDE's fix_errors: errors first, then the true positives)."""
    points: list[dict[int, tuple[float, bool]]] = [{} for _ in run.points]
    gt_pos = run.gt_pos.copy()
    for (ekind, c, pid, s, _), fix in zip(run.errors, run.fixes):
        if ekind != kind:
            if ekind != "Miss":
                points[c][pid] = (s, False)
        elif fix == -1:
            gt_pos[c] -= 1  # a missed box no longer counts
        elif fix is not None:
            points[fix[0]][pid] = (s, True)
    for c, pts in enumerate(run.points):
        for pid, (s, ok) in pts.items():
            if ok:
                points[c][pid] = (s, True)
    return points, gt_pos


def _mean_ap(points, gt_pos: np.ndarray, classes: np.ndarray) -> float:
    """TIDE's mAP over ``classes`` that have boxes or detections; -1 when none has."""
    aps = [_ap50(points[c], int(gt_pos[c])) for c in classes if points[c] or gt_pos[c] > 0]
    return float(np.mean(aps)) if aps else -1.0


def tide_errors(
    gt: str | Path | Mapping[str, Any],
    detections: Detections,
    frequency: Frequency = None,
    max_dets: int = MAX_DETS,
) -> dict[str, dict[str, float]]:
    """TIDE's breakdown (module docstring) for every class and per r / c / f bucket: {"all" | "r" | "c" | "f":
    {"AP50": TIDE's AP50, "dAP_<type>": the AP50 gained by fixing that error type, "n_<type>": its count}} for
    the types in ``ERROR_TYPES``; -1 where a bucket has no class with boxes or detections."""
    g = GroundTruth(gt, frequency, require_frequency=True)
    img, cat, score, box = detection_arrays(detections, g, "detections")
    run = _Run(g, img, cat, score, box, max_dets)
    freq = np.asarray(g.frequency)
    fixed = {kind: _fixed(run, kind) for kind in ERROR_TYPES}
    err_kind = np.array([e[0] for e in run.errors])
    err_bucket = freq[[e[1] for e in run.errors]] if run.errors else np.array([], dtype=freq.dtype)
    out: dict[str, dict[str, float]] = {}
    for name in ("all", *FREQ_LABELS):
        classes = np.arange(g.n_cat) if name == "all" else np.flatnonzero(freq == name)
        base = _mean_ap(run.points, run.gt_pos, classes)
        res = {"AP50": base}
        for kind in ERROR_TYPES:
            after = _mean_ap(*fixed[kind], classes)
            res[f"dAP_{kind}"] = max(after - base, 0.0) if base >= 0 else -1.0
            in_bucket = err_kind == kind if name == "all" else (err_kind == kind) & (err_bucket == name)
            res[f"n_{kind}"] = float(np.count_nonzero(in_bucket))
        out[name] = res
    return out


def tide_metrics(res: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The dAPs of :func:`tide_errors` as flat metrics: ``dAP_<type>`` (every class) and ``dAP_<type>_<bucket>``."""
    out = {f"dAP_{kind}": res["all"][f"dAP_{kind}"] for kind in ERROR_TYPES}
    out.update({f"dAP_{kind}_{b}": res[b][f"dAP_{kind}"] for b in FREQ_LABELS for kind in ERROR_TYPES})
    return out
