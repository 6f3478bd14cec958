"""Detection evaluation: LVIS AP/APr/APc/APf identical to lvis-api, Open Images AP@0.5, per-class views.

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

``evaluate_openimages`` follows the Open Images challenge rules of the TF Object Detection API evaluator: AP@0.5
per class (VOC area under the monotone PR curve), gt boxes and positive image labels expanded up the hierarchy,
negative labels down, detections of classes not verified in the image ignored, group-of boxes matched by IoA.
"""
from __future__ import annotations

import collections
import csv
import io
import itertools
import json
import math
import numbers
from operator import itemgetter, methodcaller
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lt_models.atomic import write_bytes_atomic
from lt_models.errors import AnnotationError

__all__ = [
    "evaluate_lvis", "evaluate_openimages", "load_detections", "format_results", "per_class_table",
    "write_per_class_csv", "plot_ap_by_frequency", "IOU_THRS", "REC_THRS", "AREA_RANGES", "MAX_DETS",
]

# Exactly lvis.eval.Params (np.linspace, not np.arange: the values must compare equal to lvis-api's).
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = ((0 ** 2, 1e5 ** 2), (0 ** 2, 32 ** 2), (32 ** 2, 96 ** 2), (96 ** 2, 1e5 ** 2))
AREA_LABELS = ("all", "small", "medium", "large")
MAX_DETS = 300
FREQ_LABELS = ("r", "c", "f")
RARE_MAX, COMMON_MAX = 10, 100  # LVIS buckets: rare <= 10 training images, common <= 100, frequent > 100

Frequency = Mapping[Any, str] | Sequence[str] | None


# --------------------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------------------

def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc}); fix: write the {what} with json.dump") from exc
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{path}: not a UTF-8 text file; fix: pass the {what} JSON file") from exc


def _load_gt(gt: str | Path | Mapping[str, Any]) -> tuple[dict, str]:
    if isinstance(gt, (str, Path)):
        data, source = _read_json(gt, "ground-truth annotations"), str(gt)
    elif isinstance(gt, Mapping):
        data, source = gt, "ground truth (dict)"
    else:
        raise TypeError(f"gt must be a path or an LVIS-format dict, got {type(gt).__name__}")
    if not isinstance(data, Mapping):
        raise AnnotationError(f"{source}: top level must be an object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{source}: missing list field '{key}'; fix: use an LVIS/COCO-format JSON")
    return data, source


def _frequency_from_counts(counts: Iterable[int]) -> list[str]:
    return ["r" if n <= RARE_MAX else "c" if n <= COMMON_MAX else "f" for n in counts]


def _resolve_frequency(cats: list[dict], cat_ids: list, frequency: Frequency, source: str,
                       required: bool) -> list[str] | None:
    """'r'/'c'/'f' per sorted category: the override, else each category's `frequency`, else `image_count`."""
    if frequency is not None:
        if isinstance(frequency, Mapping):
            missing = [c for c in cat_ids if c not in frequency]
            if missing:
                raise AnnotationError(f"frequency override: no bucket for category id(s) {missing[:5]} of {source};"
                                      f" fix: give one of 'r'/'c'/'f' for every category")
            freq = [frequency[c] for c in cat_ids]
        else:
            freq = list(frequency)
            if len(freq) != len(cat_ids):
                raise AnnotationError(f"frequency override has {len(freq)} entries but {source} has "
                                      f"{len(cat_ids)} categories; fix: one 'r'/'c'/'f' per sorted category id")
        where = "frequency override"
    else:
        by_id = {c["id"]: c for c in cats}
        if all("frequency" in by_id[c] for c in cat_ids):
            freq, where = [by_id[c]["frequency"] for c in cat_ids], f"{source} categories[].frequency"
        elif all("image_count" in by_id[c] for c in cat_ids):
            freq = _frequency_from_counts(by_id[c]["image_count"] for c in cat_ids)
            where = f"{source} categories[].image_count"
        elif required:
            lacking = [c for c in cat_ids if "frequency" not in by_id[c]][:5]
            raise AnnotationError(
                f"{source}: categories {lacking} have no 'frequency' (and no 'image_count'), so APr/APc/APf are "
                f"undefined; fix: pass frequency= to evaluate_lvis (e.g. "
                f"lt_models.datasets.frequency_buckets(training image counts)) or add 'frequency' to categories")
        else:
            return None
    bad = [(c, f) for c, f in zip(cat_ids, freq) if f not in FREQ_LABELS]
    if bad:
        raise AnnotationError(f"{where}: category {bad[0][0]} has frequency {bad[0][1]!r}; fix: use 'r', 'c' or 'f'")
    return list(freq)


class _GT:
    """Ground truth as flat arrays. Images and categories are indexed in sorted-id order, as lvis-api does."""

    def __init__(self, gt: str | Path | Mapping[str, Any], frequency: Frequency = None,
                 require_frequency: bool = True):
        data, source = _load_gt(gt)
        self.data, self.source = data, source
        try:
            img_ids = sorted({im["id"] for im in data["images"]})
            cat_ids = sorted({c["id"] for c in data["categories"]})
        except KeyError as exc:
            raise AnnotationError(f"{source}: an image or category has no 'id'; fix: give every entry an id") from exc
        self.img_ids, self.cat_ids = img_ids, cat_ids
        self.img_index = {i: k for k, i in enumerate(img_ids)}
        self.cat_index = {c: k for k, c in enumerate(cat_ids)}
        self.n_img, self.n_cat = len(img_ids), len(cat_ids)
        self.cats = {c["id"]: c for c in data["categories"]}
        self.frequency = _resolve_frequency(data["categories"], cat_ids, frequency, source, require_frequency)

        anns = data["annotations"]
        n = len(anns)
        try:
            img = np.fromiter(map(self.img_index.__getitem__, map(itemgetter("image_id"), anns)), np.int64, n)
            cat = np.fromiter(map(self.cat_index.__getitem__, map(itemgetter("category_id"), anns)), np.int64, n)
            box = np.array(list(map(itemgetter("bbox"), anns)), np.float64).reshape(n, 4)
            if all(map(methodcaller("__contains__", "area"), anns)):
                area = np.fromiter(map(itemgetter("area"), anns), np.float64, n)
            else:  # COCO-style files without area: the box area
                area = np.fromiter((a["area"] if "area" in a else a["bbox"][2] * a["bbox"][3] for a in anns),
                                   np.float64, n)
        except (KeyError, TypeError, ValueError) as exc:
            self._diagnose_anns(anns)
            raise AnnotationError(f"{source}: annotations could not be read ({exc})") from exc
        ignore = np.fromiter(map(methodcaller("get", "ignore", 0), anns), bool, n)
        ann_id = np.fromiter(map(methodcaller("get", "id", -1), anns), np.int64, n)
        group_of = np.fromiter(map(methodcaller("get", "isgroupof", 0), anns), bool, n)
        if not (np.isfinite(box).all() and not np.isnan(area).any()):
            bad = int(np.flatnonzero(~np.isfinite(box).all(1) | np.isnan(area))[0])
            raise AnnotationError(f"{source}: annotations[{bad}] has a non-finite bbox/area; fix: drop or repair it")
        self.ann_img, self.ann_cat, self.ann_box, self.ann_area = img, cat, box, area
        self.ann_ignore, self.ann_id, self.ann_group_of = ignore, ann_id, group_of

        def pair_keys(field: str) -> np.ndarray:
            imgs = [im for im in data["images"] if im.get(field)]
            cats = list(itertools.chain.from_iterable(im[field] for im in imgs))
            known = np.fromiter((c in self.cat_index for c in cats), bool, len(cats))
            ci = np.fromiter((self.cat_index[c] for c, k in zip(cats, known) if k), np.int64, int(known.sum()))
            ii = np.repeat([self.img_index[im["id"]] for im in imgs], [len(im[field]) for im in imgs])
            return np.unique(ci * self.n_img + ii[known])

        self.neg_keys = pair_keys("neg_category_ids")
        self.nel_keys = pair_keys("not_exhaustive_category_ids")
        self.pos_label_keys = pair_keys("pos_category_ids")

    def _diagnose_anns(self, anns: list) -> None:
        """Raise an AnnotationError naming the first unreadable annotation (slow path, bad input only)."""
        for j, a in enumerate(anns):
            where = f"{self.source}: annotations[{j}]"
            if not isinstance(a, Mapping):
                raise AnnotationError(f"{where} is not an object; fix: annotations are {{image_id, category_id, "
                                      f"bbox, area}} objects")
            for field, index, kind in (("image_id", self.img_index, "images"),
                                       ("category_id", self.cat_index, "categories")):
                if field not in a:
                    raise AnnotationError(f"{where} has no '{field}'; fix: every annotation needs {field}")
                if a[field] not in index:
                    raise AnnotationError(f"{where} (id {a.get('id')}) has {field} {a[field]!r}, which is not in "
                                          f"'{kind}'; fix: add the entry to '{kind}' or drop the annotation")
            b = a.get("bbox")
            if not isinstance(b, (list, tuple)) or len(b) != 4:
                raise AnnotationError(f"{where} (id {a.get('id')}) has bbox {b!r}; fix: bbox must be [x, y, w, h]")
            try:
                float(a["area"] if "area" in a else b[2] * b[3])
                [float(v) for v in b]
            except (TypeError, ValueError) as exc:
                raise AnnotationError(f"{where} (id {a.get('id')}) has a non-numeric bbox/area; fix: numbers only"
                                      ) from exc


def _det_arrays(dets: Sequence[Mapping[str, Any]], g: _GT | None, source: str):
    """(image index, category index, score, xywh box) arrays of COCO-results detections, validated."""
    n = len(dets)
    if n == 0:
        z = np.zeros(0, np.int64)
        return z, z.copy(), np.zeros(0), np.zeros((0, 4))
    try:  # C-level iteration (map/itemgetter): ~1.5 M detections in about a second
        ids = map(itemgetter("image_id"), dets)
        cids = map(itemgetter("category_id"), dets)
        if g is not None:
            img = np.fromiter(map(g.img_index.__getitem__, ids), np.int64, n)
            cat = np.fromiter(map(g.cat_index.__getitem__, cids), np.int64, n)
        else:
            img = cat = None
            collections.deque(zip(ids, cids), maxlen=0)  # presence check
        score = np.fromiter(map(itemgetter("score"), dets), np.float64, n)
        bbs = list(map(itemgetter("bbox"), dets))
        if not (np.fromiter(map(len, bbs), np.int64, n) == 4).all():
            raise ValueError("bbox length")
        box = np.fromiter(itertools.chain.from_iterable(bbs), np.float64, 4 * n).reshape(n, 4)
    except (KeyError, TypeError, ValueError, AttributeError):
        _diagnose_dets(dets, g, source)
        raise
    if not (np.isfinite(score).all() and np.isfinite(box).all()):
        _diagnose_dets(dets, g, source)
    return img, cat, score, box


def _diagnose_dets(dets: Sequence[Any], g: _GT | None, source: str) -> None:
    """Find the first bad detection and raise an AnnotationError naming it (slow path, only on bad input)."""
    for i, d in enumerate(dets):
        where = f"{source}: detection #{i}"
        if not isinstance(d, Mapping):
            raise AnnotationError(f"{where} is a {type(d).__name__}, not an object; fix: COCO results are a list "
                                  f"of {{image_id, category_id, bbox, score}}")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in d:
                raise AnnotationError(f"{where} has no '{key}'; fix: COCO results need image_id, category_id, "
                                      f"bbox [x, y, w, h] and score")
        b = d["bbox"]
        if (not isinstance(b, (list, tuple)) or len(b) != 4
                or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in b)):
            raise AnnotationError(f"{where} has bbox {b!r}; fix: bbox must be 4 finite numbers [x, y, w, h]")
        s = d["score"]
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
            raise AnnotationError(f"{where} has score {s!r}; fix: score must be a finite number")
        if g is not None:
            if d["image_id"] not in g.img_index:
                raise AnnotationError(f"{where} has image_id {d['image_id']!r}, which is not an image of "
                                      f"{g.source}; fix: evaluate against the ground truth the detector ran on")
            if d["category_id"] not in g.cat_index:
                raise AnnotationError(f"{where} has category_id {d['category_id']!r}, which is not a category of "
                                      f"{g.source}; fix: map labels back to dataset category ids "
                                      f"(label_to_cat_id) before writing results")
    raise AnnotationError(f"{source}: detections could not be read; fix: COCO results list of "
                          f"{{image_id, category_id, bbox, score}}")


def load_detections(path: str | Path, gt: str | Path | Mapping[str, Any] | None = None) -> list[dict]:
    """Read a COCO-results JSON (a list of {image_id, category_id, bbox [x,y,w,h], score}) and validate it.

    With ``gt``, image and category ids must exist in the ground truth. Raises AnnotationError naming the file,
    the detection and the fix.
    """
    data = _read_json(path, "detections")
    if isinstance(data, Mapping) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: top level is a {type(data).__name__}; fix: COCO results are a JSON list "
                              f"of {{image_id, category_id, bbox, score}}")
    g = _GT(gt, require_frequency=False) if gt is not None else None
    _det_arrays(data, g, str(path))
    return data


# --------------------------------------------------------------------------------------------------------------
# LVIS
# --------------------------------------------------------------------------------------------------------------

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
_LEVEL_BITS = np.array([sum(1 << (t * _A + a) for t in range(lev) for a in range(_A))
                        for lev in range(_T + 1)], np.uint64)  # thresholds passed -> bits


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


def _match_pairs(dbox, pd_start, pd_count, gbox, g_ign_bits, g_id0, pg_start, pg_count,
                 out_matched, out_ignored_gt, out_id0) -> None:
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
            r, p = rows[c0:c0 + step], pl[c0:c0 + step]
            iou[c0:c0 + step] = np.where(valid[p], _iou_xywh(dbox[r][:, None, :], gbox[gi[p]]), -1.0)
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
    return np.unpackbits(bits.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1,
                         bitorder="little")[:, :_T * _A]


def _lvis_precision_recall(gt: str | Path | Mapping[str, Any] | _GT, detections: Sequence[Mapping[str, Any]],
                           frequency: Frequency = None, max_dets: int = MAX_DETS, source: str = "detections"):
    """The arrays LVISEval.accumulate builds: precision [T, R, K, A], recall [T, K, A], plus the indexed gt."""
    g = gt if isinstance(gt, _GT) else _GT(gt, frequency, require_frequency=True)
    T, R, A, K, nI = _T, len(REC_THRS), _A, g.n_cat, g.n_img
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
    img, cat, score, box = _det_arrays(detections, g, source)
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
            _match_pairs(dbox, pd_start[both], pd_count[both], g.ann_box[go], _area_bits(g_ign),
                         g.ann_id[go] == 0, pg_start[both], pg_count[both], m_bits, mi_bits, z_bits)

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
    return precision, recall, g


def _segmented_suffix_max(v: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """out[j] = max(v[j:end of j's segment]) for non-decreasing segment ids, exactly (values are rank-coded)."""
    if len(v) == 0:
        return v
    uniq, rank = np.unique(v, return_inverse=True)
    big = len(uniq)
    block = (int(seg[-1]) - seg) * big  # later segments get smaller blocks, so the reversed running max resets
    run = np.maximum.accumulate((block + rank)[::-1])[::-1]
    return uniq[run - block]


def _accumulate(tp_bits: np.ndarray, fp_bits: np.ndarray, ccat: np.ndarray, c_start: np.ndarray,
                num_gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _summarize(arr: np.ndarray, iou_thr: float | None = None, area: str = "all",
               cats: list[int] | None = None, recall: bool = False) -> float:
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


def evaluate_lvis(gt: str | Path | Mapping[str, Any], detections: Sequence[Mapping[str, Any]],
                  frequency: Frequency = None, max_dets: int = MAX_DETS) -> dict[str, Any]:
    """LVIS box AP, identical to lvis-api's LVISEval(iou_type="bbox") on the same input.

    gt: LVIS-format JSON path or dict. detections: COCO results (image_id, category_id, bbox xywh, score).
    frequency: 'r'/'c'/'f' buckets overriding the categories' `frequency` field, as {category_id: bucket} or a
    list aligned with the sorted category ids (e.g. ``frequency_buckets(training image counts)`` for datasets
    without the field). Without both, a category `image_count` field is bucketed (<=10 r, <=100 c, else f).

    Returns AP, AP50, AP75, APs, APm, APl, APr, APc, APf, AR@300, ARs@300, ARm@300, ARl@300 (floats in [0, 1],
    -1 where undefined) and per_class {category_id: AP or -1 when the category has no gt}.
    """
    precision, recall, g = _lvis_precision_recall(gt, detections, frequency, max_dets)
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
    return res


# --------------------------------------------------------------------------------------------------------------
# Open Images
# --------------------------------------------------------------------------------------------------------------

def _load_hierarchy(hierarchy: str | Path | Mapping, name_to_cat_id: Mapping[str, Any]) -> dict[Any, list]:
    """Parent category id -> direct child category ids from an Open Images hierarchy JSON.

    Shape: {"LabelName": name, "Subcategory": [{"LabelName": ..., "Subcategory": [...]}, ...]}; LabelName is
    the category `name`. Nodes that are not categories (the root, classes outside the dataset) are passed
    through: their category children hang off their nearest category ancestors. "Part" entries are not
    subclasses and are skipped, as in the Open Images expansion tool. A ready mapping
    {parent_cat_id: [child_cat_id, ...]} is accepted as is.
    """
    if isinstance(hierarchy, Mapping) and "LabelName" not in hierarchy:
        return {p: list(cs) for p, cs in hierarchy.items()}
    source = str(hierarchy) if not isinstance(hierarchy, Mapping) else "hierarchy (dict)"
    tree = hierarchy if isinstance(hierarchy, Mapping) else _read_json(hierarchy, "class hierarchy")
    children: dict[Any, list] = {}

    def walk(node: Any, cat_ancestors: tuple) -> None:
        if not isinstance(node, Mapping) or not isinstance(node.get("LabelName"), str):
            raise AnnotationError(f"{source}: node {str(node)[:80]!r} has no string 'LabelName'; fix: Open Images "
                                  f"hierarchy nodes are {{'LabelName': name, 'Subcategory': [...]}}")
        cid = name_to_cat_id.get(node["LabelName"])
        if cid is not None:
            if cid in cat_ancestors:
                raise AnnotationError(f"{source}: '{node['LabelName']}' is its own ancestor; fix: remove the cycle")
            if cat_ancestors:
                lst = children.setdefault(cat_ancestors[-1], [])
                if cid not in lst:
                    lst.append(cid)
            cat_ancestors = cat_ancestors + (cid,)
        subs = node.get("Subcategory", [])
        if not isinstance(subs, list):
            raise AnnotationError(f"{source}: 'Subcategory' of '{node['LabelName']}' is not a list")
        for child in subs:
            walk(child, cat_ancestors)

    walk(tree, ())
    if not children and not _any_label_matches(tree, name_to_cat_id):
        raise AnnotationError(f"{source}: no LabelName matches a category name of the ground truth; fix: the "
                              f"hierarchy's LabelName must be the category 'name' (e.g. convert /m/ ids to names)")
    return children


def _any_label_matches(node: Mapping, names: Mapping[str, Any]) -> bool:
    stack = [node]
    while stack:
        n = stack.pop()
        if n.get("LabelName") in names:
            return True
        stack.extend(n.get("Subcategory", []))
    return False


def _closure(direct: Mapping[Any, list], keys: Iterable) -> dict[Any, set]:
    out: dict[Any, set] = {}
    for k in keys:
        seen, stack = set(), list(direct.get(k, ()))
        while stack:
            x = stack.pop()
            if x not in seen:
                seen.add(x)
                stack.extend(direct.get(x, ()))
        out[k] = seen
    return out


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


def evaluate_openimages(gt: str | Path | Mapping[str, Any], detections: Sequence[Mapping[str, Any]],
                        hierarchy: str | Path | Mapping, expand_detections: bool = False,
                        frequency: Frequency = None, iou_thr: float = 0.5,
                        group_of_weight: float = 1.0) -> dict[str, Any]:
    """Open Images challenge-style AP@0.5 (TF Object Detection API ``OpenImagesDetectionChallengeEvaluator``).

    gt: LVIS-format JSON/dict. Annotations may carry ``isgroupof``. Images list verified absent classes in
    ``neg_category_ids`` and may list verified present classes without boxes in ``pos_category_ids``.
    hierarchy: Open Images hierarchy JSON (LabelName = category name) or {parent_cat_id: [child ids]}.

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
    g = _GT(gt, frequency, require_frequency=False)
    name_to_cat = {c["name"]: c["id"] for c in g.data["categories"] if "name" in c}
    direct = _load_hierarchy(hierarchy, name_to_cat)
    for p, cs in direct.items():
        for c in [p, *cs]:
            if c not in g.cat_index:
                raise AnnotationError(f"hierarchy: category id {c!r} is not in {g.source}; fix: build the "
                                      f"hierarchy from the same category list")
    up: dict[int, list] = {}
    for p, cs in direct.items():
        for c in cs:
            up.setdefault(g.cat_index[c], []).append(g.cat_index[p])
    down = {g.cat_index[p]: [g.cat_index[c] for c in cs] for p, cs in direct.items()}
    K, nI = g.n_cat, g.n_img
    anc = _closure(up, range(K))
    desc = _closure(down, range(K))

    # expanded ground truth boxes, keyed by (image, class)
    gt_boxes: dict[tuple[int, int], list[int]] = {}
    pos: set[tuple[int, int]] = set()
    for j in range(len(g.ann_img)):
        i = int(g.ann_img[j])
        for c in (int(g.ann_cat[j]), *anc[int(g.ann_cat[j])]):
            gt_boxes.setdefault((i, c), []).append(j)
            pos.add((i, c))
    for key in g.pos_label_keys:
        c, i = divmod(int(key), nI)
        pos.update((i, a) for a in (c, *anc[c]))
    neg: set[tuple[int, int]] = set()
    for key in g.neg_keys:
        c, i = divmod(int(key), nI)
        neg.update((i, d) for d in (c, *desc[c]))
    verified = pos | neg

    num_gt = np.zeros(K)
    for (i, c), js in gt_boxes.items():
        grp = g.ann_group_of[js]
        num_gt[c] += np.sum(~grp) + group_of_weight * np.sum(grp)

    img, cat, score, box = _det_arrays(detections, g, "detections")
    if expand_detections and len(img):
        reps = [np.arange(len(img))]
        cats = [cat]
        for c in np.unique(cat):
            idx = np.flatnonzero(cat == c)
            for a in anc[int(c)]:
                reps.append(idx)
                cats.append(np.full(len(idx), a, np.int64))
        rep = np.concatenate(reps)
        img, cat, score, box = img[rep], np.concatenate(cats), score[rep], box[rep]
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
        sc, w = _tp_fp_open_images(score[sel[s:s + n]], xyxy[s:s + n], gxyxy[js].reshape(-1, 4),
                                   g.ann_group_of[js], iou_thr, group_of_weight)
        per_cls_scores[c].append(sc)
        per_cls_w[c].append(w)

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


# --------------------------------------------------------------------------------------------------------------
# Views: table, CSV, plot
# --------------------------------------------------------------------------------------------------------------

_SUMMARY_ORDER = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
                  "AR@300", "ARs@300", "ARm@300", "ARl@300")


def format_results(res: Mapping[str, Any]) -> str:
    """A plain-text table of a result dict (values x100; 'n/a' where a metric is undefined, i.e. -1)."""
    keys = [k for k in _SUMMARY_ORDER if k in res]
    keys += [k for k, v in res.items() if k not in keys and isinstance(v, (int, float)) and k != "per_class"
             and k != "num_classes_evaluated"]
    lines = [f"{'metric':<10} {'value':>7}", f"{'-' * 10} {'-' * 7}"]
    for k in keys:
        v = float(res[k])
        lines.append(f"{k:<10} {'n/a' if v < 0 else f'{100 * v:.2f}':>7}")
    pc = res.get("per_class") or {}
    if pc:
        n_def = sum(1 for v in pc.values() if v >= 0)
        lines.append(f"per-class AP defined for {n_def} of {len(pc)} categories (the others have no ground truth)")
    return "\n".join(lines)


def _image_counts(g: _GT, image_counts: Mapping[Any, int] | Sequence[int] | None) -> tuple[list[int], str]:
    if image_counts is not None:
        if isinstance(image_counts, Mapping):
            return [int(image_counts.get(c, 0)) for c in g.cat_ids], "given"
        return [int(x) for x in image_counts], "given"
    if all("image_count" in g.cats[c] for c in g.cat_ids):
        return [int(g.cats[c]["image_count"]) for c in g.cat_ids], "categories[].image_count"
    counts = np.zeros(g.n_cat, np.int64)
    pairs = np.unique(g.ann_cat * g.n_img + g.ann_img)
    np.add.at(counts, pairs // g.n_img, 1)
    return counts.tolist(), "images of the evaluated set"


def per_class_table(res: Mapping[str, Any], gt: str | Path | Mapping[str, Any],
                    image_counts: Mapping[Any, int] | Sequence[int] | None = None,
                    frequency: Frequency = None) -> list[dict]:
    """One row per category, most images first: rank, category_id, name, frequency, image_count, instances, AP.

    image_count is the category's `image_count` field (training images, as in LVIS), else ``image_counts``
    when given, else the number of images of `gt` containing the category. AP is -1 where undefined.
    """
    g = _GT(gt, frequency, require_frequency=False)
    counts, _ = _image_counts(g, image_counts)
    instances = np.bincount(g.ann_cat, minlength=g.n_cat)
    by_str = {str(c): c for c in g.cat_ids}  # per_class keys turn into strings after a JSON round trip
    pc = {(k if k in g.cat_index else by_str.get(str(k), k)): v for k, v in (res.get("per_class") or {}).items()}
    order = sorted(range(g.n_cat), key=lambda k: (-counts[k], g.cat_ids[k]))
    rows = []
    for rank, k in enumerate(order):
        cid = g.cat_ids[k]
        rows.append({"rank": rank, "category_id": cid, "name": g.cats[cid].get("name", str(cid)),
                     "frequency": g.frequency[k] if g.frequency else "", "image_count": counts[k],
                     "instances": int(instances[k]), "AP": float(pc.get(cid, -1.0))})
    return rows


def write_per_class_csv(res: Mapping[str, Any], gt: str | Path | Mapping[str, Any], path: str | Path,
                        image_counts: Mapping[Any, int] | Sequence[int] | None = None,
                        frequency: Frequency = None) -> Path:
    """Write per_class_table as CSV (atomically: temp file + os.replace). Returns the path."""
    rows = per_class_table(res, gt, image_counts, frequency)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["rank", "category_id", "name", "frequency", "image_count",
                                             "instances", "AP"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "AP": f"{r['AP']:.6f}" if r["AP"] >= 0 else "-1"})
    return write_bytes_atomic(path, buf.getvalue().encode())


_BUCKET_COLOURS = {"f": "#d9ead3", "c": "#fff2cc", "r": "#f4cccc"}
_BUCKET_NAMES = {"f": "frequent", "c": "common", "r": "rare"}


def plot_ap_by_frequency(runs: Mapping[str, Mapping[str, Any]], gt: str | Path | Mapping[str, Any],
                         path: str | Path, image_counts: Mapping[Any, int] | Sequence[int] | None = None,
                         frequency: Frequency = None, title: str | None = None) -> Path:
    """Per-class AP against frequency rank, several runs overlaid (the papers' Fig 4 / Fig 5 style).

    x: categories sorted by image count, most images first (see per_class_table); y: per-class AP. One line
    per run (e.g. {"baseline": res_a, "ACSL": res_b}); categories without gt are skipped. Frequent / common / rare
    regions are shaded. Uses matplotlib's Agg canvas (no display, no pyplot state); written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("plot_ap_by_frequency needs at least one run")
    base = per_class_table(next(iter(runs.values())), gt, image_counts, frequency)
    fig = Figure(figsize=(10, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    n = len(base)
    x = np.arange(n)
    freq = [r["frequency"] for r in base]
    start = 0
    labelled = set()
    for i in range(1, n + 1):  # shade each run of equal buckets
        if i == n or freq[i] != freq[start]:
            f = freq[start]
            if f in _BUCKET_COLOURS:
                ax.axvspan(start - 0.5, i - 0.5, color=_BUCKET_COLOURS[f], alpha=0.6, lw=0,
                           label=None if f in labelled else _BUCKET_NAMES[f])
                labelled.add(f)
            start = i
    for label, res in runs.items():
        rows = per_class_table(res, gt, image_counts, frequency)
        ap = np.array([r["AP"] for r in rows], float)
        ok = ap >= 0
        mean = f"AP {100 * res['AP']:.1f}" if isinstance(res.get("AP"), (int, float)) and res["AP"] >= 0 else ""
        parts = [mean] + [f"AP{b} {100 * res[f'AP{b}']:.1f}" for b in FREQ_LABELS
                          if isinstance(res.get(f"AP{b}"), (int, float)) and res[f"AP{b}"] >= 0]
        parts = [p for p in parts if p]
        ax.plot(x[ok], ap[ok], lw=1.0, marker="." if ok.sum() < 300 else None, ms=3,
                label=f"{label} ({', '.join(parts)})" if parts else str(label))
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(0, 1)
    ax.set_xlabel("categories sorted by number of training images (most first)")
    ax.set_ylabel("per-class AP")
    ax.set_title(title or "AP by frequency rank")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_bytes_atomic(path, buf.getvalue())
