"""LVIS box AP/APr/APc/APf, identical to lvis-api.

``evaluate_lvis`` returns the numbers lvis-api's ``LVISEval`` (PyPI ``lvis`` 0.5.3, ``iou_type="bbox"``) returns
on the same input, and it runs many times faster. It applies the same rules:

- top 300 detections per image over all classes (``LVISResults(max_dets=300)``: score descending, ties in input
  order);
- ground truth and detections with an area outside (0, inf) are dropped (``get_ann_ids``). Ground truth uses its
  ``area`` field (``w*h`` when the field is missing); detections use ``w*h``;
- federated rules: a detection of category c in image i is evaluated only if c has a box in i or is in the image's
  ``neg_category_ids``. Unmatched detections of a category in ``not_exhaustive_category_ids`` are ignored;
- per (image, category): gts with ``ignore`` or outside the area range go last. Detections by score (stable). A
  detection takes the unmatched non-ignored gt with the highest IoU >= threshold (ties: the later gt), and only
  when there is none, an ignored one. ``iscrowd`` plays no part (lvis-api passes iscrowd=0 for every box);
- 10 IoU thresholds 0.50:0.95, 101 recall points, areas all/small/medium/large with inclusive bounds; precision
  tp/(tp+fp+eps), made monotone from the right, sampled at the first rank reaching each recall point;
- AP = mean of all precision entries > -1. A category/area with no non-ignored gt is -1 and left out. A bucket
  with no such entry is -1.

The greedy matching is inherently sequential per (image, category) pair. lvis-api walks the whole
image x category x area grid in Python. This module works only on the pairs that hold detections and ground truth,
and it vectorises across all of them at once. It loops over the rank of the detection inside its pair (pairs are
bucketed by their number of gts, each bucket padded), with the 10 IoU thresholds x 4 area ranges as array axes.
``per_class`` is the mean precision of a category over IoU and recall thresholds (area "all"), or -1 with no gt.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lt_models.data.annotations import FREQ_LABELS
from lt_models.evaluation.inputs import Detections, Frequency, GroundTruth, detection_arrays
from lt_models.evaluation.matches import Matches

# Exactly lvis.eval.Params (np.linspace, not np.arange: the values must compare equal to lvis-api's).
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = ((0**2, 1e5**2), (0**2, 32**2), (32**2, 96**2), (96**2, 1e5**2))
AREA_LABELS = ("all", "small", "medium", "large")
MAX_DETS = 300


def _keep_top_per_image(img: np.ndarray, score: np.ndarray, n_img: int, max_dets: int) -> np.ndarray:
    """Mask of the detections LVISResults keeps: per image the `max_dets` best scores (ties: input order)."""
    keep = np.ones(len(img), bool)
    if max_dets < 0 or len(img) == 0:
        return keep
    over = np.bincount(img, minlength=n_img) > max_dets
    if not over.any():
        return keep
    idx = np.flatnonzero(over[img])
    o = idx[np.lexsort((idx, -score[idx], img[idx]))]
    si = img[o]
    rank = np.arange(len(o)) - np.searchsorted(si, si, side="left")
    keep[o[rank >= max_dets]] = False
    return keep


def _iou_xywh(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """pycocotools' bbIou for non-crowd boxes, in the same float64 operation order (bit-identical)."""
    w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    inter = w * h
    union = d[..., 2] * d[..., 3] + g[..., 2] * g[..., 3] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w > 0) & (h > 0), iou, 0.0)


# Match state as bit masks: bit t*A + a stands for IoU threshold t and area range a (10 x 4 = 40 bits).
_T, _A = len(IOU_THRS), len(AREA_RANGES)
_ALL = np.uint64((1 << (_T * _A)) - 1)
_AREA_BITS = np.array([sum(1 << (t * _A + a) for t in range(_T)) for a in range(_A)], np.uint64)
_LEVEL_BITS = np.array(
    [sum(1 << (t * _A + a) for t in range(lev) for a in range(_A)) for lev in range(_T + 1)], np.uint64
)  # thresholds passed -> bits


def _area_bits(flags: np.ndarray) -> np.ndarray:
    """[n, A] bool -> uint64 mask with every threshold bit of each flagged area."""
    out = np.zeros(len(flags), np.uint64)
    for a in range(_A):
        out[flags[:, a]] |= _AREA_BITS[a]
    return out


def _ragged_arange(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """concatenate(arange(s, s + c) for s, c in zip(starts, counts)), vectorised."""
    ends = np.cumsum(counts)
    return np.repeat(starts - (ends - counts), counts) + np.arange(ends[-1] if len(ends) else 0)


def _match_pairs(
    dbox, pd_start, pd_count, gbox, g_ign_bits, g_id0, pg_start, pg_count, out_matched, out_ignored_gt, out_id0
) -> None:
    """Greedy COCO/LVIS matching of every (image, category) pair that has both detections and gts.

    dbox [D, 4]: detections sorted by (pair, score desc, input order); gbox/g_ign_bits/g_id0: gts sorted by
    (pair, input order). Per pair: start and count of its detections and of its gts. For each detection, writes
    the bits (threshold x area) where it matched, where the gt it took is ignored, where that gt has id 0.

    Pairs are bucketed by gt count (padded to a power of two). Detections without any gt at IoU >= 0.5 cannot
    match and are skipped. Step k of a bucket handles the k-th remaining detection of every pair at once: its gts
    are visited by IoU descending (ties: the later gt first), non-ignored ones first, and each visit hands the
    gt every still-free threshold/area bit where it is a candidate. That is lvis-api's loop, bit-parallel.
    """
    thr = np.minimum(IOU_THRS, 1 - 1e-10)
    bucket = np.ceil(np.log2(pg_count)).astype(np.int64)
    for b in np.unique(bucket):
        sel = np.flatnonzero(bucket == b)
        P, mp = len(sel), 1 << int(b)
        slot = np.arange(mp)
        valid = slot[None, :] < pg_count[sel][:, None]
        gi = np.where(valid, pg_start[sel][:, None] + slot[None, :], pg_start[sel][:, None])
        cnt = pd_count[sel]
        rows = _ragged_arange(pd_start[sel], cnt)
        pl = np.repeat(np.arange(P), cnt)
        iou = np.empty((len(rows), mp))
        step = max(1, (1 << 21) // mp)
        for c0 in range(0, len(rows), step):  # bounded memory
            r, p = rows[c0 : c0 + step], pl[c0 : c0 + step]
            iou[c0 : c0 + step] = np.where(valid[p], _iou_xywh(dbox[r][:, None, :], gbox[gi[p]]), -1.0)
        keep = iou.max(1) >= thr[0]
        if not keep.any():
            continue
        rows, pl, iou = rows[keep], pl[keep], iou[keep]
        kc = np.bincount(pl, minlength=P)
        porder = np.argsort(-kc, kind="stable")  # most candidates first: active pairs form a prefix
        inv = np.empty(P, np.int64)
        inv[porder] = np.arange(P)
        rank = np.arange(len(pl)) - np.searchsorted(pl, pl, side="left")
        o = np.lexsort((inv[pl], rank))
        rows, iou, rank = rows[o], iou[o], rank[o]
        bounds = np.searchsorted(rank, np.arange(kc[porder[0]] + 1), side="left")
        gi = gi[porder]
        ign_bits, id0 = g_ign_bits[gi], g_id0[gi]
        taken = np.where(valid[porder], np.uint64(0), _ALL)  # padding slots are never free
        cand_bits = _LEVEL_BITS[np.searchsorted(thr, iou, side="right")]
        visit = mp - 1 - np.argsort(-iou[:, ::-1], axis=1, kind="stable")  # IoU desc, ties: later gt first
        n_cand = (iou >= thr[0]).sum(1)
        for k in range(len(bounds) - 1):
            s0, s1 = bounds[k], bounds[k + 1]
            a = s1 - s0
            ar = np.arange(a)
            cand = cand_bits[s0:s1] & ~taken[:a]
            vis = visit[s0:s1]
            free = np.full(a, _ALL)
            m_bits = np.zeros(a, np.uint64)
            mi_bits = np.zeros(a, np.uint64)
            z_bits = np.zeros(a, np.uint64)
            jmax = int(n_cand[s0:s1].max())
            for ignored_pass in (False, True):
                for j in range(jmax):
                    g = vis[:, j]
                    ib = ign_bits[ar, g]
                    got = cand[ar, g] & free & (ib if ignored_pass else ~ib)
                    taken[ar, g] |= got
                    m_bits |= got
                    if ignored_pass:
                        mi_bits |= got
                    z_bits |= np.where(id0[ar, g], got, np.uint64(0))
                    free &= ~got
            r = rows[s0:s1]
            out_matched[r], out_ignored_gt[r], out_id0[r] = m_bits, mi_bits, z_bits


def _unpack_bits(bits: np.ndarray) -> np.ndarray:
    """uint64 [n] -> bool-ish uint8 [n, 40] (column t*A + a)."""
    return np.unpackbits(bits.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, : _T * _A]


def _lvis_precision_recall(
    gt: str | Path | Mapping[str, Any] | GroundTruth,
    detections: Detections,
    frequency: Frequency = None,
    max_dets: int = MAX_DETS,
    source: str = "detections",
    keep_matches: bool = False,
):
    """The arrays LVISEval.accumulate builds: precision [T, R, K, A], recall [T, K, A], plus the indexed gt and
    (``keep_matches``) the matching of area "all" as ``Matches``."""
    g = gt if isinstance(gt, GroundTruth) else GroundTruth(gt, frequency, require_frequency=True)
    A, K, nI = _A, g.n_cat, g.n_img
    lo = np.array([r[0] for r in AREA_RANGES])
    hi = np.array([r[1] for r in AREA_RANGES])

    # ground truth kept by lvis-api (0 < area < inf), sorted by (pair, input order)
    gkeep = np.flatnonzero((g.ann_area > 0) & (g.ann_area < np.inf))
    go = gkeep[np.argsort(g.ann_cat[gkeep] * nI + g.ann_img[gkeep], kind="stable")]
    gpair = g.ann_cat[go] * nI + g.ann_img[go]
    garea = g.ann_area[go]
    g_ign = g.ann_ignore[go][:, None] | (garea[:, None] < lo) | (garea[:, None] > hi)  # [G, A]
    num_gt = np.zeros((K, A), np.int64)
    for a in range(A):
        num_gt[:, a] = np.bincount(g.ann_cat[go][~g_ign[:, a]], minlength=K)

    # detections: top-300 per image, then lvis-api's area and federated filters
    img, cat, score, box = detection_arrays(detections, g, source)
    area = box[:, 2] * box[:, 3]
    keep = _keep_top_per_image(img, score, nI, max_dets) & (area > 0) & (area < np.inf)
    pair = cat * nI + img
    keep &= np.isin(pair, np.union1d(gpair, g.neg_keys))
    sel = np.flatnonzero(keep)
    sel = sel[np.lexsort((-score[sel], pair[sel]))]  # (pair, score desc, input order): lvis-api's dt order
    dpair, dbox, darea, dscore, dcat = pair[sel], box[sel], area[sel], score[sel], cat[sel]
    D = len(sel)

    # match every pair holding both detections and gts
    m_bits = np.zeros(D, np.uint64)
    mi_bits = np.zeros(D, np.uint64)
    z_bits = np.zeros(D, np.uint64)
    if D:
        upair, pd_start, pd_count = np.unique(dpair, return_index=True, return_counts=True)
        pg_start = np.searchsorted(gpair, upair, side="left")
        pg_count = np.searchsorted(gpair, upair, side="right") - pg_start
        both = pg_count > 0
        if both.any():
            _match_pairs(
                dbox,
                pd_start[both],
                pd_count[both],
                g.ann_box[go],
                _area_bits(g_ign),
                g.ann_id[go] == 0,
                pg_start[both],
                pg_count[both],
                m_bits,
                mi_bits,
                z_bits,
            )

    # tp / fp / ignored bits per detection, as lvis-api's dt_m / dt_ig. lvis-api records the matched gt's id,
    # so a match to a gt with id 0 reads as "unmatched" there; reproduced through z_bits.
    unmatched_ign = _area_bits((darea[:, None] < lo) | (darea[:, None] > hi))
    unmatched_ign[np.isin(dpair, g.nel_keys)] = _ALL  # not exhaustively annotated: unmatched dets ignored
    eff = m_bits & ~z_bits
    tp_bits = eff & ~mi_bits
    fp_bits = _ALL & ~eff & ~mi_bits & ~unmatched_ign
    # accumulate order: per category, score desc, then image, then input order (lvis-api's mergesort)
    # (positions in `sel` are ordered by image, then input order, inside a category)
    acc = np.lexsort((-dscore, dcat))
    tp_bits, fp_bits, ccat = tp_bits[acc], fp_bits[acc], dcat[acc]
    c_start = np.searchsorted(ccat, np.arange(K), side="left")
    precision, recall = _accumulate(tp_bits, fp_bits, ccat, c_start, num_gt)
    matches = None
    if keep_matches:
        gpair_all = gpair[~g_ign[:, 0]]
        matches = _area_all_matches(g, tp_bits, fp_bits, ccat, dpair[acc] % nI, gpair_all, dscore[acc])
    return precision, recall, g, matches


def _area_all_matches(g: GroundTruth, tp_bits, fp_bits, ccat, cimg, gpair_all, cscore) -> Matches:
    """The matching of area "all" (bit t of a 10-bit mask: IoU threshold t), without the detections that are
    ignored at every threshold."""
    tp = np.zeros(len(tp_bits), np.uint16)
    fp = np.zeros(len(fp_bits), np.uint16)
    for t in range(_T):
        col = np.uint64(t * _A)
        tp |= (((tp_bits >> col) & np.uint64(1)).astype(np.uint16)) << np.uint16(t)
        fp |= (((fp_bits >> col) & np.uint64(1)).astype(np.uint16)) << np.uint16(t)
    counts = (tp | fp) != 0
    pairs, n = np.unique(gpair_all, return_counts=True)
    return Matches(
        img_ids=np.asarray(g.img_ids, np.int64),
        cat_ids=np.asarray(g.cat_ids, np.int64),
        frequency=np.asarray(g.frequency if g.frequency is not None else ["f"] * g.n_cat),
        det_cat=ccat[counts].astype(np.int32),
        det_img=cimg[counts].astype(np.int32),
        tp=tp[counts],
        fp=fp[counts],
        det_score=cscore[counts].astype(np.float64),
        gt_cat=(pairs // g.n_img).astype(np.int32),
        gt_img=(pairs % g.n_img).astype(np.int32),
        gt_n=n.astype(np.int32),
    )


def _segmented_suffix_max(v: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """out[j] = max(v[j:end of j's segment]) for non-decreasing segment ids, exactly (values are rank-coded)."""
    if len(v) == 0:
        return v
    uniq, rank = np.unique(v, return_inverse=True)
    big = len(uniq)
    block = (int(seg[-1]) - seg) * big  # later segments get smaller blocks, so the reversed running max resets
    run = np.maximum.accumulate((block + rank)[::-1])[::-1]
    return uniq[run - block]


def _accumulate(
    tp_bits: np.ndarray, fp_bits: np.ndarray, ccat: np.ndarray, c_start: np.ndarray, num_gt: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """LVISEval.accumulate for all categories at once, one pass per (IoU threshold, area) column.

    Detections are in accumulate order (category, score desc, image, input order). lvis-api's precision at
    recall r is max(pr[j:]) from the first rank j whose recall reaches r. Between two true positives pr can
    only fall, so that maximum is always reached at a true positive (or is 0 without any). A category has at
    most num_gt true positives per column, so only those events are materialised: the i-th TP of a category
    has pr = i / (fp + i + eps) with fp the false positives ranked above it (the same float operations).
    """
    T, R, A = _T, len(REC_THRS), _A
    K = len(num_gt)
    precision = -np.ones((T, R, K, A))
    recall = -np.ones((T, K, A))
    eps = np.spacing(1)
    for a in range(A):
        has = np.flatnonzero(num_gt[:, a] > 0)
        if len(has) == 0:
            continue
        ng = num_gt[has, a]
        uniq_ng, inv = np.unique(ng, return_inverse=True)
        # smallest tp count whose recall tp/ng reaches each recall threshold (as searchsorted on tp/ng)
        tq = np.stack([np.searchsorted(np.arange(u + 1) / u, REC_THRS, side="left") for u in uniq_ng])[inv]
        tq = np.maximum(tq, 1)  # r = 0: max over all of pr, i.e. from the first TP on
        for t in range(T):
            col = np.uint64(t * A + a)
            tp_rows = np.flatnonzero((tp_bits >> col) & np.uint64(1))
            fp_cum = np.concatenate([[0], np.cumsum((fp_bits >> col) & np.uint64(1), dtype=np.int64)])
            tcat = ccat[tp_rows]
            ntp = np.bincount(tcat, minlength=K)
            t_start = np.cumsum(ntp) - ntp
            i = (np.arange(len(tp_rows)) - t_start[tcat] + 1).astype(np.float64)
            f = (fp_cum[tp_rows] - fp_cum[c_start[tcat]]).astype(np.float64)
            smax = _segmented_suffix_max(i / (f + i + eps), tcat)
            ok = tq <= ntp[has][:, None]
            if len(smax):
                vals = np.where(ok, smax[np.where(ok, t_start[has][:, None] + tq - 1, 0)], 0.0)
            else:
                vals = np.zeros(tq.shape)
            precision[t][:, has, a] = vals.T
            recall[t, has, a] = ntp[has] / ng
    return precision, recall


def _summarize(
    arr: np.ndarray,
    iou_thr: float | None = None,
    area: str = "all",
    cats: list[int] | None = None,
    recall: bool = False,
) -> float:
    """LVISEval._summarize: mean of the entries > -1, or -1 when there are none."""
    aidx = [i for i, lbl in enumerate(AREA_LABELS) if lbl == area]
    s = arr
    if iou_thr is not None:
        s = s[np.where(iou_thr == IOU_THRS)[0]]
    if recall:
        s = s[:, :, aidx]
    elif cats is not None:
        s = s[:, :, cats, aidx]
    else:
        s = s[:, :, :, aidx]
    v = s[s > -1]
    return float(np.mean(v)) if v.size else -1.0


def evaluate_lvis(
    gt: str | Path | Mapping[str, Any],
    detections: Detections,
    frequency: Frequency = None,
    max_dets: int = MAX_DETS,
    *,
    keep_matches: bool = False,
) -> dict[str, Any]:
    """LVIS box AP, identical to lvis-api's LVISEval(iou_type="bbox") on the same input.

    gt: LVIS-format JSON path or dict. detections: COCO results (image_id, category_id, bbox xywh, score), or the
    path of a COCO-results JSON, which is streamed (never one list of dicts in memory).
    frequency: 'r'/'c'/'f' buckets overriding the categories' `frequency` field, as {category_id: bucket} or a
    list aligned with the sorted category ids (e.g. ``frequency_buckets(training image counts)`` for datasets
    without the field). Without both, a category `image_count` field is bucketed (<=10 r, <=100 c, else f).

    Returns AP, AP50, AP75, APs, APm, APl, APr, APc, APf, AR@300, ARs@300, ARm@300, ARl@300 (floats in [0, 1],
    -1 where undefined) and per_class {category_id: AP or -1 when the category has no gt}. ``keep_matches``: also
    ``matches``, the matching (``lt_models.evaluation.matches.Matches``) that recomputes AP under image weights.
    """
    precision, recall, g, matches = _lvis_precision_recall(
        gt, detections, frequency, max_dets, keep_matches=keep_matches
    )
    groups = [[k for k, f in enumerate(g.frequency) if f == lbl] for lbl in FREQ_LABELS]
    res: dict[str, Any] = {
        "AP": _summarize(precision),
        "AP50": _summarize(precision, iou_thr=0.50),
        "AP75": _summarize(precision, iou_thr=0.75),
        "APs": _summarize(precision, area="small"),
        "APm": _summarize(precision, area="medium"),
        "APl": _summarize(precision, area="large"),
        "APr": _summarize(precision, cats=groups[0]),
        "APc": _summarize(precision, cats=groups[1]),
        "APf": _summarize(precision, cats=groups[2]),
    }
    key = f"AR@{max_dets}"
    res[key] = _summarize(recall, recall=True)
    for lbl in ("small", "medium", "large"):
        res[f"AR{lbl[0]}@{max_dets}"] = _summarize(recall, area=lbl, recall=True)
    per_class = {}
    for k, cid in enumerate(g.cat_ids):
        p = precision[:, :, k, 0]
        per_class[cid] = float(p.mean()) if p[0, 0] > -1 else -1.0
    res["per_class"] = per_class
    if matches is not None:
        res["matches"] = matches
    return res
