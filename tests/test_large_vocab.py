"""AP-fixed, AP-pool and calibration: closed forms derived by hand, and lvis-api (the oracle) run the way the
authors' reference scripts run it (top 10,000 detections per category, ``max_dets = -1``; pooled AP accumulated
over ``LVISEval.eval_imgs`` of a whole pool)."""

import logging

import numpy as np
import pytest
from test_evaluation import make_case

from lt_models.errors import AnnotationError
from lt_models.evaluation import evaluate_lvis
from lt_models.evaluation.calibration import calibration, ece, reliability
from lt_models.evaluation.large_vocab import evaluate_fixed, pooled_ap, top_per_class
from lt_models.evaluation.lvis import REC_THRS
from lt_models.evaluation.matches import Matches
from lvis_oracle import lvis_api_evaluate

logging.getLogger("lvis").setLevel(logging.ERROR)


def _img(i, neg=()):
    return {"id": i, "width": 100, "height": 100, "neg_category_ids": list(neg), "not_exhaustive_category_ids": []}


def _two_class_case():
    """Class 1: one box in image 1; class 2: one box in image 2, and image 1 is a verified negative of class 2."""
    gt = {
        "images": [_img(1, neg=[2]), _img(2)],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 50, 20, 20], "area": 400},
        ],
        "categories": [{"id": 1, "name": "a", "frequency": "r"}, {"id": 2, "name": "b", "frequency": "f"}],
    }
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},  # TP
        {"image_id": 1, "category_id": 2, "bbox": [60, 60, 20, 20], "score": 0.8},  # FP (negative image)
        {"image_id": 2, "category_id": 2, "bbox": [50, 50, 20, 20], "score": 0.7},  # TP
    ]
    return gt, dets


def test_pooled_ap_closed_form():
    # per category: class 1 AP 1; class 2 ranks FP (0.8) then TP (0.7): precision 1/2 at every recall -> AP 1/2.
    # pooled: TP, FP, TP over 2 gts -> (recall, precision) (1/2, 1), (1/2, 1/2), (1, 2/3); interpolated: 1 up to
    # recall 0.50 (51 of the 101 recall points), 2/3 above (50 points), at every IoU threshold (exact boxes).
    gt, dets = _two_class_case()
    res = evaluate_fixed(gt, dets)
    assert res["AP_fixed"] == pytest.approx(0.75, abs=1e-12)
    assert res["AP_pool"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    assert res["APr_pool"] == pytest.approx(1.0) and res["APf_pool"] == pytest.approx(0.5)
    assert res["APc_pool"] == -1.0  # no common class


def test_fixed_ap_lifts_the_per_image_cap():
    # 300 false positives of class 2 outrank class 1's true positive in image 1: LVIS AP (300 per image) drops
    # it, so class 1's AP is 0; AP-fixed keeps it (AP 1). Class 2's AP is 0 either way (no true positive).
    gt, _ = _two_class_case()
    fps = [{"image_id": 1, "category_id": 2, "bbox": [60, 60, 10, 10], "score": 0.9} for _ in range(300)]
    dets = [*fps, {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.5}]
    assert evaluate_lvis(gt, dets)["per_class"][1] == 0.0
    res = evaluate_fixed(gt, dets)
    assert res["APr_fixed"] == pytest.approx(1.0) and res["APf_fixed"] == 0.0
    assert res["AP_fixed"] == pytest.approx(0.5)


def test_top_per_class_keeps_k_best_with_input_order_ties():
    dets = [{"category_id": c, "score": s, "i": i} for i, (c, s) in enumerate([(1, .5), (2, .9), (1, .9), (1, .5),
                                                                             (1, .1), (2, .2)])]  # fmt: skip
    assert [d["i"] for d in top_per_class(dets, k=2)] == [0, 1, 2, 5]
    assert [d["i"] for d in top_per_class(dets, k=1)] == [1, 2]
    with pytest.raises(ValueError, match="at least one"):
        top_per_class(dets, k=0)


def _authors_top_k(dets, k):
    by_cat: dict = {}
    for d in dets:
        by_cat.setdefault(d["category_id"], []).append(d)
    return [d for v in by_cat.values() for d in sorted(v, key=lambda x: x["score"], reverse=True)[:k]]


def _pooled_oracle(ev, pool: list[int]) -> float:
    """The authors' pooled accumulate over lvis-api's eval_imgs (area "all", the pool's categories)."""
    n_img, n_area = len(ev.params.img_ids), len(ev.params.area_rng)
    e = [ev.eval_imgs[c * n_area * n_img + i] for i in range(n_img) for c in pool]
    e = [x for x in e if x is not None]
    if not e:
        return -1.0
    scores = np.concatenate([x["dt_scores"] for x in e])
    order = np.argsort(-scores, kind="mergesort")
    dt_m = np.concatenate([x["dt_matches"] for x in e], axis=1)[:, order]
    dt_ig = np.concatenate([x["dt_ignore"] for x in e], axis=1)[:, order]
    num_gt = np.count_nonzero(np.concatenate([x["gt_ignore"] for x in e]) == 0)
    if num_gt == 0:
        return -1.0
    prec = np.zeros((dt_m.shape[0], len(REC_THRS)))
    for t in range(dt_m.shape[0]):
        tp = np.cumsum(np.logical_and(dt_m[t], ~dt_ig[t])).astype(float)
        fp = np.cumsum(np.logical_and(~dt_m[t].astype(bool), ~dt_ig[t])).astype(float)
        rc, pr = tp / num_gt, list(tp / (fp + tp + np.spacing(1)))
        for i in range(len(pr) - 1, 0, -1):
            pr[i - 1] = max(pr[i - 1], pr[i])
        for j, p in enumerate(np.searchsorted(rc, REC_THRS, side="left")):
            prec[t, j] = pr[p] if p < len(pr) else 0.0
    return float(prec.mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_fixed_and_pooled_equal_the_reference_logic(seed):
    gt, dets = make_case(seed=seed, n_img=30, n_cat=9, dets_per_img=(0, 40), score_decimals=2)  # ties included
    k = 25  # binding for the frequent classes
    res = evaluate_fixed(gt, dets, k=k)
    ref, ev = lvis_api_evaluate(gt, _authors_top_k(dets, k), max_dets=-1, return_eval=True)
    for key in ("AP", "APr", "APc", "APf"):
        assert res[f"{key}_fixed"] == pytest.approx(ref[key], abs=1e-12), key
    groups = {lbl: [k for k, c in enumerate(ev.params.cat_ids) if ev.lvis_gt.cats[c]["frequency"] == lbl]
              for lbl in "rcf"}  # fmt: skip
    assert res["AP_pool"] == pytest.approx(_pooled_oracle(ev, list(range(len(ev.params.cat_ids)))), abs=1e-12)
    for lbl, cats in groups.items():
        assert res[f"AP{lbl}_pool"] == pytest.approx(_pooled_oracle(ev, cats), abs=1e-12), lbl


def test_ece_closed_form_and_reliability():
    # bin 9: scores 0.95, 0.95, one right -> gap |1/2 - 0.95| = 0.45; bin 1: 0.15, 0.15, none right -> 0.15.
    score, correct = np.array([0.95, 0.95, 0.15, 0.15]), np.array([1, 0, 0, 0])
    assert ece(score, correct) == pytest.approx((2 * 0.45 + 2 * 0.15) / 4)
    r = reliability(score, correct)
    assert r["count"][9] == 2 and r["precision"][9] == 0.5 and r["confidence"][1] == pytest.approx(0.15)
    assert r["precision"][5] is None
    assert ece(np.array([1.0, 1.0]), np.array([1, 1])) == 0.0  # a score of 1 lands in the last bin
    assert ece(np.array([]), np.array([])) == -1.0


def test_calibration_per_bucket_from_the_matching():
    gt, dets = _two_class_case()
    m = evaluate_lvis(gt, dets, keep_matches=True)["matches"]
    cal = calibration(m)
    assert cal["ECEr"] == pytest.approx(0.1)  # one TP at 0.9
    assert cal["ECEf"] == pytest.approx((0.8 + (1 - 0.7)) / 2)  # an FP at 0.8 and a TP at 0.7, separate bins
    assert cal["ECEc"] == -1.0 and cal["ECE"] == pytest.approx((0.1 + 0.8 + 0.3) / 3)


def test_matches_keep_scores_and_old_files_say_how_to_fix(tmp_path):
    gt, dets = _two_class_case()
    m = evaluate_lvis(gt, dets, keep_matches=True)["matches"]
    assert sorted(m.scores().tolist()) == [0.7, 0.8, 0.9]
    back = Matches.load(m.save(tmp_path / "m.npz"))
    assert np.array_equal(back.scores(), m.scores())
    assert pooled_ap(back) == pooled_ap(m)
    arrays = {k: getattr(m, k) for k in ("img_ids", "cat_ids", "frequency", "det_cat", "det_img", "tp", "fp",
                                         "gt_cat", "gt_img", "gt_n")}  # fmt: skip
    np.savez(tmp_path / "old.npz", **arrays)
    old = Matches.load(tmp_path / "old.npz")
    with pytest.raises(AnnotationError, match="evaluate the checkpoint again"):
        pooled_ap(old)
