"""Concurrent-rate matrix from a hand-built annotation set, checked against rates counted by hand."""

import json

import pytest
import torch

from lt_models.data.rate_matrix import concurrent_rate_matrix
from lt_models.errors import AnnotationError, ConfigError
from lt_models.losses.concurrent_softmax import ConcurrentSoftmaxLoss

# category ids 10, 20, 30, 40, 50 -> contiguous labels 1..5 (K = 6)
NAMES = {10: "a", 20: "b", 30: "c", 40: "d", 50: "e"}


def annotations() -> dict:
    boxes = [  # (image, category, bbox xywh, iscrowd)
        (1, 10, [0, 0, 10, 10], 0),
        (1, 20, [0, 0, 10, 10], 0),  # identical box: same object as the first -> {a, b}
        (1, 10, [50, 50, 10, 10], 0),
        (1, 10, [50, 50, 10, 10], 0),  # duplicate with the same label: one object {a}, counted once
        (2, 20, [0, 0, 100, 100], 0),
        (2, 30, [0, 0, 100, 98], 0),  # IoU 0.98 with the b box
        (2, 10, [0, 0, 100, 94], 0),  # IoU 0.94 with b (< 0.95) but 0.959 with c: transitively {a, b, c}
        (2, 30, [200, 200, 20, 20], 0),  # {c}
        (2, 40, [300, 300, 20, 20], 1),  # crowd: ignored
        (3, 20, [0, 0, 10, 10], 0),
        (3, 30, [0, 0, 10, 9], 0),  # IoU 0.9: separate objects {b}, {c}
        (3, 40, [100, 100, 10, 10], 0),  # {d}
        (3, 10, [400, 400, 5, 5], 0),  # {a}
    ]
    return {
        "images": [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.png"} for i in (1, 2, 3)],
        "annotations": [
            {"id": n + 1, "image_id": img, "category_id": cat, "bbox": box, "iscrowd": crowd, "area": box[2] * box[3]}
            for n, (img, cat, box, crowd) in enumerate(boxes)
        ],
        "categories": [{"id": cid, "name": name} for cid, name in NAMES.items()],
    }


def by_hand() -> torch.Tensor:
    # objects: {a,b} {a} | {a,b,c} {c} | {b} {c} {d} {a}  ->  #a = 4, #b = 3, #c = 3, #d = 1, #e = 0
    # both(a,b) = 2, both(a,c) = 1, both(b,c) = 1
    r = torch.zeros(6, 6)
    r[1, 2], r[1, 3] = 2 / 4, 1 / 4
    r[2, 1], r[2, 3] = 2 / 3, 1 / 3
    r[3, 1], r[3, 2] = 1 / 3, 1 / 3
    return r


def test_rates_equal_the_hand_counted_matrix():
    r = concurrent_rate_matrix(annotations())
    assert r.shape == (6, 6) and r.dtype == torch.float32
    torch.testing.assert_close(r, by_hand())
    assert not r[0].any() and not r[:, 0].any() and not r.diagonal().any()


def test_min_rate_drops_small_rates_and_sparse_output():
    expected = by_hand()
    expected[1, 3] = 0.0  # 1/4 < 0.3
    torch.testing.assert_close(concurrent_rate_matrix(annotations(), min_rate=0.3), expected)
    sparse = concurrent_rate_matrix(annotations(), min_rate=0.3, sparse=True)
    assert sparse.is_sparse and sparse._nnz() == 5
    torch.testing.assert_close(sparse.to_dense(), expected)
    ConcurrentSoftmaxLoss(sparse)  # the loss accepts it


@pytest.mark.parametrize("rate", [1.0, 0.0, 0.5])
def test_hierarchy_pairs_take_hierarchy_rate_both_ways_and_for_ancestors(rate, tmp_path):
    # d (40) is the parent of b (20), b the parent of a (10): pairs a-b, b-d and the ancestor pair a-d
    expected = by_hand()
    for i, j in ((1, 2), (2, 4), (1, 4)):
        expected[i, j] = expected[j, i] = rate  # replaces the estimates r_ab = 1/2, r_ba = 2/3
    tree = {40: [20], 20: [10]}
    torch.testing.assert_close(concurrent_rate_matrix(annotations(), hierarchy=tree, hierarchy_rate=rate), expected)
    # the same from files: annotation JSON + Open Images style hierarchy JSON (category names as LabelName)
    ann_file = tmp_path / "train.json"
    ann_file.write_text(json.dumps(annotations()))
    hier_file = tmp_path / "hierarchy.json"
    hier_file.write_text(
        json.dumps(
            {
                "LabelName": "root",
                "Subcategory": [
                    {"LabelName": "d", "Subcategory": [{"LabelName": "b", "Subcategory": [{"LabelName": "a"}]}]},
                    {"LabelName": "c"},
                ],
            }
        )
    )
    torch.testing.assert_close(concurrent_rate_matrix(ann_file, hierarchy=hier_file, hierarchy_rate=rate), expected)


def test_iou_threshold_is_configurable():
    # with iou_thr = 0.9 the two boxes of image 3 (IoU 0.9) merge too: objects {b, c} instead of {b} and {c}
    r = concurrent_rate_matrix(annotations(), iou_thr=0.9)
    assert r[2, 3] == pytest.approx(2 / 3) and r[3, 2] == pytest.approx(2 / 3)


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="category id 99"):
        concurrent_rate_matrix(annotations(), hierarchy={99: [10]})
    with pytest.raises(ConfigError, match="cycle"):
        concurrent_rate_matrix(annotations(), hierarchy={10: [20], 20: [10]})
    with pytest.raises(ConfigError, match="hierarchy_rate"):
        concurrent_rate_matrix(annotations(), hierarchy_rate=2.0)
    bad = annotations()
    bad["annotations"][0]["category_id"] = 77
    with pytest.raises(AnnotationError, match="annotation id 1 has category_id 77"):
        concurrent_rate_matrix(bad)
    with pytest.raises(AnnotationError, match="not found"):
        concurrent_rate_matrix("/nonexistent/train.json")
