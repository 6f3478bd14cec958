"""Concurrent-rate matrix r for the concurrent softmax (Peng et al., CVPR 2020, §4.1.1, eq 3 and eq 5).

The paper defines r_ij as "the probability that an object of class i is labeled as class j", estimated from the
training annotations. Here, precisely:

* **Objects.** In each image the non-crowd boxes are grouped with ``lt_models.data.datasets.group_duplicate_boxes``:
  boxes with IoU >= ``iou_thr`` (0.95) or identical coordinates are one physical object (transitively), the same
  rule ``LVISDetection`` uses to build multi-hot targets. An object's label set is the set of category ids of its
  boxes; several boxes of one category on one object count once.
* **Objects of class i** are the objects whose label set contains i (whichever box carried it), and

      r_ij = #(objects whose label set contains i and j) / #(objects whose label set contains i)     (i != j)

  i.e. the share of class-i objects that are also labelled j, or "instead" labelled j by a second annotator box on
  the same object (Open Images' confusion pairs, LVIS duplicates). r is not symmetric. Classes without objects have a
  zero row. Estimated rates below ``min_rate`` are dropped to keep r sparse.
* **Hierarchy.** Parsed and closed by ``lt_models.data.annotations`` (category names or Open Images MIDs as
  LabelName). For every pair (descendant, ancestor) of the hierarchy (leaf-parent, and every further ancestor),
  in both directions, r is set to ``hierarchy_rate``, replacing the estimate. The paper says "r_ij is set 0 when i
  is leaf node with j as its parent, and vice versa": read literally that is ``hierarchy_rate=0`` — parent and leaf
  suppress each other like any two classes (a box that carries both labels is still exempt through the (1 - y_j)
  term of eq 3). But eq 5 at inference only lets "scores of categories in a hierarchy ... not suppress each other"
  if (1 - r_ij) = 0 for those pairs, i.e. r = 1; the paper's "set 0" then refers to the (1 - r_ij) weight.
  ``hierarchy_rate=1.0`` (default) follows that second reading; both are one config value away.
* Row 0, column 0 (background) and the diagonal are 0.

Implementation: numpy over all boxes at once, with no Python loop per image, per object or per box pair.
`lt_models.data.merge.object_ids` applies ``group_duplicate_boxes``' rule (the same IoU arithmetic, so the same float
comparisons) to the pairs of boxes of an image that can merge (after a sort by x0, only boxes starting before the
earlier box's right edge), in bounded chunks, and merges them with scipy's connected components;
`lt_models.data.merge.co_label_counts` counts objects per label and co-labels per label pair by sorting (object, label)
and (label, label) keys. tests/test_concurrency_vectorised.py checks the result against the per-image
``group_duplicate_boxes`` loop.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lt_models.data.annotations import hierarchy_ancestors, load_hierarchy, name_to_cat_id
from lt_models.data.lvis_json import load_lvis_json
from lt_models.data.merge import MERGE_IOU, co_label_counts, object_ids
from lt_models.data.store import META as STORE_META
from lt_models.data.store import AnnotationStore, open_store
from lt_models.errors import AnnotationError, ConfigError


def _annotations(ann: dict | str | os.PathLike, skip_invalid: bool) -> tuple[dict, str]:
    if isinstance(ann, (str, os.PathLike)):
        return load_lvis_json(ann, skip_invalid=skip_invalid), str(ann)
    if (
        not isinstance(ann, dict)
        or not isinstance(ann.get("categories"), list)
        or not isinstance(ann.get("annotations"), list)
    ):
        raise AnnotationError(
            "concurrent_rate_matrix: annotations must be an LVIS/COCO dict (or a path to one) "
            "with 'categories' and 'annotations' lists"
        )
    return ann, "<annotations dict>"


def _hierarchy_dict(hierarchy, data: dict, source: str, cat_ids: set[int]) -> dict[int, list[int]]:
    if isinstance(hierarchy, (str, os.PathLike)):
        return load_hierarchy(Path(hierarchy), name_to_cat_id(data["categories"]))
    if not isinstance(hierarchy, dict):
        raise ConfigError(
            f"hierarchy must be a dict parent category id -> [child category ids] or a path to an "
            f"Open Images hierarchy JSON, got {type(hierarchy).__name__}"
        )
    for parent, children in hierarchy.items():
        if not isinstance(children, (list, tuple, set)):
            raise ConfigError(f"hierarchy[{parent!r}] must be a list of child category ids")
        for cid in (parent, *children):
            if isinstance(cid, bool) or not isinstance(cid, (int, np.integer)) or int(cid) not in cat_ids:
                raise ConfigError(
                    f"hierarchy mentions category id {cid!r} (parent {parent!r}), which is not a "
                    f"category of {source}; use the dataset's integer category ids"
                )
    return {int(p): [int(c) for c in cs] for p, cs in hierarchy.items()}


def _box_table(data: dict, label: dict, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-crowd boxes as arrays: (image index int64 [n], contiguous label int64 [n], xyxy float64 [n, 4])."""
    anns = [a for a in data["annotations"] if not a.get("iscrowd", 0)]
    labels = np.fromiter((label.get(a.get("category_id"), 0) for a in anns), dtype=np.int64, count=len(anns))
    if (labels == 0).any():
        a = anns[int(np.argmax(labels == 0))]
        raise AnnotationError(
            f"{source}: annotation id {a.get('id')!r} has category_id "
            f"{a.get('category_id')!r}, which is not in 'categories'; fix the file"
        )
    image_index: dict = {}
    images = np.fromiter(
        (image_index.setdefault(a["image_id"], len(image_index)) for a in anns), dtype=np.int64, count=len(anns)
    )
    xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    return images, labels, np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def _store_objects(store: AnnotationStore, cat_ids: np.ndarray, iou_thr: float) -> tuple[np.ndarray, np.ndarray]:
    """(object id, contiguous label) of every non-crowd box of a store: its merged objects when they were merged at
    ``iou_thr``, else merged again from its box columns."""
    keep = np.asarray(store["ann_iscrowd"]) == 0
    labels = np.searchsorted(cat_ids, np.asarray(store["ann_cat"])[keep]) + 1
    if store.meta.get("options", {}).get("iou_thr") == iou_thr:
        return np.asarray(store["ann_object"])[keep], labels
    xywh = np.asarray(store["ann_bbox"])[keep]
    return object_ids(
        np.asarray(store["ann_image"])[keep], np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1), iou_thr
    ), labels


def concurrent_rate_matrix(
    ann: dict | str | os.PathLike | AnnotationStore,
    hierarchy: dict | str | os.PathLike | None = None,
    hierarchy_rate: float = 1.0,
    min_rate: float = 0.0,
    iou_thr: float = MERGE_IOU,
    sparse: bool = False,
    *,
    skip_invalid: bool = False,
) -> torch.Tensor:
    """r [K, K] (float32, K = C + 1 in sorted-category-id order, column 0 = background); see the module docstring.

    ``ann``: LVIS/COCO training annotations, a dict or a JSON path (read with ``load_lvis_json``; ``skip_invalid``
    as there), or an annotation store (`lt_models.data.store`, opened or its directory): its merged objects are
    used. ``hierarchy``: {parent category id: [child category ids]} (``LVISDetection.hierarchy``) or an Open Images
    hierarchy JSON path (``load_hierarchy``). ``hierarchy_rate``: r for every descendant/ancestor pair, both
    directions (1.0 = no suppression inside a hierarchy, 0.0 = the paper's literal text). ``min_rate``: drop
    estimated rates below it. ``sparse=True`` returns a coalesced sparse COO tensor (``ConcurrentSoftmaxLoss``
    takes either).
    """
    for name, value, low, high in (
        ("hierarchy_rate", hierarchy_rate, 0.0, 1.0),
        ("min_rate", min_rate, 0.0, 1.0),
        ("iou_thr", iou_thr, 0.0, 1.0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
            raise ConfigError(f"concurrent_rate_matrix: {name} = {value!r} must be a number in [{low}, {high}]")
    if isinstance(ann, AnnotationStore) or (isinstance(ann, (str, os.PathLike)) and (Path(ann) / STORE_META).is_file()):
        store = ann if isinstance(ann, AnnotationStore) else open_store(ann)
        data, source = {"categories": store.categories}, str(store.path)
    else:
        data, source = _annotations(ann, skip_invalid)
    cat_ids = sorted(int(c["id"]) for c in data["categories"])
    label = {cid: i + 1 for i, cid in enumerate(cat_ids)}
    k = len(cat_ids) + 1
    if "annotations" in data:
        images, labels, xyxy = _box_table(data, label, source)
        obj = object_ids(images, xyxy, iou_thr)
    else:
        obj, labels = _store_objects(store, np.asarray(cat_ids), iou_thr)
    objects, rows, cols, both = co_label_counts(obj, labels, k)
    estimate = both / objects[rows]  # share of class-i objects also labelled j
    keep = estimate >= min_rate
    rates: dict[tuple[int, int], float] = dict(
        zip(zip(rows[keep].tolist(), cols[keep].tolist()), estimate[keep].tolist())
    )
    if hierarchy is not None:
        tree = _hierarchy_dict(hierarchy, data, source, set(cat_ids))
        for cid, ancestors in hierarchy_ancestors(tree).items():
            if cid in ancestors:
                raise ConfigError(
                    f"hierarchy has a cycle through category id {cid}; a category cannot be its own ancestor"
                )
            for anc in ancestors:
                for pair in ((label[cid], label[anc]), (label[anc], label[cid])):
                    rates[pair] = float(hierarchy_rate)
    rates = {ij: r for ij, r in rates.items() if r > 0 and ij[0] != ij[1]}

    index = torch.tensor(sorted(rates), dtype=torch.int64).reshape(-1, 2).t()
    values = torch.tensor([rates[ij] for ij in sorted(rates)], dtype=torch.float32)
    if sparse:
        return torch.sparse_coo_tensor(index, values, (k, k), check_invariants=True).coalesce()
    out = torch.zeros(k, k, dtype=torch.float32)
    out[index[0], index[1]] = values
    return out
