"""LVIS/COCO data layer: validation, duplicate-box merge, multi-hot targets, hierarchy, buckets, statistics."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lt_models.data.annotations import fill_frequency, frequency_buckets, load_hierarchy
from lt_models.data.datasets import LVISDetection, collate_detection
from lt_models.data.lvis_json import load_lvis_json
from lt_models.data.merge import box_iou_xyxy, group_duplicate_boxes
from lt_models.data.stats import dataset_stats, format_stats
from lt_models.errors import AnnotationError

# Category ids are deliberately unordered and sparse: labels follow the sorted ids.
# sorted ids 3 banana, 7 apple, 10 car, 11 toy, 42 fruit -> labels 1..5
CATS = [
    {"id": 42, "name": "fruit", "frequency": "f"},
    {"id": 7, "name": "apple", "frequency": "c"},
    {"id": 3, "name": "banana"},
    {"id": 10, "name": "car", "frequency": "r"},
    {"id": 11, "name": "toy", "frequency": "r"},
]
HIERARCHY = {
    "LabelName": "root",
    "Subcategory": [
        {"LabelName": "fruit", "Subcategory": [{"LabelName": "apple"}, {"LabelName": "banana"}]},
        {"LabelName": "vehicle", "Subcategory": [{"LabelName": "car"}]},  # not a category: transparent
        {"LabelName": "toy"},
    ],
}


def _base():
    images = [
        {
            "id": 1,
            "file_name": "a.png",
            "width": 64,
            "height": 48,
            "neg_category_ids": [],
            "not_exhaustive_category_ids": [42],
        },
        {"id": 2, "file_name": "b.png", "width": 32, "height": 32},  # COCO style: no federated fields
        {"id": 3, "file_name": "c.png", "width": 32, "height": 32, "neg_category_ids": [3, 7]},  # empty
        {"id": 5, "file_name": "d.png", "width": 32, "height": 32},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 42, "bbox": [10, 10, 20, 20]},  # fruit  } one object,
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20]},  # apple  } identical box
        {"id": 3, "image_id": 1, "category_id": 10, "bbox": [30, 5, 20, 30]},  # car    } IoU 0.99:
        {"id": 4, "image_id": 1, "category_id": 11, "bbox": [30.2, 5, 20, 30]},  # toy    } "car toy"
        {"id": 5, "image_id": 1, "category_id": 3, "bbox": [2, 30, 10, 10]},  # banana
        {"id": 6, "image_id": 2, "category_id": 3, "bbox": [0, 0, 8, 8]},
        {"id": 7, "image_id": 2, "category_id": 7, "bbox": [16, 16, 8, 8]},
        {"id": 8, "image_id": 5, "category_id": 42, "bbox": [1, 1, 5, 5]},  # parent only
    ]
    return {"images": images, "annotations": anns, "categories": [dict(c) for c in CATS]}


def _write(tmp_path, data, images=True):
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(data))
    (tmp_path / "hierarchy.json").write_text(json.dumps(HIERARCHY))
    if images:
        (tmp_path / "images").mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        for img in data["images"]:
            if isinstance(img, dict) and "file_name" in img:
                arr = rng.integers(0, 256, (img["height"], img["width"], 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / "images" / img["file_name"])
    return ann


# ------------------------------------------------------------------ merge rule


def test_iou_and_duplicate_grouping():
    a = np.array([[0, 0, 10, 10]], float)
    assert box_iou_xyxy(a, np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)) == pytest.approx(
        np.array([[1.0, 1 / 3, 0.0]])
    )
    boxes = np.array(
        [
            [0, 0, 100, 100],
            [0, 0, 100, 100],
            [1, 0, 101, 100],  # identical, IoU 0.98
            [0, 0, 100, 90],  # IoU 0.90 -> separate
            [200, 200, 210, 210],
            [200, 200, 210, 210.3],
        ],
        float,
    )
    assert group_duplicate_boxes(boxes).tolist() == [0, 0, 0, 1, 2, 2]
    # transitive: b~a and c~b merge even though IoU(a, c) < 0.95
    chain = np.array([[0, 0, 100, 100], [2, 0, 102, 100], [4, 0, 104, 100]], float)
    assert box_iou_xyxy(chain[:1], chain[2:])[0, 0] < 0.95
    assert group_duplicate_boxes(chain).tolist() == [0, 0, 0]
    assert group_duplicate_boxes(np.zeros((0, 4))).tolist() == []


# ------------------------------------------------------------------ dataset


def test_dataset_merges_duplicates_into_multi_hot_objects(tmp_path):
    ds = LVISDetection(_write(tmp_path, _base()))
    assert ds.cat_ids == [3, 7, 10, 11, 42] and ds.num_classes == 5
    assert ds.cat_id_to_label == {3: 1, 7: 2, 10: 3, 11: 4, 42: 5} and ds.label_to_cat_id == [-1, 3, 7, 10, 11, 42]
    assert ds.image_ids.tolist() == [1, 2, 5]  # train=True drops the image without objects
    image, t = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
    raw = np.asarray(Image.open(tmp_path / "images" / "a.png"), dtype=np.float32) / 255
    assert torch.allclose(image, torch.from_numpy(raw).permute(2, 0, 1))
    assert t["boxes"].dtype == torch.float32
    assert t["boxes"].tolist() == [[10, 10, 30, 30], [30, 5, 50, 35], [2, 30, 12, 40]]
    assert t["labels"].dtype == torch.int64
    # no hierarchy: primary = label of the smallest annotation id (fruit, ann 1; car, ann 3)
    assert t["labels"].tolist() == [5, 3, 1]
    assert t["multi_hot"].shape == (3, 6) and t["multi_hot"][:, 0].sum() == 0
    assert t["multi_hot"].tolist() == [[0, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 0], [0, 1, 0, 0, 0, 0]]
    assert t["image_id"].item() == 1 and t["image_id"].dtype == torch.int64
    indptr, labels = ds.label_csr()
    assert indptr.tolist() == [0, 5, 7, 8] and labels.tolist() == [0, 1, 2, 3, 4, 0, 1, 4]
    assert ds.image_counts().tolist() == [2, 2, 1, 1, 2]
    assert ds.frequency == ["r", "c", "r", "r", "f"]  # banana lacks `frequency`: 2 images -> rare


def test_hierarchy_picks_the_leaf_as_primary_and_expands_parents(tmp_path):
    ann = _write(tmp_path, _base())
    ds = LVISDetection(ann, hierarchy_file=tmp_path / "hierarchy.json")
    assert ds.hierarchy == {42: [3, 7]}
    assert ds.target(0)["labels"].tolist() == [2, 3, 1]  # apple (most specific) beats fruit despite larger ann id
    assert ds.target(0)["multi_hot"][2].tolist() == [0, 1, 0, 0, 0, 0]  # not expanded
    ex = LVISDetection(ann, hierarchy_file=tmp_path / "hierarchy.json", expand_parents=True)
    t = ex.target(1)  # image 2: banana, apple -> both also fruit
    assert t["multi_hot"].tolist() == [[0, 1, 0, 0, 0, 1], [0, 0, 1, 0, 0, 1]]
    assert t["labels"].tolist() == [1, 2]
    assert ex.image_counts().tolist() == [2, 2, 1, 1, 3]
    with pytest.raises(ValueError, match="hierarchy_file"):
        LVISDetection(ann, expand_parents=True)


def test_eval_mode_keeps_empty_images_and_collates(tmp_path):
    ds = LVISDetection(_write(tmp_path, _base()), train=False)
    assert ds.image_ids.tolist() == [1, 2, 3, 5]
    image, t = ds[2]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["multi_hot"].shape == (0, 6)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert (
        isinstance(images, list)
        and len(images) == 3
        and [tuple(i.shape) for i in images] == [(3, 48, 64), (3, 32, 32), (3, 32, 32)]
    )
    assert [t["image_id"].item() for t in targets] == [1, 2, 3]


def test_image_size_mismatch_is_an_error(tmp_path):
    data = _base()
    ann = _write(tmp_path, data)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "images" / "b.png")
    ds = LVISDetection(ann)
    with pytest.raises(AnnotationError, match=r"image id 2: fields 'width'/'height' = 32x32 .* is 10x10"):
        ds[1]


def test_transforms_are_applied(tmp_path):
    def flip(image, target):
        return image.flip(-1), dict(target, flipped=True)

    ds = LVISDetection(_write(tmp_path, _base()), transforms=flip)
    assert ds[0][1]["flipped"] is True


# ------------------------------------------------------------------ validation


def _drop_file(tmp, d):
    (tmp / "images" / "b.png").unlink()


BAD = {
    # name: (mutation of the data dict or the files, expected message regex, skip reason, skipped count)
    "unknown category_id": (
        lambda t, d: d["annotations"][1].update(category_id=999),
        r"annotation id 2: field 'category_id' = 999",
        "unknown category id",
        1,
    ),
    "zero width": (
        lambda t, d: d["annotations"][4].update(bbox=[2, 30, 0, 10]),
        r"annotation id 5 \(image id 1\): field 'bbox' = \[2, 30, 0, 10\] has width or height <= 0",
        "bad box",
        1,
    ),
    "negative height": (
        lambda t, d: d["annotations"][4].update(bbox=[2, 30, 5, -1]),
        r"annotation id 5 \(image id 1\): field 'bbox'.*height <= 0",
        "bad box",
        1,
    ),
    "box outside image": (
        lambda t, d: d["annotations"][5].update(bbox=[28, 0, 8, 8]),
        r"annotation id 6 \(image id 2\): field 'bbox' = \[28, 0, 8, 8\] lies outside the "
        r"32x32 image",
        "bad box",
        1,
    ),
    "missing image file": (
        _drop_file,
        r"image id 2: field 'file_name' = 'b.png': image file .*b.png does not exist",
        "missing image file",
        1,
    ),
    "duplicate image id": (
        lambda t, d: d["images"].append(dict(d["images"][1])),
        r"image id 2: duplicate 'id'",
        "duplicate image id",
        1,
    ),
    "duplicate annotation id": (
        lambda t, d: d["annotations"].append(dict(d["annotations"][0], category_id=7)),
        r"annotation id 1: duplicate 'id'",
        "duplicate annotation id",
        1,
    ),
    "unknown image_id": (
        lambda t, d: d["annotations"].append({"id": 99, "image_id": 77, "category_id": 7, "bbox": [0, 0, 1, 1]}),
        r"annotation id 99: field 'image_id' = 77",
        "unknown image id",
        1,
    ),
    "negative but annotated": (
        lambda t, d: d["images"][0].update(neg_category_ids=[10, 3]),
        r"image id 1: field 'neg_category_ids' lists category id 3 that is annotated",
        "negative and annotated",
        1,
    ),
    "unknown id in not_exhaustive": (
        lambda t, d: d["images"][0].update(not_exhaustive_category_ids=[5]),
        r"image id 1: field 'not_exhaustive_category_ids' lists unknown category id 5",
        "unknown category id",
        1,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_id_and_field(tmp_path, case):
    mutate, pattern, reason, n = BAD[case]
    data = _base()
    ann = _write(tmp_path, data)
    mutate(tmp_path, data)
    ann.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=pattern) as exc:
        load_lvis_json(ann, image_dir=tmp_path / "images")
    assert str(ann) in str(exc.value) and "--skip-invalid" in str(exc.value)
    with pytest.raises(AnnotationError):
        LVISDetection(ann)
    ok = load_lvis_json(ann, image_dir=tmp_path / "images", skip_invalid=True)
    assert ok["invalid_reasons"].get(reason) == n
    ds = LVISDetection(ann, skip_invalid=True)
    assert ds.num_skipped == ok["invalid_skipped"] >= n
    for img in ok["images"]:  # what is left is consistent
        assert not set(img["neg_category_ids"]) & {
            a["category_id"] for a in ok["annotations"] if a["image_id"] == img["id"]
        }


def test_skipping_an_image_drops_its_annotations(tmp_path):
    data = _base()
    ann = _write(tmp_path, data)
    (tmp_path / "images" / "a.png").unlink()
    ok = load_lvis_json(ann, image_dir=tmp_path / "images", skip_invalid=True)
    assert ok["invalid_reasons"] == {"missing image file": 1, "annotation of skipped image": 5}
    assert {a["image_id"] for a in ok["annotations"]} == {2, 5}


def test_malformed_json(tmp_path):
    ann = tmp_path / "broken.json"
    ann.write_text('{"images": [1, 2,\n  "annotations": ')
    with pytest.raises(AnnotationError, match=r"broken.json: malformed JSON at line 2 column"):
        load_lvis_json(ann)
    with pytest.raises(AnnotationError, match="malformed JSON"):
        load_lvis_json(ann, skip_invalid=True)  # nothing to skip: the file cannot be read at all
    ann.write_text('{"images": []}')
    with pytest.raises(AnnotationError, match="'annotations'"):
        load_lvis_json(ann)
    with pytest.raises(AnnotationError, match="not found"):
        load_lvis_json(tmp_path / "nope.json")


def test_small_overhang_is_clipped_larger_is_not(tmp_path):
    data = _base()
    data["annotations"][5]["bbox"] = [24.5, 0, 8, 8]  # 0.5 px past the right edge of the 32 px image
    ann = _write(tmp_path, data)
    d = load_lvis_json(ann)
    assert d["annotations"][5]["bbox"] == [24.5, 0, 7.5, 8] and d["annotations"][5]["area"] == 60
    assert d["annotations"][0]["area"] == 400 and d["annotations"][0]["iscrowd"] == 0
    assert d["images"][1]["neg_category_ids"] == []  # COCO-style images get empty federated lists


# ------------------------------------------------------------------ buckets and hierarchy


def test_frequency_buckets_lvis_thresholds_and_configurable():
    assert frequency_buckets([0, 1, 10, 11, 100, 101]) == ["r", "r", "r", "c", "c", "f"]
    assert frequency_buckets(np.array([2, 3, 5, 6]), rare_max=2, common_max=5) == ["r", "c", "c", "f"]
    with pytest.raises(ValueError):
        frequency_buckets([1], rare_max=10, common_max=10)


def test_fill_frequency_only_fills_missing():
    data = _base()
    assert fill_frequency(data) == 1
    cats = {c["id"]: c for c in data["categories"]}
    assert cats[3]["frequency"] == "r" and cats[3]["image_count"] == 2 and cats[3]["instance_count"] == 2
    assert cats[42]["frequency"] == "f"  # kept as given
    data = _base()
    fill_frequency(data, image_counts={3: 500})  # val file: use the training counts
    assert {c["id"]: c["frequency"] for c in data["categories"]}[3] == "f"


def test_load_hierarchy(tmp_path):
    p = tmp_path / "h.json"
    p.write_text(json.dumps(HIERARCHY))
    names = {"fruit": 42, "apple": 7, "banana": 3, "car": 10, "toy": 11}
    assert load_hierarchy(p, names) == {42: [3, 7]}
    # a non-category node between two categories is transparent
    p.write_text(
        json.dumps(
            {
                "LabelName": "/m/root",
                "Subcategory": [
                    {
                        "LabelName": "/m/veh",
                        "Subcategory": [{"LabelName": "/m/mid", "Subcategory": [{"LabelName": "/m/car"}]}],
                    }
                ],
            }
        )
    )
    assert load_hierarchy(p, {"/m/veh": 1, "/m/car": 2}) == {1: [2]}
    with pytest.raises(AnnotationError, match="no hierarchy LabelName matches"):
        load_hierarchy(p, names)
    p.write_text(json.dumps({"LabelName": "root", "Subcategory": [{"Name": "x"}]}))
    with pytest.raises(AnnotationError, match="needs a string 'LabelName'"):
        load_hierarchy(p, names)
    p.write_text("{")
    with pytest.raises(AnnotationError, match="h.json: malformed JSON"):
        load_hierarchy(p, names)


# ------------------------------------------------------------------ statistics


def _stats_dataset(tmp_path):
    """P parent of A, B, C. 30 images of A (10 also labelled B on the same box), 5 of B alone,
    4 parent-only objects, 6 objects labelled C + P."""
    cats = [{"id": 1, "name": "P"}, {"id": 2, "name": "A"}, {"id": 3, "name": "B"}, {"id": 4, "name": "C"}]
    images, anns = [], []

    def add(labels):
        iid = len(images) + 1
        images.append({"id": iid, "file_name": f"{iid}.png", "width": 50, "height": 50})
        for c in labels:
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": c, "bbox": [5, 5, 20, 20]})

    for k in range(30):
        add([2, 3] if k < 10 else [2])
    for _ in range(5):
        add([3])
    for _ in range(4):
        add([1])
    for _ in range(6):
        add([4, 1])
    ann = tmp_path / "stats.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    h = tmp_path / "h.json"
    h.write_text(
        json.dumps(
            {"LabelName": "root", "Subcategory": [{"LabelName": "P", "Subcategory": [{"LabelName": n} for n in "ABC"]}]}
        )
    )
    return ann, h


def test_dataset_stats_closed_form(tmp_path):
    ann, h = _stats_dataset(tmp_path)
    s = dataset_stats(ann, lam=0.5, hierarchy_file=h)
    assert s["images"] == 45 and s["objects"] == 45 and s["multi_label_objects"] == 16
    assert s["image_counts"] == {"P": 10, "A": 30, "B": 15, "C": 6}
    assert s["imbalance"] == 5.0 and s["head"]["name"] == "A" and s["tail"]["name"] == "C"
    assert s["buckets"] == {"r": 2, "c": 2, "f": 0} and s["bucket_source"] == "image counts"
    # concurrent rates (Fig 3a): P(B | A) = 10/30, P(A | B) = 10/15; the C/P hierarchy pair is excluded
    assert [(p["label"], p["also_labelled"], p["objects"], p["of"]) for p in s["confused_pairs"]] == [
        ("B", "A", 10, 15),
        ("A", "B", 10, 30),
    ]
    assert s["confused_pairs"][0]["rate"] == pytest.approx(2 / 3, abs=1e-4)
    # parent-only (Fig 3b): 4 of the 45 objects in P's family carry only P
    assert s["parent_only_share"] == pytest.approx(4 / 45)
    assert s["parent_only"]["P"] == {"objects": 45, "parent_only": 4, "share": round(4 / 45, 4)}
    # soft-balance views: class i is drawn 45 * P*(i) times, P* ∝ n_i^(1-λ) (eq 8); an image collects the
    # draws of all its classes, each spread over that class's n_i images.
    n = {"P": 10, "A": 30, "B": 15, "C": 6}
    rows = s["sampling"]["rows"]
    assert rows["non-balance (each image once)"]["head_views"] == 1.0
    for name, lam in (("soft-balance λ=0.5", 0.5), ("class-aware (λ=1)", 1.0)):
        z = sum(v ** (1 - lam) for v in n.values())
        per = {k: 45 * v ** (1 - lam) / z / v for k, v in n.items()}
        head_imgs = [per["A"] + per["B"]] * 10 + [per["A"]] * 20
        assert rows[name]["head_views"] == pytest.approx(np.mean(head_imgs))
        assert rows[name]["head_unseen"] == pytest.approx(np.mean(np.exp(-np.array(head_imgs))))
        assert rows[name]["tail_views"] == pytest.approx(per["C"] + per["P"])
        assert rows[name]["tail_unseen"] == pytest.approx(math.exp(-(per["C"] + per["P"])))
    assert rows["class-aware (λ=1)"]["tail_views"] == pytest.approx(3.0)  # 45/4/6 + 45/4/10
    text = format_stats(s)
    assert "imbalance magnitude (Fig 2): 5.0" in text and "B  " in text and "8.9%" in text
    assert "class-aware (λ=1)" in text


def test_dataset_stats_plots_and_auto_hierarchy(tmp_path):
    ann, h = _stats_dataset(tmp_path)
    h.rename(tmp_path / "hierarchy.json")  # found beside the annotations
    s = dataset_stats(ann, lam=0.7, plot_dir=tmp_path)
    assert s["hierarchy"] == str(tmp_path / "hierarchy.json") and s["parent_only_share"] > 0
    names = sorted(Path(p).name for p in s["plots"])
    assert names == ["stats_confusion.png", "stats_imbalance.png", "stats_parent_only.png", "stats_soft_balance.png"]
    for p in s["plots"]:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300
    assert not list(tmp_path.glob(".tmp-*"))


def test_dataset_stats_without_hierarchy_reports_na(tmp_path):
    ann, _ = _stats_dataset(tmp_path)
    s = dataset_stats(ann)
    assert s["parent_only_share"] is None and "sampling" not in s
    # C and P are unrelated without a hierarchy, so their co-labels now count as concurrent pairs
    assert ("C", "P") in {(p["label"], p["also_labelled"]) for p in s["confused_pairs"]}
    assert "n/a (no hierarchy" in format_stats(s)


def test_lvis_v1_images_are_found_through_coco_url(tmp_path):
    """LVIS v1 images carry only `coco_url`; files live under <COCO root>/<split>/."""
    data = _base()
    data["images"] = data["images"][:2]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in (1, 2)]
    for img, split in zip(data["images"], ("train2017", "val2017")):
        name = img.pop("file_name")
        img["coco_url"] = f"http://images.cocodataset.org/{split}/{name}"
        (tmp_path / split).mkdir()
        Image.fromarray(np.zeros((img["height"], img["width"], 3), np.uint8)).save(tmp_path / split / name)
    ann = tmp_path / "lvis_v1_train.json"
    ann.write_text(json.dumps(data))
    ds = LVISDetection(ann, image_dir=tmp_path)
    assert [ds.image_info(i)["file_name"] for i in range(len(ds))] == ["train2017/a.png", "val2017/b.png"]
    assert ds[1][0].shape == (3, 32, 32)
