"""Open Images challenge CSVs -> annotation store, streaming: memory bounded by images and classes, not CSV rows.

`convert_openimages_store` reads the inputs of `lt_models.data.openimages.convert.convert_openimages` with the same
rules (see that module's docstring: categories, federated lists, image sizes and where they come from, validation) and
writes the annotation store (`lt_models.data.store`) directly: the raw columns of
`lt_models.data.store_columns.RAW_ARRAYS`, the derived arrays of `derive_arrays` with the hierarchy and the dataset's
default options, and the meta that `lt_models.data.datasets.dataset_store` writes for the converted JSON, so
``LVISDetection(store, hierarchy_file=H)`` and ``data.train: <store>`` use it as it is. The LVIS-format JSON is
written only when asked (``out_json``), from the same columns; it equals `convert_openimages`' file
(tests/test_openimages_store.py).

How: each CSV is read with `pyarrow.csv.open_csv` in record batches of ``block_size`` bytes, only the needed
columns, as strings. Per batch, vectorised (pyarrow.compute + numpy): ImageIDs are dictionary-encoded and the
batch's distinct ids mapped to integer ids in order of first appearance through one dict ImageID -> id (so Python
objects are bounded by the number of images), LabelNames through the classes, numbers cast by Arrow (a batch Arrow
cannot cast is parsed by Python's ``float`` instead, so a bad cell is judged and named as the JSON converter judges
it). Each validation rule is a mask; without ``skip_invalid`` the first bad row raises `AnnotationError` with the
JSON converter's message (file, line, ImageID, field); with it the rows are counted per reason and dropped.

Memory: the valid boxes stay in RAM as compact numpy columns (image int32, category int32, XMin/XMax/YMin/YMax
float64, group-of int8: 41 bytes a box, about 600 MB for Open Images' 14.6M boxes; nothing spills to disk), the
image-level labels as (image, class, line) columns. Building the store then needs a few arrays of the
annotations' size at a time (pixel boxes, clipping, the merge of `derive_arrays`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lt_models.data.openimages import common as m
from lt_models.data.openimages import convert as oi
from lt_models.data.openimages.arrow_csv import release_memory
from lt_models.data.openimages.columns import raw_columns
from lt_models.data.openimages.lvis_writer import write_lvis_json
from lt_models.data.openimages.rows import (
    DEFAULT_BLOCK_SIZE,
    State,
    fill_sizes_from_files,
    read_boxes,
    read_labels,
    read_sizes_csv,
)
from lt_models.data.store import write_store
from lt_models.data.store_columns import dataset_options, derive_arrays


def clip_boxes(xywh: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """Boxes clipped to their images as `lt_models.data.lvis_json.load_lvis_json` clips them: a box that reaches past
    an edge gets all four values recomputed from the clipped corners; the others are kept exactly. (Converted boxes
    stick out by at most the 0.01 px of rounding, far inside `lt_models.data.lvis_json.BOX_TOLERANCE`: none is
    refused.)"""
    x, y, w, h = xywh.T
    x1, y1 = x + w, y + h
    c = np.stack([np.maximum(x, 0.0), np.maximum(y, 0.0), np.minimum(x1, width), np.minimum(y1, height)], axis=1)
    changed = (c[:, 0] != x) | (c[:, 1] != y) | (c[:, 2] != x1) | (c[:, 3] != y1)
    out = xywh.copy()
    out[changed] = np.stack(
        [c[changed, 0], c[changed, 1], c[changed, 2] - c[changed, 0], c[changed, 3] - c[changed, 1]], axis=1
    )
    return out


def _source(paths: list[Path | None]) -> list[list]:
    """[resolved path, size, mtime_ns] of each input file: what the store was built from (`lt_models.data.store`)."""
    out = []
    for p in paths:
        if p is not None and Path(p).is_dir():  # a training store (train_ann)
            p = Path(p) / "meta.json"
        if p is not None and Path(p).is_file():
            st = Path(p).stat()
            out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


def store_options(hierarchy_json: Path, skip_invalid: bool) -> dict[str, Any]:
    """The options of a converted store: those of `lt_models.data.datasets.dataset_store` with the same hierarchy file
    and default options, so that such a dataset uses the store as it is."""
    return dataset_options(skip_invalid=skip_invalid, hierarchy_file=hierarchy_json)


def convert_openimages_store(
    boxes_csv: str | os.PathLike,
    labels_csv: str | os.PathLike,
    classes_csv: str | os.PathLike,
    hierarchy_json: str | os.PathLike,
    out_store: str | os.PathLike,
    skip_invalid: bool = False,
    *,
    train_ann: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    image_sizes: str | os.PathLike | None = None,
    out_json: str | os.PathLike | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict:
    """Convert Open Images challenge files into an annotation store at `out_store` (see the module docstring);
    returns the summary of `convert_openimages` (``out``: the store; ``json``: `out_json` or None).

    Arguments as `lt_models.data.openimages.convert.convert_openimages`: `image_sizes` (CSV ImageID, ImageWidth,
    ImageHeight), `image_dir` (image headers give the remaining sizes; default ``<dir of out_store>/images``, where
    `LVISDetection` looks for a store's images), `train_ann` (the converted training JSON, or its store directory:
    the frequency buckets come from its image counts). `out_json`: also write the LVIS-format JSON. `block_size`:
    bytes of CSV per record batch. The same bad input raises the same `AnnotationError` (file, line, ImageID,
    field); with `skip_invalid` the same rows are skipped and counted per reason.
    """
    out_store = Path(out_store)
    inp = m.read_inputs(boxes_csv, labels_csv, classes_csv, hierarchy_json, out_store, image_dir, train_ann)
    conv = oi._Conversion(inp.classes_csv, {c["mid"]: c["id"] for c in inp.categories}, skip_invalid)
    st = State(conv, [inp.boxes_csv, inp.labels_csv, Path(image_sizes) if image_sizes is not None else Path()])
    boxes = read_boxes(st, block_size)
    labels = read_labels(st, block_size)
    if image_sizes is not None:
        read_sizes_csv(st, block_size)
    dropped = fill_sizes_from_files(st, inp.image_dir)
    release_memory()
    raw, names = raw_columns(st, inp, boxes, labels, dropped)  # consumes the box corners (popped from `boxes`)
    del boxes, labels
    st.index.clear()
    head = {"info": inp.info, "frequency_source": inp.frequency_source}
    if out_json is not None:
        _write_json(out_json, head, raw, names, inp.categories)
    del names
    row = raw["ann_image"]
    raw["ann_bbox"] = clip_boxes(raw["ann_bbox"], raw["width"][row], raw["height"][row])
    release_memory()
    derived, frequency = derive_arrays(raw, inp.categories, inp.hierarchy)
    meta = _meta(inp, conv.reasons, head, frequency, skip_invalid, image_sizes, train_ann)
    write_store(out_store, dict(raw, **derived), meta)
    out = m.summary(
        str(out_store),
        len(raw["image_id"]),
        len(raw["ann_id"]),
        inp.categories,
        int(raw["ann_isgroupof"].sum()),
        len(raw["neg_ids"]),
        len(inp.hierarchy),
        inp.frequency_source,
        conv.reasons,
    )
    return dict(out, json=None if out_json is None else str(out_json))


def _meta(inp: m.Inputs, reasons, head: dict, frequency, skip_invalid: bool, image_sizes, train_ann) -> dict[str, Any]:
    """The store's meta.json: categories, the JSON's extra fields, skip counts, the sources and the options."""
    return {
        "categories": inp.categories,
        "extra": head,
        "invalid_skipped": int(sum(reasons.values())),
        "invalid_reasons": dict(sorted(reasons.items())),
        "source": _source(
            [
                inp.boxes_csv,
                inp.labels_csv,
                inp.classes_csv,
                inp.hierarchy_json,
                None if image_sizes is None else Path(image_sizes),
                None if train_ann is None else Path(train_ann),
            ]
        ),
        "frequency": frequency,
        "hierarchy": [[p, cs] for p, cs in inp.hierarchy.items()],
        "options": store_options(inp.hierarchy_json, skip_invalid),
        "raw_store": None,
    }


def _write_json(out_json, head: dict, raw: dict[str, np.ndarray], names: list[str], categories: list[dict]) -> None:
    """The LVIS-format JSON of the converted rows (boxes not yet clipped, as the row-by-row converter writes them)."""
    anns = {
        "id": raw["ann_id"],
        "image_id": raw["image_id"][raw["ann_image"]],
        "category_id": raw["ann_cat"],
        "bbox": raw["ann_bbox"],
        "area": raw["ann_area"],
        "isgroupof": raw["ann_isgroupof"],
    }
    write_lvis_json(out_json, head, raw, names, anns, categories)
