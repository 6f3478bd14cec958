"""AP under image weights (the bootstrap over validation images) equals evaluate_lvis on the resampled images.

The oracle: a replicate that draws image i w_i times is the dataset where image i is copied w_i times (new image and
annotation ids, the same boxes, detections and federated lists). ``weighted_ap`` computed from the matching alone
must give evaluate_lvis's AP, APr, APc and APf of that copied dataset, and with all weights 1 the AP of the data.
"""

import copy

import numpy as np
import pytest
from test_evaluation import make_case

from lt_models.errors import AnnotationError
from lt_models.evaluation import evaluate_lvis
from lt_models.evaluation.bootstrap import image_weights, weighted_ap
from lt_models.evaluation.matches import Matches, same_images

KEYS = ("AP", "AP50", "APr", "APc", "APf")


def _resampled(gt: dict, dets: list, weights: np.ndarray) -> tuple[dict, list]:
    """The dataset in which image k (sorted-id order) appears weights[k] times."""
    img_ids = sorted(im["id"] for im in gt["images"])
    by_img = {i: [] for i in img_ids}
    for a in gt["annotations"]:
        by_img[a["image_id"]].append(a)
    dets_by_img = {i: [] for i in img_ids}
    for d in dets:
        dets_by_img[d["image_id"]].append(d)
    images, anns, out_dets = [], [], []
    next_img, next_ann = 1, 1
    for k, im in enumerate(sorted(gt["images"], key=lambda im: im["id"])):
        for _ in range(int(weights[k])):
            images.append(dict(copy.deepcopy(im), id=next_img))
            for a in by_img[im["id"]]:
                anns.append(dict(copy.deepcopy(a), id=next_ann, image_id=next_img))
                next_ann += 1
            out_dets += [dict(d, image_id=next_img) for d in dets_by_img[im["id"]]]
            next_img += 1
    return {"images": images, "annotations": anns, "categories": gt["categories"]}, out_dets


def _close(a: float, b: float) -> bool:
    return (np.isnan(a) and b == -1.0) or abs(a - b) <= 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unit_weights_give_the_evaluators_ap(seed):
    gt, dets = make_case(seed=seed, score_decimals=9)
    res = evaluate_lvis(gt, dets, keep_matches=True)
    m = res["matches"]
    got = weighted_ap(m, np.ones((m.n_images, 2)))
    for key in KEYS:
        assert all(_close(v, res[key]) for v in got[key]), (key, got[key], res[key])


@pytest.mark.parametrize("seed", [3, 4])
def test_replicates_equal_lvis_on_the_resampled_images(seed):
    gt, dets = make_case(seed=seed, n_img=40, score_decimals=9)
    m = evaluate_lvis(gt, dets, keep_matches=True)["matches"]
    w = image_weights(m.n_images, 3, np.random.default_rng(seed))
    w[:5, 0] = 0  # some images drawn not at all, others several times
    got = weighted_ap(m, w, batch=2)  # two batches
    for r in range(w.shape[1]):
        ref = evaluate_lvis(*_resampled(gt, dets, w[:, r]))
        for key in KEYS:
            assert _close(got[key][r], ref[key]), (r, key, got[key][r], ref[key])


def test_a_bucket_without_ground_truth_in_a_replicate_is_nan():
    gt, dets = make_case(seed=5, n_img=20, score_decimals=9)
    m = evaluate_lvis(gt, dets, keep_matches=True)["matches"]
    w = np.zeros((m.n_images, 1))
    got = weighted_ap(m, w)
    assert all(np.isnan(got[key][0]) for key in KEYS)


def test_matches_round_trip_and_refuse_other_images(tmp_path):
    gt, dets = make_case(seed=6, n_img=15, score_decimals=9)
    m = evaluate_lvis(gt, dets, keep_matches=True)["matches"]
    back = Matches.load(m.save(tmp_path / "matches.npz"))
    for f in ("img_ids", "cat_ids", "frequency", "det_cat", "det_img", "tp", "fp", "gt_cat", "gt_img", "gt_n"):
        assert np.array_equal(getattr(back, f), getattr(m, f)), f
    other = evaluate_lvis(*make_case(seed=7, n_img=16), keep_matches=True)["matches"]
    with pytest.raises(AnnotationError, match="different validation sets"):
        same_images([m, other])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(AnnotationError, match="not a matches file"):
        Matches.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("seed", [8, 9])
def test_a_label_set_scores_the_mean_of_its_classes_ap(seed):
    """Matches.select(subset): AP (and APr/APc/APf) over a subset of the classes is the mean of their per-class AP in
    the full evaluation (the same detections, the same per-image cap), bucket by bucket."""
    gt, dets = make_case(seed=seed, n_img=30, score_decimals=9)
    res = evaluate_lvis(gt, dets, keep_matches=True)
    m = res["matches"]
    subset = [int(c) for c in m.cat_ids[::2]]  # every other class
    got = weighted_ap(m.select(subset), np.ones((m.n_images, 1)))
    bucket = {int(c): f for c, f in zip(m.cat_ids, m.frequency)}
    for key, members in [("AP", subset)] + [(f"AP{b}", [c for c in subset if bucket[c] == b]) for b in "rcf"]:
        aps = [res["per_class"][c] for c in members if res["per_class"][c] > -1]
        expected = float(np.mean(aps)) if aps else float("nan")
        assert _close(got[key][0], expected if aps else -1.0), (key, got[key][0], expected)
    assert m.select(m.cat_ids).n_categories == m.n_categories
    with pytest.raises(AnnotationError, match="not scored"):
        m.select([10**6])
