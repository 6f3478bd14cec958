"""Reading and validating an LVIS/COCO-format annotation file (`load_lvis_json`).

Malformed JSON, an unknown `category_id`/`image_id`, a box with w or h <= 0 or more than `BOX_TOLERANCE` px outside
its image, a missing image file, duplicate image/annotation ids, a category that is both annotated and listed in
`neg_category_ids` of one image -> `AnnotationError` naming the file, the id and the field. With
``skip_invalid=True`` the offending record is skipped instead and counted in ``data["invalid_skipped"]`` /
``data["invalid_reasons"]``. This reader runs once per dataset, when its annotation store is built.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import numpy as np

from lt_models.data.annotations import FREQ_LABELS, read_json
from lt_models.errors import AnnotationError

BOX_TOLERANCE = 1.0  # px a box may stick out of its image (float rounding in COCO/LVIS); it is clipped
_HINT = "fix it, or skip such records: --skip-invalid on the ltsweep command (data.skip_invalid: true in a sweep YAML)"


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


class _Problems:
    """Where a bad record goes: an `AnnotationError` naming the file, or (``skip_invalid``) a count per reason."""

    reasons: Counter[str]

    def __init__(self, path: Path, skip_invalid: bool):
        self.path, self.skip_invalid, self.reasons = path, skip_invalid, Counter()

    def __call__(self, reason: str, msg: str) -> None:
        if not self.skip_invalid:
            raise AnnotationError(f"{self.path}: {msg}; {_HINT}")
        self.reasons[reason] += 1


def _new_id(rec: object, kind: str, seen, bad: _Problems) -> int | None:
    """The record's integer `id`, or None (after reporting it to `bad`) when it is not an integer or already seen."""
    rid = rec.get("id") if isinstance(rec, dict) else None
    if not _is_int(rid):
        bad(f"{kind} id", f"{kind} {rec!r}: field 'id' must be an integer")
        return None
    if rid in seen:
        bad(f"duplicate {kind} id", f"{kind} id {rid}: duplicate 'id' (first one kept)")
        return None
    return rid


def image_file_name(img: dict) -> str | None:
    """Image path relative to the image folder: `file_name`, else ``<split>/<file>`` from `coco_url`.

    LVIS v1 has no `file_name`; its val set mixes COCO train2017 and val2017 images, so for LVIS v1 the image
    folder is the COCO root holding train2017/ and val2017/ (as in detectron2): the last two path components of
    the URL, e.g. ``http://images.cocodataset.org/train2017/000000391895.jpg`` -> ``train2017/000000391895.jpg``.
    `file_name` (LVIS v0.5, COCO, the synthetic benchmark) wins when both are present.
    """
    if img.get("file_name"):
        return str(img["file_name"])
    if img.get("coco_url"):
        parts = [p for p in PurePosixPath(urlsplit(str(img["coco_url"])).path).parts if p != "/"]
        return "/".join(parts[-2:]) or None
    return None


def _image_source(img: dict, fname: str) -> str:
    """Which field an image path came from, for error messages: ``field 'file_name' = 'a.jpg'`` or the URL."""
    if img.get("file_name"):
        return f"field 'file_name' = {fname!r}"
    return f"field 'coco_url' = {str(img['coco_url'])!r} (-> {fname!r})"


def load_lvis_json(
    path: str | os.PathLike, image_dir: str | os.PathLike | None = None, skip_invalid: bool = False
) -> dict:
    """Read and validate an LVIS/COCO-format file; returns a new dict with clean records.

    `image_dir`: when given, every image file must exist there. Boxes up to `BOX_TOLERANCE` px outside the image
    are clipped; further out is an error. `area` defaults to w*h, `iscrowd` to 0, the federated lists to [].
    Raises `AnnotationError` naming file, id and field; with `skip_invalid` skips the record instead
    (an invalid image takes its annotations with it) and reports ``invalid_skipped`` / ``invalid_reasons``.
    """
    path = Path(path)
    data = read_json(path)
    bad = _Problems(path, skip_invalid)
    _check_layout(path, data)
    cats = _categories(path, data["categories"])
    images, dropped = _images(path, data["images"], cats, None if image_dir is None else Path(image_dir), bad)
    anns = _annotations(data["annotations"], images, dropped, cats, bad)
    _drop_annotated_negatives(images, anns, bad)
    out = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    out.update(
        images=list(images.values()),
        annotations=anns,
        categories=list(cats.values()),
        invalid_skipped=int(sum(bad.reasons.values())),
        invalid_reasons=dict(sorted(bad.reasons.items())),
    )
    return out


def _check_layout(path: Path, data: object) -> None:
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: top level must be a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(
                f"{path}: missing or non-list field '{key}'; an LVIS/COCO file needs "
                f"'images', 'annotations' and 'categories' lists"
            )


def _categories(path: Path, records: list) -> dict[int, dict]:
    cats: dict[int, dict] = {}
    for c in records:
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise AnnotationError(f"{path}: category {c!r}: field 'id' must be an integer")
        if c["id"] in cats:
            raise AnnotationError(f"{path}: category id {c['id']}: duplicate 'id'; category ids must be unique")
        if "frequency" in c and c["frequency"] not in FREQ_LABELS:
            raise AnnotationError(
                f"{path}: category id {c['id']}: field 'frequency' = {c['frequency']!r}, "
                f"expected 'r', 'c' or 'f' (or leave it out to compute it)"
            )
        cats[int(c["id"])] = dict(c, name=str(c.get("name", c["id"])))
    return cats


def _images(path: Path, records: list, cats: dict, idir: Path | None, bad: _Problems) -> tuple[dict[int, dict], set]:
    """The valid image records by id, and the ids of the images skipped (their annotations go with them)."""
    images: dict[int, dict] = {}
    dropped: set = set()
    for img in records:
        iid = _new_id(img, "image", images, bad)
        if iid is None:
            continue
        w, h = img.get("width"), img.get("height")
        if not (_is_num(w) and _is_num(h) and w > 0 and h > 0):
            bad("image size", f"image id {iid}: fields 'width'/'height' = {w!r}/{h!r} must be positive numbers")
            dropped.add(iid)
            continue
        fname = image_file_name(img)
        if idir is not None and not _image_file_exists(img, iid, fname, idir, bad):
            dropped.add(iid)
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
    return images, dropped


def _image_file_exists(img: dict, iid: int, fname: str | None, idir: Path, bad: _Problems) -> bool:
    if fname is None:
        bad("image file", f"image id {iid}: no 'file_name' (or 'coco_url') field")
        return False
    if not (idir / fname).is_file():
        where = (
            "wrong --images dir? For LVIS v1 (coco_url) the image dir (--images, data.image_dir, "
            "data.val_image_dir) is the COCO root holding train2017/ and val2017/"
            if not img.get("file_name")
            else "wrong --images dir?"
        )
        bad(
            "missing image file",
            f"image id {iid}: {_image_source(img, fname)}: image file {idir / fname} does not exist ({where})",
        )
        return False
    return True


def _annotations(records: list, images: dict, dropped: set, cats: dict, bad: _Problems) -> list[dict]:
    anns: list[dict] = []
    ann_ids: set = set()
    for a in records:
        aid = _new_id(a, "annotation", ann_ids, bad)
        if aid is None:
            continue
        ann_ids.add(aid)
        iid, cid = a.get("image_id"), a.get("category_id")
        if iid in dropped:
            bad.reasons["annotation of skipped image"] += 1
            continue
        if iid not in images:
            bad("unknown image id", f"annotation id {aid}: field 'image_id' = {iid!r} is not an image id in this file")
            continue
        if cid not in cats:
            bad(
                "unknown category id",
                f"annotation id {aid}: field 'category_id' = {cid!r} is not a category id in this file",
            )
            continue
        box = _clipped_box(a.get("bbox"), aid, images[iid], bad)
        if box is None:
            continue
        rec = dict(a, bbox=box)
        rec.setdefault("area", rec["bbox"][2] * rec["bbox"][3])
        rec.setdefault("iscrowd", 0)
        anns.append(rec)
    return anns


def _clipped_box(box: object, aid: int, image: dict, bad: _Problems) -> list | None:
    """The annotation's [x, y, w, h], clipped to its image when it sticks out by at most `BOX_TOLERANCE` px;
    None (reported) when it is not a box of positive size inside the image."""
    iid = image["id"]
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_num(v) for v in box)):
        bad("bad box", f"annotation id {aid}: field 'bbox' = {box!r} must be [x, y, w, h] (4 finite numbers)")
        return None
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        bad("bad box", f"annotation id {aid} (image id {iid}): field 'bbox' = {list(box)} has width or height <= 0")
        return None
    W, H = float(image["width"]), float(image["height"])
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > W + t or y + h > H + t:
        bad(
            "bad box",
            f"annotation id {aid} (image id {iid}): field 'bbox' = {list(box)} lies outside the {W:g}x{H:g} image",
        )
        return None
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
    return [x0, y0, x1 - x0, y1 - y0] if (x0, y0, x1, y1) != (x, y, x + w, y + h) else list(box)


def _drop_annotated_negatives(images: dict, anns: list[dict], bad: _Problems) -> None:
    """LVIS semantics: a category annotated in an image cannot also be verified absent from it."""
    pos: dict[int, set] = defaultdict(set)
    for a in anns:
        pos[a["image_id"]].add(a["category_id"])
    for iid, rec in images.items():
        clash = sorted(set(rec["neg_category_ids"]) & pos.get(iid, set()))
        if clash:
            bad(
                "negative and annotated",
                f"image id {iid}: field 'neg_category_ids' lists category id {clash[0]} that is annotated in the image",
            )
            rec["neg_category_ids"] = [c for c in rec["neg_category_ids"] if c not in clash]
