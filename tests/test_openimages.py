"""Open Images challenge CSVs -> LVIS-format JSON, on small CSVs written here."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from lt_models.data.annotations import load_hierarchy, name_to_cat_id
from lt_models.data.datasets import LVISDetection
from lt_models.data.lvis_json import load_lvis_json
from lt_models.data.openimages.convert import convert_openimages
from lt_models.errors import AnnotationError

MIDS = {
    "/m/fruit": "Fruit",
    "/m/apple": "Apple",
    "/m/banana": "Banana",
    "/m/car": "Car",
    "/m/toy": "Toy",
    "/m/person": "Person",
}
HIER = {
    "LabelName": "/m/0bl9f",
    "Subcategory": [
        {"LabelName": "/m/fruit", "Subcategory": [{"LabelName": "/m/apple"}, {"LabelName": "/m/banana"}]},
        {"LabelName": "/m/vehicle", "Subcategory": [{"LabelName": "/m/car"}]},  # not one of our classes
        {"LabelName": "/m/toy"},
        {"LabelName": "/m/person", "Part": [{"LabelName": "/m/hand"}]},
    ],
}
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
]


def _box(image, label, x0, x1, y0, y1, group=0, **extra):
    row = {
        "ImageID": image,
        "Source": "xclick",
        "LabelName": label,
        "Confidence": 1,
        "XMin": x0,
        "XMax": x1,
        "YMin": y0,
        "YMax": y1,
        "IsOccluded": 0,
        "IsTruncated": 0,
        "IsGroupOf": group,
        "IsDepiction": 0,
        "IsInside": 0,
    }
    row.update(extra)
    return row


def _rows():
    boxes = [
        _box("img_a", "/m/car", 0.1, 0.5, 0.2, 0.6, ImageWidth=200, ImageHeight=100),
        _box("img_a", "/m/toy", 0.1, 0.5, 0.2, 0.6, ImageWidth=200, ImageHeight=100),  # a "car toy"
        _box("img_a", "/m/apple", 0.6, 0.9, 0.1, 0.4, ImageWidth=200, ImageHeight=100),
        _box("img_b", "/m/person", 0.0, 1.0, 0.0, 1.0, group=1, ImageWidth=50, ImageHeight=80),
        _box("img_b", "/m/fruit", 0.2, 0.4, 0.2, 0.4, ImageWidth=50, ImageHeight=80),
    ]
    labels = [
        {"ImageID": "img_a", "Source": "verification", "LabelName": "/m/car", "Confidence": 1},
        {"ImageID": "img_a", "Source": "verification", "LabelName": "/m/banana", "Confidence": 1},  # no box
        {"ImageID": "img_a", "Source": "verification", "LabelName": "/m/person", "Confidence": 0},
        {"ImageID": "img_b", "Source": "verification", "LabelName": "/m/car", "Confidence": 0},
        {
            "ImageID": "img_c",
            "Source": "verification",
            "LabelName": "/m/fruit",
            "Confidence": 0,
            "ImageWidth": 30,
            "ImageHeight": 30,
        },  # labels-only image
    ]
    return boxes, labels


def _write(tmp_path, boxes, labels, classes_header=False, box_cols=None):
    def dump(name, rows, cols):
        with open(tmp_path / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        return tmp_path / name

    cols = box_cols or BOX_COLS + ["ImageWidth", "ImageHeight"]
    b = dump("boxes.csv", boxes, cols)
    lab = dump("labels.csv", labels, ["ImageID", "Source", "LabelName", "Confidence", "ImageWidth", "ImageHeight"])
    with open(tmp_path / "classes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        if classes_header:
            w.writerow(["LabelName", "DisplayName"])
        w.writerows(MIDS.items())
    (tmp_path / "hierarchy.json").write_text(json.dumps(HIER))
    return b, lab, tmp_path / "classes.csv", tmp_path / "hierarchy.json"


def test_convert_small_challenge_files(tmp_path):
    files = _write(tmp_path, *_rows())
    out = tmp_path / "oi.json"
    summary = convert_openimages(*files, out)
    d = json.loads(out.read_text())
    cats = {c["mid"]: c for c in d["categories"]}
    assert [c["name"] for c in d["categories"]] == list(MIDS.values()) and [c["id"] for c in d["categories"]] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    cid = {m: c["id"] for m, c in cats.items()}
    assert cats["/m/car"]["image_count"] == 1 and cats["/m/banana"]["image_count"] == 0
    assert all(c["frequency"] == "r" for c in d["categories"])  # every count <= 10
    imgs = {i["oi_image_id"]: i for i in d["images"]}
    assert set(imgs) == {"img_a", "img_b", "img_c"}
    a, b, c = imgs["img_a"], imgs["img_b"], imgs["img_c"]
    assert (a["width"], a["height"], a["file_name"]) == (200, 100, "img_a.jpg")
    anns = [x for x in d["annotations"] if x["image_id"] == a["id"]]
    assert anns[0]["bbox"] == [20.0, 20.0, 80.0, 40.0] and anns[0]["area"] == 3200.0 and anns[0]["iscrowd"] == 0
    assert anns[0]["bbox"] == anns[1]["bbox"]  # car + toy: duplicate box kept
    assert [x["isgroupof"] for x in d["annotations"]] == [0, 0, 0, 1, 0]
    # Confidence 0 -> negatives, expanded to descendants (no fruit => no apple, no banana)
    assert a["neg_category_ids"] == [cid["/m/person"]]
    assert c["neg_category_ids"] == sorted([cid["/m/fruit"], cid["/m/apple"], cid["/m/banana"]])
    assert b["neg_category_ids"] == [cid["/m/car"]]
    # verified present without a box, or boxed only as a group -> not exhaustive
    assert a["not_exhaustive_category_ids"] == [cid["/m/banana"]]
    assert b["not_exhaustive_category_ids"] == [cid["/m/person"]]
    assert a["pos_category_ids"] == sorted([cid["/m/car"], cid["/m/banana"]])
    assert summary["images"] == 3 and summary["annotations"] == 5 and summary["group_of_boxes"] == 1
    assert summary["invalid_skipped"] == 0 and summary["buckets"] == {"r": 6, "c": 0, "f": 0}
    # the output passes the data layer's validation, and the original MID hierarchy applies to it
    v = load_lvis_json(out)
    assert v["invalid_skipped"] == 0
    assert load_hierarchy(files[3], name_to_cat_id(v["categories"])) == {
        cid["/m/fruit"]: [cid["/m/apple"], cid["/m/banana"]]
    }


def test_sizes_from_image_files_and_dataset_merge(tmp_path):
    """Without size columns, sizes come from <out dir>/images/<ImageID>.jpg; the dataset merges car + toy."""
    boxes, labels = _rows()
    for r in boxes + labels:
        r.pop("ImageWidth", None), r.pop("ImageHeight", None)
    files = _write(tmp_path, boxes, labels, classes_header=True, box_cols=BOX_COLS)
    (tmp_path / "images").mkdir()
    for name, (w, h) in {"img_a": (120, 60), "img_b": (40, 40), "img_c": (10, 10)}.items():
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "images" / f"{name}.jpg")
    out = tmp_path / "oi.json"
    convert_openimages(*files, out)
    d = json.loads(out.read_text())
    assert [(i["width"], i["height"]) for i in d["images"]] == [(120, 60), (40, 40), (10, 10)]
    assert d["annotations"][0]["bbox"] == [12.0, 12.0, 48.0, 24.0]
    ds = LVISDetection(out, hierarchy_file=files[3], expand_parents=True)
    _, t = ds[0]
    cid = {c["mid"]: c["id"] for c in d["categories"]}
    lab = {m: ds.cat_id_to_label[c] for m, c in cid.items()}
    assert t["multi_hot"].shape == (2, 7)
    assert t["multi_hot"][0].nonzero().flatten().tolist() == sorted([lab["/m/car"], lab["/m/toy"]])
    assert t["multi_hot"][1].nonzero().flatten().tolist() == sorted([lab["/m/apple"], lab["/m/fruit"]])


def test_missing_image_size_is_an_error_or_skipped(tmp_path):
    boxes, labels = _rows()
    for r in boxes + labels:
        r.pop("ImageWidth", None), r.pop("ImageHeight", None)
    files = _write(tmp_path, boxes, labels, box_cols=BOX_COLS)
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "images" / "img_a.jpg")
    with pytest.raises(AnnotationError, match=r"ImageID img_b: no image size: add 'ImageWidth'/'ImageHeight'"):
        convert_openimages(*files, tmp_path / "oi.json")
    assert not (tmp_path / "oi.json").exists()  # nothing half-written
    s = convert_openimages(*files, tmp_path / "oi.json", skip_invalid=True)
    assert s["images"] == 1 and s["invalid_reasons"] == {"box of skipped image": 2, "no image size": 2}


BAD = {
    "unknown LabelName": (
        lambda b, l: b[2].update(LabelName="/m/zebra"),
        r"boxes.csv: line 4 \(ImageID img_a\): field 'LabelName' = '/m/zebra' is not in "
        r".*classes.csv",
        "unknown LabelName",
    ),
    "coordinate above 1": (
        lambda b, l: b[2].update(XMax=1.7),
        r"boxes.csv: line 4 \(ImageID img_a\): field 'XMax' = 1.7 is outside \[0, 1\]",
        "bad box",
    ),
    "empty box": (
        lambda b, l: b[2].update(XMax=0.6),
        r"boxes.csv: line 4 \(ImageID img_a\): field 'XMax'/'YMax' must exceed .* width or height <= 0",
        "bad box",
    ),
    "non-numeric coordinate": (
        lambda b, l: b[0].update(YMin="abc"),
        r"boxes.csv: line 2 \(ImageID img_a\): fields XMin/XMax/YMin/YMax",
        "bad box",
    ),
    "bad IsGroupOf": (
        lambda b, l: b[3].update(IsGroupOf="yes"),
        r"boxes.csv: line 5 \(ImageID img_b\): field 'IsGroupOf' = 'yes'",
        "bad IsGroupOf",
    ),
    "confidence not 0/1": (
        lambda b, l: l[0].update(Confidence=0.5),
        r"labels.csv: line 2 \(ImageID img_a\): field 'Confidence' = '0.5'",
        "bad Confidence",
    ),
    "negative but boxed": (
        lambda b, l: l.append({"ImageID": "img_b", "LabelName": "/m/fruit", "Confidence": 0}),
        r"labels.csv: line 7 \(ImageID img_b\): field 'Confidence' = 0 \(verified absent\) for "
        r"'Fruit', but the image has a box",
        "negative label of a present class",
    ),
    "negative parent of a boxed leaf": (
        lambda b, l: l.append({"ImageID": "img_a", "LabelName": "/m/fruit", "Confidence": 0}),
        r"labels.csv: line 7 \(ImageID img_a\): .* for 'Fruit', but the image has a box or a Confidence 1 label of "
        r"'Apple'",
        "negative label of a present class",
    ),
    "size disagrees": (
        lambda b, l: b[1].update(ImageWidth=201),
        r"boxes.csv: line 3 \(ImageID img_a\): 'ImageWidth'/'ImageHeight' \(201.0, 100.0\) disagree",
        "bad image size",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rows(tmp_path, case):
    mutate, pattern, reason = BAD[case]
    boxes, labels = _rows()
    mutate(boxes, labels)
    files = _write(tmp_path, boxes, labels)
    with pytest.raises(AnnotationError, match=pattern) as exc:
        convert_openimages(*files, tmp_path / "oi.json")
    assert "--skip-invalid" in str(exc.value)
    s = convert_openimages(*files, tmp_path / "oi.json", skip_invalid=True)
    assert s["invalid_reasons"] == {reason: 1} and s["invalid_skipped"] == 1
    assert load_lvis_json(tmp_path / "oi.json")["invalid_skipped"] == 0  # the output itself is clean


def test_bad_files(tmp_path):
    boxes, labels = _rows()
    files = list(_write(tmp_path, boxes, labels))
    out = tmp_path / "oi.json"
    (tmp_path / "nobox.csv").write_text("ImageID,LabelName,XMin,XMax,YMin\nimg_a,/m/car,0,1,0\n")
    with pytest.raises(AnnotationError, match=r"nobox.csv: missing column 'YMax'"):
        convert_openimages(tmp_path / "nobox.csv", *files[1:], out)
    (tmp_path / "dup.csv").write_text("/m/car,Car\n/m/car,Auto\n")
    with pytest.raises(AnnotationError, match=r"dup.csv: line 2: duplicate LabelName '/m/car'"):
        convert_openimages(files[0], files[1], tmp_path / "dup.csv", files[3], out)
    (tmp_path / "h.json").write_text("[")
    with pytest.raises(AnnotationError, match=r"h.json: malformed JSON"):
        convert_openimages(*files[:3], tmp_path / "h.json", out)
    with pytest.raises(AnnotationError, match=r"missing.csv: CSV file not found"):
        convert_openimages(tmp_path / "missing.csv", *files[1:], out)


def _split(tmp_path, name, counts):
    """One split's CSVs in tmp_path/name: class MID -> number of images with one box of it (one class per image)."""
    d = tmp_path / name
    d.mkdir()
    boxes = [
        _box(f"{name}_{mid[3:]}_{i}", mid, 0.1, 0.5, 0.1, 0.5, ImageWidth=10, ImageHeight=10)
        for mid, n in counts.items()
        for i in range(n)
    ]
    return _write(d, boxes, []), d / "oi.json"


# training counts 101 / 11 / 1 -> f / c / r; validation's own counts 3 / 1 / 20 would give r / r / c
TRAIN_COUNTS = {"/m/apple": 101, "/m/car": 11, "/m/toy": 1}
VAL_COUNTS = {"/m/apple": 3, "/m/car": 1, "/m/toy": 20}


def test_val_takes_training_buckets(tmp_path):
    train_files, train_out = _split(tmp_path, "train", TRAIN_COUNTS)
    s = convert_openimages(*train_files, train_out)
    train = json.loads(train_out.read_text())
    assert train["frequency_source"] == s["frequency_source"] == "self: image_count"
    assert {c["mid"]: c["frequency"] for c in train["categories"]} == {
        "/m/fruit": "r",
        "/m/apple": "f",
        "/m/banana": "r",
        "/m/car": "c",
        "/m/toy": "r",
        "/m/person": "r",
    }

    val_files, val_out = _split(tmp_path, "val", VAL_COUNTS)
    own = convert_openimages(*val_files, tmp_path / "val_own.json")  # the old behaviour: own buckets
    assert {
        c["mid"]: c["frequency"]
        for c in json.loads((tmp_path / "val_own.json").read_text())["categories"]
        if c["mid"] in VAL_COUNTS
    } == {"/m/apple": "r", "/m/car": "r", "/m/toy": "c"}
    assert own["buckets"] == {"r": 5, "c": 1, "f": 0}

    s = convert_openimages(*val_files, val_out, train_ann=train_out)
    val = json.loads(val_out.read_text())
    assert [(c["id"], c["mid"], c["name"]) for c in val["categories"]] == [
        (c["id"], c["mid"], c["name"]) for c in train["categories"]
    ]
    assert [c["frequency"] for c in val["categories"]] == [c["frequency"] for c in train["categories"]]
    # image / instance counts stay the validation file's own
    assert {c["mid"]: (c["image_count"], c["instance_count"]) for c in val["categories"]} == {
        "/m/fruit": (0, 0),
        "/m/apple": (3, 3),
        "/m/banana": (0, 0),
        "/m/car": (1, 1),
        "/m/toy": (20, 20),
        "/m/person": (0, 0),
    }
    assert val["frequency_source"] == s["frequency_source"] == f"train: {train_out} image_count"
    assert s["buckets"] == {"r": 4, "c": 1, "f": 1}
    assert load_lvis_json(val_out)["invalid_skipped"] == 0


def test_train_ann_without_image_count_counts_its_annotations(tmp_path):
    train_files, train_out = _split(tmp_path, "train", TRAIN_COUNTS)
    convert_openimages(*train_files, train_out)
    d = json.loads(train_out.read_text())
    for c in d["categories"]:
        del c["image_count"], c["frequency"]
    train_out.write_text(json.dumps(d))
    val_files, val_out = _split(tmp_path, "val", VAL_COUNTS)
    convert_openimages(*val_files, val_out, train_ann=train_out)
    assert {
        c["mid"]: c["frequency"] for c in json.loads(val_out.read_text())["categories"] if c["mid"] in VAL_COUNTS
    } == {"/m/apple": "f", "/m/car": "c", "/m/toy": "r"}


TRAIN_BAD = {
    "missing MID": (
        lambda d: d["categories"].pop(3),
        r"train/oi.json: no category with mid '/m/car' \('Car' in .*val/classes.csv\), so "
        r".*val/oi.json cannot take its frequency bucket from training counts; convert the training "
        r"split with the same classes CSV .* and pass that JSON as --train-ann",
    ),
    "different id": (
        lambda d: d["categories"][1].update(id=9),
        r"train/oi.json: category mid '/m/apple' has id 9, name 'Apple', but id 2, name 'Apple' here: "
        r"it differs from the category list of .*val/oi.json; category ids must be identical",
    ),
    "extra category": (
        lambda d: d["categories"].append({"id": 7, "name": "Zebra", "mid": "/m/zebra", "image_count": 4}),
        r"train/oi.json: 7 categories \(extra mid '/m/zebra'\) vs 6 in .*val/classes.csv: it differs",
    ),
    "no mid": (
        lambda d: d["categories"][0].pop("mid"),
        r"train/oi.json: category 1 has no 'mid' field; --train-ann must be a training JSON written by "
        r"convert-openimages",
    ),
}


@pytest.mark.parametrize("case", sorted(TRAIN_BAD))
def test_bad_train_ann(tmp_path, case):
    mutate, pattern = TRAIN_BAD[case]
    train_files, train_out = _split(tmp_path, "train", TRAIN_COUNTS)
    convert_openimages(*train_files, train_out)
    d = json.loads(train_out.read_text())
    mutate(d)
    train_out.write_text(json.dumps(d))
    val_files, val_out = _split(tmp_path, "val", VAL_COUNTS)
    with pytest.raises(AnnotationError, match=pattern):
        convert_openimages(*val_files, val_out, train_ann=train_out)
    assert not val_out.exists()
    with pytest.raises(AnnotationError, match=r"none.json: training annotations file not found"):
        convert_openimages(*val_files, val_out, train_ann=tmp_path / "none.json")
