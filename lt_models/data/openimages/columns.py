"""The streaming converter's store columns: the kept images and boxes, the image-level labels and the negative
labels expanded through the hierarchy (a negative label of a present class is refused), as the raw columns of an
annotation store (`lt_models.data.store_columns`)."""

from __future__ import annotations

import numpy as np

from lt_models.data.annotations import frequency_buckets, hierarchy_descendants
from lt_models.data.openimages import common as m
from lt_models.data.openimages.rows import (
    State,
)
from lt_models.data.store_columns import encode_names, unique_keys
from lt_models.errors import AnnotationError


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


def _negatives(
    st: State, inp: m.Inputs, labels: dict[str, np.ndarray], keep_img: np.ndarray, present: np.ndarray, k: int
) -> np.ndarray:
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
    exp_cat = d_ids[
        np.repeat(d_ptr[cat], sizes) + np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    ]
    exp_key = (key // k)[src] * k + exp_cat
    clash = _member(exp_key, present)
    bad = unique_keys(src[clash])
    if len(bad):
        s0 = int(bad[0])
        if not st.conv.skip_invalid:
            names, cats = list(st.index), inp.categories
            st.conv.bad(
                "negative label of a present class",
                m.msg_negative_present(
                    f"{st.files[1]}: line {line[s0]}",
                    names[key[s0] // k],
                    cats[cat[s0] - 1]["name"],
                    cats[int(exp_cat[clash & (src == s0)][0]) - 1]["name"],
                ),
            )
        st.conv.reasons["negative label of a present class"] += len(bad)
    return unique_keys(exp_key[~clash])


def raw_columns(
    st: State, inp: m.Inputs, boxes: dict[str, np.ndarray], labels: dict[str, np.ndarray], dropped: np.ndarray
) -> tuple[dict[str, np.ndarray], list[str]]:
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
        raise AnnotationError(
            f"{st.files[0]}: no valid image left after conversion "
            f"({sum(st.conv.reasons.values())} invalid records skipped); check the inputs"
        )
    row_of_code = np.cumsum(keep_img) - 1
    bimg, bcat = boxes["img"].astype(np.int64), boxes["cat"].astype(np.int64)
    x0, x1, y0, y1 = (boxes.pop(c) for c in ("x0", "x1", "y0", "y1"))
    bbox, area = m.pixel_boxes(x0, x1, y0, y1, st.width[bimg], st.height[bimg])
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
    raw: dict[str, np.ndarray] = {
        "image_id": (codes + 1).astype(np.int64),
        "width": st.width[codes].copy(),
        "height": st.height[codes].copy(),
    }
    raw["name_offsets"], raw["name_bytes"] = encode_names([f"{n}.jpg" for n in names])
    for short, keys in (("neg", neg_keys), ("notex", notex_keys), ("pos", pos_keys)):
        raw[f"{short}_indptr"], raw[f"{short}_ids"] = _csr_of_keys(keys, k, row_of_code, len(codes))
    raw.update(
        ann_id=np.arange(1, len(bimg) + 1, dtype=np.int64),
        ann_image=row_of_code[bimg].astype(np.int64),
        ann_cat=bcat,
        ann_bbox=bbox,
        ann_area=area,
        ann_iscrowd=np.zeros(len(bimg), np.int8),
        ann_isgroupof=boxes["group"].astype(np.int8),
    )

    image_count = np.bincount(boxed % k, minlength=k)[1:].tolist()
    instance_count = np.bincount(bcat, minlength=k)[1:].tolist()
    train = image_count if inp.train_counts is None else [inp.train_counts.get(c["id"], 0) for c in inp.categories]
    for c, n_img, n_inst, bucket in zip(inp.categories, image_count, instance_count, frequency_buckets(train)):
        c["image_count"], c["instance_count"], c["frequency"] = n_img, n_inst, bucket
    return raw, names
