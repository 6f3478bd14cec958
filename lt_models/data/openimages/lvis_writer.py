"""The LVIS-format JSON of a streaming Open Images conversion, written from its columns in chunks.

`write_lvis_json` writes, atomically (`lt_models.atomic.atomic_path`), the same bytes as ``json.dump`` of the
`lt_models.data.openimages.convert.convert_openimages` document with compact separators: top-level keys info,
frequency_source, images, annotations, categories, records with the same fields in the same order. The images and
annotations are turned into Python dicts ``chunk`` records at a time, so the writer holds one chunk of Python
objects, not the whole file's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np

from lt_models.atomic import atomic_path

CHUNK = 100_000
_SEP = (",", ":")


def _number(x: float) -> int | float:
    """A size as the JSON converter writes it: an int when integral."""
    return int(x) if float(x).is_integer() else x


def _split(indptr: np.ndarray, ids: np.ndarray, a: int, b: int) -> list[list[int]]:
    values = ids[indptr[a] : indptr[b]].tolist()
    bounds = (indptr[a : b + 1] - indptr[a]).tolist()
    return [values[s:e] for s, e in zip(bounds[:-1], bounds[1:])]


def _image_records(img: dict[str, np.ndarray], names: list[str], chunk: int) -> Iterator[list[dict]]:
    n = len(img["image_id"])
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        lists = [_split(img[f"{k}_indptr"], img[f"{k}_ids"], a, b) for k in ("neg", "notex", "pos")]
        yield [
            {
                "id": i,
                "oi_image_id": name,
                "file_name": f"{name}.jpg",
                "width": _number(w),
                "height": _number(h),
                "neg_category_ids": neg,
                "not_exhaustive_category_ids": notex,
                "pos_category_ids": pos,
            }
            for i, name, w, h, neg, notex, pos in zip(
                img["image_id"][a:b].tolist(),
                names[a:b],
                img["width"][a:b].tolist(),
                img["height"][a:b].tolist(),
                *lists,
            )
        ]


def _annotation_records(ann: dict[str, np.ndarray], chunk: int) -> Iterator[list[dict]]:
    n = len(ann["id"])
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        yield [
            {"id": i, "image_id": im, "category_id": c, "bbox": box, "area": area, "iscrowd": 0, "isgroupof": g}
            for i, im, c, box, area, g in zip(
                *(ann[k][a:b].tolist() for k in ("id", "image_id", "category_id", "bbox", "area", "isgroupof"))
            )
        ]


def write_lvis_json(
    path: str | os.PathLike,
    head: dict,
    images: dict[str, np.ndarray],
    names: list[str],
    annotations: dict[str, np.ndarray],
    categories: list[dict],
    chunk: int = CHUNK,
) -> None:
    """Write ``{**head, "images": [...], "annotations": [...], "categories": categories}`` to `path`.

    `images`: image_id, width, height and the CSR pairs neg/notex/pos ``_indptr``/``_ids`` (one row per image,
    `names` its ImageIDs); `annotations`: id, image_id, category_id, bbox [n,4], area, isgroupof.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write("{" + json.dumps(head, separators=_SEP)[1:-1])
            for key, records in (
                ("images", _image_records(images, names, chunk)),
                ("annotations", _annotation_records(annotations, chunk)),
            ):
                fh.write(f',"{key}":[')
                first = True
                for part in records:
                    if part:
                        fh.write(("" if first else ",") + json.dumps(part, separators=_SEP)[1:-1])
                        first = False
                fh.write("]")
            fh.write(',"categories":' + json.dumps(categories, separators=_SEP) + "}")
