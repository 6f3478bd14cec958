"""The merge rule for duplicate boxes, written once: which boxes of one image are one physical object.

Boxes of one image whose IoU is >= ``MERGE_IOU`` (0.95), or that are identical, are one object carrying several labels
(the concurrent-softmax paper's explicit multi-label case, Peng et al. CVPR 2020, §3); grouping is transitive.
`group_duplicate_boxes` states the rule for one image; `object_ids` applies it to all boxes of a dataset at once
(numpy, no Python loop per image, per object or per box pair) and gives the same partition
(tests/test_concurrency_vectorised.py). `co_label_counts` counts objects per label and co-labels per label pair.

numpy and scipy only.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

MERGE_IOU = 0.95
PAIR_CHUNK = 1 << 21  # box pairs compared per numpy step (bounds memory: ~50 bytes per pair and array)


def box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes in xyxy format, [n,4] x [m,4] -> [n,m] (float64)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def group_duplicate_boxes(boxes_xyxy: np.ndarray, iou_thr: float = MERGE_IOU) -> np.ndarray:
    """Group ids (0..g-1, numbered by first appearance) for the boxes of ONE image.

    Two boxes are the same object when IoU >= iou_thr or they are identical; grouping is transitive
    (union-find over that relation), so a leaf + parent + second leaf annotated on one object form one group.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if n > 1:
        iou = box_iou_xyxy(boxes, boxes)
        same = (iou >= iou_thr) | np.all(boxes[:, None, :] == boxes[None, :, :], axis=-1)
        ii, jj = np.nonzero(np.triu(same, k=1))
        for i, j in zip(ii.tolist(), jj.tolist()):
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    _, first = np.unique(roots, return_index=True)
    order = {int(roots[f]): k for k, f in enumerate(sorted(first))}
    return np.array([order[int(r)] for r in roots], dtype=np.int64)


def object_ids(images: np.ndarray, xyxy: np.ndarray, iou_thr: float) -> np.ndarray:
    """Object id of every box: the connected components of "same image and (IoU >= iou_thr or identical)".

    The partition ``group_duplicate_boxes`` makes image by image, for all images at once. Boxes are sorted by
    (image, x0); with iou_thr > 0 two boxes can only be the same object when the later one starts at or before the
    right edge of the earlier one (else their intersection is empty and they are not identical), so each box is
    compared with that window of its image only (every later box of its image when iou_thr = 0), PAIR_CHUNK pairs at
    a time. The IoU is the arithmetic of ``box_iou_xyxy`` pair by pair, so each comparison gives
    the same result.
    """
    n = len(images)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((xyxy[:, 0], images))
    boxes, image = xyxy[order], images[order]
    starts = np.flatnonzero(np.r_[True, image[1:] != image[:-1]])
    sizes = np.diff(np.r_[starts, n])
    end = np.repeat(starts + sizes, sizes)  # one past the last box of each box's image
    if iou_thr > 0:
        # (image, x) as one exact, sorted integer key: image index * (2n) + rank of x among all x0 and right edges
        right = np.maximum(boxes[:, 0], boxes[:, 2])
        _, rank = np.unique(np.concatenate([boxes[:, 0], right]), return_inverse=True)
        key = image * (2 * n) + rank[:n]
        end = np.searchsorted(key, image * (2 * n) + rank[n:], side="right")
    partners = end - np.arange(n) - 1  # later boxes in each box's window
    first_pair = np.r_[0, np.cumsum(partners)]  # pairs of boxes < k, for each k
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    bounds = np.unique(np.r_[np.searchsorted(first_pair, np.arange(0, first_pair[-1], PAIR_CHUNK), "right") - 1, n])
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        count = partners[lo:hi]
        k = np.repeat(np.arange(lo, hi), count)
        m = k + 1 + np.arange(len(k)) - np.repeat(first_pair[lo:hi] - first_pair[lo], count)
        a, b = boxes[k], boxes[m]
        wh = np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0, None)
        inter = wh[:, 0] * wh[:, 1]
        union = area[k] + area[m] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        same = (iou >= iou_thr) | np.all(a == b, axis=1)
        src.append(k[same])
        dst.append(m[same])
    edges = (np.concatenate(src), np.concatenate(dst)) if src else (np.zeros(0, np.int64),) * 2
    graph = coo_matrix((np.ones(len(edges[0]), dtype=np.int8), edges), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    out = np.empty(n, dtype=np.int64)
    out[order] = component
    return out


def runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of each run of equal values in a sorted array."""
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]]) if len(values) else np.zeros(0, np.int64)
    return starts, np.diff(np.r_[starts, len(values)])


def co_label_counts(
    objects: np.ndarray, labels: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(objects per label int64 [k]; and i, j, count for every ordered pair i != j of labels sharing objects).

    Sorting and runs of equal keys rather than ``np.unique``, whose hashing is several times slower here.
    """
    keys = np.sort(objects * k + labels)
    keys = keys[runs(keys)[0]]  # each (object, label) once, sorted by object
    obj, lab = keys // k, keys % k
    per_label = np.bincount(lab, minlength=k).astype(np.int64)
    starts, sizes = runs(obj)
    entry = np.flatnonzero(np.repeat(sizes > 1, sizes))  # (object, label) entries of multi-label objects
    size = np.repeat(sizes, sizes)[entry]  # per entry: its object's label count
    first = np.repeat(starts, sizes)[entry]  # per entry: its object's first entry
    left = np.repeat(entry, size)  # each entry with every entry of its object ...
    right = np.repeat(first, size) + np.arange(len(left)) - np.repeat(np.cumsum(size) - size, size)
    keep = left != right  # ... but itself
    pairs = np.sort(lab[left[keep]] * k + lab[right[keep]])
    starts, counts = runs(pairs)
    pairs = pairs[starts]
    return per_label, pairs // k, pairs % k, counts


def merged_objects(
    data: dict, ancestors: dict[int, set[int]], expand_parents: bool, iou_thr: float = MERGE_IOU
) -> dict[int, list[tuple[list[float], int, list[int]]]]:
    """image id -> [(box xywh, primary category id, sorted category ids of the object)] (crowd boxes dropped).

    The per-image statement of the dataset's rules (one Python loop per image; `lt_models.data.stats` and the
    tests use it): objects by `group_duplicate_boxes`, numbered by their smallest annotation id; the primary label
    is the most specific one (labels that are an ancestor of another label of the object are dropped), then the
    smallest annotation id. `lt_models.data.store_columns.derive_arrays` computes the same for all images at once."""
    by_img: dict[int, list[dict]] = defaultdict(list)
    for a in data["annotations"]:
        if not a.get("iscrowd", 0):
            by_img[a["image_id"]].append(a)
    out: dict[int, list] = {}
    for iid, anns in by_img.items():
        anns.sort(key=lambda a: a["id"])
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        groups = group_duplicate_boxes(xyxy, iou_thr)
        objs = []
        for g in range(int(groups.max()) + 1 if len(groups) else 0):
            members = [anns[i] for i in np.nonzero(groups == g)[0]]  # ascending annotation id
            cats = {a["category_id"] for a in members}
            # most specific: drop labels that are an ancestor of another label of the object
            specific = [a for a in members if not any(a["category_id"] in ancestors.get(c, ()) for c in cats)]
            primary = specific[0]
            labels = set(cats)
            if expand_parents:
                for c in cats:
                    labels |= ancestors.get(c, set())
            objs.append((list(primary["bbox"]), int(primary["category_id"]), sorted(labels)))
        out[iid] = objs
    return out
