"""Open Images challenge-style AP@0.5 on small hand-built cases; every expected AP is worked out by hand.

Hierarchy used throughout: root -> Animal -> {Cat, Dog}; root -> Vehicle. Category ids: Animal 1, Cat 2, Dog 3,
Vehicle 4. AP is the VOC area under the monotone PR curve; mAP averages the classes that have ground truth.
"""

import csv
import json

import pytest

from lt_models.data.openimages.convert import convert_openimages
from lt_models.errors import AnnotationError
from lt_models.evaluation import evaluate_openimages
from pipelines.cli import main

ANIMAL, CAT, DOG, VEHICLE = 1, 2, 3, 4
HIERARCHY = {
    "LabelName": "root",
    "Subcategory": [
        {"LabelName": "Animal", "Subcategory": [{"LabelName": "Cat"}, {"LabelName": "Dog"}]},
        {"LabelName": "Vehicle"},
    ],
}


def _gt(images, anns):
    cats = [
        {"id": i, "name": n, "frequency": f}
        for i, n, f in [(ANIMAL, "Animal", "f"), (CAT, "Cat", "c"), (DOG, "Dog", "r"), (VEHICLE, "Vehicle", "f")]
    ]
    for k, a in enumerate(anns):
        a.setdefault("id", k + 1)
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    images = [
        {"id": i, "width": 500, "height": 500, "neg_category_ids": [], "not_exhaustive_category_ids": [], **extra}
        for i, extra in images
    ]
    return {"images": images, "annotations": anns, "categories": cats}


def _det(img, cat, box, score):
    return {"image_id": img, "category_id": cat, "bbox": list(box), "score": score}


def test_hierarchy_expansion_of_ground_truth():
    # Image 1: a Cat box A and a Dog box B. Expanded gt: Animal gets both boxes.
    gt = _gt(
        [(1, {})],
        [
            {"image_id": 1, "category_id": CAT, "bbox": [0, 0, 10, 10]},
            {"image_id": 1, "category_id": DOG, "bbox": [20, 0, 10, 10]},
        ],
    )
    dets = [
        _det(1, CAT, [0, 0, 10, 10], 0.9),  # Cat TP -> AP(Cat) = 1
        _det(1, ANIMAL, [0, 0, 10, 10], 0.8),  # Animal TP on expanded A
        _det(1, ANIMAL, [20, 0, 10, 10], 0.7),
    ]  # Animal TP on expanded B -> AP(Animal) = 1
    res = evaluate_openimages(gt, dets, HIERARCHY)  # Dog: 1 gt, no detection -> AP 0; Vehicle: no gt -> -1
    assert res["per_class"] == {ANIMAL: 1.0, CAT: 1.0, DOG: 0.0, VEHICLE: -1.0}
    assert res["AP50"] == pytest.approx(2 / 3) and res["AP"] == res["AP50"]
    assert res["num_classes_evaluated"] == 3
    # buckets from the categories' frequency: f = {Animal}, c = {Cat}, r = {Dog} (Vehicle has no gt)
    assert (res["APf"], res["APc"], res["APr"]) == (1.0, 1.0, 0.0)


def test_expand_detections_to_parents():
    gt = _gt(
        [(1, {})],
        [
            {"image_id": 1, "category_id": CAT, "bbox": [0, 0, 10, 10]},
            {"image_id": 1, "category_id": DOG, "bbox": [20, 0, 10, 10]},
        ],
    )
    dets = [_det(1, CAT, [0, 0, 10, 10], 0.9), _det(1, DOG, [20, 0, 10, 10], 0.6)]
    plain = evaluate_openimages(gt, dets, HIERARCHY)
    assert plain["per_class"][ANIMAL] == 0.0  # Animal has 2 expanded gts and no detection
    expanded = evaluate_openimages(gt, dets, HIERARCHY, expand_detections=True)
    # the Cat det becomes Animal@0.9 and the Dog det Animal@0.6: both TPs on the two Animal boxes
    assert expanded["per_class"] == {ANIMAL: 1.0, CAT: 1.0, DOG: 1.0, VEHICLE: -1.0}


def test_unverified_class_is_ignored_and_verified_negative_is_a_false_positive():
    # Image 1: a Cat only; Vehicle is neither positive nor negative there -> unverified.
    # Image 2: a Vehicle box. Image 3: Vehicle verified absent (neg_category_ids).
    gt = _gt(
        [(1, {}), (2, {}), (3, {"neg_category_ids": [VEHICLE]})],
        [
            {"image_id": 1, "category_id": CAT, "bbox": [0, 0, 10, 10]},
            {"image_id": 2, "category_id": VEHICLE, "bbox": [50, 50, 40, 20]},
        ],
    )
    tp = _det(2, VEHICLE, [50, 50, 40, 20], 0.5)
    unverified = _det(1, VEHICLE, [0, 0, 10, 10], 0.95)
    negative = _det(3, VEHICLE, [0, 0, 10, 10], 0.9)
    # ignored: the only scored Vehicle entry is the TP -> AP 1
    assert evaluate_openimages(gt, [tp, unverified], HIERARCHY)["per_class"][VEHICLE] == 1.0
    # verified negative: ranking FP@0.9, TP@0.5 -> precision 1/2 at recall 1 -> AP 0.5
    assert evaluate_openimages(gt, [tp, unverified, negative], HIERARCHY)["per_class"][VEHICLE] == 0.5


def test_negative_labels_expand_down_and_positive_labels_up():
    # Image 1 is verified to contain no Animal -> no Cat either: a Cat det there is a FP.
    # Image 2 has a Cat box; image 3 carries the image-level positive label Dog (verified, no box).
    gt = _gt(
        [(1, {"neg_category_ids": [ANIMAL]}), (2, {}), (3, {"pos_category_ids": [DOG]})],
        [{"image_id": 2, "category_id": CAT, "bbox": [0, 0, 10, 10]}],
    )
    dets = [
        _det(1, CAT, [0, 0, 10, 10], 0.9),
        _det(2, CAT, [0, 0, 10, 10], 0.8),
        # Animal is positive in image 3 through Dog's expansion, so this Animal det counts (as a FP)
        _det(3, ANIMAL, [5, 5, 10, 10], 0.99),
        _det(2, ANIMAL, [0, 0, 10, 10], 0.7),
    ]
    res = evaluate_openimages(gt, dets, HIERARCHY)
    assert res["per_class"][CAT] == 0.5  # FP@0.9 then TP@0.8, 1 gt
    assert res["per_class"][ANIMAL] == 0.5  # FP@0.99 then TP@0.7 on the expanded Cat box, 1 gt


def test_group_of_box_counts_one_true_positive():
    # Cat: a group-of box G (0,0)-(100,100) and a regular box C.
    gt = _gt(
        [(4, {})],
        [
            {"image_id": 4, "category_id": CAT, "bbox": [0, 0, 100, 100], "isgroupof": 1},
            {"image_id": 4, "category_id": CAT, "bbox": [200, 200, 10, 10]},
        ],
    )
    dets = [
        _det(4, CAT, [300, 300, 10, 10], 0.95),  # matches nothing: FP
        _det(4, CAT, [10, 10, 20, 20], 0.9),  # inside G (IoA 1): G's single TP, at score 0.9
        _det(4, CAT, [50, 50, 20, 20], 0.8),  # inside G as well: dropped, not a FP
        _det(4, CAT, [200, 200, 10, 10], 0.7),
    ]  # C: TP
    # num_gt = 1 regular + 1 group-of = 2. Ranking FP@.95, TP@.9, TP@.7 -> (P, R) = (0, 0), (1/2, 1/2), (2/3, 1)
    # monotone precision 2/3 on both recall steps -> AP = 1/2 * 2/3 + 1/2 * 2/3 = 2/3
    res = evaluate_openimages(gt, dets, HIERARCHY)
    assert res["per_class"][CAT] == pytest.approx(2 / 3)
    # the group-of box is expanded to Animal too, still as a group-of box
    assert res["per_class"][ANIMAL] == 0.0  # Animal: 2 gts, no Animal detections
    # a detection only partly inside the group box (IoA 0.25 < 0.5) is a plain FP
    res2 = evaluate_openimages(gt, dets[:2] + [_det(4, CAT, [90, 90, 20, 20], 0.92)] + dets[3:], HIERARCHY)
    # FP@.95, FP@.92, TP@.9 (group), TP@.7 -> (1/3, 1/2), (2/4, 1) -> AP = 1/2 * 1/2 + 1/2 * 1/2 = 1/2
    assert res2["per_class"][CAT] == pytest.approx(0.5)


def test_detection_takes_only_its_best_iou_box():
    # TF OD API rule: a detection is tested against its highest-IoU box only. If that box is taken it is a FP,
    # even when another free box overlaps it by >= 0.5 (COCO would match the second box).
    gt = _gt(
        [(1, {})],
        [
            {"image_id": 1, "category_id": DOG, "bbox": [0, 0, 10, 10]},
            {"image_id": 1, "category_id": DOG, "bbox": [2, 0, 10, 10]},
        ],
    )
    dets = [
        _det(1, DOG, [0, 0, 10, 10], 0.9),  # IoU 1 with the first box: TP
        _det(1, DOG, [0.5, 0, 10, 10], 0.8),
    ]  # IoU 0.905 with the first (taken), 0.739 with the second: FP
    assert evaluate_openimages(gt, dets, HIERARCHY)["per_class"][DOG] == 0.5


def test_hierarchy_file_and_errors(tmp_path):
    gt = _gt([(1, {})], [{"image_id": 1, "category_id": CAT, "bbox": [0, 0, 10, 10]}])
    path = tmp_path / "hierarchy.json"
    path.write_text(json.dumps(HIERARCHY))
    res = evaluate_openimages(gt, [_det(1, ANIMAL, [0, 0, 10, 10], 0.5)], path)
    assert res["per_class"][ANIMAL] == 1.0
    # the ready mapping {parent id: [child ids]} gives the same result
    res2 = evaluate_openimages(gt, [_det(1, ANIMAL, [0, 0, 10, 10], 0.5)], {ANIMAL: [CAT, DOG]})
    assert res2["per_class"] == res["per_class"]
    path.write_text(json.dumps({"Subcategory": []}))
    with pytest.raises(AnnotationError, match="LabelName"):
        evaluate_openimages(gt, [], path)
    path.write_text(json.dumps({"LabelName": "/m/0bl9f", "Subcategory": [{"LabelName": "/m/01yrx"}]}))
    with pytest.raises(AnnotationError, match="no hierarchy LabelName matches a category name or MID"):
        evaluate_openimages(gt, [], path)
    with pytest.raises(AnnotationError, match="category_id 99"):
        evaluate_openimages(gt, [_det(1, 99, [0, 0, 1, 1], 0.5)], HIERARCHY)


def test_convert_and_evaluate_with_the_same_mid_keyed_hierarchy(tmp_path, capsys):
    """The official hierarchy file is keyed by MIDs: the file that converts the CSVs must also evaluate them.

    Classes Fruit (/m/fruit) > {Apple, Banana}; after conversion Fruit 1, Apple 2, Banana 3. Images are 100x100.
    Image 1: an Apple box [10, 10, 40, 40] and a Banana box [60, 60, 30, 30]. Image 2: a Banana box [0, 0, 50, 50]
    and Apple verified absent. Expanded gt: Fruit has all 3 boxes.
    """
    hierarchy = tmp_path / "bbox_labels_600_hierarchy.json"
    hierarchy.write_text(
        json.dumps(
            {
                "LabelName": "/m/0bl9f",
                "Subcategory": [
                    {"LabelName": "/m/fruit", "Subcategory": [{"LabelName": "/m/apple"}, {"LabelName": "/m/banana"}]}
                ],
            }
        )
    )
    (tmp_path / "classes.csv").write_text("/m/fruit,Fruit\n/m/apple,Apple\n/m/banana,Banana\n")
    with open(tmp_path / "boxes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf", "ImageWidth", "ImageHeight"])
        w.writerow(["i1", "/m/apple", 0.1, 0.5, 0.1, 0.5, 0, 100, 100])
        w.writerow(["i1", "/m/banana", 0.6, 0.9, 0.6, 0.9, 0, 100, 100])
        w.writerow(["i2", "/m/banana", 0.0, 0.5, 0.0, 0.5, 0, 100, 100])
    (tmp_path / "labels.csv").write_text("ImageID,LabelName,Confidence\ni1,/m/apple,1\ni2,/m/apple,0\n")
    gt = tmp_path / "oi.json"
    convert_openimages(tmp_path / "boxes.csv", tmp_path / "labels.csv", tmp_path / "classes.csv", hierarchy, gt)
    ids = {c["mid"]: c["id"] for c in json.loads(gt.read_text())["categories"]}
    fruit, apple, banana = ids["/m/fruit"], ids["/m/apple"], ids["/m/banana"]
    dets = [
        _det(1, apple, [60, 60, 30, 30], 0.95),  # Apple FP (on the banana)
        _det(1, apple, [10, 10, 40, 40], 0.9),  # Apple TP
        _det(2, apple, [0, 0, 50, 50], 0.8),  # Apple verified absent in image 2: FP -> AP(Apple) = 1/2
        _det(1, banana, [60, 60, 30, 30], 0.7),  # Banana TP
        _det(2, banana, [0, 0, 50, 50], 0.6),  # Banana TP -> AP(Banana) = 1
        _det(2, fruit, [0, 0, 50, 50], 0.5),
    ]  # Fruit TP on the expanded banana box: 1 of 3 -> AP 1/3
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    rc = main(
        [
            "eval",
            "--openimages",
            "--gt",
            str(gt),
            "--dets",
            str(tmp_path / "dets.json"),
            "--hierarchy",
            str(hierarchy),
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    assert res["per_class"] == {str(fruit): pytest.approx(1 / 3), str(apple): 0.5, str(banana): 1.0}
    assert res["AP"] == res["AP50"] == pytest.approx((1 / 3 + 0.5 + 1.0) / 3)
    assert res["num_classes_evaluated"] == 3
    # the same numbers as a hierarchy keyed by the converted category names
    by_name = {
        "LabelName": "root",
        "Subcategory": [{"LabelName": "Fruit", "Subcategory": [{"LabelName": "Apple"}, {"LabelName": "Banana"}]}],
    }
    assert evaluate_openimages(gt, dets, by_name)["per_class"] == {int(k): v for k, v in res["per_class"].items()}
