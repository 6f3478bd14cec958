"""LVIS/COCO-format annotations -> torch Dataset with multi-hot targets.

Boxes of one image whose IoU is >= 0.95 (or that are identical) are one physical object carrying several
labels (the concurrent-softmax paper's explicit multi-label case, §3). `group_duplicate_boxes` is the single
place that decides which boxes merge; the dataset and `lt_models.concurrency` both use it.
"""
from __future__ import annotations

import numpy as np

MERGE_IOU = 0.95


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
