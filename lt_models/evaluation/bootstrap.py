"""LVIS AP under image weights: the bootstrap over validation images, from the matched detections.

A bootstrap replicate draws the validation images with replacement: image i appears w_i times (w ~ Multinomial(I,
1/I)). The AP of the replicate is the AP lvis-api would compute on that resampled set, and it follows from the
matching (``lt_models.evaluation.matches.Matches``) alone: per category and IoU threshold t, walking the detections
in score order, the true positives so far count sum(w of their images), the false positives likewise, and the
number of ground-truth boxes is sum_i w_i n_gt(c, i). ``weighted_ap`` computes that for R weight vectors at once
(``weights`` [I, R]); with all weights 1 it is ``evaluate_lvis``'s AP to the last bit of float64 but for sums in
another order.

How it stays fast (1000 replicates of an LVIS v1 val-sized evaluation in a minute on 2 cores): the interpolated
precision at each recall point is reached at a true positive, so only the TP "events" are materialised (at most
n_gt per category and threshold), as in the evaluator. Detections that are FP at every threshold ("base" FPs) only
enter through the number of them above each event: a sparse matrix (events x images) of base FP counts between
consecutive candidate events, times the weights, gives them for all replicates in one product. Base FPs after a
category's last candidate event never matter and are dropped.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from lt_models.atomic import write_bytes_atomic
from lt_models.evaluation.lvis import IOU_THRS, REC_THRS
from lt_models.evaluation.matches import Matches

BUCKET_KEYS = {"APr": "r", "APc": "c", "APf": "f"}
_T = len(IOU_THRS)
_ALL_T = np.uint16((1 << _T) - 1)
_EPS = np.spacing(1)


def image_weights(n_images: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """[I, R] bootstrap weights: how often each image appears in each replicate (a multinomial draw of I images)."""
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=replicates).T.astype(np.float64)


class _Prepared:
    """The parts of ``Matches`` that do not depend on the weights, built once per evaluation."""

    def __init__(self, m: Matches):
        K, I = m.n_categories, m.n_images
        self.m = m
        self.K = K
        base = m.fp == _ALL_T
        cand = ~base  # a TP at some threshold, or an FP at some and ignored at others
        last = np.full(K, -1, np.int64)  # position of each category's last candidate
        cpos = np.flatnonzero(cand)
        last[m.det_cat[cpos]] = cpos  # positions ascend, so the last write per category wins
        keep_base = base & (np.arange(len(base)) < last[m.det_cat])
        # each kept base FP belongs to the next candidate of its category (the segment it precedes)
        nxt = np.searchsorted(cpos, np.flatnonzero(keep_base), side="left")
        self.cand_img = m.det_img[cpos]
        self.cand_cat = m.det_cat[cpos].astype(np.int64)
        self.tp = m.tp[cpos]
        self.fp = m.fp[cpos]
        bi = np.flatnonzero(keep_base)
        self.base = sparse.csr_matrix((np.ones(len(bi)), (nxt, m.det_img[bi])), shape=(len(cpos), I), dtype=np.float64)
        self.gt = sparse.csr_matrix((m.gt_n.astype(np.float64), (m.gt_cat, m.gt_img)), shape=(K, I))
        self.cand_starts = _segment_starts(self.cand_cat)
        self.plans = [_plan(self, np.uint16(1 << t)) for t in range(_T)]
        self.buckets = {key: m.frequency == f for key, f in BUCKET_KEYS.items()}


class _Plan:
    """What one IoU threshold needs, independent of the weights: its TP events (rows of the candidates), their
    categories and category starts, the suffix-max offsets, and the candidates ignored at it."""

    def __init__(self, rows, cat, starts, offset, ignored):
        self.rows, self.cat, self.starts, self.offset, self.ignored = rows, cat, starts, offset, ignored


def _plan(p: _Prepared, bit: np.uint16) -> _Plan:
    rows = np.flatnonzero((p.tp & bit) != 0)
    cat = p.cand_cat[rows]
    offset = (cat[-1] - cat) * 2.0 if len(cat) else np.zeros(0)  # later categories get smaller offsets
    i_rows = np.flatnonzero(((p.tp | p.fp) & bit) == 0)  # matched to an ignored box at this threshold
    ignored = None
    if len(i_rows) and len(rows):
        last = np.searchsorted(i_rows, rows, side="right") - 1  # the last ignored candidate above each event
        last0 = np.maximum(last, 0)
        same = (last >= 0) & (p.cand_cat[i_rows[last0]] == cat)
        ignored = (i_rows, _segment_starts(p.cand_cat[i_rows]), last0, same)
    return _Plan(rows, cat, _segment_starts(cat), offset, ignored)


def _segmented_cumsum(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cumulative sums along axis 1 that restart at every segment (``starts``: the first column of each segment,
    ascending, starting with 0)."""
    c = np.cumsum(x, axis=1)
    if len(starts) > 1:
        before = np.concatenate([np.zeros((x.shape[0], 1)), c[:, starts[1:] - 1]], axis=1)
        c -= np.repeat(before, np.diff(np.r_[starts, x.shape[1]]), axis=1)
    return c


def _segment_starts(seg: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]]) if len(seg) else np.zeros(0, np.int64)


def _segmented_suffix_max(v: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """out[:, j] = max(v[:, j:end of j's segment]) for values in [0, 1]; ``offset``: 2 x (last segment id - the
    column's), so that the reversed running max resets at every segment."""
    v += offset
    run = np.maximum.accumulate(v[:, ::-1], axis=1)[:, ::-1]
    run -= offset
    return run


def _class_ap(p: _Prepared, wt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(AP per category summed over thresholds [R, K], AP per category at IoU 0.5 [R, K], ground-truth boxes per
    category [R, K]) under the weights ``wt`` [R, I] (row r: replicate r)."""
    R = wt.shape[0]
    npos = np.asarray(p.gt @ wt.T).T  # [R, K]
    ap = np.zeros((R, p.K))
    ap50 = np.zeros((R, p.K))
    if len(p.cand_cat) == 0:
        return ap, ap50, npos
    wc = wt[:, p.cand_img]  # [R, M]
    # every detection at or above each candidate in its category (base FPs and candidates of any status)
    above = _segmented_cumsum(np.asarray(p.base @ wt.T).T + wc, p.cand_starts)
    for t, plan in enumerate(p.plans):
        if len(plan.rows) == 0:
            continue
        cat, starts = plan.cat, plan.starts
        tps = _segmented_cumsum(np.take(wc, plan.rows, axis=1), starts)
        seen = np.take(above, plan.rows, axis=1)  # = TP + FP at t, once the ignored ones are taken out
        if plan.ignored is not None:
            seen -= _ignored_before(wc, plan.ignored)
        seen += _EPS  # lvis-api: tp / (fp + tp + eps)
        prec = _segmented_suffix_max(tps / seen, plan.offset)  # 0 before the first weighted TP
        # a category without weighted ground truth has no weighted TP either: its recall is 0 (and it is left out)
        rc = tps / np.maximum(np.take(npos, cat, axis=1), 1e-300)
        below = _thresholds_reached(rc)
        gain = np.diff(below, axis=1, prepend=0)  # recall points first reached at each event
        gain[:, starts] = below[:, starts]
        ap_t = np.add.reduceat(prec * gain, starts, axis=1) / len(REC_THRS)
        ap[:, cat[starts]] += ap_t
        if t == 0:
            ap50[:, cat[starts]] = ap_t
    return ap, ap50, npos


_THR = np.append(REC_THRS, np.inf)


def _thresholds_reached(rc: np.ndarray) -> np.ndarray:
    """How many recall points are <= each recall (``searchsorted(REC_THRS, rc, "right")``, by arithmetic: the
    points are about k/100, and the two candidates next to floor(100 rc) settle the float rounding)."""
    k = np.minimum((rc * 100.0).astype(np.int64), 100)
    return k + (_THR[k] <= rc) + (_THR[k + 1] <= rc)


def _ignored_before(wc: np.ndarray, ignored) -> np.ndarray:
    """Weighted candidates ignored at the threshold (matched to an ignored box) ranked above each TP event of its
    category [R, events] (``ignored``: the plan's ignored rows, their category starts and, per event, the last
    ignored row above it and whether it is of the same category)."""
    i_rows, i_starts, last0, same = ignored
    i_cum = _segmented_cumsum(wc[:, i_rows], i_starts)
    return np.where(same, i_cum[:, last0], 0.0)


def weighted_ap(m: Matches, weights: np.ndarray, batch: int | None = None, threads: int = 2) -> dict[str, np.ndarray]:
    """AP, AP50, APr, APc and APf [R] of the evaluation ``m`` with image weights [I, R] (column r: replicate r).

    A category counts in a replicate when it has ground truth there (as in LVIS: no box, no AP); a mean over no
    category is NaN (LVIS's -1). ``batch``: replicates computed together (default: as many as keep an array near
    2^17 values: one row at LVIS size, the fastest measured there, and hundreds on small sets, where per-call
    overhead would dominate); ``threads``: batches computed at once (numpy releases the GIL in the array work)."""
    p = _Prepared(m)
    batch = batch or int(np.clip((1 << 17) // max(len(p.cand_cat), 1), 1, 256))
    wt = np.ascontiguousarray(weights.T)
    out = {key: np.empty(wt.shape[0]) for key in ("AP", "AP50", *BUCKET_KEYS)}

    def one(r0: int) -> None:
        ap, ap50, npos = _class_ap(p, wt[r0 : r0 + batch])
        ap /= _T
        has = npos > 0
        for key in out:
            sel = has if key in ("AP", "AP50") else has & p.buckets[key][None, :]
            values = ap50 if key == "AP50" else ap
            n = sel.sum(1)
            with np.errstate(invalid="ignore"):
                out[key][r0 : r0 + len(n)] = np.where(n > 0, (values * sel).sum(1) / np.maximum(n, 1), np.nan)

    with ThreadPoolExecutor(max_workers=threads) as pool:  # numpy releases the GIL in the array work
        list(pool.map(one, range(0, wt.shape[0], batch)))
    return out


REPLICATES_FILE = "replicates.npz"
BOOTSTRAP_SEED = 0  # every run's replicates draw the same images: comparisons between runs are paired


def replicate_weights(n_images: int, replicates: int, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """The image weights [I, R] of the product's bootstrap: the same for every run evaluated on the same images."""
    return image_weights(n_images, replicates, np.random.default_rng(seed))


def save_replicates(path, m: Matches, replicates: int, seed: int = BOOTSTRAP_SEED, threads: int = 2) -> None:
    """Write AP, AP50, APr, APc and APf of ``replicates`` bootstrap draws of the images (``replicate_weights``) as .npz,
    atomically, with the draw's seed and the number of images."""
    reps = weighted_ap(m, replicate_weights(m.n_images, replicates, seed), threads=threads)
    buf = io.BytesIO()
    arrays: dict[str, Any] = {"seed": np.int64(seed), "n_images": np.int64(m.n_images), **reps}
    np.savez(buf, **arrays)
    write_bytes_atomic(Path(path), buf.getvalue())


def read_replicates(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of a replicates file's bytes: AP, APr, APc, APf [R], seed, n_images."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
