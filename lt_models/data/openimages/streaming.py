"""Open Images challenge CSVs -> annotation store, streaming: memory bounded by images and classes, not CSV rows.

`convert_openimages_store` reads the inputs of `lt_models.data.openimages.convert.convert_openimages` with the same rules (see
that module's docstring: categories, federated lists, image sizes and where they come from, validation) and writes
the annotation store (`lt_models.data.store`) directly: the raw columns of `lt_models.data.store_columns.RAW_ARRAYS`, the
derived arrays of `derive_arrays` with the hierarchy and the dataset's default options, and the meta that
`lt_models.data.datasets.dataset_store` writes for the converted JSON, so ``LVISDetection(store, hierarchy_file=H)`` and
``data.train_ann: <store>`` use it as it is. The LVIS-format JSON is written only when asked (``out_json``), from the
same columns; it equals `convert_openimages`' file (tests/test_openimages_store.py).

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
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from lt_models.data.openimages import convert as oi
from lt_models.data.openimages import common as m
from lt_models.data.annotations import frequency_buckets, hierarchy_descendants
from lt_models.data.openimages.arrow_csv import batches, floats, lookup, release_memory
from lt_models.errors import AnnotationError
from lt_models.data.openimages.lvis_writer import write_lvis_json
from lt_models.data.store import write_store
from lt_models.data.store_columns import unique_keys, dataset_options, derive_arrays, encode_names

DEFAULT_BLOCK_SIZE = 1 << 24        # bytes of CSV per record batch
_BOX_OPTIONAL = ("IsGroupOf", "ImageWidth", "ImageHeight")


class _State:
    """What the conversion has read so far: the invalid-row policy (`oi._Conversion`: raise, or count per reason),
    the images (ImageID -> 0-based code in order of first appearance) and their sizes (NaN = not known yet), with
    the file and line each size was first given at."""

    def __init__(self, conv: oi._Conversion, files: list[Path]):
        self.conv, self.files = conv, files
        self.index: dict[str, int] = {}
        self.width = np.zeros(0)
        self.height = np.zeros(0)
        self.size_file = np.zeros(0, np.int8)
        self.size_line = np.zeros(0, np.int64)

    def grow(self) -> None:
        n, have = len(self.index), len(self.width)
        if n > have:
            extra = max(n - have, have)
            self.width = np.r_[self.width, np.full(extra, np.nan)]
            self.height = np.r_[self.height, np.full(extra, np.nan)]
            self.size_file = np.r_[self.size_file, np.zeros(extra, np.int8)]
            self.size_line = np.r_[self.size_line, np.zeros(extra, np.int64)]

    def size_where(self, code: int) -> str:
        return f"{self.files[self.size_file[code]]}: line {self.size_line[code]}"


def _batches(path: Path, required: tuple[str, ...], optional: tuple[str, ...], block_size: int,
             bar: tqdm | None = None) -> Iterator[tuple[int, dict[str, pa.Array]]]:
    """`arrow_csv.batches` of the required columns (missing one: the JSON converter's error) and the optional ones."""
    reader, fh = oi._open_csv(path, required)
    fh.close()
    return batches(path, [c for c in dict.fromkeys(required + optional) if c in (reader.fieldnames or [])],
                   block_size, bar)


def _image_codes(st: _State, ids: pa.Array, register: bool) -> np.ndarray:
    """Code of each row's (stripped) ImageID, registering new ones when `register`; -1 for empty or unknown."""
    index = st.index
    key = ((lambda s: -1 if s == "" else index.setdefault(s, len(index))) if register
           else (lambda s: index.get(s, -1)))
    codes = lookup(ids, key)
    st.grow()
    return codes


def _note_sizes(st: _State, cols: dict[str, pa.Array], code: np.ndarray, rows: np.ndarray, file_index: int,
                line0: int, ids: pa.Array) -> list[tuple[str, np.ndarray, Callable[[int], str]]]:
    """The size checks of rows with ImageWidth/ImageHeight (format, then agreement with the size first given),
    recording the first valid size of each image, as `oi._note_size` does row by row."""
    w_raw, h_raw = cols.get("ImageWidth"), cols.get("ImageHeight")
    if w_raw is None and h_raw is None:
        return []
    n = len(code)
    fmt_bad, disagree = np.zeros(n, bool), np.zeros(n, bool)
    empty = [np.ones(n, bool) if a is None else pc.equal(a, "").to_numpy(zero_copy_only=False)
             for a in (w_raw, h_raw)]
    idx = np.flatnonzero(rows & ~(empty[0] & empty[1]))
    w, h = np.full(n, np.nan), np.full(n, np.nan)
    ok = np.ones(len(idx), bool)
    for raw, out in ((w_raw, w), (h_raw, h)):
        if raw is None:
            ok[:] = False
            continue
        vals, parsed = floats(raw.take(pa.array(idx)))
        out[idx] = vals
        ok &= parsed
    ok &= (w[idx] > 0) & (h[idx] > 0)
    fmt_bad[idx[~ok]] = True
    good = idx[ok]
    c = code[good]
    first_code, first = np.unique(c, return_index=True)
    new = np.isnan(st.width[first_code])
    setters = good[first[new]]
    st.width[first_code[new]], st.height[first_code[new]] = w[setters], h[setters]
    st.size_file[first_code[new]], st.size_line[first_code[new]] = file_index, line0 + setters
    disagree[good[(w[good] != st.width[c]) | (h[good] != st.height[c])]] = True

    def where(i: int) -> str:
        return f"{st.files[file_index]}: line {line0 + i}"

    return [("bad image size", fmt_bad, lambda i: m.msg_size_format(
                where(i), ids[i].as_py(), None if w_raw is None else w_raw[i].as_py(),
                None if h_raw is None else h_raw[i].as_py())),
            ("bad image size", disagree, lambda i: m.msg_size_disagree(
                where(i), ids[i].as_py(), (float(w[i]), float(h[i])),
                (float(st.width[code[i]]), float(st.height[code[i]])), st.size_where(code[i])))]


def _judge(st: _State, checks: list[tuple[str, np.ndarray, Callable[[int], str]]], n: int) -> np.ndarray:
    """Valid-row mask of a batch. Each row takes the reason of its first failing check (the JSON converter's
    order); the first bad row raises (`oi._Conversion.bad`), or with skip_invalid every bad row is counted."""
    taken = np.zeros(n, bool)
    counts: Counter = Counter()
    first: tuple[int, str, Callable[[int], str]] | None = None
    for reason, mask, msg in checks:
        hit = mask & ~taken
        k = int(hit.sum())
        if k:
            i = int(np.argmax(hit))
            if first is None or i < first[0]:
                first = (i, reason, msg)
            counts[reason] += k
            taken |= hit
    if first is not None:
        if not st.conv.skip_invalid:
            st.conv.bad(first[1], first[2](first[0]))
        st.conv.reasons.update(counts)
    return ~taken


def _row_checks(st: _State, cols: dict[str, pa.Array], line0: int, file_index: int):
    """(image codes, category ids, stripped ImageIDs, the ImageID / size / LabelName checks, row -> "file: line")
    of a boxes or labels batch; registers the batch's new ImageIDs."""
    ids = pc.utf8_trim_whitespace(cols["ImageID"])
    code = _image_codes(st, ids, register=True)
    path = st.files[file_index]
    mids = pc.utf8_trim_whitespace(cols["LabelName"])
    mid_to_cat = st.conv.mid_to_cat
    cat = lookup(mids, lambda s: mid_to_cat.get(s, -1))

    def where(i: int) -> str:
        return f"{path}: line {line0 + i}"

    checks = [("missing ImageID", code < 0, lambda i: m.msg_missing_id(where(i)))]
    checks += _note_sizes(st, cols, code, code >= 0, file_index, line0, ids)
    checks.append(("unknown LabelName", cat < 0, lambda i: m.msg_unknown_label(
        where(i), ids[i].as_py(), mids[i].as_py(), st.conv.classes_csv)))
    return code, cat, ids, checks, where


def _read_boxes(st: _State, block_size: int) -> dict[str, np.ndarray]:
    """Columns of the valid box rows: img (code), cat, x0, x1, y0, y1, group."""
    path = st.files[0]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("img", "cat", "x0", "x1", "y0", "y1", "group")}
    with tqdm(total=path.stat().st_size, desc="boxes CSV", unit="B", unit_scale=True, disable=None) as bar:
        for line0, cols in _batches(path, oi._BOX_REQUIRED, _BOX_OPTIONAL, block_size, bar):
            n = len(cols["ImageID"])
            code, cat, ids, checks, where = _row_checks(st, cols, line0, 0)
            parsed = [floats(cols[k]) for k in m.COORDS]
            v = np.stack([p[0] for p in parsed])
            numeric = np.logical_and.reduce([p[1] for p in parsed])
            out_of_range = ~((v >= 0.0) & (v <= 1.0))
            g_raw = cols.get("IsGroupOf")
            g = (pa.nulls(n, pa.string()).fill_null("0") if g_raw is None else
                 pc.if_else(pc.equal(g_raw, ""), "0", pc.utf8_trim_whitespace(g_raw)))
            checks += [
                ("bad box", ~numeric, lambda i: m.msg_not_numbers(where(i), ids[i].as_py(),
                                                                  [cols[k][i].as_py() for k in m.COORDS])),
                ("bad box", out_of_range.any(axis=0), lambda i: m.msg_outside(
                    where(i), ids[i].as_py(), m.COORDS[int(np.argmax(out_of_range[:, i]))],
                    cols[m.COORDS[int(np.argmax(out_of_range[:, i]))]][i].as_py())),
                ("bad box", (v[1] <= v[0]) | (v[3] <= v[2]), lambda i: m.msg_empty_box(
                    where(i), ids[i].as_py(), *(float(x) for x in v[:, i]))),
                ("bad IsGroupOf", ~pc.is_in(g, pa.array(["0", "1", "-1"])).to_numpy(zero_copy_only=False),
                 lambda i: m.msg_group(where(i), ids[i].as_py(), g[i].as_py()))]
            keep = np.flatnonzero(_judge(st, checks, n))
            group = pc.equal(g, "1").to_numpy(zero_copy_only=False)
            for k, a in (("img", code.astype(np.int32)), ("cat", cat.astype(np.int32)), ("x0", v[0]), ("x1", v[1]),
                         ("y0", v[2]), ("y1", v[3]), ("group", group.astype(np.int8))):
                parts[k].append(a[keep])
        bar.update(bar.total - bar.n)
    return {k: np.concatenate(p) if p else np.zeros(0, np.float64 if k[0] in "xy" else np.int32)
            for k, p in parts.items()}


def _read_labels(st: _State, block_size: int) -> dict[str, np.ndarray]:
    """Columns of the valid image-level label rows: img (code), cat, conf (0/1), line."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("img", "cat", "conf", "line")}
    for line0, cols in _batches(st.files[1], oi._LABEL_REQUIRED, ("ImageWidth", "ImageHeight"), block_size):
        n = len(cols["ImageID"])
        code, cat, ids, checks, where = _row_checks(st, cols, line0, 1)
        conf, parsed = floats(cols["Confidence"])
        checks.append(("bad Confidence", ~(parsed & ((conf == 0.0) | (conf == 1.0))),
                       lambda i: m.msg_confidence(where(i), ids[i].as_py(), cols["Confidence"][i].as_py())))
        keep = np.flatnonzero(_judge(st, checks, n))
        for k, a in (("img", code), ("cat", cat), ("conf", conf.astype(np.int8)),
                     ("line", line0 + np.arange(n, dtype=np.int64))):
            parts[k].append(a[keep])
    return {k: np.concatenate(p) if p else np.zeros(0, np.int64) for k, p in parts.items()}


def _read_sizes_csv(st: _State, block_size: int) -> None:
    """Sizes of this conversion's images from an ImageID,ImageWidth,ImageHeight CSV (other images' rows ignored)."""
    for line0, cols in _batches(st.files[2], oi._SIZES_REQUIRED, (), block_size):
        ids = pc.utf8_trim_whitespace(cols["ImageID"])
        code = _image_codes(st, ids, register=False)
        _judge(st, _note_sizes(st, cols, code, code >= 0, 2, line0, ids), len(code))


def _fill_sizes_from_files(st: _State, image_dir: Path) -> np.ndarray:
    """Sizes the CSVs did not give, from the image headers (`oi.read_header_sizes`); returns the dropped mask."""
    todo = np.flatnonzero(np.isnan(st.width[:len(st.index)]))
    dropped = np.zeros(len(st.index), bool)
    if not len(todo):
        return dropped
    names = list(st.index)
    with closing(oi.read_header_sizes(image_dir, [names[c] for c in todo])) as results:
        for c, (iid, path, size) in zip(todo, results):
            problem = oi.header_problem(iid, path, size, image_dir, st.files[0], st.files[1])
            if problem:
                st.conv.bad(*problem)
                dropped[c] = True
            else:
                st.width[c], st.height[c] = float(size[0]), float(size[1])
    return dropped


def clip_boxes(xywh: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """Boxes clipped to their images as `lt_models.data.datasets.load_lvis_json` clips them: a box that reaches past an
    edge gets all four values recomputed from the clipped corners; the others are kept exactly. (Converted boxes
    stick out by at most the 0.01 px of rounding, far inside `lt_models.data.datasets.BOX_TOLERANCE`: none is refused.)"""
    x, y, w, h = xywh.T
    x1, y1 = x + w, y + h
    c = np.stack([np.maximum(x, 0.0), np.maximum(y, 0.0), np.minimum(x1, width), np.minimum(y1, height)], axis=1)
    changed = (c[:, 0] != x) | (c[:, 1] != y) | (c[:, 2] != x1) | (c[:, 3] != y1)
    out = xywh.copy()
    out[changed] = np.stack([c[changed, 0], c[changed, 1], c[changed, 2] - c[changed, 0],
                             c[changed, 3] - c[changed, 1]], axis=1)
    return out


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Mask of `keys` found in the sorted array `sorted_keys` (binary search: no sort of the large side)."""
    if not len(sorted_keys):
        return np.zeros(len(keys), bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def _minus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted unique keys of `a` not in `b` (both sorted unique)."""
    return a[~_member(a, b)]


def _csr_of_keys(keys: np.ndarray, k: int, row_of_code: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr, category ids) per kept image row of sorted unique keys ``code * k + category``."""
    counts = np.bincount(row_of_code[keys // k], minlength=n_rows)
    return np.r_[0, np.cumsum(counts)].astype(np.int64), (keys % k).astype(np.int64)


def _negatives(st: _State, inp: m.Inputs, labels: dict[str, np.ndarray], keep_img: np.ndarray,
               present: np.ndarray, k: int) -> np.ndarray:
    """Sorted keys (code * k + category) of the verified-absent classes and their hierarchy descendants, without
    the present ones; a Confidence-0 label that reaches a present class is an error (or counted), as in
    `oi._images`, citing the last row that gave the label."""
    neg = (labels["conf"] == 0) & keep_img[labels["img"]]
    key, line = labels["img"][neg] * k + labels["cat"][neg], labels["line"][neg]
    order = np.lexsort((line, key))
    key, line = key[order], line[order]
    last = np.r_[key[1:] != key[:-1], True] if len(key) else np.zeros(0, bool)
    key, line = key[last], line[last]
    desc = hierarchy_descendants(inp.hierarchy)
    lists = [sorted({c} | desc.get(c, set())) for c in range(k)]
    d_ptr = np.r_[0, np.cumsum([len(x) for x in lists])].astype(np.int64)
    d_ids = np.fromiter((c for x in lists for c in x), np.int64, int(d_ptr[-1]))
    cat = key % k
    sizes = np.diff(d_ptr)[cat]
    src = np.repeat(np.arange(len(key)), sizes)
    exp_cat = d_ids[np.repeat(d_ptr[cat], sizes) + np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes,
                                                                                           sizes)]
    exp_key = (key // k)[src] * k + exp_cat
    clash = _member(exp_key, present)
    bad = unique_keys(src[clash])
    if len(bad):
        s0 = int(bad[0])
        if not st.conv.skip_invalid:
            names, cats = list(st.index), inp.categories
            st.conv.bad("negative label of a present class", m.msg_negative_present(
                f"{st.files[1]}: line {line[s0]}", names[key[s0] // k], cats[cat[s0] - 1]["name"],
                cats[int(exp_cat[clash & (src == s0)][0]) - 1]["name"]))
        st.conv.reasons["negative label of a present class"] += len(bad)
    return unique_keys(exp_key[~clash])


def _columns(st: _State, inp: m.Inputs, boxes: dict[str, np.ndarray], labels: dict[str, np.ndarray],
             dropped: np.ndarray) -> tuple[dict[str, np.ndarray], list[str]]:
    """(raw store columns, boxes not yet clipped; ImageIDs of the kept images); fills the categories' counts and
    buckets as `fill_frequency` does."""
    k = len(inp.categories) + 1
    keep_img = ~dropped
    kb = keep_img[boxes["img"]]
    if not kb.all():
        st.conv.reasons["box of skipped image"] += int((~kb).sum())
        boxes.update({key: a[kb] for key, a in boxes.items()})
    codes = np.flatnonzero(keep_img)
    if not len(codes):
        raise AnnotationError(f"{st.files[0]}: no valid image left after conversion "
                              f"({sum(st.conv.reasons.values())} invalid records skipped); check the inputs")
    row_of_code = np.cumsum(keep_img) - 1
    bimg, bcat = boxes["img"].astype(np.int64), boxes["cat"].astype(np.int64)
    bbox, area = m.pixel_boxes(*(boxes.pop(c) for c in ("x0", "x1", "y0", "y1")), st.width[bimg], st.height[bimg])
    box_key = bimg * k + bcat
    boxed = unique_keys(box_key)
    is_group = boxes["group"] == 1
    grouped_only = _minus(unique_keys(box_key[is_group]), unique_keys(box_key[~is_group]))
    pos = (labels["conf"] == 1) & keep_img[labels["img"]]
    pos_keys = unique_keys(labels["img"][pos] * k + labels["cat"][pos])
    neg_keys = _negatives(st, inp, labels, keep_img, unique_keys(np.r_[boxed, pos_keys]), k)
    notex_keys = unique_keys(np.r_[_minus(pos_keys, boxed), grouped_only])

    all_names = list(st.index)
    names = [all_names[c] for c in codes]
    del all_names
    raw: dict[str, np.ndarray] = {"image_id": (codes + 1).astype(np.int64), "width": st.width[codes].copy(),
                                  "height": st.height[codes].copy()}
    raw["name_offsets"], raw["name_bytes"] = encode_names([f"{n}.jpg" for n in names])
    for short, keys in (("neg", neg_keys), ("notex", notex_keys), ("pos", pos_keys)):
        raw[f"{short}_indptr"], raw[f"{short}_ids"] = _csr_of_keys(keys, k, row_of_code, len(codes))
    raw.update(ann_id=np.arange(1, len(bimg) + 1, dtype=np.int64), ann_image=row_of_code[bimg].astype(np.int64),
               ann_cat=bcat, ann_bbox=bbox, ann_area=area, ann_iscrowd=np.zeros(len(bimg), np.int8),
               ann_isgroupof=boxes["group"].astype(np.int8))

    image_count = np.bincount(boxed % k, minlength=k)[1:].tolist()
    instance_count = np.bincount(bcat, minlength=k)[1:].tolist()
    train = image_count if inp.train_counts is None else [inp.train_counts.get(c["id"], 0) for c in inp.categories]
    for c, n_img, n_inst, bucket in zip(inp.categories, image_count, instance_count, frequency_buckets(train)):
        c["image_count"], c["instance_count"], c["frequency"] = n_img, n_inst, bucket
    return raw, names


def _source(paths: list[Path | None]) -> list[list]:
    """[resolved path, size, mtime_ns] of each input file: what the store was built from (`lt_models.data.store`)."""
    out = []
    for p in paths:
        if p is not None and Path(p).is_dir():          # a training store (train_ann)
            p = Path(p) / "meta.json"
        if p is not None and Path(p).is_file():
            st = Path(p).stat()
            out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


def store_options(hierarchy_json: Path, skip_invalid: bool) -> dict[str, Any]:
    """The options of a converted store: those of `lt_models.data.datasets.dataset_store` with the same hierarchy file
    and default options, so that such a dataset uses the store as it is."""
    return dataset_options(skip_invalid=skip_invalid, hierarchy_file=hierarchy_json)


def convert_openimages_store(boxes_csv: str | os.PathLike, labels_csv: str | os.PathLike,
                             classes_csv: str | os.PathLike, hierarchy_json: str | os.PathLike,
                             out_store: str | os.PathLike, skip_invalid: bool = False, *,
                             train_ann: str | os.PathLike | None = None, image_dir: str | os.PathLike | None = None,
                             image_sizes: str | os.PathLike | None = None, out_json: str | os.PathLike | None = None,
                             block_size: int = DEFAULT_BLOCK_SIZE) -> dict:
    """Convert Open Images challenge files into an annotation store at `out_store` (see the module docstring);
    returns the summary of `convert_openimages` (``out``: the store; ``json``: `out_json` or None).

    Arguments as `lt_models.data.openimages.convert.convert_openimages`: `image_sizes` (CSV ImageID,ImageWidth,ImageHeight),
    `image_dir` (image headers give the remaining sizes; default ``<dir of out_store>/images``, where
    `LVISDetection` looks for a store's images), `train_ann` (the converted training JSON, or its store directory:
    the frequency buckets come from its image counts). `out_json`: also write the LVIS-format JSON. `block_size`:
    bytes of CSV per record batch. The same bad input raises the same `AnnotationError` (file, line, ImageID,
    field); with `skip_invalid` the same rows are skipped and counted per reason.
    """
    out_store = Path(out_store)
    inp = m.read_inputs(boxes_csv, labels_csv, classes_csv, hierarchy_json, out_store, image_dir, train_ann)
    conv = oi._Conversion(inp.classes_csv, {c["mid"]: c["id"] for c in inp.categories}, skip_invalid)
    st = _State(conv, [inp.boxes_csv, inp.labels_csv, Path(image_sizes) if image_sizes is not None else Path()])
    boxes = _read_boxes(st, block_size)
    labels = _read_labels(st, block_size)
    if image_sizes is not None:
        _read_sizes_csv(st, block_size)
    dropped = _fill_sizes_from_files(st, inp.image_dir)
    release_memory()
    raw, names = _columns(st, inp, boxes, labels, dropped)      # consumes the box corners (popped from `boxes`)
    del boxes, labels
    st.index.clear()
    head = {"info": inp.info, "frequency_source": inp.frequency_source}
    if out_json is not None:
        anns = {"id": raw["ann_id"], "image_id": raw["image_id"][raw["ann_image"]], "category_id": raw["ann_cat"],
                "bbox": raw["ann_bbox"], "area": raw["ann_area"], "isgroupof": raw["ann_isgroupof"]}
        write_lvis_json(out_json, head, raw, names, anns, inp.categories)
        del anns
    del names
    row = raw["ann_image"]
    raw["ann_bbox"] = clip_boxes(raw["ann_bbox"], raw["width"][row], raw["height"][row])
    release_memory()
    derived, frequency = derive_arrays(raw, inp.categories, inp.hierarchy)
    meta = {"categories": inp.categories, "extra": head, "invalid_skipped": int(sum(conv.reasons.values())),
            "invalid_reasons": dict(sorted(conv.reasons.items())),
            "source": _source([inp.boxes_csv, inp.labels_csv, inp.classes_csv, inp.hierarchy_json,
                               None if image_sizes is None else Path(image_sizes),
                               None if train_ann is None else Path(train_ann)]),
            "frequency": frequency, "hierarchy": [[p, cs] for p, cs in inp.hierarchy.items()],
            "options": store_options(inp.hierarchy_json, skip_invalid), "raw_store": None}
    write_store(out_store, dict(raw, **derived), meta)
    out = m.summary(str(out_store), len(raw["image_id"]), len(raw["ann_id"]), inp.categories,
                    int(raw["ann_isgroupof"].sum()), len(raw["neg_ids"]), len(inp.hierarchy), inp.frequency_source,
                    conv.reasons)
    return dict(out, json=None if out_json is None else str(out_json))
