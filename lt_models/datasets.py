"""LVIS/COCO-format annotations -> torch Dataset with multi-hot targets.

Boxes of one image whose IoU is >= 0.95 (or that are identical) are one physical object carrying several
labels (the concurrent-softmax paper's explicit multi-label case, §3). `group_duplicate_boxes` is the single
place that decides which boxes merge; the dataset and `lt_models.concurrency` both use it.

Label space: categories are sorted by id; contiguous label ``l = index + 1`` in 1..C; column 0 of every
K = C+1 tensor is background.

Primary label of a merged object (`target["labels"]`, used by single-label losses): the most specific label,
i.e. labels that are an ancestor (in the hierarchy, when one is given) of another label of the same object are
dropped, and among the rest the one from the annotation with the smallest id wins. Without a hierarchy this
is simply the label of the smallest annotation id. The merged object's box is that annotation's box.

Validation (`load_lvis_json`): malformed JSON, an unknown `category_id`/`image_id`, a box with w or h <= 0 or
more than `BOX_TOLERANCE` px outside its image, a missing image file, duplicate image/annotation ids, a
category that is both annotated and listed in `neg_category_ids` of one image -> `AnnotationError` naming the
file, the id and the field. With ``skip_invalid=True`` the offending record is skipped instead and counted in
``data["invalid_skipped"]`` / ``data["invalid_reasons"]``.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lt_models.atomic import atomic_path
from lt_models.errors import AnnotationError

MERGE_IOU = 0.95
BOX_TOLERANCE = 1.0  # px a box may stick out of its image (float rounding in COCO/LVIS); it is clipped
RARE_MAX = 10        # LVIS: rare = 1-10 training images
COMMON_MAX = 100     # LVIS: common = 11-100, frequent > 100


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


# ---------------------------------------------------------------------------------------------------------
# Frequency buckets
# ---------------------------------------------------------------------------------------------------------


def frequency_buckets(image_counts: Sequence[int] | np.ndarray, rare_max: int = RARE_MAX,
                      common_max: int = COMMON_MAX) -> list[str]:
    """LVIS buckets from training image counts: 'r' (<= rare_max, including 0), 'c' (<= common_max), else 'f'."""
    if not 0 <= rare_max < common_max:
        raise ValueError(f"frequency thresholds need 0 <= rare_max < common_max, got {rare_max}, {common_max}")
    return ["r" if n <= rare_max else "c" if n <= common_max else "f" for n in np.asarray(image_counts).tolist()]


def category_image_counts(data: dict) -> tuple[dict[int, int], dict[int, int]]:
    """(images per category id, annotations per category id) over non-crowd annotations."""
    imgs: dict[int, set] = {c["id"]: set() for c in data["categories"]}
    inst: dict[int, int] = {c["id"]: 0 for c in data["categories"]}
    for a in data["annotations"]:
        if a.get("iscrowd", 0):
            continue
        imgs[a["category_id"]].add(a["image_id"])
        inst[a["category_id"]] += 1
    return {k: len(v) for k, v in imgs.items()}, inst


def fill_frequency(data: dict, image_counts: dict[int, int] | None = None, rare_max: int = RARE_MAX,
                   common_max: int = COMMON_MAX) -> int:
    """Write `frequency` (and missing `image_count`/`instance_count`) into categories that lack it, in place.

    `image_counts` (category id -> training images) defaults to this file's own counts: right for a training
    file; for a val file pass the training counts (LVIS buckets always come from train). Returns how many
    categories were filled.
    """
    own_imgs, own_inst = category_image_counts(data)
    counts = own_imgs if image_counts is None else image_counts
    filled = 0
    for c in data["categories"]:
        c.setdefault("image_count", own_imgs[c["id"]])
        c.setdefault("instance_count", own_inst[c["id"]])
        if c.get("frequency") not in ("r", "c", "f"):
            c["frequency"] = frequency_buckets([counts.get(c["id"], 0)], rare_max, common_max)[0]
            filled += 1
    return filled


# ---------------------------------------------------------------------------------------------------------
# Loading + validation
# ---------------------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str = "annotations") -> object:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: {what} file not found; check the path") from None
    except IsADirectoryError:
        raise AnnotationError(f"{path}: is a directory, expected a JSON {what} file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg}); "
                              f"fix the file (truncated or hand-edited?)") from None


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def image_file_name(img: dict) -> str | None:
    """Image path relative to the image folder: `file_name`, else ``<split>/<file>`` from `coco_url`.

    LVIS v1 has no `file_name`; its val set mixes COCO train2017 and val2017 images, so for LVIS v1 the image
    folder is the COCO root holding train2017/ and val2017/ (as in detectron2).
    """
    if img.get("file_name"):
        return str(img["file_name"])
    if img.get("coco_url"):
        return "/".join(str(img["coco_url"]).rstrip("/").split("/")[-2:])
    return None


def load_lvis_json(path: str | os.PathLike, image_dir: str | os.PathLike | None = None,
                   skip_invalid: bool = False) -> dict:
    """Read and validate an LVIS/COCO-format file; returns a new dict with clean records.

    `image_dir`: when given, every image file must exist there. Boxes up to `BOX_TOLERANCE` px outside the image
    are clipped; further out is an error. `area` defaults to w*h, `iscrowd` to 0, the federated lists to [].
    Raises `AnnotationError` naming file, id and field; with `skip_invalid` skips the record instead
    (an invalid image takes its annotations with it) and reports ``invalid_skipped`` / ``invalid_reasons``.
    """
    path = Path(path)
    data = _read_json(path)
    hint = "fix it or pass --skip-invalid to skip such records"
    reasons: Counter = Counter()

    def bad(reason: str, msg: str) -> None:
        if not skip_invalid:
            raise AnnotationError(f"{path}: {msg}; {hint}")
        reasons[reason] += 1

    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: top level must be a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{path}: missing or non-list field '{key}'; an LVIS/COCO file needs "
                                  f"'images', 'annotations' and 'categories' lists")

    cats: dict[int, dict] = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise AnnotationError(f"{path}: category {c!r}: field 'id' must be an integer")
        if c["id"] in cats:
            raise AnnotationError(f"{path}: category id {c['id']}: duplicate 'id'; category ids must be unique")
        if "frequency" in c and c["frequency"] not in ("r", "c", "f"):
            raise AnnotationError(f"{path}: category id {c['id']}: field 'frequency' = {c['frequency']!r}, "
                                  f"expected 'r', 'c' or 'f' (or leave it out to compute it)")
        cats[int(c["id"])] = dict(c, name=str(c.get("name", c["id"])))

    images: dict[int, dict] = {}
    dropped_images: set = set()
    idir = Path(image_dir) if image_dir is not None else None
    for img in data["images"]:
        iid = img.get("id") if isinstance(img, dict) else None
        if not _is_int(iid):
            bad("image id", f"image {img!r}: field 'id' must be an integer")
            continue
        if iid in images:
            bad("duplicate image id", f"image id {iid}: duplicate 'id' (first one kept)")
            continue
        w, h = img.get("width"), img.get("height")
        if not (_is_num(w) and _is_num(h) and w > 0 and h > 0):
            bad("image size", f"image id {iid}: fields 'width'/'height' = {w!r}/{h!r} must be positive numbers")
            dropped_images.add(iid)
            continue
        fname = image_file_name(img)
        if idir is not None:
            if fname is None:
                bad("image file", f"image id {iid}: no 'file_name' (or 'coco_url') field")
                dropped_images.add(iid)
                continue
            if not (idir / fname).is_file():
                bad("missing image file", f"image id {iid}: field 'file_name' = {fname!r}: image file "
                                          f"{idir / fname} does not exist (wrong --images dir?)")
                dropped_images.add(iid)
                continue
        rec = dict(img)
        for fld in ("neg_category_ids", "not_exhaustive_category_ids"):
            ids = rec.get(fld, [])
            if not isinstance(ids, list) or not all(_is_int(x) for x in ids):
                raise AnnotationError(f"{path}: image id {iid}: field '{fld}' must be a list of category ids")
            unknown = [x for x in ids if x not in cats]
            if unknown:
                bad("unknown category id", f"image id {iid}: field '{fld}' lists unknown category id {unknown[0]}")
                ids = [x for x in ids if x in cats]
            rec[fld] = list(ids)
        if fname is not None:
            rec["file_name"] = fname
        images[iid] = rec

    anns: list[dict] = []
    ann_ids: set = set()
    for a in data["annotations"]:
        aid = a.get("id") if isinstance(a, dict) else None
        if not _is_int(aid):
            bad("annotation id", f"annotation {a!r}: field 'id' must be an integer")
            continue
        if aid in ann_ids:
            bad("duplicate annotation id", f"annotation id {aid}: duplicate 'id' (first one kept)")
            continue
        ann_ids.add(aid)
        iid, cid = a.get("image_id"), a.get("category_id")
        if iid in dropped_images:
            reasons["annotation of skipped image"] += 1
            continue
        if iid not in images:
            bad("unknown image id", f"annotation id {aid}: field 'image_id' = {iid!r} is not an image id in this file")
            continue
        if cid not in cats:
            bad("unknown category id", f"annotation id {aid}: field 'category_id' = {cid!r} is not a category id "
                                       f"in this file")
            continue
        box = a.get("bbox")
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_num(v) for v in box)):
            bad("bad box", f"annotation id {aid}: field 'bbox' = {box!r} must be [x, y, w, h] (4 finite numbers)")
            continue
        x, y, w, h = (float(v) for v in box)
        if w <= 0 or h <= 0:
            bad("bad box", f"annotation id {aid} (image id {iid}): field 'bbox' = {list(box)} has width or "
                           f"height <= 0")
            continue
        W, H = float(images[iid]["width"]), float(images[iid]["height"])
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + w > W + t or y + h > H + t:
            bad("bad box", f"annotation id {aid} (image id {iid}): field 'bbox' = {list(box)} lies outside the "
                           f"{W:g}x{H:g} image")
            continue
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
        rec = dict(a, bbox=[x0, y0, x1 - x0, y1 - y0] if (x0, y0, x1, y1) != (x, y, x + w, y + h) else list(box))
        rec.setdefault("area", rec["bbox"][2] * rec["bbox"][3])
        rec.setdefault("iscrowd", 0)
        anns.append(rec)

    # LVIS semantics: a category annotated in an image cannot also be verified absent from it.
    pos: dict[int, set] = defaultdict(set)
    for a in anns:
        pos[a["image_id"]].add(a["category_id"])
    for iid, rec in images.items():
        clash = sorted(set(rec["neg_category_ids"]) & pos.get(iid, set()))
        if clash:
            bad("negative and annotated", f"image id {iid}: field 'neg_category_ids' lists category id {clash[0]} "
                                          f"that is annotated in the image")
            rec["neg_category_ids"] = [c for c in rec["neg_category_ids"] if c not in clash]

    out = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    out.update(images=list(images.values()), annotations=anns, categories=list(cats.values()),
               invalid_skipped=int(sum(reasons.values())), invalid_reasons=dict(sorted(reasons.items())))
    return out


# ---------------------------------------------------------------------------------------------------------
# Hierarchy
# ---------------------------------------------------------------------------------------------------------


def name_to_cat_id(categories: Sequence[dict]) -> dict[str, int]:
    """Names a hierarchy may use for a category: its `name`, and its Open Images MID (`mid`) when present."""
    out: dict[str, int] = {}
    for c in categories:
        out[str(c["name"])] = int(c["id"])
        if c.get("mid"):
            out[str(c["mid"])] = int(c["id"])
    return out


def load_hierarchy(path: str | os.PathLike, name_to_cat_id: dict[str, int]) -> dict[int, list[int]]:
    """Open Images hierarchy JSON -> {parent category id: [child category ids]}.

    The file is {"LabelName": ..., "Subcategory": [{"LabelName": ..., "Subcategory": [...]}, ...]}; LabelName is
    a category name (synthetic benchmark) or an Open Images MID (matched against the categories' `mid`).
    Nodes that are not categories (the root, classes outside this label set) are transparent: their children
    attach to the nearest ancestor that is a category. "Part" lists are ignored (not an is-a relation).
    """
    path = Path(path)
    tree = _read_json(path, "hierarchy")
    children: dict[int, set[int]] = defaultdict(set)
    matched: set[int] = set()

    def walk(node: object, anc: int | None, trail: tuple) -> None:
        if not isinstance(node, dict) or not isinstance(node.get("LabelName"), str):
            raise AnnotationError(f"{path}: hierarchy node {str(node)[:80]!r} under {'/'.join(trail) or 'top'} "
                                  f"needs a string 'LabelName'")
        name = node["LabelName"]
        if name in trail:
            raise AnnotationError(f"{path}: hierarchy cycle at LabelName {name!r} ({'/'.join(trail)})")
        cid = name_to_cat_id.get(name)
        if cid is not None:
            matched.add(cid)
            if anc is not None and anc != cid:
                children[anc].add(cid)
        subs = node.get("Subcategory", [])
        if not isinstance(subs, list):
            raise AnnotationError(f"{path}: LabelName {name!r}: field 'Subcategory' must be a list")
        for sub in subs:
            walk(sub, cid if cid is not None else anc, trail + (name,))

    walk(tree, None, ())
    if not matched:
        raise AnnotationError(f"{path}: no hierarchy LabelName matches a category of the dataset; LabelNames must "
                              f"be category names (or Open Images MIDs stored as category 'mid')")
    return {p: sorted(c) for p, c in sorted(children.items())}


def hierarchy_ancestors(hierarchy: dict[int, list[int]]) -> dict[int, set[int]]:
    """Transitive ancestors of every category id that has a parent."""
    parents: dict[int, set[int]] = defaultdict(set)
    for p, cs in hierarchy.items():
        for c in cs:
            parents[c].add(p)
    out: dict[int, set[int]] = {}

    def anc(c: int) -> set[int]:
        if c not in out:
            out[c] = set()
            acc: set[int] = set()
            for p in parents.get(c, ()):
                acc |= {p} | anc(p)
            out[c] = acc
        return out[c]

    for c in list(parents):
        anc(c)
    return out


# ---------------------------------------------------------------------------------------------------------
# Merged objects (shared by the dataset and the statistics)
# ---------------------------------------------------------------------------------------------------------


def _objects_per_image(data: dict, ancestors: dict[int, set[int]], expand_parents: bool,
                       iou_thr: float = MERGE_IOU) -> dict[int, list[tuple[list[float], int, list[int]]]]:
    """image id -> [(box xywh, primary category id, sorted category ids of the object)] (crowd boxes dropped)."""
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
            members = [anns[i] for i in np.nonzero(groups == g)[0]]   # ascending annotation id
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


# ---------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------


class LVISDetection(Dataset):
    """LVIS/COCO-format detection dataset with merged multi-label objects.

    ``__getitem__(i) -> (image float32 [3,H,W] in [0,1], target)``; target has ``boxes`` float32 [n,4] xyxy,
    ``labels`` int64 [n] (primary contiguous label), ``multi_hot`` float32 [n,K] and ``image_id``.
    ``train=True`` drops images without a (non-crowd) object, as torchvision's references do; ``train=False``
    keeps every image in file order (evaluation). `transforms(image, target) -> (image, target)` is optional.
    """

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike | None = None,
                 hierarchy_file: str | os.PathLike | None = None, expand_parents: bool = False, train: bool = True,
                 skip_invalid: bool = False, transforms: Callable | None = None, rare_max: int = RARE_MAX,
                 common_max: int = COMMON_MAX):
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir) if image_dir is not None else self.ann_file.parent / "images"
        if expand_parents and hierarchy_file is None:
            raise ValueError("expand_parents=True needs hierarchy_file")
        data = load_lvis_json(self.ann_file, image_dir=self.image_dir, skip_invalid=skip_invalid)
        self.num_skipped: int = data["invalid_skipped"]
        self.skipped_reasons: dict = data["invalid_reasons"]
        self.transforms = transforms
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids: list[int] = [int(c["id"]) for c in self.categories]
        self.num_classes: int = len(self.cat_ids)
        self.cat_id_to_label: dict[int, int] = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.label_to_cat_id: list[int] = [-1] + self.cat_ids
        self.class_names: list[str] = [c["name"] for c in self.categories]
        self.hierarchy: dict[int, list[int]] = (
            load_hierarchy(hierarchy_file, name_to_cat_id(self.categories)) if hierarchy_file is not None else {})
        ancestors = hierarchy_ancestors(self.hierarchy)
        counts, _ = category_image_counts(data)
        self.frequency: list[str] = [
            c["frequency"] if c.get("frequency") in ("r", "c", "f")
            else frequency_buckets([counts[c["id"]]], rare_max, common_max)[0] for c in self.categories]

        objects = _objects_per_image(data, ancestors, expand_parents)
        self.images: list[dict] = []
        self._boxes: list[np.ndarray] = []
        self._primary: list[np.ndarray] = []
        self._obj_rows: list[np.ndarray] = []    # per image: object index of every (object, label) pair
        self._obj_labels: list[np.ndarray] = []  # per image: contiguous label of every (object, label) pair
        for img in data["images"]:
            objs = objects.get(img["id"], [])
            if train and not objs:
                continue
            self.images.append(img)
            xywh = np.array([o[0] for o in objs], dtype=np.float32).reshape(-1, 4)
            self._boxes.append(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1))
            self._primary.append(np.array([self.cat_id_to_label[o[1]] for o in objs], dtype=np.int64))
            self._obj_rows.append(np.array([k for k, o in enumerate(objs) for _ in o[2]], dtype=np.int64))
            self._obj_labels.append(np.array([self.cat_id_to_label[c] for o in objs for c in o[2]], dtype=np.int64))
        self.image_ids: list[int] = [int(img["id"]) for img in self.images]
        indptr = [0]
        flat: list[np.ndarray] = []
        for labels in self._obj_labels:
            present = np.unique(labels) - 1
            flat.append(present)
            indptr.append(indptr[-1] + len(present))
        self._indptr = np.asarray(indptr, dtype=np.int64)
        self._csr_labels = np.concatenate(flat).astype(np.int64) if flat else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def label_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """(indptr int64 [n_images+1], labels int64 [nnz]): 0-based classes (label-1) present in each image."""
        return self._indptr.copy(), self._csr_labels.copy()

    def image_counts(self) -> np.ndarray:
        """int64 [C]: images of this dataset containing each class (after merge / parent expansion)."""
        return np.bincount(self._csr_labels, minlength=self.num_classes).astype(np.int64)

    def target(self, i: int) -> dict:
        """The target of item i without decoding the image."""
        multi_hot = torch.zeros(len(self._primary[i]), self.num_classes + 1, dtype=torch.float32)
        multi_hot[torch.from_numpy(self._obj_rows[i]), torch.from_numpy(self._obj_labels[i])] = 1.0
        return {"boxes": torch.from_numpy(self._boxes[i].copy()), "labels": torch.from_numpy(self._primary[i].copy()),
                "multi_hot": multi_hot, "image_id": torch.tensor(self.image_ids[i], dtype=torch.int64)}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        img = self.images[i]
        path = self.image_dir / img["file_name"]
        with Image.open(path) as pil:
            pixels = np.array(pil.convert("RGB"))            # uint8 [H, W, 3], writable copy
        if pixels.shape[:2] != (int(img["height"]), int(img["width"])):
            raise AnnotationError(f"{self.ann_file}: image id {img['id']}: fields 'width'/'height' = "
                                  f"{img['width']}x{img['height']} but {path} is {pixels.shape[1]}x{pixels.shape[0]}; "
                                  f"fix the annotation file")
        # numpy, not torch ops: torch's intra-op thread pool makes this tiny conversion slow in loader workers
        image = torch.from_numpy(np.ascontiguousarray(np.divide(pixels, np.float32(255), dtype=np.float32)
                                                      .transpose(2, 0, 1)))
        target = self.target(i)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches stay lists: images differ in size and targets in length (torchvision convention)."""
    images, targets = zip(*batch) if len(batch) else ((), ())
    return list(images), list(targets)


# ---------------------------------------------------------------------------------------------------------
# Statistics (`ltsweep data stats`)
# ---------------------------------------------------------------------------------------------------------


def _soft_balance(counts: np.ndarray, lam: float) -> np.ndarray:
    from lt_models.samplers import soft_balance_probabilities

    return np.asarray(soft_balance_probabilities(counts, lam), dtype=np.float64)


def _class_views(counts: np.ndarray, pairs: tuple[np.ndarray, np.ndarray], num_images: int,
                 lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Per class: (mean views of its images, share of its images never drawn) in one soft-balance epoch.

    `pairs` = (image index, class index) for every class present in every image; an epoch is `num_images` draws.
    The sampler draws class i with P*_s(i) (paper eq 8, `lt_models.samplers.soft_balance_probabilities`), then one of
    the n_i images containing i uniformly, so image j is drawn v_j = num_images * sum_{i in L_j} P*_s(i) / n_i times
    on average; draws are with replacement, so it is missed with probability ~exp(-v_j).
    """
    img, cls = pairs
    per_class = np.zeros(len(counts))
    nz = counts > 0
    per_class[nz] = num_images * _soft_balance(counts[nz], lam) / counts[nz]
    views = np.bincount(img, weights=per_class[cls], minlength=num_images)
    n = np.maximum(np.bincount(cls, minlength=len(counts)), 1)
    mean = np.bincount(cls, weights=views[img], minlength=len(counts)) / n
    unseen = np.bincount(cls, weights=np.exp(-views[img]), minlength=len(counts)) / n
    return mean, unseen


def _atomic_savefig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def dataset_stats(ann_file: str | os.PathLike, lam: float | None = None,
                  hierarchy_file: str | os.PathLike | None = None, plot_dir: str | os.PathLike | None = None, *,
                  image_dir: str | os.PathLike | None = None, skip_invalid: bool = False, rare_max: int = RARE_MAX,
                  common_max: int = COMMON_MAX, top_k: int = 10) -> dict:
    """Long-tail and multi-label statistics of an LVIS-format file (the paper's Fig 2, Fig 3a/3b, §3 sampling).

    - imbalance: images of the largest category / images of the smallest non-empty one (Fig 2);
    - buckets: categories per LVIS bucket (the file's `frequency`, else from its own image counts);
    - confused pairs: after merging boxes (IoU >= 0.95), the rate r_ij = P(object labelled i also labelled j) for
      pairs not related in the hierarchy, the highest `top_k` (Fig 3a);
    - parent-only share: objects whose labels include a parent but none of its descendants (Fig 3b; needs a
      hierarchy: `hierarchy_file`, else ``hierarchy.json`` beside the file when present);
    - with `lam`: views per image of the head and tail class in one epoch for non-balance (λ=0), λ and
      class-aware (λ=1) sampling, and the share of their images never drawn (≈ exp(-views)).
    `image_dir` (default ``<file dir>/images`` when it exists) is checked for missing image files.
    PNG plots go to `plot_dir` (``<stem>_imbalance.png`` ...).
    """
    ann_file = Path(ann_file)
    if image_dir is None and (ann_file.parent / "images").is_dir():
        image_dir = ann_file.parent / "images"
    data = load_lvis_json(ann_file, image_dir=image_dir, skip_invalid=skip_invalid)
    if hierarchy_file is None and (ann_file.parent / "hierarchy.json").is_file():
        hierarchy_file = ann_file.parent / "hierarchy.json"
    cats = sorted(data["categories"], key=lambda c: c["id"])
    names = {c["id"]: c["name"] for c in cats}
    hierarchy = load_hierarchy(hierarchy_file, name_to_cat_id(cats)) if hierarchy_file is not None else {}
    ancestors = hierarchy_ancestors(hierarchy)
    img_counts, inst_counts = category_image_counts(data)
    counts = np.array([img_counts[c["id"]] for c in cats], dtype=np.int64)
    own = frequency_buckets(counts, rare_max, common_max)
    freq = [c["frequency"] if c.get("frequency") in ("r", "c", "f") else b for c, b in zip(cats, own)]
    nz = counts[counts > 0]
    head = int(np.argmax(counts)) if len(cats) else None
    tail = int(np.flatnonzero(counts == nz.min())[0]) if len(nz) else None

    objects = _objects_per_image(data, ancestors, expand_parents=False)
    n_obj = Counter()
    n_pair = Counter()
    n_multi = 0
    n_objects = 0
    parent_only = Counter()
    parent_any = Counter()
    descendants: dict[int, set[int]] = defaultdict(set)
    for c, ancs in ancestors.items():
        for a in ancs:
            descendants[a].add(c)
    for objs in objects.values():
        for _box, _primary, labels in objs:
            n_objects += 1
            n_multi += len(labels) > 1
            for i in labels:
                n_obj[i] += 1
                for j in labels:
                    if i != j and j not in ancestors.get(i, ()) and i not in ancestors.get(j, ()):
                        n_pair[i, j] += 1
            ls = set(labels)
            for p in {a for c in ls for a in ancestors.get(c, ())} | (ls & descendants.keys()):
                parent_any[p] += 1
                if p in ls and not ls & descendants[p]:
                    parent_only[p] += 1
    pairs = sorted(((n / n_obj[i], n, i, j) for (i, j), n in n_pair.items()), key=lambda t: (-t[0], -t[1], t[2], t[3]))
    confused = [{"label": names[i], "also_labelled": names[j], "rate": round(r, 4), "objects": int(n),
                 "of": int(n_obj[i])} for r, n, i, j in pairs[:top_k]]

    stats: dict = {
        "file": str(ann_file), "images": len(data["images"]), "annotations": len(data["annotations"]),
        "objects": n_objects, "multi_label_objects": n_multi, "categories": len(cats),
        "empty_categories": int((counts == 0).sum()),
        "imbalance": float(nz.max() / nz.min()) if len(nz) else 0.0,
        "head": {"name": names[cats[head]["id"]], "images": int(counts[head])} if head is not None else None,
        "tail": {"name": names[cats[tail]["id"]], "images": int(counts[tail])} if tail is not None else None,
        "buckets": {b: freq.count(b) for b in "rcf"}, "bucket_source": (
            "file" if all(c.get("frequency") in ("r", "c", "f") for c in cats) else "image counts"),
        "thresholds": {"rare_max": rare_max, "common_max": common_max},
        "confused_pairs": confused, "hierarchy": str(hierarchy_file) if hierarchy_file is not None else None,
        "images_checked": str(image_dir) if image_dir is not None else None,
        "invalid_skipped": data["invalid_skipped"], "invalid_reasons": data["invalid_reasons"],
        "image_counts": {names[c["id"]]: int(n) for c, n in zip(cats, counts)},
        "instance_counts": {names[c["id"]]: int(inst_counts[c["id"]]) for c in cats},
        "frequency": {names[c["id"]]: f for c, f in zip(cats, freq)},
    }
    if hierarchy:
        tot_any = sum(parent_any.values())
        stats["parent_only_share"] = (sum(parent_only.values()) / tot_any) if tot_any else 0.0
        stats["parent_only"] = {names[p]: {"objects": int(parent_any[p]), "parent_only": int(parent_only[p]),
                                           "share": round(parent_only[p] / parent_any[p], 4) if parent_any[p] else 0.0}
                                for p in sorted(descendants)}
    else:
        stats["parent_only_share"] = None
    pairs = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if lam is not None and len(nz):
        cat_index = {c["id"]: k for k, c in enumerate(cats)}
        present = [sorted({cat_index[c] for o in objs for c in o[2]}) for objs in objects.values() if objs]
        n_images = len(present)
        pairs = (np.repeat(np.arange(n_images), [len(p) for p in present]),
                 np.array([c for p in present for c in p], dtype=np.int64))
        rows = {"non-balance (each image once)": {"lam": None, "head_views": 1.0, "tail_views": 1.0,
                                                  "head_unseen": 0.0, "tail_unseen": 0.0}}
        for name, lv in ((f"soft-balance λ={lam:g}", float(lam)), ("class-aware (λ=1)", 1.0)):
            mean, unseen = _class_views(counts.astype(np.float64), pairs, n_images, lv)
            rows[name] = {"lam": lv, "head_views": float(mean[head]), "tail_views": float(mean[tail]),
                          "head_unseen": float(unseen[head]), "tail_unseen": float(unseen[tail])}
        stats["sampling"] = {"epoch_draws": n_images, "rows": rows}
    if plot_dir is not None:
        stats["plots"] = _plot_stats(stats, counts, freq, lam, pairs, Path(plot_dir), ann_file.stem)
    return stats


def _plot_stats(stats: dict, counts: np.ndarray, freq: list[str], lam: float | None,
                pairs: tuple[np.ndarray, np.ndarray], plot_dir: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    colours = {"r": "tab:red", "c": "tab:orange", "f": "tab:blue"}
    order = np.argsort(-counts, kind="stable")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(np.arange(len(counts)), np.maximum(counts[order], 0.8), color=[colours[freq[i]] for i in order], width=1.0)
    ax.set_yscale("log")
    ax.set_xlabel("category (sorted by training images)")
    ax.set_ylabel("images")
    ax.set_title(f"imbalance magnitude {stats['imbalance']:.0f} (Fig 2); "
                 + ", ".join(f"{b}={stats['buckets'][b]}" for b in "rcf"))
    ax.legend(handles=[Patch(color=c, label={"r": "rare", "c": "common", "f": "frequent"}[b])
                       for b, c in colours.items()], loc="upper right", fontsize=8)
    path = plot_dir / f"{stem}_imbalance.png"
    _atomic_savefig(fig, path)
    plt.close(fig)
    written.append(str(path))

    if stats["confused_pairs"]:
        top = stats["confused_pairs"][::-1]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(top) + 1))
        ax.barh([f"{p['label']} → {p['also_labelled']}" for p in top], [p["rate"] for p in top], color="tab:purple")
        ax.set_xlabel("P(object labelled i is also labelled j)")
        ax.set_title("most concurrent label pairs (Fig 3a)")
        path = plot_dir / f"{stem}_confusion.png"
        _atomic_savefig(fig, path)
        plt.close(fig)
        written.append(str(path))

    if stats.get("parent_only"):
        po = stats["parent_only"]
        names = list(po)
        leaf = [po[n]["objects"] - po[n]["parent_only"] for n in names]
        only = [po[n]["parent_only"] for n in names]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar(names, leaf, label="with leaf label", color="tab:green")
        ax.bar(names, only, bottom=leaf, label="parent label only", color="tab:gray")
        ax.set_ylabel("objects")
        ax.set_title(f"parent-only labels: {stats['parent_only_share']:.1%} (Fig 3b)")
        ax.tick_params(axis="x", rotation=60)
        ax.legend(fontsize=8)
        path = plot_dir / f"{stem}_parent_only.png"
        _atomic_savefig(fig, path)
        plt.close(fig)
        written.append(str(path))

    if lam is not None and "sampling" in stats:
        n = stats["sampling"]["epoch_draws"]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        x = np.arange(len(counts))
        ax.plot(x, np.ones(len(counts)), label="non-balance", color="black", lw=1)
        for lv in sorted({float(lam), 1.0}):
            mean, _ = _class_views(counts.astype(np.float64), pairs, n, lv)
            ax.plot(x, np.where(counts[order] > 0, mean[order], np.nan), label=f"soft-balance λ={lv:g}")
        ax.set_yscale("log")
        ax.set_xlabel("category (sorted by training images)")
        ax.set_ylabel("mean views per image per epoch")
        ax.set_title("soft-balance sampling (eq 8)")
        ax.legend(fontsize=8)
        path = plot_dir / f"{stem}_soft_balance.png"
        _atomic_savefig(fig, path)
        plt.close(fig)
        written.append(str(path))
    return written


def format_stats(stats: dict) -> str:
    """Human-readable table of `dataset_stats` output."""
    lines = [f"{stats['file']}: {stats['images']} images, {stats['annotations']} annotations, "
             f"{stats['objects']} objects after merging duplicate boxes ({stats['multi_label_objects']} multi-label), "
             f"{stats['categories']} categories ({stats['empty_categories']} without images)"]
    if stats.get("invalid_skipped"):
        lines.append(f"skipped {stats['invalid_skipped']} invalid records: "
                     + ", ".join(f"{k} {v}" for k, v in stats["invalid_reasons"].items()))
    if stats["head"]:
        lines.append(f"imbalance magnitude (Fig 2): {stats['imbalance']:.1f}  "
                     f"(head {stats['head']['name']}: {stats['head']['images']} images, "
                     f"tail {stats['tail']['name']}: {stats['tail']['images']})")
    b, t = stats["buckets"], stats["thresholds"]
    lines.append(f"buckets ({stats['bucket_source']}; rare <= {t['rare_max']} < common <= {t['common_max']} < "
                 f"frequent images): rare {b['r']}  common {b['c']}  frequent {b['f']}")
    lines.append("")
    lines.append("most concurrent label pairs, excluding parent/child (Fig 3a):")
    if stats["confused_pairs"]:
        w = max(len(p["label"]) for p in stats["confused_pairs"])
        w2 = max(len(p["also_labelled"]) for p in stats["confused_pairs"])
        lines.append(f"  {'label i':<{w}}  {'also labelled j':<{w2}}  {'rate':>6}  objects")
        for p in stats["confused_pairs"]:
            lines.append(f"  {p['label']:<{w}}  {p['also_labelled']:<{w2}}  {p['rate']:>6.3f}  "
                         f"{p['objects']}/{p['of']}")
    else:
        lines.append("  (no object carries two unrelated labels)")
    lines.append("")
    if stats["parent_only_share"] is None:
        lines.append("parent-only labels (Fig 3b): n/a (no hierarchy; pass --hierarchy)")
    else:
        lines.append(f"parent-only labels (Fig 3b): {stats['parent_only_share']:.1%} of objects in a hierarchy "
                     f"family carry the parent label only ({stats['hierarchy']})")
        po = stats["parent_only"]
        w = max([len(n) for n in po] + [6])
        lines.append(f"  {'parent':<{w}}  objects  parent-only  share")
        for n, r in po.items():
            lines.append(f"  {n:<{w}}  {r['objects']:>7}  {r['parent_only']:>11}  {r['share']:>5.1%}")
    if "sampling" in stats:
        s = stats["sampling"]
        lines.append("")
        lines.append(f"expected views per image in one epoch of {s['epoch_draws']} draws "
                     f"(head {stats['head']['name']}, tail {stats['tail']['name']}):")
        lines.append(f"  {'sampler':<30} {'head views':>10} {'head unseen':>11} {'tail views':>10} {'tail unseen':>11}")
        for name, r in s["rows"].items():
            lines.append(f"  {name:<30} {r['head_views']:>10.3f} {r['head_unseen']:>11.1%} "
                         f"{r['tail_views']:>10.2f} {r['tail_unseen']:>11.1%}")
    if stats.get("plots"):
        lines.append("")
        lines.append("plots: " + ", ".join(stats["plots"]))
    return "\n".join(lines)
