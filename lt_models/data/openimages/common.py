"""What both Open Images converters share: the classes file, the categories, the training buckets, the pixel boxes
and the wording of every invalid-row message.

`lt_models.data.openimages.convert` (row by row, the reference, writes LVIS-format JSON) and
`lt_models.data.openimages.streaming` (streaming, vectorised, writes the annotation store) read the same inputs with the
same rules; keeping these pieces in one place is what lets tests/test_openimages_store.py demand identical output,
errors and skip counts.

Rounding: pixel boxes and areas are rounded to 2 decimals by `pixel_boxes` with ``np.round`` (x * 100, round half
to even, / 100). Python's ``round(x, 2)`` rounds the exact decimal value instead and can differ in the last digit,
so neither converter uses it.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lt_models.data.annotations import category_image_counts, load_hierarchy, name_to_cat_id, read_json
from lt_models.errors import AnnotationError

SKIP_HINT = "fix it or pass --skip-invalid to skip such rows"
COORDS = ("XMin", "XMax", "YMin", "YMax")


def pixel_boxes(x0, x1, y0, y1, width, height) -> tuple[np.ndarray, np.ndarray]:
    """(bbox float64 [n,4] pixel xywh, area float64 [n]) of normalised corners in images of `width` x `height`,
    both rounded to 2 decimals (area from the unrounded w and h): the one rounding of both converters."""
    x0, x1, y0, y1, width, height = (np.asarray(a, dtype=np.float64) for a in (x0, x1, y0, y1, width, height))
    w, h = (x1 - x0) * width, (y1 - y0) * height
    bbox = np.round(np.stack([x0 * width, y0 * height, w, h], axis=1).reshape(-1, 4), 2)
    return bbox, np.round(w * h, 2)


# --- invalid-row messages (where = "<file>: line <n>") -------------------------------------------------------------


def msg_missing_id(where: str) -> str:
    return f"{where}: empty field 'ImageID'"


def msg_size_format(where: str, iid: str, w, h) -> str:
    return f"{where} (ImageID {iid}): fields 'ImageWidth'/'ImageHeight' = {w!r}/{h!r} must be positive numbers"


def msg_size_disagree(where: str, iid: str, wh: tuple, first: tuple, first_where: str) -> str:
    return f"{where} (ImageID {iid}): 'ImageWidth'/'ImageHeight' {wh} disagree with {first} given at {first_where}"


def msg_unknown_label(where: str, iid: str, mid: str, classes_csv: Path) -> str:
    return f"{where} (ImageID {iid}): field 'LabelName' = {mid!r} is not in {classes_csv}"


def msg_not_numbers(where: str, iid: str, raw: list) -> str:
    return f"{where} (ImageID {iid}): fields XMin/XMax/YMin/YMax = {raw} must be numbers"


def msg_outside(where: str, iid: str, field: str, raw: str) -> str:
    return f"{where} (ImageID {iid}): field '{field}' = {raw} is outside [0, 1] (coordinates are normalised)"


def msg_empty_box(where: str, iid: str, x0: float, x1: float, y0: float, y1: float) -> str:
    return (
        f"{where} (ImageID {iid}): field 'XMax'/'YMax' must exceed 'XMin'/'YMin' (got x {x0}..{x1}, "
        f"y {y0}..{y1}): the box has width or height <= 0"
    )


def msg_group(where: str, iid: str, g: str) -> str:
    return f"{where} (ImageID {iid}): field 'IsGroupOf' = {g!r} must be 0 or 1"


def msg_confidence(where: str, iid: str, raw) -> str:
    return f"{where} (ImageID {iid}): field 'Confidence' = {raw!r} must be 1 (verified present) or 0 (verified absent)"


def msg_no_size(iid: str, image_dir: Path, boxes_csv: Path, labels_csv: Path) -> str:
    return (
        f"ImageID {iid}: no image size: add 'ImageWidth'/'ImageHeight' columns to {boxes_csv} (or {labels_csv}), "
        f"pass --image-sizes CSV (ImageID,ImageWidth,ImageHeight), or put the image at "
        f"{image_dir / (iid + '.jpg')} (or pass its folder as --images)"
    )


def msg_unreadable(iid: str, path: Path, err: str) -> str:
    return (
        f"ImageID {iid}: cannot read the image size from the header of {path} ({err}); replace the file "
        f"(truncated or not an image?) or give its size with --image-sizes CSV"
    )


def msg_negative_present(where: str, iid: str, absent: str, present: str) -> str:
    return (
        f"{where} (ImageID {iid}): field 'Confidence' = 0 (verified absent) for {absent!r}, but the image has "
        f"a box or a Confidence 1 label of {present!r}"
    )


# --- classes, categories, training buckets -------------------------------------------------------------------------


def _read_classes(path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, newline="") as fh:
            raw = list(csv.reader(fh))
    except FileNotFoundError:
        raise AnnotationError(f"{path}: classes CSV not found; check the path") from None
    if raw and [c.strip() for c in raw[0][:2]] == ["LabelName", "DisplayName"]:
        rows = [(i + 2, r) for i, r in enumerate(raw[1:])]
    else:
        rows = [(i + 1, r) for i, r in enumerate(raw)]
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for line, r in rows:
        if not r or not "".join(r).strip():
            continue
        if len(r) != 2 or not r[0].strip():
            raise AnnotationError(f"{path}: line {line}: expected 2 fields LabelName,DisplayName, got {r!r}")
        mid, name = r[0].strip(), r[1].strip()
        if mid in seen:
            raise AnnotationError(f"{path}: line {line}: duplicate LabelName {mid!r}; each class once")
        seen.add(mid)
        out.append((mid, name))
    if not out:
        raise AnnotationError(f"{path}: no classes; expected rows LabelName,DisplayName")
    return out


def _categories(classes: list[tuple[str, str]]) -> list[dict]:
    """Categories 1..C in classes-file order; a DisplayName shared by two classes gets the MID appended."""
    name_count = Counter(n for _, n in classes)
    return [
        {"id": k + 1, "name": name if name_count[name] == 1 else f"{name} ({mid})", "mid": mid}
        for k, (mid, name) in enumerate(classes)
    ]


def _train_image_counts(train_ann: Path, categories: list[dict], classes_csv: Path, out_json: Path) -> dict[int, int]:
    """Training images per category id of `categories`, read from the converted training JSON `train_ann` (or the
    ``meta.json`` of a training store written by ``convert-openimages --store``, whose categories carry the counts).

    Categories are matched by `mid`; the training file must list exactly the same categories (id, mid, name).
    Counts are the training categories' `image_count` fields, or counted from its annotations when absent.
    """
    if (Path(train_ann) / "meta.json").is_file():
        train_ann = Path(train_ann) / "meta.json"
    fix = f"convert the training split with the same classes CSV ({classes_csv}) and pass that JSON as --train-ann"
    data = read_json(train_ann, "training annotations")
    tcats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(tcats, list) or not all(isinstance(c, dict) for c in tcats):
        raise AnnotationError(
            f"{train_ann}: no 'categories' list of objects; --train-ann must be an LVIS-format "
            f"training JSON written by convert-openimages"
        )
    by_mid: dict[str, dict] = {}
    for c in tcats:
        if not isinstance(c.get("mid"), str):
            raise AnnotationError(
                f"{train_ann}: category {c.get('id')!r} has no 'mid' field; --train-ann must be a "
                f"training JSON written by convert-openimages, needed by {out_json}"
            )
        by_mid[c["mid"]] = c
    for c in categories:
        if c["mid"] not in by_mid:
            raise AnnotationError(
                f"{train_ann}: no category with mid {c['mid']!r} ({c['name']!r} in {classes_csv}), "
                f"so {out_json} cannot take its frequency bucket from training counts; {fix}"
            )
    differ = f"differs from the category list of {out_json}; category ids must be identical, {fix}"
    for c in categories:
        t = by_mid[c["mid"]]
        if (t.get("id"), t.get("name")) != (c["id"], c["name"]):
            raise AnnotationError(
                f"{train_ann}: category mid {c['mid']!r} has id {t.get('id')!r}, name "
                f"{t.get('name')!r}, but id {c['id']}, name {c['name']!r} here: it {differ}"
            )
    if len(tcats) != len(categories):
        extra = sorted(set(by_mid) - {c["mid"] for c in categories})
        what = f"extra mid {extra[0]!r}" if extra else "a duplicate mid"
        raise AnnotationError(
            f"{train_ann}: {len(tcats)} categories ({what}) vs {len(categories)} in {classes_csv}: it {differ}"
        )
    if all(isinstance(c.get("image_count"), int) and c["image_count"] >= 0 for c in tcats):
        counts = {c["mid"]: c["image_count"] for c in tcats}
    else:
        if not isinstance(data.get("annotations"), list):
            raise AnnotationError(
                f"{train_ann}: categories without 'image_count' and no 'annotations' list to count "
                f"from; --train-ann must be a training JSON written by convert-openimages"
            )
        try:
            own, _ = category_image_counts(data)
        except (KeyError, TypeError):
            raise AnnotationError(
                f"{train_ann}: an annotation without a valid 'category_id' of its categories; "
                f"--train-ann must be a training JSON written by convert-openimages"
            ) from None
        counts = {c["mid"]: own[c["id"]] for c in tcats}
    return {c["id"]: counts[c["mid"]] for c in categories}


def summary(
    out: str,
    images: int,
    annotations: int,
    categories: list[dict],
    group_of: int,
    negative: int,
    hierarchy_parents: int,
    source: str,
    reasons: Counter,
) -> dict:
    """The summary both converters return (and ``ltsweep data convert-openimages`` prints)."""
    counts = np.array([c["image_count"] for c in categories])
    nz = counts[counts > 0]
    freq = [c["frequency"] for c in categories]
    return {
        "out": out,
        "images": images,
        "annotations": annotations,
        "categories": len(categories),
        "group_of_boxes": group_of,
        "negative_labels": negative,
        "hierarchy_parents": hierarchy_parents,
        "buckets": {b: freq.count(b) for b in "rcf"},
        "frequency_source": source,
        "imbalance": float(nz.max() / nz.min()) if len(nz) else 0.0,
        "invalid_skipped": int(sum(reasons.values())),
        "invalid_reasons": dict(sorted(reasons.items())),
    }


@dataclass
class Inputs:
    """What a conversion knows before reading the CSVs: paths, categories, hierarchy, training counts."""

    boxes_csv: Path
    labels_csv: Path
    classes_csv: Path
    hierarchy_json: Path
    image_dir: Path
    categories: list[dict]
    hierarchy: dict[int, list[int]]
    train_counts: dict[int, int] | None
    frequency_source: str

    @property
    def info(self) -> dict:
        return {
            "description": "converted from Open Images CSVs by ltsweep",
            "boxes": self.boxes_csv.name,
            "labels": self.labels_csv.name,
            "classes": self.classes_csv.name,
            "hierarchy": self.hierarchy_json.name,
        }


def read_inputs(
    boxes_csv: str | os.PathLike,
    labels_csv: str | os.PathLike,
    classes_csv: str | os.PathLike,
    hierarchy_json: str | os.PathLike,
    out: Path,
    image_dir: str | os.PathLike | None,
    train_ann: str | os.PathLike | None,
) -> Inputs:
    """Check the image folder (default ``<dir of out>/images``), read the classes, the hierarchy and (`train_ann`)
    the training image counts; `out` is the converter's output, named in error messages."""
    if image_dir is not None and not Path(image_dir).is_dir():
        raise AnnotationError(
            f"{image_dir}: image folder not found; --images must be the folder holding the <ImageID>.jpg files"
        )
    classes_csv = Path(classes_csv)
    categories = _categories(_read_classes(classes_csv))
    hierarchy = load_hierarchy(Path(hierarchy_json), name_to_cat_id(categories))
    train_counts, source = None, "self: image_count"
    if train_ann is not None:
        train_counts = _train_image_counts(Path(train_ann), categories, classes_csv, out)
        source = f"train: {train_ann} image_count"
    return Inputs(
        Path(boxes_csv),
        Path(labels_csv),
        classes_csv,
        Path(hierarchy_json),
        Path(image_dir) if image_dir is not None else out.parent / "images",
        categories,
        hierarchy,
        train_counts,
        source,
    )
