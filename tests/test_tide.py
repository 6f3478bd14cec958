"""TIDE's error breakdown on a hand-made case where every error type occurs once, with the dAPs derived by hand from
TIDE's definitions (lt_models.evaluation.tide's docstring), and LVIS's federated labels."""

import pytest

from lt_models.evaluation.tide import ERROR_TYPES, tide_errors, tide_metrics
from pipelines.names import TIDE_ERROR_TYPES, TIDE_METRICS


def _gt(neg=(), nel=()):
    """Class 1 (rare): box A in image 1 and box C in image 2; class 2 (common): box B in image 1; class 3
    (frequent): no box, verified absent from image 1 (``neg``)."""
    images = [
        {"id": 1, "width": 100, "height": 100, "neg_category_ids": list(neg), "not_exhaustive_category_ids": list(nel)},
        {"id": 2, "width": 100, "height": 100, "neg_category_ids": [], "not_exhaustive_category_ids": []},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100},  # A
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 10, 10], "area": 100},  # B
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100},  # C
    ]
    cats = [{"id": c, "name": f"c{c}", "frequency": f} for c, f in ((1, "r"), (2, "c"), (3, "f"))]
    return {"images": images, "annotations": anns, "categories": cats}


def _det(cat, box, score):
    return {"image_id": 1, "category_id": cat, "bbox": box, "score": score}


DETS = [
    _det(1, [0, 0, 10, 10], 0.9),  # p1: true positive on A
    _det(1, [0, 0, 10, 10], 0.8),  # p2: Dupe (A already taken by p1)
    _det(3, [50, 50, 10, 10], 0.7),  # p3: Cls (IoU 1 with B, of class 2)
    _det(2, [80, 80, 10, 10], 0.6),  # p4: Bkg (overlaps nothing)
    _det(2, [56, 50, 10, 10], 0.5),  # p5: Loc (IoU 40/160 = 0.25 with B); B's best error is p3 (0.7)
    _det(1, [54, 54, 10, 10], 0.4),  # p6: Both (IoU 36/164 with B, another class; none with A)
]  # C (image 2) has no detection: Miss


def test_every_error_type_and_its_dap_by_hand():
    # AP50 per class: class 1 ranks T (.9), F (.8), F (.4) over 2 boxes -> precision 1 up to recall 0.5: 51/101;
    # class 2 has two false positives -> 0; class 3 has detections but no box -> 0. mAP = (51/101) / 3.
    # Fix Cls: p3 becomes class 2's true positive at 0.7 (above p4 and p5) -> class 2 AP 1, and class 3 is left
    #   without boxes or detections, so it drops out of the mean: (51/101 + 1) / 2.
    # Fix Miss: C no longer counts -> class 1 AP 1: (1 + 0 + 0) / 3.
    # Fix Loc: p5 is not B's best error, so it is dropped: class 2 still has p4 -> no change. Dupe, Bkg, Both:
    #   dropping p2, p4 or p6 leaves every AP as it was.
    res = tide_errors(_gt(neg=[3]), DETS)
    base = (51 / 101) / 3
    assert res["all"]["AP50"] == pytest.approx(base)
    expect = {"Cls": (51 / 101 + 1) / 2 - base, "Miss": 1 / 3 - base, "Loc": 0, "Dupe": 0, "Bkg": 0, "Both": 0}
    for kind in ERROR_TYPES:
        assert res["all"][f"dAP_{kind}"] == pytest.approx(expect[kind], abs=1e-12), kind
        assert res["all"][f"n_{kind}"] == 1, kind
    # per bucket: class 1 is rare, class 2 common, class 3 frequent; counts by the detection's class (Miss: box's)
    assert res["r"]["AP50"] == pytest.approx(51 / 101) and res["r"]["dAP_Miss"] == pytest.approx(50 / 101)
    assert res["c"]["AP50"] == 0 and res["c"]["dAP_Cls"] == pytest.approx(1.0)
    assert res["f"]["n_Cls"] == 1 and res["c"]["n_Cls"] == 0 and res["c"]["n_Loc"] == res["c"]["n_Bkg"] == 1
    assert (res["r"]["n_Dupe"], res["r"]["n_Both"], res["r"]["n_Miss"]) == (1, 1, 1)


def test_federated_labels_drop_unverified_classes_and_ignore_non_exhaustive_ones():
    # class 3 not verified absent in image 1: p3 is dropped (no Cls error, class 3 drops out of the mean)
    res = tide_errors(_gt(neg=[]), DETS)
    assert res["all"]["n_Cls"] == 0 and res["f"]["AP50"] == -1.0
    # B's Loc error (p5) is now B's best: fixed, class 2 ranks F (.6), T (.5) -> precision 1/2 at every recall,
    # AP 1/2, averaged over classes 1 and 2
    assert res["all"]["dAP_Loc"] == pytest.approx(0.5 / 2)
    # class 1 not exhaustively annotated in image 1: its unmatched detections (p2, p6) are ignored, not errors
    res = tide_errors(_gt(neg=[3], nel=[1]), DETS)
    assert res["all"]["n_Dupe"] == res["all"]["n_Both"] == 0 and res["all"]["n_Cls"] == 1


def test_the_metric_names_are_the_ones_the_pipelines_log():
    assert ERROR_TYPES == TIDE_ERROR_TYPES
    assert tuple(sorted(tide_metrics(tide_errors(_gt(neg=[3]), DETS)))) == tuple(sorted(TIDE_METRICS))
