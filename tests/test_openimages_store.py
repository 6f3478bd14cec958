"""The streaming Open Images converter gives exactly what the JSON path gives: the same store, JSON, errors, counts.

The reference is the row-by-row converter `lt_models.data.openimages.convert.convert_openimages` followed by the
dataset's own JSON reader (`lt_models.data.datasets.dataset_store`: `load_lvis_json`, its clipping,
`raw_columns_from_lvis`, `derive_arrays`). Inputs are random challenge-style CSVs (several seeds) with images in
shuffled row order, sizes from the boxes CSV, the labels CSV, a sizes CSV and image headers, group-of boxes,
near-duplicate and identical boxes of different classes, boxes reaching the image edge (clipped after rounding),
positive and negative image-level labels with hierarchy descendants, duplicate label rows, and a tiny ``block_size`` so
that every CSV comes in many batches.
"""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from lt_models.data.annotations import hierarchy_descendants
from lt_models.data.datasets import LVISDetection, dataset_store
from lt_models.data.openimages.arrow_csv import batches, floats
from lt_models.data.openimages.convert import convert_openimages
from lt_models.data.openimages.streaming import convert_openimages_store
from lt_models.data.rate_matrix import concurrent_rate_matrix
from lt_models.data.store import open_store
from lt_models.data.store_columns import DERIVED_ARRAYS, RAW_ARRAYS
from lt_models.errors import AnnotationError
from pipelines.cli import main

MIDS = [f"/m/c{i}" for i in range(10)]
NAMES = ["Fruit", "Apple", "Green apple", "Banana", "Vehicle", "Car", "Toy", "Person", "Thing", "Thing"]
# c0 > c1 > c2, c0 > c3, c4 > c5; /m/other is not a class (c7 attaches to the root); c8, c9 outside the tree
HIER = {
    "LabelName": "/m/0bl9f",
    "Subcategory": [
        {
            "LabelName": "/m/c0",
            "Subcategory": [{"LabelName": "/m/c1", "Subcategory": [{"LabelName": "/m/c2"}]}, {"LabelName": "/m/c3"}],
        },
        {"LabelName": "/m/c4", "Subcategory": [{"LabelName": "/m/c5"}]},
        {"LabelName": "/m/c6"},
        {"LabelName": "/m/other", "Subcategory": [{"LabelName": "/m/c7"}]},
    ],
}
DESC = {MIDS[p]: {MIDS[c] for c in cs} for p, cs in hierarchy_descendants({0: [1, 3], 1: [2], 4: [5]}).items()}
BOX_COLS = [
    "ImageID",
    "Source",
    "LabelName",
    "Confidence",
    "XMin",
    "XMax",
    "YMin",
    "YMax",
    "IsOccluded",
    "IsTruncated",
    "IsGroupOf",
    "IsDepiction",
    "IsInside",
    "ImageWidth",
    "ImageHeight",
]
LABEL_COLS = ["ImageID", "Source", "LabelName", "Confidence", "ImageWidth", "ImageHeight"]
BLOCK = 512  # bytes of CSV per batch: dozens of batches per file


def _coord(rng, v):
    return rng.choice([f"{v:.6f}", repr(v), f"{v:.4f}"])


def _random_case(d, seed, n_images=40):
    """Random challenge CSVs in folder d; returns (boxes, labels, classes, hierarchy), sizes CSV, image folder."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    (d / "images").mkdir(exist_ok=True)
    ids = [f"{rng.getrandbits(40):010x}" for _ in range(n_images)]
    sizes, source = {}, {}
    for iid in ids:
        sizes[iid] = (rng.choice([100, 333, 640, 97]), rng.choice([75, 480, 211, 1000]))
        source[iid] = rng.choice(["boxes", "labels", "csv", "file"])
        if source[iid] != "file" and rng.random() < 0.2:
            sizes[iid] = (333.5, sizes[iid][1])  # a fractional size stays a float in the JSON
    sizes[ids[0]], source[ids[0]] = (100, 80), "boxes"
    boxes, labels, sized = [], [], set()

    def size_cols(iid, where):
        if source[iid] == where and (iid not in sized or rng.random() < 0.5):
            sized.add(iid)
            return list(sizes[iid])
        return ["", ""]

    # the edge box: x 0.15645..1 in a 100 px wide image, rounded x + w = 100.01 px, clipped by the dataset
    boxes.append([ids[0], "xclick", "/m/c6", 1, "0.15645", "1", "0.1", "0.2", 0, 0, 0, 0, 0, 100, 80])
    sized.add(ids[0])
    for iid in ids:
        n = rng.choice([0, 1, 2, 4, 7]) if source[iid] != "boxes" else rng.choice([1, 3, 6])
        present = {"/m/c6"} if iid == ids[0] else set()  # ids[0] has the edge box above
        prev = None
        for _ in range(n):
            mid = rng.choice(MIDS)
            if prev is not None and rng.random() < 0.4:  # near-duplicate or identical box, another class
                x0, x1, y0, y1 = prev
                if rng.random() < 0.5:
                    x1 = x0 + (x1 - x0) * rng.uniform(0.93, 0.99)
            else:
                x0, y0 = rng.uniform(0, 0.9), rng.uniform(0, 0.9)
                x1 = 1.0 if rng.random() < 0.2 else rng.uniform(x0 + 0.01, 1.0)
                y1 = 1.0 if rng.random() < 0.2 else rng.uniform(y0 + 0.01, 1.0)
            prev = (x0, x1, y0, y1)
            present.add(mid)
            boxes.append(
                [
                    iid,
                    "xclick",
                    mid,
                    1,
                    _coord(rng, x0),
                    _coord(rng, x1),
                    _coord(rng, y0),
                    _coord(rng, y1),
                    0,
                    0,
                    int(rng.random() < 0.15),
                    0,
                    0,
                ]
                + size_cols(iid, "boxes")
            )
        pos = set(rng.sample(MIDS, rng.choice([0, 1, 2]))) | {m for m in present if rng.random() < 0.5}
        for mid in sorted(pos):
            labels.append([iid, "verification", mid, 1] + size_cols(iid, "labels"))
        for mid in rng.sample(MIDS, 3):  # verified absent, with all its descendants
            if not ({mid} | DESC.get(mid, set())) & (present | pos):
                labels.append([iid, "verification", mid, 0] + size_cols(iid, "labels"))
        if rng.random() < 0.2 and labels:
            labels.append(list(labels[-1]))  # a duplicate row
        if source[iid] == "labels" and iid not in sized:
            labels.append([iid, "verification", "/m/c8", 1] + size_cols(iid, "labels"))
        if source[iid] == "boxes" and iid not in sized:
            raise AssertionError("every boxes-sized image has a box")
    rng.shuffle(boxes)
    rng.shuffle(labels)
    for rows in (boxes, labels):  # empty lines: skipped, not counted, by both
        rows.insert(rng.randrange(len(rows) + 1), [])
    for iid in ids:
        if source[iid] == "file":
            Image.new("RGB", sizes[iid]).save(d / "images" / f"{iid}.png")
    _dump(d / "boxes.csv", BOX_COLS, boxes)
    _dump(d / "labels.csv", LABEL_COLS, labels)
    _dump(
        d / "sizes.csv",
        ["ImageID", "ImageWidth", "ImageHeight"],
        [[iid, *sizes[iid]] for iid in ids if source[iid] == "csv"] + [["unused", 5, 5]],
    )
    _dump(d / "classes.csv", None, list(zip(MIDS, NAMES)))
    (d / "hierarchy.json").write_text(json.dumps(HIER))
    return (d / "boxes.csv", d / "labels.csv", d / "classes.csv", d / "hierarchy.json"), d / "sizes.csv", d / "images"


def _dump(path, cols, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        if cols:
            w.writerow(cols)
        w.writerows(rows)


def _convert_both(d, files, sizes, images, skip=False, **kw):
    """(JSON converter's summary, streaming converter's summary); outputs d/oi.json, d/store, d/oi_store.json."""
    s_json = convert_openimages(*files, d / "oi.json", skip_invalid=skip, image_sizes=sizes, image_dir=images, **kw)
    s_store = convert_openimages_store(
        *files,
        d / "store",
        skip_invalid=skip,
        image_sizes=sizes,
        image_dir=images,
        out_json=d / "oi_store.json",
        block_size=BLOCK,
        **kw,
    )
    return s_json, s_store


def _assert_same(d, files, s_json, s_store, skip=False):
    assert (d / "oi_store.json").read_bytes() == (d / "oi.json").read_bytes()
    assert {k: v for k, v in s_store.items() if k not in ("out", "json")} == {
        k: v for k, v in s_json.items() if k != "out"
    }
    assert s_store["out"] == str(d / "store") and s_store["json"] == str(d / "oi_store.json")
    ref = dataset_store(d / "oi.json", hierarchy_file=files[3])
    got = open_store(d / "store")
    assert set(got.arrays) == set(ref.arrays) == set(RAW_ARRAYS) | set(DERIVED_ARRAYS)
    for name in ref.arrays:
        assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape, name
        assert np.array_equal(got[name], ref[name]), name
    for key in ("categories", "frequency", "hierarchy"):
        assert got.meta[key] == ref.meta[key], key
    assert got.meta["options"] == dict(ref.meta["options"], skip_invalid=skip)
    assert got.meta["extra"] == {k: v for k, v in ref.meta["extra"].items() if not k.startswith("invalid_")}
    assert got.meta["invalid_reasons"] == s_json["invalid_reasons"]
    assert got.meta["invalid_skipped"] == s_json["invalid_skipped"]
    assert [p for p, _, _ in got.meta["source"]] == [str(f.resolve()) for f in files] + [
        str((d / "sizes.csv").resolve())
    ]
    return got


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_store_equals_the_json_path(tmp_path, seed):
    files, sizes, images = _random_case(tmp_path, seed)
    s_json, s_store = _convert_both(tmp_path, files, sizes, images)
    got = _assert_same(tmp_path, files, s_json, s_store)
    assert sum(1 for _ in batches(files[0], ["ImageID"], BLOCK)) > 5 and (got["width"] == 333.5).any()
    assert s_store["group_of_boxes"] > 0 and len(got["pos_ids"]) > 0 and len(got["notex_ids"]) > 0
    negatives = {(r[0], r[2]) for r in csv.reader(open(files[1])) if r and r[3] == "0"}
    assert len(got["neg_ids"]) > len(negatives)  # expanded to descendants
    rounded = np.array([a["bbox"] for a in json.loads((tmp_path / "oi.json").read_text())["annotations"]])
    assert (got["ann_bbox"] != rounded).any(axis=1).sum() > 0  # some boxes clipped after rounding
    assert (np.diff(got["pair_indptr"]) > 1).any()  # duplicate boxes merged: multi-label objects


def test_store_is_used_as_is_by_the_dataset_and_r_ij(tmp_path):
    files, sizes, images = _random_case(tmp_path, 7, n_images=60)
    convert_openimages(*files, tmp_path / "oi.json", image_sizes=sizes, image_dir=images)
    convert_openimages_store(*files, tmp_path / "store", image_sizes=sizes, image_dir=images, block_size=BLOCK)
    (tmp_path / "jpgs").mkdir()
    for img in json.loads((tmp_path / "oi.json").read_text())["images"]:
        (tmp_path / "jpgs" / img["file_name"]).touch()  # the JSON path checks that image files exist
    same = dataset_store(tmp_path / "store", hierarchy_file=files[3])
    assert same.path == tmp_path / "store" and same.meta["raw_store"] is None  # default options: no rebuild
    for expand in (False, True):
        a = LVISDetection(tmp_path / "oi.json", tmp_path / "jpgs", hierarchy_file=files[3], expand_parents=expand)
        b = LVISDetection(
            tmp_path / "store", hierarchy_file=files[3], expand_parents=expand, cache_root=tmp_path / "cache"
        )
        assert len(a) == len(b) > 0 and a.frequency == b.frequency and a.hierarchy == b.hierarchy
        for i in range(len(a)):
            ta, tb = a.target(i), b.target(i)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
            assert a.image_info(i) == b.image_info(i)
    r_json = concurrent_rate_matrix(tmp_path / "oi.json", hierarchy=files[3])
    assert torch.equal(concurrent_rate_matrix(tmp_path / "store", hierarchy=files[3]), r_json)


def _boxed_image_file(files, images):
    """An image file of the folder whose ImageID has a box."""
    boxed = {r[0] for r in csv.reader(open(files[0])) if r}
    return next(p for p in sorted(images.iterdir()) if p.stem in boxed)


def _inject(d, files, kind, rng):
    """Add one bad row of `kind` at a random position of the boxes or labels CSV; returns nothing."""
    boxes = list(csv.reader(open(files[0], newline="")))
    labels = list(csv.reader(open(files[1], newline="")))
    first = next(r for r in boxes[1:] if r)
    iid = first[0]
    good = ["xclick", "/m/c1", 1, "0.1", "0.5", "0.2", "0.6", 0, 0, 0, 0, 0, "", ""]
    box_rows = {
        "unknown LabelName": [iid, "xclick", "/m/zebra"] + good[2:],
        "outside": [iid] + good[:4] + ["1.25"] + good[5:],
        "empty box": [iid] + good[:3] + ["0.5", "0.5"] + good[5:],
        "not numbers": [iid] + good[:5] + ["abc"] + good[6:],
        "bad IsGroupOf": [iid] + good[:9] + ["yes"] + good[10:],
        "missing ImageID": ["  "] + good,
        "size format": [iid] + good[:12] + ["-3", "10"],
        "size disagree": ["fresh"] + good[:12] + ["10", "10"],
    }
    if kind in box_rows:
        at = rng.randrange(1, len(boxes) + 1)
        boxes.insert(at, box_rows[kind])
        if kind == "size disagree":
            boxes.insert(rng.randrange(1, at + 1), ["fresh"] + good[:12] + ["10", "12"])
    else:
        label_rows = {
            "bad Confidence": [iid, "verification", "/m/c3", "0.5", "", ""],
            "label unknown": [iid, "verification", "/m/zebra", "1", "", ""],
            "negative present": [iid, "verification", first[2], "0", "", ""],
            "negative parent present": [iid, "verification", "/m/c0", "0", "", ""],
        }
        if kind == "negative parent present":
            boxes.insert(1, [iid, "xclick", "/m/c2"] + good[2:])
        labels.insert(rng.randrange(1, len(labels) + 1), label_rows[kind])
        if kind == "negative present":  # twice: the message cites the last row, as a dict keeps it
            labels.insert(rng.randrange(1, len(labels) + 1), label_rows[kind])
    _dump(files[0], None, boxes)
    _dump(files[1], None, labels)


KINDS = [
    "unknown LabelName",
    "outside",
    "empty box",
    "not numbers",
    "bad IsGroupOf",
    "missing ImageID",
    "size format",
    "size disagree",
    "bad Confidence",
    "label unknown",
    "negative present",
    "negative parent present",
]


@pytest.mark.parametrize("kind", KINDS)
def test_errors_name_the_same_line_as_the_json_converter(tmp_path, kind):
    files, sizes, images = _random_case(tmp_path, 11)
    _inject(tmp_path, files, kind, random.Random(kind))
    with pytest.raises(AnnotationError) as e_json:
        convert_openimages(*files, tmp_path / "oi.json", image_sizes=sizes, image_dir=images)
    with pytest.raises(AnnotationError) as e_store:
        convert_openimages_store(
            *files,
            tmp_path / "store",
            image_sizes=sizes,
            image_dir=images,
            block_size=BLOCK,
            out_json=tmp_path / "x.json",
        )
    assert str(e_store.value) == str(e_json.value)
    assert ": line " in str(e_store.value) and "--skip-invalid" in str(e_store.value)
    assert not (tmp_path / "store").exists() and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_skip_invalid_counts_and_drops_the_same_rows(tmp_path, seed):
    files, sizes, images = _random_case(tmp_path, 20 + seed)
    rng = random.Random(seed)
    for kind in KINDS * 2:
        _inject(tmp_path, files, kind, rng)
    _boxed_image_file(files, images).write_bytes(b"not an image")  # an unreadable header
    s_json, s_store = _convert_both(tmp_path, files, sizes, images, skip=True)
    assert s_json["invalid_skipped"] > 2 * len(KINDS) and "unreadable image" in s_json["invalid_reasons"]
    _assert_same(tmp_path, files, s_json, s_store, skip=True)


def test_missing_sizes_columns_and_headers(tmp_path):
    files, sizes, images = _random_case(tmp_path, 5)
    victim = _boxed_image_file(files, images)
    victim.unlink()
    for skip in (False, True):
        try:
            expected = convert_openimages(*files, tmp_path / "oi.json", skip, image_sizes=sizes, image_dir=images)
        except AnnotationError as e:
            with pytest.raises(AnnotationError) as got:
                convert_openimages_store(*files, tmp_path / "store", skip, image_sizes=sizes, image_dir=images)
            assert str(got.value) == str(e) and f"ImageID {victim.stem}: no image size" in str(e)
            continue
        s = convert_openimages_store(*files, tmp_path / "store", skip, image_sizes=sizes, image_dir=images)
        assert s["invalid_reasons"] == expected["invalid_reasons"] and "no image size" in s["invalid_reasons"]
    (tmp_path / "nobox.csv").write_text("ImageID,LabelName,XMin,XMax,YMin\nimg_a,/m/c1,0,1,0\n")
    for convert, out in ((convert_openimages, tmp_path / "a.json"), (convert_openimages_store, tmp_path / "s")):
        with pytest.raises(AnnotationError, match=r"nobox.csv: missing column 'YMax' \(header has"):
            convert(tmp_path / "nobox.csv", *files[1:], out)
    with pytest.raises(AnnotationError, match=r"nope: image folder not found"):
        convert_openimages_store(*files, tmp_path / "s", image_dir=tmp_path / "nope")


def test_validation_split_takes_training_buckets_from_a_store(tmp_path):
    train_files, sizes, images = _random_case(tmp_path / "train", 30, n_images=80)
    convert_openimages_store(
        *train_files, tmp_path / "train_store", image_sizes=sizes, image_dir=images, out_json=tmp_path / "train.json"
    )
    val_files, vsizes, vimages = _random_case(tmp_path / "val", 31, n_images=15)
    a = convert_openimages_store(
        *val_files, tmp_path / "v1", image_sizes=vsizes, image_dir=vimages, train_ann=tmp_path / "train_store"
    )
    b = convert_openimages(
        *val_files, tmp_path / "v2.json", image_sizes=vsizes, image_dir=vimages, train_ann=tmp_path / "train.json"
    )
    assert open_store(tmp_path / "v1").meta["frequency"] == [
        c["frequency"] for c in json.loads((tmp_path / "v2.json").read_text())["categories"]
    ]
    assert a["buckets"] == b["buckets"]


def test_floats_read_numbers_as_python_does():
    rng = random.Random(0)
    values = [rng.uniform(0, 1) for _ in range(2000)] + [rng.uniform(0, 1e4) for _ in range(500)]
    texts = [rng.choice([repr(v), f"{v:.6f}", f"{v:.17g}", f"{v:e}"]) for v in values]
    got, ok = floats(pa.array(texts))
    assert ok.all() and got.tolist() == [float(t) for t in texts]
    odd = [" 0.5", "1_0", "abc", "", "nan", "-0", "+.5"]  # Arrow refuses some: Python decides
    got, ok = floats(pa.array(odd))
    assert ok.tolist() == [True, True, False, False, True, True, True]
    assert got[[0, 1, 5, 6]].tolist() == [0.5, 10.0, 0.0, 0.5] and np.isnan(got[4])


def test_cli_store_option(tmp_path, capsys):
    files, sizes, images = _random_case(tmp_path, 40)
    base = [
        "data",
        "convert-openimages",
        "--boxes",
        str(files[0]),
        "--labels",
        str(files[1]),
        "--classes",
        str(files[2]),
        "--hierarchy",
        str(files[3]),
        "--image-sizes",
        str(sizes),
        "--images",
        str(images),
    ]
    assert main(base + ["--store", str(tmp_path / "store")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(tmp_path / "store") and summary["json"] is None
    assert [p.name for p in tmp_path.glob("*.json")] == ["hierarchy.json"]  # no LVIS JSON written
    ds = LVISDetection(tmp_path / "store", hierarchy_file=files[3])
    assert len(ds) > 0 and ds.store.path == tmp_path / "store"
    assert main(base + ["--store", str(tmp_path / "store2"), "--out", str(tmp_path / "oi.json")]) == 0
    assert json.loads(capsys.readouterr().out)["json"] == str(tmp_path / "oi.json")
    assert json.loads((tmp_path / "oi.json").read_text())["images"]
    assert main(base) == 2
    assert "--out" in capsys.readouterr().err


def test_a_sweep_config_takes_a_store_as_data_train(tmp_path):
    """data.train may name a store directory: the config check accepts it and the stage-1 fingerprint hashes its
    meta.json (so a rebuilt store from other CSVs gets another fingerprint); data.val stays a JSON file."""
    import yaml

    from lt_models.errors import ConfigError
    from pipelines.config import identity
    from pipelines.config.load import load_experiment_config

    files, sizes, images = _random_case(tmp_path, 50)
    convert_openimages_store(
        *files,
        tmp_path / "store",
        image_sizes=sizes,
        image_dir=images,
        block_size=BLOCK,
        out_json=tmp_path / "val.json",
    )

    def config(train, val):
        raw = {
            "name": "p",
            "data": {"train": str(train), "val": str(val), "hierarchy": str(files[3])},
            "stage1": {"epochs": 1},
            "stage2": {"epochs": 1},
            "run": {"storage_path": str(tmp_path / "r")},
        }
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
        return load_experiment_config(tmp_path / "c.yaml")

    cfg = config(tmp_path / "store", tmp_path / "val.json")
    first = identity._fingerprint(cfg)
    with pytest.raises(ConfigError, match=r"data.val: dataset file not found"):
        config(tmp_path / "store", tmp_path / "store")
    with pytest.raises(ConfigError, match=r"data.train: dataset file not found"):
        config(tmp_path / "nostore", tmp_path / "val.json")
    _random_case(tmp_path, 51)  # other CSVs, same paths
    convert_openimages_store(*files, tmp_path / "store", image_sizes=sizes, image_dir=images)
    assert identity._fingerprint(cfg) != first
