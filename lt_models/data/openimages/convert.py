"""Open Images challenge CSVs + hierarchy JSON -> LVIS-format JSON.

Inputs (the challenge 2019 file layout):
- boxes CSV: ImageID, Source, LabelName, Confidence, XMin, XMax, YMin, YMax, IsOccluded, IsTruncated, IsGroupOf,
  IsDepiction, IsInside, coordinates in [0, 1]; only ImageID, LabelName and the four coordinates are required.
- image-level labels CSV: ImageID, Source, LabelName, Confidence. Confidence 1 means the class was verified
  present, 0 means verified absent.
- classes CSV: LabelName (MID), DisplayName. A header row is optional (the official file has none).
- hierarchy JSON: {"LabelName": ..., "Subcategory": [...]}, with MIDs as LabelName.

Output, with the same conventions as `lt_models.data.datasets`:
- categories: id 1..C in classes-file order, `name` = DisplayName (made unique with the MID if two classes
  share one), `mid` = LabelName. `image_count` and `instance_count` are this file's own box counts. `frequency`
  (the LVIS r/c/f bucket, thresholds from `lt_models.data.annotations`) always comes from TRAINING image counts:
  converting the training split, from its own counts; converting a validation/test split, pass ``train_ann`` (the
  already converted training JSON, ``--train-ann`` on the command line) and each category gets the bucket of
  the training category with the same `mid`, as LVIS val files carry the training buckets. The two files must
  have the same categories (same ids, MIDs and names: convert both with the same classes CSV). Because `mid` is
  kept, the same MID-keyed hierarchy file serves the dataset and both evaluators
  (`lt_models.data.annotations.load_hierarchy`).
- frequency_source: where the buckets came from, ``"self: image_count"`` or ``"train: <train_ann> image_count"``.
- images: integer `id` in order of first appearance, `oi_image_id`, `file_name` = ``<ImageID>.jpg``, `width`,
  `height`. Then `neg_category_ids`: the classes whose image-level label has Confidence 0, plus all their
  descendants in the hierarchy (verified "no fruit" means no apple). `not_exhaustive_category_ids`: classes
  verified present without a box, and classes boxed only as a group (IsGroupOf=1). For those, LVIS evaluation
  ignores unmatched detections instead of counting them as false positives, which is close to Open Images' own
  group-of rule. `pos_category_ids`: the classes whose image-level label has Confidence 1, for the Open
  Images evaluator.
- annotations: pixel `bbox` xywh and `area`, rounded to 2 decimals (`common.pixel_boxes`, shared with the
  streaming converter `lt_models.data.openimages.streaming`), `iscrowd` = 0, and `isgroupof` (0/1) for the Open Images
  evaluator.

Image sizes. The CSVs hold normalised coordinates only, and an LVIS file needs pixels. Sizes come from, in
order:
1. `ImageWidth` / `ImageHeight` columns in the boxes CSV or the labels CSV;
2. an image-sizes CSV (``image_sizes``, ``--image-sizes``) with columns ImageID, ImageWidth, ImageHeight (pixels;
   other columns are ignored, and so are rows of images this conversion does not use, so one file can serve
   every split). A size that disagrees with one from 1. is an error;
3. the header of the image file ``<image_dir>/<ImageID>.jpg`` (or .jpeg, .png), where `image_dir` (``--images``)
   defaults to ``<out_json dir>/images``, where `LVISDetection` looks for images by default. Only the header is
   read (PIL, no pixel decoding), by a thread pool, with a tqdm progress bar on a terminal.
An image without a size is an error that names the ImageID and the file it looked for; so is an image whose
header cannot be read. With ``skip_invalid`` the image is skipped and counted. There is no guessed default size,
because boxes in a made-up frame would silently disagree with the detector's predictions.
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image
from tqdm import tqdm

from lt_models.atomic import write_json_atomic
from lt_models.data.annotations import fill_frequency, hierarchy_descendants
from lt_models.data.openimages import common as m
from lt_models.data.openimages.common import pixel_boxes
from lt_models.errors import AnnotationError

_BOX_REQUIRED = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")
_LABEL_REQUIRED = ("ImageID", "LabelName", "Confidence")
_SIZES_REQUIRED = ("ImageID", "ImageWidth", "ImageHeight")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_HEADER_CHUNK = 256  # images per thread-pool task when reading headers


def _open_csv(path: Path, required: tuple[str, ...]) -> tuple[csv.DictReader[str], TextIO]:
    try:
        fh = open(path, newline="")
    except FileNotFoundError:
        raise AnnotationError(f"{path}: CSV file not found; check the path") from None
    reader = csv.DictReader(fh)
    cols = reader.fieldnames or []
    missing = [c for c in required if c not in cols]
    if missing:
        fh.close()
        raise AnnotationError(
            f"{path}: missing column '{missing[0]}' (header has {cols}); an Open Images CSV "
            f"needs columns {list(required)}"
        )
    return reader, fh


def _header_sizes(image_dir: Path, image_ids: list[str]) -> list[tuple[str, Path | None, tuple[int, int] | str]]:
    """(ImageID, image file or None when there is none, (width, height) or the reason the header is unreadable).

    `Image.open` parses the header only; `.size` needs no pixel decoding.
    """
    out: list[tuple[str, Path | None, tuple[int, int] | str]] = []
    for iid in image_ids:
        path = next((p for p in (image_dir / f"{iid}{ext}" for ext in IMAGE_SUFFIXES) if p.is_file()), None)
        if path is None:
            out.append((iid, None, ""))
            continue
        try:
            with Image.open(path) as im:
                out.append((iid, path, im.size))
        except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
            out.append((iid, path, f"{type(e).__name__}: {e}"))
    return out


@dataclass
class _Conversion:
    """What one conversion has read so far, and its policy for invalid rows (raise, or skip and count)."""

    classes_csv: Path
    mid_to_cat: dict[str, int]
    skip_invalid: bool
    reasons: Counter = field(default_factory=Counter)
    image_index: dict[str, int] = field(default_factory=dict)  # ImageID -> image id, in order of appearance
    sizes: dict[str, tuple[float, float]] = field(default_factory=dict)
    size_line: dict[str, str] = field(default_factory=dict)  # where each size was first given

    def bad(self, reason: str, msg: str) -> None:
        if not self.skip_invalid:
            raise AnnotationError(f"{msg}; {m.SKIP_HINT}")
        self.reasons[reason] += 1


def _note_image(conv: _Conversion, iid: str, row: dict, where: str) -> bool:
    """Register the image and the size its row gives (if any); False if that size is invalid or contradicts."""
    conv.image_index.setdefault(iid, len(conv.image_index) + 1)
    return _note_size(conv, iid, row, where)


def _note_size(conv: _Conversion, iid: str, row: dict, where: str) -> bool:
    """Record the size a row gives (if any); False if that size is invalid or contradicts an earlier one."""
    w: Any = row.get("ImageWidth")  # a string, or None: float() below rejects a bad one
    h: Any = row.get("ImageHeight")
    if w in (None, "") and h in (None, ""):
        return True
    try:
        wh = (float(w), float(h))
        if not (wh[0] > 0 and wh[1] > 0):
            raise ValueError
    except (TypeError, ValueError):
        conv.bad("bad image size", m.msg_size_format(where, iid, w, h))
        return False
    if iid in conv.sizes and conv.sizes[iid] != wh:
        conv.bad("bad image size", m.msg_size_disagree(where, iid, wh, conv.sizes[iid], conv.size_line[iid]))
        return False
    conv.sizes[iid], conv.size_line[iid] = wh, where
    return True


def _valid_rows(conv: _Conversion, path: Path, required: tuple[str, ...]):
    """(where, ImageID, category id, row) for each row of a CSV whose ImageID and LabelName fields are valid."""
    reader, fh = _open_csv(path, required)
    with fh:
        for line, row in enumerate(reader, start=2):
            where = f"{path}: line {line}"
            iid = (row["ImageID"] or "").strip()
            if not iid:
                conv.bad("missing ImageID", m.msg_missing_id(where))
                continue
            if not _note_image(conv, iid, row, where):
                continue
            mid = (row["LabelName"] or "").strip()
            if mid not in conv.mid_to_cat:
                conv.bad("unknown LabelName", m.msg_unknown_label(where, iid, mid, conv.classes_csv))
                continue
            yield where, iid, conv.mid_to_cat[mid], row


def _read_boxes(conv: _Conversion, boxes_csv: Path) -> list[tuple[str, int, float, float, float, float, int]]:
    """(ImageID, category id, XMin, XMax, YMin, YMax, is group-of) of every valid box row."""
    boxes = []
    for where, iid, cid, row in _valid_rows(conv, boxes_csv, _BOX_REQUIRED):
        try:
            x0, x1, y0, y1 = (float(row[k]) for k in ("XMin", "XMax", "YMin", "YMax"))
        except (TypeError, ValueError):
            conv.bad("bad box", m.msg_not_numbers(where, iid, [row[k] for k in m.COORDS]))
            continue
        outside = next(
            (k for k, v in (("XMin", x0), ("XMax", x1), ("YMin", y0), ("YMax", y1)) if not 0.0 <= v <= 1.0), None
        )
        if outside is not None:
            conv.bad("bad box", m.msg_outside(where, iid, outside, row[outside]))
            continue
        if x1 <= x0 or y1 <= y0:
            conv.bad("bad box", m.msg_empty_box(where, iid, x0, x1, y0, y1))
            continue
        g = (row.get("IsGroupOf") or "0").strip()
        if g not in ("0", "1", "-1"):
            conv.bad("bad IsGroupOf", m.msg_group(where, iid, g))
            continue
        boxes.append((iid, cid, x0, x1, y0, y1, int(g == "1")))
    return boxes


def _read_labels(conv: _Conversion, labels_csv: Path) -> tuple[dict[str, set[int]], dict[str, dict[int, str]]]:
    """(verified present classes per ImageID, verified absent classes per ImageID -> the row that says so)."""
    pos_labels: dict[str, set[int]] = defaultdict(set)
    neg_labels: dict[str, dict[int, str]] = defaultdict(dict)
    for where, iid, cid, row in _valid_rows(conv, labels_csv, _LABEL_REQUIRED):
        try:
            conf = float(row["Confidence"])
        except (TypeError, ValueError):
            conf = -1.0
        if conf not in (0.0, 1.0):
            conv.bad("bad Confidence", m.msg_confidence(where, iid, row["Confidence"]))
            continue
        if conf == 1.0:
            pos_labels[iid].add(cid)
        else:
            neg_labels[iid][cid] = where
    return pos_labels, neg_labels


def _read_sizes_csv(conv: _Conversion, sizes_csv: Path) -> None:
    """Sizes of this conversion's images without one, from an ImageID,ImageWidth,ImageHeight CSV."""
    reader, fh = _open_csv(sizes_csv, _SIZES_REQUIRED)
    with fh:
        for line, row in enumerate(reader, start=2):
            iid = (row["ImageID"] or "").strip()
            if iid in conv.image_index:
                _note_size(conv, iid, row, f"{sizes_csv}: line {line}")


def read_header_sizes(image_dir: Path, todo: list[str]) -> Generator[tuple[str, Path | None, tuple | str], None, None]:
    """Yield `_header_sizes` results for the ImageIDs `todo`, read `_HEADER_CHUNK` at a time in a thread pool with
    a tqdm bar; closing the generator (an error in the caller) stops the reading of the remaining headers."""
    if not todo:
        return
    chunks = [todo[i : i + _HEADER_CHUNK] for i in range(0, len(todo), _HEADER_CHUNK)]
    pool = ThreadPoolExecutor(thread_name_prefix="image-size")
    try:
        with tqdm(total=len(todo), desc="image sizes", unit="img", disable=None) as bar:
            for results in pool.map(_header_sizes, [image_dir] * len(chunks), chunks):
                yield from results
                bar.update(len(results))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def header_problem(
    iid: str, path: Path | None, size, image_dir: Path, boxes_csv: Path, labels_csv: Path
) -> tuple[str, str] | None:
    """(reason, message) of a `read_header_sizes` result that gives no size; None when it gives one."""
    if path is None:
        return "no image size", m.msg_no_size(iid, image_dir, boxes_csv, labels_csv)
    if isinstance(size, str):
        return "unreadable image", m.msg_unreadable(iid, path, size)
    return None


def _fill_sizes_from_files(conv: _Conversion, image_dir: Path, boxes_csv: Path, labels_csv: Path) -> set[str]:
    """Read the missing image sizes from the image files' headers, in threads; returns the ImageIDs left without."""
    dropped: set[str] = set()
    with closing(read_header_sizes(image_dir, [iid for iid in conv.image_index if iid not in conv.sizes])) as res:
        for iid, path, size in res:
            problem = header_problem(iid, path, size, image_dir, boxes_csv, labels_csv)
            if problem:
                conv.bad(*problem)
                dropped.add(iid)
            else:
                conv.sizes[iid] = (float(size[0]), float(size[1]))
    return dropped


def _annotations(conv: _Conversion, boxes: list[tuple], dropped: set[str]) -> list[dict]:
    """Pixel xywh annotations of the boxes of kept images (`pixel_boxes`: the rounding of both converters)."""
    kept = [b for b in boxes if b[0] not in dropped]
    if len(kept) < len(boxes):
        conv.reasons["box of skipped image"] += len(boxes) - len(kept)
    corners = np.array([b[2:6] for b in kept], dtype=np.float64).reshape(-1, 4)
    size = np.array([conv.sizes[b[0]] for b in kept], dtype=np.float64).reshape(-1, 2)
    x0, x1, y0, y1 = corners.T  # [4, n]: the rows XMin, XMax, YMin, YMax
    bbox, area = pixel_boxes(x0, x1, y0, y1, size[:, 0], size[:, 1])
    return [
        {
            "id": k + 1,
            "image_id": conv.image_index[b[0]],
            "category_id": b[1],
            "bbox": bb,
            "area": ar,
            "iscrowd": 0,
            "isgroupof": b[6],
        }
        for k, (b, bb, ar) in enumerate(zip(kept, bbox.tolist(), area.tolist()))
    ]


def _images(
    conv: _Conversion,
    anns: list[dict],
    dropped: set[str],
    pos_labels: dict[str, set[int]],
    neg_labels: dict[str, dict[int, str]],
    descendants: dict[int, set[int]],
    categories: list[dict],
) -> list:
    """Image records with the federated lists: negatives (expanded down the hierarchy), not exhaustive, positives."""
    boxed: dict[int, set[int]] = defaultdict(set)
    grouped: dict[int, set[int]] = defaultdict(set)  # classes with a group-of box in the image
    single: dict[int, set[int]] = defaultdict(set)  # classes with an individual box in the image
    for a in anns:
        boxed[a["image_id"]].add(a["category_id"])
        (grouped if a["isgroupof"] else single)[a["image_id"]].add(a["category_id"])
    images = []
    for iid, num in conv.image_index.items():
        if iid in dropped:
            continue
        pos = pos_labels.get(iid, set())
        present = boxed[num] | pos
        neg: set[int] = set()
        for cid, where in sorted(neg_labels.get(iid, {}).items()):
            expanded = {cid} | descendants.get(cid, set())
            clash = sorted(expanded & present)
            if clash:
                conv.bad(
                    "negative label of a present class",
                    m.msg_negative_present(where, iid, categories[cid - 1]["name"], categories[clash[0] - 1]["name"]),
                )
                expanded -= present
            neg |= expanded
        not_exhaustive = (pos - boxed[num]) | (grouped[num] - single[num])
        W, H = conv.sizes[iid]
        images.append(
            {
                "id": num,
                "oi_image_id": iid,
                "file_name": f"{iid}.jpg",
                "width": int(W) if float(W).is_integer() else W,
                "height": int(H) if float(H).is_integer() else H,
                "neg_category_ids": sorted(neg),
                "not_exhaustive_category_ids": sorted(not_exhaustive),
                "pos_category_ids": sorted(pos),
            }
        )
    return images


def convert_openimages(
    boxes_csv: str | os.PathLike,
    labels_csv: str | os.PathLike,
    classes_csv: str | os.PathLike,
    hierarchy_json: str | os.PathLike,
    out_json: str | os.PathLike,
    skip_invalid: bool = False,
    *,
    train_ann: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    image_sizes: str | os.PathLike | None = None,
) -> dict:
    """Convert Open Images challenge files into one LVIS-format JSON (see the module docstring); returns a summary.

    `image_sizes`: a CSV ImageID,ImageWidth,ImageHeight; `image_dir`: the folder of ``<ImageID>.jpg`` files whose
    headers give the remaining sizes (default ``<out_json dir>/images``). See "Image sizes" in the module docstring.

    `train_ann`: the already converted training JSON. When given, each category's `frequency` bucket comes from
    that file's image counts for the same MID (pass it for validation/test splits); `image_count` and
    `instance_count` stay this file's own. A MID missing from the training file, or a different category list,
    raises `AnnotationError`. Without it the buckets come from this file's own counts (right for training only).

    Bad input (missing column, unknown LabelName, coordinates outside [0,1] or XMin >= XMax, Confidence not 0/1,
    no image size, a class both boxed and verified absent) raises `AnnotationError` naming the file, line,
    ImageID and field. With `skip_invalid` the row (or image) is skipped and counted in the summary instead.
    """
    out_json = Path(out_json)
    inp = m.read_inputs(boxes_csv, labels_csv, classes_csv, hierarchy_json, out_json, image_dir, train_ann)
    boxes_csv, labels_csv, categories, hierarchy = inp.boxes_csv, inp.labels_csv, inp.categories, inp.hierarchy
    conv = _Conversion(inp.classes_csv, {c["mid"]: c["id"] for c in categories}, skip_invalid)

    boxes = _read_boxes(conv, boxes_csv)
    pos_labels, neg_labels = _read_labels(conv, labels_csv)
    if image_sizes is not None:
        _read_sizes_csv(conv, Path(image_sizes))
    dropped = _fill_sizes_from_files(conv, inp.image_dir, boxes_csv, labels_csv)
    anns = _annotations(conv, boxes, dropped)
    images = _images(conv, anns, dropped, pos_labels, neg_labels, hierarchy_descendants(hierarchy), categories)
    if not images:
        raise AnnotationError(
            f"{boxes_csv}: no valid image left after conversion "
            f"({sum(conv.reasons.values())} invalid records skipped); check the inputs"
        )

    out = {
        "info": inp.info,
        "frequency_source": inp.frequency_source,
        "images": images,
        "annotations": anns,
        "categories": categories,
    }
    fill_frequency(out, inp.train_counts)  # own image_count/instance_count; LVIS bucket from train (or own) counts
    write_json_atomic(out_json, out)
    return m.summary(
        str(out_json),
        len(images),
        len(anns),
        categories,
        sum(a["isgroupof"] for a in anns),
        sum(len(i["neg_category_ids"]) for i in images),
        len(hierarchy),
        inp.frequency_source,
        conv.reasons,
    )
