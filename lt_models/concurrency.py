"""Concurrent-rate matrix r for the concurrent softmax (Peng et al., CVPR 2020, §4.1.1, eq 3 and eq 5).

The paper defines r_ij as "the probability that an object of class i is labeled as class j", estimated from the
training annotations. Here, precisely:

* **Objects.** In each image the non-crowd boxes are grouped with ``lt_models.datasets.group_duplicate_boxes``:
  boxes with IoU >= ``iou_thr`` (0.95) or identical coordinates are one physical object (transitively), the same
  rule ``LVISDetection`` uses to build multi-hot targets. An object's label set is the set of category ids of its
  boxes; several boxes of one category on one object count once.
* **Objects of class i** are the objects whose label set contains i (whichever box carried it), and

      r_ij = #(objects whose label set contains i and j) / #(objects whose label set contains i)     (i != j)

  i.e. the share of class-i objects that are also labelled j, or "instead" labelled j by a second annotator box on
  the same object (Open Images' confusion pairs, LVIS duplicates). r is not symmetric. Classes without objects have a
  zero row. Estimated rates below ``min_rate`` are dropped to keep r sparse.
* **Hierarchy.** Parsed and closed by ``lt_models.annotations`` (category names or Open Images MIDs as
  LabelName). For every pair (descendant, ancestor) of the hierarchy (leaf-parent, and every further ancestor),
  in both directions, r is set to ``hierarchy_rate``, replacing the estimate. The paper says "r_ij is set 0 when i
  is leaf node with j as its parent, and vice versa": read literally that is ``hierarchy_rate=0`` — parent and leaf
  suppress each other like any two classes (a box that carries both labels is still exempt through the (1 - y_j)
  term of eq 3). But eq 5 at inference only lets "scores of categories in a hierarchy ... not suppress each other"
  if (1 - r_ij) = 0 for those pairs, i.e. r = 1; the paper's "set 0" then refers to the (1 - r_ij) weight.
  ``hierarchy_rate=1.0`` (default) follows that second reading; both are one config value away.
* Row 0, column 0 (background) and the diagonal are 0.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from itertools import permutations
from pathlib import Path

import numpy as np
import torch

from lt_models.annotations import hierarchy_ancestors, load_hierarchy, name_to_cat_id
from lt_models.datasets import MERGE_IOU, group_duplicate_boxes, load_lvis_json
from lt_models.errors import AnnotationError, ConfigError


def _annotations(ann: dict | str | os.PathLike, skip_invalid: bool) -> tuple[dict, str]:
    if isinstance(ann, (str, os.PathLike)):
        return load_lvis_json(ann, skip_invalid=skip_invalid), str(ann)
    if not isinstance(ann, dict) or not isinstance(ann.get("categories"), list) \
            or not isinstance(ann.get("annotations"), list):
        raise AnnotationError("concurrent_rate_matrix: annotations must be an LVIS/COCO dict (or a path to one) "
                              "with 'categories' and 'annotations' lists")
    return ann, "<annotations dict>"


def _hierarchy_dict(hierarchy, data: dict, source: str, cat_ids: set[int]) -> dict[int, list[int]]:
    if isinstance(hierarchy, (str, os.PathLike)):
        return load_hierarchy(Path(hierarchy), name_to_cat_id(data["categories"]))
    if not isinstance(hierarchy, dict):
        raise ConfigError(f"hierarchy must be a dict parent category id -> [child category ids] or a path to an "
                          f"Open Images hierarchy JSON, got {type(hierarchy).__name__}")
    for parent, children in hierarchy.items():
        if not isinstance(children, (list, tuple, set)):
            raise ConfigError(f"hierarchy[{parent!r}] must be a list of child category ids")
        for cid in (parent, *children):
            if isinstance(cid, bool) or not isinstance(cid, (int, np.integer)) or int(cid) not in cat_ids:
                raise ConfigError(f"hierarchy mentions category id {cid!r} (parent {parent!r}), which is not a "
                                  f"category of {source}; use the dataset's integer category ids")
    return {int(p): [int(c) for c in cs] for p, cs in hierarchy.items()}


def concurrent_rate_matrix(ann: dict | str | os.PathLike, hierarchy: dict | str | os.PathLike | None = None,
                           hierarchy_rate: float = 1.0, min_rate: float = 0.0, iou_thr: float = MERGE_IOU,
                           sparse: bool = False, *, skip_invalid: bool = False) -> torch.Tensor:
    """r [K, K] (float32, K = C + 1 in sorted-category-id order, column 0 = background); see the module docstring.

    ``ann``: LVIS/COCO training annotations, a dict or a JSON path (read with ``load_lvis_json``; ``skip_invalid``
    as there). ``hierarchy``: {parent category id: [child category ids]} (``LVISDetection.hierarchy``) or an
    Open Images hierarchy JSON path (``load_hierarchy``). ``hierarchy_rate``: r for every descendant/ancestor pair,
    both directions (1.0 = no suppression inside a hierarchy, 0.0 = the paper's literal text). ``min_rate``: drop
    estimated rates below it. ``sparse=True`` returns a coalesced sparse COO tensor (``ConcurrentSoftmaxLoss``
    takes either).
    """
    for name, value, low, high in (("hierarchy_rate", hierarchy_rate, 0.0, 1.0), ("min_rate", min_rate, 0.0, 1.0),
                                   ("iou_thr", iou_thr, 0.0, 1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
            raise ConfigError(f"concurrent_rate_matrix: {name} = {value!r} must be a number in [{low}, {high}]")
    data, source = _annotations(ann, skip_invalid)
    cat_ids = sorted(int(c["id"]) for c in data["categories"])
    label = {cid: i + 1 for i, cid in enumerate(cat_ids)}
    k = len(cat_ids) + 1

    boxes_by_image: dict = defaultdict(list)
    for a in data["annotations"]:
        if a.get("iscrowd", 0):
            continue
        if a.get("category_id") not in label:
            raise AnnotationError(f"{source}: annotation id {a.get('id')!r} has category_id "
                                  f"{a.get('category_id')!r}, which is not in 'categories'; fix the file")
        boxes_by_image[a["image_id"]].append(a)

    objects = np.zeros(k, dtype=np.int64)  # objects whose label set contains i
    both: Counter = Counter()  # objects whose label set contains i and j
    for anns in boxes_by_image.values():
        anns.sort(key=lambda a: a.get("id", 0))
        xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        groups = group_duplicate_boxes(xyxy, iou_thr)
        label_sets: dict[int, set[int]] = defaultdict(set)
        for g, a in zip(groups.tolist(), anns):
            label_sets[g].add(label[a["category_id"]])
        for labels in label_sets.values():
            objects[list(labels)] += 1
            if len(labels) > 1:
                both.update(permutations(sorted(labels), 2))

    rates: dict[tuple[int, int], float] = {}
    for (i, j), n in both.items():
        r = n / objects[i]
        if r >= min_rate:
            rates[(i, j)] = r
    if hierarchy is not None:
        tree = _hierarchy_dict(hierarchy, data, source, set(cat_ids))
        for cid, ancestors in hierarchy_ancestors(tree).items():
            if cid in ancestors:
                raise ConfigError(f"hierarchy has a cycle through category id {cid}; a category cannot be its own "
                                  "ancestor")
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
