"""The streaming converter's row reader: each CSV in pyarrow record batches, every row checked by the rules of the
row-by-row converter (`lt_models.data.openimages.convert`: the same messages, the same skip counts), the valid
rows kept as numpy columns, and the image sizes from the CSVs, a sizes file or the image headers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from lt_models.data.openimages import common as m
from lt_models.data.openimages import convert as oi
from lt_models.data.openimages.arrow_csv import batches, floats, lookup

DEFAULT_BLOCK_SIZE = 1 << 24  # bytes of CSV per record batch


BOX_OPTIONAL = ("IsGroupOf", "ImageWidth", "ImageHeight")


class State:
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


def _batches(
    path: Path, required: tuple[str, ...], optional: tuple[str, ...], block_size: int, bar: tqdm | None = None
) -> Iterator[tuple[int, dict[str, pa.Array]]]:
    """`arrow_csv.batches` of the required columns (missing one: the JSON converter's error) and the optional ones."""
    reader, fh = oi._open_csv(path, required)
    fh.close()
    return batches(
        path, [c for c in dict.fromkeys(required + optional) if c in (reader.fieldnames or [])], block_size, bar
    )


def _image_codes(st: State, ids: pa.Array, register: bool) -> np.ndarray:
    """Code of each row's (stripped) ImageID, registering new ones when `register`; -1 for empty or unknown."""
    index = st.index
    key = (lambda s: -1 if s == "" else index.setdefault(s, len(index))) if register else (lambda s: index.get(s, -1))
    codes = lookup(ids, key)
    st.grow()
    return codes


def _note_sizes(
    st: State,
    cols: dict[str, pa.Array],
    code: np.ndarray,
    rows: np.ndarray,
    file_index: int,
    line0: int,
    ids: pa.Array,
) -> list[tuple[str, np.ndarray, Callable[[int], str]]]:
    """The size checks of rows with ImageWidth/ImageHeight (format, then agreement with the size first given),
    recording the first valid size of each image, as `oi._note_size` does row by row."""
    w_raw, h_raw = cols.get("ImageWidth"), cols.get("ImageHeight")
    if w_raw is None and h_raw is None:
        return []
    n = len(code)
    fmt_bad, disagree = np.zeros(n, bool), np.zeros(n, bool)
    empty = [np.ones(n, bool) if a is None else pc.equal(a, "").to_numpy(zero_copy_only=False) for a in (w_raw, h_raw)]
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

    return [
        (
            "bad image size",
            fmt_bad,
            lambda i: m.msg_size_format(
                where(i),
                ids[i].as_py(),
                None if w_raw is None else w_raw[i].as_py(),
                None if h_raw is None else h_raw[i].as_py(),
            ),
        ),
        (
            "bad image size",
            disagree,
            lambda i: m.msg_size_disagree(
                where(i),
                ids[i].as_py(),
                (float(w[i]), float(h[i])),
                (float(st.width[code[i]]), float(st.height[code[i]])),
                st.size_where(code[i]),
            ),
        ),
    ]


def _judge(st: State, checks: list[tuple[str, np.ndarray, Callable[[int], str]]], n: int) -> np.ndarray:
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


def _row_checks(st: State, cols: dict[str, pa.Array], line0: int, file_index: int):
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
    checks.append(
        (
            "unknown LabelName",
            cat < 0,
            lambda i: m.msg_unknown_label(where(i), ids[i].as_py(), mids[i].as_py(), st.conv.classes_csv),
        )
    )
    return code, cat, ids, checks, where


def read_boxes(st: State, block_size: int) -> dict[str, np.ndarray]:
    """Columns of the valid box rows: img (code), cat, x0, x1, y0, y1, group."""
    path = st.files[0]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("img", "cat", "x0", "x1", "y0", "y1", "group")}
    with tqdm(total=path.stat().st_size, desc="boxes CSV", unit="B", unit_scale=True, disable=None) as bar:
        for line0, cols in _batches(path, oi._BOX_REQUIRED, BOX_OPTIONAL, block_size, bar):
            n = len(cols["ImageID"])
            code, cat, ids, checks, where = _row_checks(st, cols, line0, 0)
            parsed = [floats(cols[k]) for k in m.COORDS]
            v = np.stack([p[0] for p in parsed])
            numeric = np.logical_and.reduce([p[1] for p in parsed])
            g_raw = cols.get("IsGroupOf")
            g = (
                pa.nulls(n, pa.string()).fill_null("0")
                if g_raw is None
                else pc.if_else(pc.equal(g_raw, ""), "0", pc.utf8_trim_whitespace(g_raw))
            )
            checks += _box_checks(where, ids, cols, v, numeric, g)
            keep = np.flatnonzero(_judge(st, checks, n))
            group = pc.equal(g, "1").to_numpy(zero_copy_only=False)
            for k, a in (
                ("img", code.astype(np.int32)),
                ("cat", cat.astype(np.int32)),
                ("x0", v[0]),
                ("x1", v[1]),
                ("y0", v[2]),
                ("y1", v[3]),
                ("group", group.astype(np.int8)),
            ):
                parts[k].append(a[keep])
        assert bar.total is not None  # made with total = the file size
        bar.update(bar.total - bar.n)
    return {
        k: np.concatenate(p) if p else np.zeros(0, np.float64 if k[0] in "xy" else np.int32) for k, p in parts.items()
    }


def _box_checks(where, ids, cols, v: np.ndarray, numeric: np.ndarray, g) -> list:
    """(reason, bad rows, message of row i) of a batch of box rows: coordinates that are not numbers, outside
    [0, 1] or of an empty box, and IsGroupOf values other than 0, 1 or -1."""
    out_of_range = ~((v >= 0.0) & (v <= 1.0))

    def outside(i: int) -> str:
        k = m.COORDS[int(np.argmax(out_of_range[:, i]))]
        return m.msg_outside(where(i), ids[i].as_py(), k, cols[k][i].as_py())

    return [
        (
            "bad box",
            ~numeric,
            lambda i: m.msg_not_numbers(where(i), ids[i].as_py(), [cols[k][i].as_py() for k in m.COORDS]),
        ),
        ("bad box", out_of_range.any(axis=0), outside),
        (
            "bad box",
            (v[1] <= v[0]) | (v[3] <= v[2]),
            lambda i: m.msg_empty_box(where(i), ids[i].as_py(), *(float(x) for x in v[:, i])),
        ),
        (
            "bad IsGroupOf",
            ~pc.is_in(g, pa.array(["0", "1", "-1"])).to_numpy(zero_copy_only=False),
            lambda i: m.msg_group(where(i), ids[i].as_py(), g[i].as_py()),
        ),
    ]


def read_labels(st: State, block_size: int) -> dict[str, np.ndarray]:
    """Columns of the valid image-level label rows: img (code), cat, conf (0/1), line."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("img", "cat", "conf", "line")}
    for line0, cols in _batches(st.files[1], oi._LABEL_REQUIRED, ("ImageWidth", "ImageHeight"), block_size):
        n = len(cols["ImageID"])
        code, cat, ids, checks, where = _row_checks(st, cols, line0, 1)
        conf, parsed = floats(cols["Confidence"])
        checks.append(_confidence_check(where, ids, cols["Confidence"], conf, parsed))
        keep = np.flatnonzero(_judge(st, checks, n))
        for k, a in (
            ("img", code),
            ("cat", cat),
            ("conf", conf.astype(np.int8)),
            ("line", line0 + np.arange(n, dtype=np.int64)),
        ):
            parts[k].append(a[keep])
    return {k: np.concatenate(p) if p else np.zeros(0, np.int64) for k, p in parts.items()}


def _confidence_check(where, ids, raw, conf: np.ndarray, parsed: np.ndarray) -> tuple:
    """(reason, bad rows, message of row i): a Confidence that is not 0 or 1."""
    return (
        "bad Confidence",
        ~(parsed & ((conf == 0.0) | (conf == 1.0))),
        lambda i: m.msg_confidence(where(i), ids[i].as_py(), raw[i].as_py()),
    )


def read_sizes_csv(st: State, block_size: int) -> None:
    """Sizes of this conversion's images from an ImageID,ImageWidth,ImageHeight CSV (other images' rows ignored)."""
    for line0, cols in _batches(st.files[2], oi._SIZES_REQUIRED, (), block_size):
        ids = pc.utf8_trim_whitespace(cols["ImageID"])
        code = _image_codes(st, ids, register=False)
        _judge(st, _note_sizes(st, cols, code, code >= 0, 2, line0, ids), len(code))


def fill_sizes_from_files(st: State, image_dir: Path) -> np.ndarray:
    """Sizes the CSVs did not give, from the image headers (`oi.read_header_sizes`); returns the dropped mask."""
    todo = np.flatnonzero(np.isnan(st.width[: len(st.index)]))
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
