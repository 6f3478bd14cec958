"""The arrays of an annotation store: a validated annotation set as flat numpy columns, and the merged objects.

Two parts, both plain numpy (no Python loop per image, object or box except where noted):

* **Raw columns** (`raw_columns_from_lvis`, or `lt_models.data.openimages.streaming` straight from the Open Images
  CSVs): what an LVIS-format file says, one array per field. Images in file order: ``image_id``, ``width``, ``height``,
  file names (``name_offsets`` int64 [n+1] into the UTF-8 ``name_bytes``), the federated lists as CSR
  (``neg_indptr``/``neg_ids``, ``notex_indptr``/``notex_ids``, ``pos_indptr``/``pos_ids``: category ids).
  Annotations: ``ann_id``, ``ann_image`` (row in the image table), ``ann_cat`` (category id), ``ann_bbox``
  (float64 xywh, clipped as `lt_models.data.datasets.load_lvis_json` clips it), ``ann_area``, ``ann_iscrowd``,
  ``ann_isgroupof``. Categories stay JSON (in the store's meta).
* **Derived arrays** (`derive_arrays`), the dataset's view of them with one choice of hierarchy, parent expansion
  and merge IoU: the objects of `lt_models.data.merge` (``ann_object``: object of each non-crowd annotation, -1 for
  crowd), ``obj_indptr`` (objects of each image, [n_img+1]), ``obj_box`` (float32 xyxy of the object's primary
  annotation), ``obj_primary`` (contiguous label), ``pair_indptr``/``pair_label`` (the object's labels, contiguous,
  sorted, with the hierarchy's ancestors when expanding), ``label_indptr``/``label_ids`` (0-based classes present
  in each image, the samplers' CSR) and ``cat_image_count`` (training images per category before merging, the
  source of the r/c/f buckets).

The rules are those of `lt_models.data.datasets` (merged objects, most specific primary label, smallest annotation id);
tests/test_store.py checks the arrays against the per-image implementation (`lt_models.data.merge.merged_objects`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lt_models.data.annotations import COMMON_MAX, RARE_MAX, category_frequencies, hierarchy_ancestors
from lt_models.data.merge import MERGE_IOU, object_ids, runs

RAW_ARRAYS = (
    "image_id",
    "width",
    "height",
    "name_offsets",
    "name_bytes",
    "neg_indptr",
    "neg_ids",
    "notex_indptr",
    "notex_ids",
    "pos_indptr",
    "pos_ids",
    "ann_id",
    "ann_image",
    "ann_cat",
    "ann_bbox",
    "ann_area",
    "ann_iscrowd",
    "ann_isgroupof",
)
DERIVED_ARRAYS = (
    "ann_object",
    "obj_indptr",
    "obj_box",
    "obj_primary",
    "pair_indptr",
    "pair_label",
    "label_indptr",
    "label_ids",
    "cat_image_count",
)


def dataset_options(
    image_dir: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    expand_parents: bool = False,
    hierarchy_file: str | os.PathLike | None = None,
    rare_max: int = RARE_MAX,
    common_max: int = COMMON_MAX,
) -> dict[str, Any]:
    """The options a store's arrays depend on, as its meta records them (``options``) and its key covers: the image
    folder (resolved) and skip_invalid (which records survive validation), the parent expansion, the merge IoU, the
    bucket thresholds and the hierarchy file's sha256."""
    return {
        "image_dir": None if image_dir is None else str(Path(image_dir).resolve()),
        "skip_invalid": skip_invalid,
        "expand_parents": expand_parents,
        "iou_thr": MERGE_IOU,
        "rare_max": rare_max,
        "common_max": common_max,
        "hierarchy": None if hierarchy_file is None else hashlib.sha256(Path(hierarchy_file).read_bytes()).hexdigest(),
    }


def csr(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(indptr int64 [n+1], values int64) of a list of integer lists."""
    sizes = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    values = np.fromiter((v for x in lists for v in x), dtype=np.int64, count=int(sizes.sum()))
    return np.r_[0, np.cumsum(sizes)].astype(np.int64), values


def encode_names(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [n+1], UTF-8 bytes uint8) of a list of strings."""
    encoded = [n.encode() for n in names]
    offsets = np.r_[0, np.cumsum([len(b) for b in encoded], dtype=np.int64)].astype(np.int64)
    return offsets, np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()


def raw_columns_from_lvis(data: dict) -> tuple[dict[str, np.ndarray], list[dict], dict[str, Any]]:
    """(raw arrays, categories sorted by id, extra top-level fields) of a file `load_lvis_json` validated (which
    resolved each image's path into `file_name`)."""
    images = data["images"]
    anns = data["annotations"]
    row = {img["id"]: k for k, img in enumerate(images)}
    arrays: dict[str, np.ndarray] = {
        "image_id": np.fromiter((img["id"] for img in images), dtype=np.int64, count=len(images)),
        "width": np.fromiter((img["width"] for img in images), dtype=np.float64, count=len(images)),
        "height": np.fromiter((img["height"] for img in images), dtype=np.float64, count=len(images)),
    }
    arrays["name_offsets"], arrays["name_bytes"] = encode_names([str(img.get("file_name") or "") for img in images])
    for short, field in (
        ("neg", "neg_category_ids"),
        ("notex", "not_exhaustive_category_ids"),
        ("pos", "pos_category_ids"),
    ):
        arrays[f"{short}_indptr"], arrays[f"{short}_ids"] = csr([img.get(field) or [] for img in images])
    n = len(anns)
    arrays.update(
        ann_id=np.fromiter((a["id"] for a in anns), dtype=np.int64, count=n),
        ann_image=np.fromiter((row[a["image_id"]] for a in anns), dtype=np.int64, count=n),
        ann_cat=np.fromiter((a["category_id"] for a in anns), dtype=np.int64, count=n),
        ann_bbox=np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
        ann_area=np.fromiter((a["area"] for a in anns), dtype=np.float64, count=n),
        ann_iscrowd=np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), dtype=np.int8, count=n),
        ann_isgroupof=np.fromiter((bool(a.get("isgroupof", 0)) for a in anns), dtype=np.int8, count=n),
    )
    categories = sorted(data["categories"], key=lambda c: c["id"])
    extra = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    return arrays, categories, extra


def _ancestor_csr(hierarchy: Mapping[int, Sequence[int]], cat_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per contiguous label 0..C (0 = background): its ancestors' contiguous labels, as CSR."""
    ancestors = hierarchy_ancestors(hierarchy)
    lists: list[list[int]] = [[]] + [
        sorted(int(np.searchsorted(cat_ids, a)) + 1 for a in ancestors.get(int(c), ())) for c in cat_ids
    ]
    return csr(lists)


def _expand(owner: np.ndarray, label: np.ndarray, anc_indptr: np.ndarray, anc_labels: np.ndarray):
    """(owner, label) pairs plus (owner, ancestor label) for every ancestor of each label."""
    n_anc = np.diff(anc_indptr)[label]
    start = np.repeat(anc_indptr[label], n_anc)
    offset = np.arange(int(n_anc.sum())) - np.repeat(np.cumsum(n_anc) - n_anc, n_anc)
    return np.r_[owner, np.repeat(owner, n_anc)], np.r_[label, anc_labels[start + offset]]


def unique_keys(keys: np.ndarray) -> np.ndarray:
    keys = np.sort(keys)
    return keys[runs(keys)[0]]


def _primary_positions(
    starts: np.ndarray, sizes: np.ndarray, labels: np.ndarray, anc_indptr: np.ndarray, anc_labels: np.ndarray, k: int
) -> np.ndarray:
    """Per group (members sorted by annotation id, group g at starts[g] with sizes[g] members): the position of its
    primary member, the first member whose label is not an ancestor of another member's label."""
    prim = starts.copy()
    multi = np.flatnonzero(sizes > 1)
    if len(multi) == 0 or len(anc_labels) == 0:
        return prim
    entry = np.flatnonzero(np.repeat(sizes > 1, sizes))  # members of multi-member groups
    size = np.repeat(sizes, sizes)[entry]
    first = np.repeat(starts, sizes)[entry]
    left = np.repeat(entry, size)
    right = np.repeat(first, size) + np.arange(len(left)) - np.repeat(np.cumsum(size) - size, size)
    # keys (descendant label, ancestor label) of the hierarchy
    desc = np.repeat(np.arange(len(anc_indptr) - 1), np.diff(anc_indptr))
    is_anc = np.isin(labels[right] * k + labels[left], desc * k + anc_labels)  # left's label is right's ancestor
    excluded = np.zeros(len(labels), dtype=bool)
    excluded[left[is_anc]] = True
    big = len(labels)
    cand = np.where(excluded, big, np.arange(len(labels)))
    first_ok = np.minimum.reduceat(cand, starts) if len(starts) else cand[:0]
    return np.where(first_ok < big, first_ok, starts)


def derive_arrays(
    raw: Mapping[str, np.ndarray],
    categories: Sequence[dict],
    hierarchy: Mapping[int, Sequence[int]],
    expand_parents: bool = False,
    iou_thr: float = MERGE_IOU,
    rare_max: int = RARE_MAX,
    common_max: int = COMMON_MAX,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """(the derived arrays of the module docstring, r/c/f bucket per category in id order)."""
    cat_ids = np.asarray([int(c["id"]) for c in categories], dtype=np.int64)
    c = len(cat_ids)
    k = c + 1
    n_img = len(raw["image_id"])
    nc = np.flatnonzero(raw["ann_iscrowd"] == 0)
    img = np.asarray(raw["ann_image"])[nc]
    aid = np.asarray(raw["ann_id"])[nc]
    lab = np.searchsorted(cat_ids, np.asarray(raw["ann_cat"])[nc]) + 1
    xywh = np.asarray(raw["ann_bbox"])[nc]
    comp = object_ids(img, np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1), iou_thr)

    order = np.lexsort((aid, comp))  # members of each object together, by annotation id
    starts, sizes = runs(comp[order])
    anc_indptr, anc_labels = _ancestor_csr(hierarchy, cat_ids)
    prim = order[_primary_positions(starts, sizes, lab[order], anc_indptr, anc_labels, k)]
    first = order[starts]
    obj_order = np.lexsort((aid[first], img[first]))  # objects by image, then by their smallest annotation id
    group_rank = np.empty(len(starts), dtype=np.int64)
    group_rank[obj_order] = np.arange(len(starts))
    member_obj = np.empty(len(nc), dtype=np.int64)
    member_obj[order] = np.repeat(group_rank, sizes)
    ann_object = np.full(len(raw["ann_id"]), -1, dtype=np.int64)
    ann_object[nc] = member_obj

    prim = prim[obj_order]
    obj_img = img[prim]
    box32 = xywh[prim].astype(np.float32)
    obj_box = np.concatenate([box32[:, :2], box32[:, :2] + box32[:, 2:]], axis=1)
    owner, label = member_obj, lab
    if expand_parents:
        owner, label = _expand(owner, label, anc_indptr, anc_labels)
    pairs = unique_keys(owner * k + label)
    pair_obj, pair_label = pairs // k, pairs % k
    image_labels = unique_keys(obj_img[pair_obj] * c + (pair_label - 1))
    raw_image_labels = unique_keys(img * c + (lab - 1))
    counts = np.bincount(raw_image_labels % c, minlength=c).astype(np.int64) if c else np.zeros(0, np.int64)

    def indptr(owners: np.ndarray, n: int) -> np.ndarray:
        return np.r_[0, np.cumsum(np.bincount(owners, minlength=n))].astype(np.int64)

    derived = {
        "ann_object": ann_object,
        "obj_indptr": indptr(obj_img, n_img),
        "obj_box": obj_box,
        "obj_primary": lab[prim].astype(np.int64),
        "pair_indptr": indptr(pair_obj, len(prim)),
        "pair_label": pair_label.astype(np.int64),
        "label_indptr": indptr(image_labels // c if c else image_labels, n_img),
        "label_ids": (image_labels % c if c else image_labels).astype(np.int64),
        "cat_image_count": counts,
    }
    frequency = category_frequencies(categories, dict(zip(cat_ids.tolist(), counts.tolist())), rare_max, common_max)
    return derived, frequency
