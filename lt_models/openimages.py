"""Open Images challenge CSVs + hierarchy JSON -> LVIS-format JSON.

Inputs (the challenge 2019 file layout):
- boxes CSV: ImageID, Source, LabelName, Confidence, XMin, XMax, YMin, YMax, IsOccluded, IsTruncated, IsGroupOf,
  IsDepiction, IsInside, with coordinates normalised to [0, 1]. Only ImageID, LabelName and the four coordinates
  are required.
- image-level labels CSV: ImageID, Source, LabelName, Confidence. Confidence 1 means the class was verified
  present, 0 means verified absent.
- classes CSV: LabelName (MID), DisplayName. A header row is optional (the official file has none).
- hierarchy JSON: {"LabelName": ..., "Subcategory": [...]}, with MIDs as LabelName.

Output, with the same conventions as `lt_models.datasets`:
- categories: id 1..C in classes-file order, `name` = DisplayName (made unique with the MID if two classes
  share one), `mid` = LabelName. `image_count`, `instance_count` and `frequency` come from the box counts, with
  the LVIS thresholds.
- images: integer `id` in order of first appearance, `oi_image_id`, `file_name` = ``<ImageID>.jpg``, `width`,
  `height`. Then `neg_category_ids`: the classes whose image-level label has Confidence 0, plus all their
  descendants in the hierarchy (verified "no fruit" means no apple). `not_exhaustive_category_ids`: classes
  verified present without a box, and classes boxed only as a group (IsGroupOf=1). For those, LVIS evaluation
  ignores unmatched detections instead of counting them as false positives, which is close to Open Images' own
  group-of rule. `pos_category_ids`: the classes whose image-level label has Confidence 1, for the Open
  Images evaluator.
- annotations: pixel `bbox` xywh, `area`, `iscrowd` = 0, and `isgroupof` (0/1) for the Open Images evaluator.

Image sizes. The CSVs hold normalised coordinates only, and an LVIS file needs pixels. Sizes come from, in
order:
1. `ImageWidth` / `ImageHeight` columns in the boxes CSV or the labels CSV;
2. the header of the image file ``<out_json dir>/images/<ImageID>.jpg`` (or .png), which is where
   `LVISDetection` looks for images by default.
An image with neither is an error that names the ImageID. With ``skip_invalid`` the image is skipped and
counted. There is no guessed default size, because boxes in a made-up frame would silently disagree with the
detector's predictions.
"""
from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from lt_models.atomic import write_json_atomic
from lt_models.errors import AnnotationError

_BOX_REQUIRED = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")
_LABEL_REQUIRED = ("ImageID", "LabelName", "Confidence")


def _open_csv(path: Path, required: tuple[str, ...]) -> tuple[csv.DictReader, object]:
    try:
        fh = open(path, newline="")
    except FileNotFoundError:
        raise AnnotationError(f"{path}: CSV file not found; check the path") from None
    reader = csv.DictReader(fh)
    cols = reader.fieldnames or []
    missing = [c for c in required if c not in cols]
    if missing:
        fh.close()
        raise AnnotationError(f"{path}: missing column '{missing[0]}' (header has {cols}); an Open Images CSV "
                              f"needs columns {list(required)}")
    return reader, fh


def _read_classes(path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise AnnotationError(f"{path}: classes CSV not found; check the path") from None
    if rows and [c.strip() for c in rows[0][:2]] == ["LabelName", "DisplayName"]:
        rows = [(i + 2, r) for i, r in enumerate(rows[1:])]
    else:
        rows = [(i + 1, r) for i, r in enumerate(rows)]
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


def _size_from_file(image_dir: Path, image_id: str) -> tuple[int, int] | None:
    from PIL import Image

    for ext in (".jpg", ".jpeg", ".png"):
        p = image_dir / f"{image_id}{ext}"
        if p.is_file():
            with Image.open(p) as im:   # reads the header only
                return im.size
    return None




def convert_openimages(boxes_csv: str | os.PathLike, labels_csv: str | os.PathLike, classes_csv: str | os.PathLike,
                       hierarchy_json: str | os.PathLike, out_json: str | os.PathLike,
                       skip_invalid: bool = False) -> dict:
    """Convert Open Images challenge files into one LVIS-format JSON (see the module docstring); returns a summary.

    Bad input (missing column, unknown LabelName, coordinates outside [0,1] or XMin >= XMax, Confidence not 0/1,
    no image size, a class both boxed and verified absent) raises `AnnotationError` naming the file, line,
    ImageID and field. With `skip_invalid` the row (or image) is skipped and counted in the summary instead.
    """
    from lt_models.datasets import (frequency_buckets, hierarchy_ancestors, load_hierarchy, name_to_cat_id)

    boxes_csv, labels_csv, classes_csv = Path(boxes_csv), Path(labels_csv), Path(classes_csv)
    hierarchy_json, out_json = Path(hierarchy_json), Path(out_json)
    reasons: Counter = Counter()
    hint = "fix it or pass --skip-invalid to skip such rows"

    def bad(reason: str, msg: str) -> None:
        if not skip_invalid:
            raise AnnotationError(f"{msg}; {hint}")
        reasons[reason] += 1

    classes = _read_classes(classes_csv)
    name_count = Counter(n for _, n in classes)
    categories = [{"id": k + 1, "name": name if name_count[name] == 1 else f"{name} ({mid})", "mid": mid}
                  for k, (mid, name) in enumerate(classes)]
    mid_to_cat = {c["mid"]: c["id"] for c in categories}
    hierarchy = load_hierarchy(hierarchy_json, name_to_cat_id(categories))
    descendants: dict[int, set[int]] = defaultdict(set)
    for c, ancs in hierarchy_ancestors(hierarchy).items():
        for a in ancs:
            descendants[a].add(c)

    image_index: dict[str, int] = {}
    sizes: dict[str, tuple[float, float]] = {}
    size_line: dict[str, str] = {}

    def note_image(iid: str, row: dict, where: str) -> bool:
        image_index.setdefault(iid, len(image_index) + 1)
        w, h = row.get("ImageWidth"), row.get("ImageHeight")
        if w in (None, "") and h in (None, ""):
            return True
        try:
            wh = (float(w), float(h))
            if not (wh[0] > 0 and wh[1] > 0):
                raise ValueError
        except (TypeError, ValueError):
            bad("bad image size", f"{where} (ImageID {iid}): fields 'ImageWidth'/'ImageHeight' = {w!r}/{h!r} must "
                                  f"be positive numbers")
            return False
        if iid in sizes and sizes[iid] != wh:
            bad("bad image size", f"{where} (ImageID {iid}): 'ImageWidth'/'ImageHeight' {wh} disagree with "
                                  f"{sizes[iid]} given at {size_line[iid]}")
            return False
        sizes[iid], size_line[iid] = wh, where
        return True

    def image_and_class(row: dict, where: str) -> tuple[str | None, str | None]:
        """Validate the ImageID and LabelName fields shared by both CSVs; (None, None) if the row is bad."""
        iid = (row["ImageID"] or "").strip()
        if not iid:
            bad("missing ImageID", f"{where}: empty field 'ImageID'")
            return None, None
        if not note_image(iid, row, where):
            return None, None
        mid = (row["LabelName"] or "").strip()
        if mid not in mid_to_cat:
            bad("unknown LabelName", f"{where} (ImageID {iid}): field 'LabelName' = {mid!r} is not in "
                                     f"{classes_csv}")
            return None, None
        return iid, mid

    # --- boxes ---
    raw_boxes: list[tuple[str, int, float, float, float, float, int, str]] = []
    reader, fh = _open_csv(boxes_csv, _BOX_REQUIRED)
    with fh:
        for line, row in enumerate(reader, start=2):
            where = f"{boxes_csv}: line {line}"
            iid, mid = image_and_class(row, where)
            if iid is None:
                continue
            try:
                x0, x1, y0, y1 = (float(row[k]) for k in ("XMin", "XMax", "YMin", "YMax"))
            except (TypeError, ValueError):
                bad("bad box", f"{where} (ImageID {iid}): fields XMin/XMax/YMin/YMax = "
                               f"{[row[k] for k in ('XMin', 'XMax', 'YMin', 'YMax')]} must be numbers")
                continue
            field = next((k for k, v in (("XMin", x0), ("XMax", x1), ("YMin", y0), ("YMax", y1))
                          if not 0.0 <= v <= 1.0), None)
            if field is not None:
                bad("bad box", f"{where} (ImageID {iid}): field '{field}' = {row[field]} is outside [0, 1] "
                               f"(coordinates are normalised)")
                continue
            if x1 <= x0 or y1 <= y0:
                bad("bad box", f"{where} (ImageID {iid}): field 'XMax'/'YMax' must exceed 'XMin'/'YMin' "
                               f"(got x {x0}..{x1}, y {y0}..{y1}): the box has width or height <= 0")
                continue
            g = (row.get("IsGroupOf") or "0").strip()
            if g not in ("0", "1", "-1"):
                bad("bad IsGroupOf", f"{where} (ImageID {iid}): field 'IsGroupOf' = {g!r} must be 0 or 1")
                continue
            raw_boxes.append((iid, mid_to_cat[mid], x0, x1, y0, y1, int(g == "1"), where))

    # --- image-level labels ---
    pos_labels: dict[str, set[int]] = defaultdict(set)
    neg_labels: dict[str, dict[int, str]] = defaultdict(dict)
    reader, fh = _open_csv(labels_csv, _LABEL_REQUIRED)
    with fh:
        for line, row in enumerate(reader, start=2):
            where = f"{labels_csv}: line {line}"
            iid, mid = image_and_class(row, where)
            if iid is None:
                continue
            try:
                conf = float(row["Confidence"])
            except (TypeError, ValueError):
                conf = -1.0
            if conf not in (0.0, 1.0):
                bad("bad Confidence", f"{where} (ImageID {iid}): field 'Confidence' = {row['Confidence']!r} must "
                                      f"be 1 (verified present) or 0 (verified absent)")
                continue
            if conf == 1.0:
                pos_labels[iid].add(mid_to_cat[mid])
            else:
                neg_labels[iid][mid_to_cat[mid]] = where

    # --- image sizes ---
    image_dir = out_json.parent / "images"
    dropped: set[str] = set()
    for iid in image_index:
        if iid not in sizes:
            wh = _size_from_file(image_dir, iid)
            if wh is None:
                bad("no image size", f"ImageID {iid}: no image size: add 'ImageWidth'/'ImageHeight' columns to "
                                     f"{boxes_csv} (or {labels_csv}) or put the image at {image_dir}/{iid}.jpg")
                dropped.add(iid)
                continue
            sizes[iid] = (float(wh[0]), float(wh[1]))

    # --- assemble ---
    anns = []
    boxed: dict[str, set[int]] = defaultdict(set)
    grouped: dict[str, set[int]] = defaultdict(set)     # classes with a group-of box in the image
    single: dict[str, set[int]] = defaultdict(set)      # classes with an individual box in the image
    for iid, cid, x0, x1, y0, y1, group, _where in raw_boxes:
        if iid in dropped:
            reasons["box of skipped image"] += 1
            continue
        W, H = sizes[iid]
        x, y, w, h = x0 * W, y0 * H, (x1 - x0) * W, (y1 - y0) * H
        anns.append({"id": len(anns) + 1, "image_id": image_index[iid], "category_id": cid,
                     "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "area": round(w * h, 2),
                     "iscrowd": 0, "isgroupof": group})
        boxed[iid].add(cid)
        (grouped if group else single)[iid].add(cid)

    images = []
    for iid, num in image_index.items():
        if iid in dropped:
            continue
        pos = pos_labels.get(iid, set())
        present = boxed[iid] | pos
        neg: set[int] = set()
        for cid, where in sorted(neg_labels.get(iid, {}).items()):
            expanded = {cid} | descendants.get(cid, set())
            clash = sorted(expanded & present)
            if clash:
                bad("negative label of a present class",
                    f"{where} (ImageID {iid}): field 'Confidence' = 0 (verified absent) for "
                    f"{categories[cid - 1]['name']!r}, but the image has a box or a Confidence 1 label of "
                    f"{categories[clash[0] - 1]['name']!r}")
                expanded -= present
            neg |= expanded
        not_exhaustive = (pos - boxed[iid]) | (grouped[iid] - single[iid])
        W, H = sizes[iid]
        images.append({"id": num, "oi_image_id": iid, "file_name": f"{iid}.jpg",
                       "width": int(W) if float(W).is_integer() else W,
                       "height": int(H) if float(H).is_integer() else H,
                       "neg_category_ids": sorted(neg), "not_exhaustive_category_ids": sorted(not_exhaustive),
                       "pos_category_ids": sorted(pos)})
    if not images:
        raise AnnotationError(f"{boxes_csv}: no valid image left after conversion "
                              f"({sum(reasons.values())} invalid records skipped); check the inputs")

    img_sets: dict[int, set] = defaultdict(set)
    inst: Counter = Counter()
    for a in anns:
        img_sets[a["category_id"]].add(a["image_id"])
        inst[a["category_id"]] += 1
    counts = np.array([len(img_sets[c["id"]]) for c in categories])
    for c, n, b in zip(categories, counts, frequency_buckets(counts)):
        c.update(image_count=int(n), instance_count=int(inst[c["id"]]), frequency=b)

    out = {"info": {"description": "converted from Open Images CSVs by ltsweep",
                    "boxes": boxes_csv.name, "labels": labels_csv.name, "classes": classes_csv.name,
                    "hierarchy": hierarchy_json.name},
           "images": images, "annotations": anns, "categories": categories}
    write_json_atomic(out_json, out)
    nz = counts[counts > 0]
    freq = [c["frequency"] for c in categories]
    return {"out": str(out_json), "images": len(images), "annotations": len(anns), "categories": len(categories),
            "group_of_boxes": sum(a["isgroupof"] for a in anns),
            "negative_labels": sum(len(i["neg_category_ids"]) for i in images),
            "hierarchy_parents": len(hierarchy),
            "buckets": {b: freq.count(b) for b in "rcf"},
            "imbalance": float(nz.max() / nz.min()) if len(nz) else 0.0,
            "invalid_skipped": int(sum(reasons.values())), "invalid_reasons": dict(sorted(reasons.items()))}
