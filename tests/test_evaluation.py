"""evaluate_lvis must equal lvis-api's LVISEval (the oracle, run through lvis_oracle) on generated cases.

The generated cases (``make_case`` of benchmarks/lvis_oracle.py; other tests import it from here too) use
non-contiguous category ids and federated fields (neg_category_ids, not_exhaustive_category_ids). They hold several
detections per object, exact-copy detections (IoU 1), zero-area detections, objects of every area range, `area`
fields that differ from the box area, `ignore` flags, rounded scores (ties), images without detections, and empty
frequency buckets. Beyond the summary numbers, the full precision [T, R, K, A] and recall arrays are compared with
lvis-api's.
"""

import json
import logging

import numpy as np
import pytest

from lt_models.errors import AnnotationError
from lt_models.evaluation import (
    evaluate_lvis,
    format_results,
    load_detections,
    per_class_table,
    plot_ap_by_frequency,
    write_per_class_csv,
)
from lt_models.evaluation.lvis import _lvis_precision_recall
from lvis_oracle import lvis_api_evaluate, make_case

logging.getLogger("lvis").setLevel(logging.ERROR)
TOL = 1e-4


SUMMARY = ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"]


def _assert_same_as_lvis(gt, dets, max_dets=300, frequency=None):
    ref, ev = lvis_api_evaluate(gt, dets, frequency=frequency, max_dets=max_dets, return_eval=True)
    ours = evaluate_lvis(gt, dets, frequency=frequency, max_dets=max_dets)
    for k in SUMMARY:
        assert abs(ours[k] - ref[k]) <= TOL, (k, ours[k], ref[k])
    for k in ["AR@300", "ARs@300", "ARm@300", "ARl@300"]:  # lvis-api names AR after Params.max_dets (300)
        assert abs(ours[k.replace("300", str(max_dets))] - ref[k]) <= TOL, k
    assert ours["per_class"].keys() == ref["per_class"].keys()
    for c, v in ref["per_class"].items():
        assert abs(ours["per_class"][c] - v) <= TOL, (c, ours["per_class"][c], v)
    precision, recall, *_ = _lvis_precision_recall(gt, dets, frequency=frequency, max_dets=max_dets)
    np.testing.assert_array_equal(precision, ev.eval["precision"])
    np.testing.assert_array_equal(recall, ev.eval["recall"])
    return ours, ref


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(seed=0),
        dict(seed=1, area_field="mask"),  # area field smaller than the box: area ranges use the field
        dict(seed=2, score_decimals=1),  # many score ties
        dict(seed=3, n_cat=3, max_obj=40, dets_per_img=(20, 120)),  # crowded pairs: many gts per (image, class)
        dict(seed=4, n_img=5, max_obj=3, dets_per_img=(0, 3)),  # tiny, sparse
    ],
    ids=["basic", "mask-area", "ties", "crowded", "sparse"],
)
def test_equals_lvis_api(kwargs):
    gt, dets = make_case(**kwargs)
    ours, _ = _assert_same_as_lvis(gt, dets)
    assert 0 < ours["AP"] < 1


def test_top_detections_per_image_cap():
    # 30-80 detections per image, capped at 20 per image (over all classes), as LVISResults(max_dets=20) does
    gt, dets = make_case(seed=5, dets_per_img=(30, 80), score_decimals=1)
    ours, _ = _assert_same_as_lvis(gt, dets, max_dets=20)
    assert ours["AP"] != evaluate_lvis(gt, dets)["AP"]  # the cap changes the result


def test_zero_area_boxes_and_more_than_300_detections_per_image_at_the_default_cap():
    gt, dets = make_case(seed=7, n_img=8, dets_per_img=(320, 420), score_decimals=3)
    for a in gt["annotations"][::6]:  # ground-truth boxes of zero area (area field and box)
        a["area"], a["bbox"] = 0.0, a["bbox"][:2] + [0.0, a["bbox"][3]]
    per_image = np.bincount([d["image_id"] for d in dets])
    assert per_image.max() > 300
    ours, _ = _assert_same_as_lvis(gt, dets)
    assert ours["AP"] > 0


def test_empty_frequency_buckets_are_minus_one():
    gt, dets = make_case(seed=6, n_cat=8, freq=["f"] * 8)
    ours, ref = _assert_same_as_lvis(gt, dets)
    assert ours["APr"] == ours["APc"] == ref["APr"] == -1
    assert ours["APf"] == pytest.approx(ours["AP"])


def test_frequency_override_for_datasets_without_the_field():
    gt, dets = make_case(seed=7)
    freq = [c.pop("frequency") for c in sorted(gt["categories"], key=lambda c: c["id"])]
    by_id = {c["id"]: f for c, f in zip(sorted(gt["categories"], key=lambda c: c["id"]), freq)}
    for c in gt["categories"]:
        c.pop("image_count")
    with pytest.raises(AnnotationError, match="frequency"):
        evaluate_lvis(gt, dets)
    ours, _ = _assert_same_as_lvis(gt, dets, frequency=freq)  # list aligned with sorted ids
    assert evaluate_lvis(gt, dets, frequency=by_id) == ours  # or a dict
    flipped = {c: {"r": "f", "f": "r", "c": "c"}[f] for c, f in by_id.items()}
    other = evaluate_lvis(gt, dets, frequency=flipped)
    assert (other["APr"], other["APf"]) == (ours["APf"], ours["APr"])
    with pytest.raises(AnnotationError, match="'x'"):
        evaluate_lvis(gt, dets, frequency=["x"] * len(freq))


def test_buckets_from_image_count_when_frequency_is_absent():
    gt, dets = make_case(seed=8)
    for c in gt["categories"]:
        c.pop("frequency")
    counts = {c["id"]: c["image_count"] for c in gt["categories"]}
    expected = {c: "r" if n <= 10 else "c" if n <= 100 else "f" for c, n in counts.items()}
    assert evaluate_lvis(gt, dets) == evaluate_lvis(gt, dets, frequency=expected)


def test_gt_annotation_with_id_zero_reproduces_lvis_api():
    # lvis-api stores the matched gt id in dt_m and tests it for truth: a match to gt id 0 counts as a FP there
    gt, dets = make_case(seed=9, first_ann_id=0)
    first = gt["annotations"][0]
    assert first["id"] == 0
    exact = {"image_id": first["image_id"], "category_id": first["category_id"], "bbox": first["bbox"], "score": 1.0}
    with_match = _assert_same_as_lvis(gt, dets + [exact])[0]
    first["id"] = len(gt["annotations"]) + 1
    assert evaluate_lvis(gt, dets + [exact])["AP"] > with_match["AP"]  # the quirk is visible


def test_no_detections_and_path_input(tmp_path):
    gt, dets = make_case(seed=10)
    path = tmp_path / "val.json"
    path.write_text(json.dumps(gt))
    res = evaluate_lvis(str(path), [])
    with_gt = [c for c, v in res["per_class"].items() if v >= 0]
    assert with_gt and all(res["per_class"][c] == 0.0 for c in with_gt)
    assert res["AP"] == 0.0
    assert evaluate_lvis(path, dets) == evaluate_lvis(gt, dets)
    # evaluate_lvis does not modify its inputs (lvis-api does)
    before = json.dumps(dets)
    evaluate_lvis(gt, dets)
    assert json.dumps(dets) == before


def test_bad_detections_are_named(tmp_path):
    gt, dets = make_case(seed=11, n_img=5)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    bad = dict(dets[0], category_id=999)
    with pytest.raises(AnnotationError, match=r"detection #1 has category_id 999"):
        evaluate_lvis(gt, [dets[0], bad])
    with pytest.raises(AnnotationError, match="image_id 5"):
        evaluate_lvis(gt, [dict(dets[0], image_id=5)])
    p = tmp_path / "dets.json"
    p.write_text('[{"image_id": 1,')
    with pytest.raises(AnnotationError, match="dets.json: malformed JSON"):
        load_detections(p)
    p.write_text(json.dumps([{"image_id": 1000, "category_id": 5, "bbox": [0, 0, 1, 1]}]))
    with pytest.raises(AnnotationError, match=r"dets.json: detection #0 has no 'score'"):
        load_detections(p)
    p.write_text(json.dumps([dict(dets[0], bbox=[0, 0, 1])]))
    with pytest.raises(AnnotationError, match="bbox"):
        load_detections(p)
    p.write_text(json.dumps([bad]))
    assert load_detections(p) == [bad]  # without gt only the structure is checked
    with pytest.raises(AnnotationError, match="category_id 999.*not a category of"):
        load_detections(p, gt=gt_path)
    p.write_text(json.dumps(dets))
    assert load_detections(p, gt=gt_path) == dets


def test_detections_streamed_from_a_file_in_chunks(tmp_path, monkeypatch):
    from lt_models.evaluation import inputs

    monkeypatch.setattr(inputs, "STREAM_BLOCK", 300)  # many pieces of a few detections each
    gt, dets = make_case(seed=12)
    p = tmp_path / "dets.json"
    p.write_text(json.dumps(dets))
    assert evaluate_lvis(gt, p) == evaluate_lvis(gt, dets)
    p.write_text(json.dumps({"annotations": dets}))  # the object form is read whole
    assert evaluate_lvis(gt, p) == evaluate_lvis(gt, dets)
    masks = [dict(d, segmentation={"size": [9, 9], "counts": "x}, y"}) for d in dets]  # "}," inside an element
    p.write_text(json.dumps(masks))
    assert evaluate_lvis(gt, p) == evaluate_lvis(gt, dets)
    bad = [*dets[:9], dict(dets[9], score="high"), *dets[10:]]  # in a later piece: named by its place in the file
    p.write_text(json.dumps(bad))
    with pytest.raises(AnnotationError, match=r"dets.json: detection #9 has score 'high'"):
        evaluate_lvis(gt, p)
    p.write_text(json.dumps(dets)[:-200])  # truncated: the pieces before it parsed, then the error
    with pytest.raises(AnnotationError, match=r"dets.json: the JSON list is not closed; fix: .*truncated"):
        evaluate_lvis(gt, p)
    p.write_text(json.dumps(dets).replace('"score"', '"score" 0', 1))  # malformed inside the list
    with pytest.raises(AnnotationError, match=r"dets.json: invalid JSON after detection #\d+"):
        evaluate_lvis(gt, p)
    with pytest.raises(AnnotationError, match="missing.json: cannot read the detections"):
        evaluate_lvis(gt, tmp_path / "missing.json")


def test_format_results_table():
    gt, dets = make_case(seed=12, n_cat=6, freq=["f"] * 6)
    res = evaluate_lvis(gt, dets)
    text = format_results(res)
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "value"]
    row = {ln.split()[0]: ln.split()[1] for ln in lines[2:] if len(ln.split()) == 2}
    assert row["AP"] == f"{100 * res['AP']:.2f}" and row["APr"] == "n/a"
    assert "per-class AP defined for" in text


def test_per_class_csv_and_plot(tmp_path):
    gt, dets = make_case(seed=13)
    base = evaluate_lvis(gt, dets)
    better = evaluate_lvis(gt, [d for d in dets if d["score"] > 0.3])
    rows = per_class_table(base, gt)
    assert [r["rank"] for r in rows] == list(range(len(gt["categories"])))
    counts = [r["image_count"] for r in rows]
    assert counts == sorted(counts, reverse=True)  # most training images first
    assert all(r["AP"] == base["per_class"][r["category_id"]] for r in rows)
    path = write_per_class_csv(base, gt, tmp_path / "per_class_ap.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "rank,category_id,name,frequency,image_count,instances,AP"
    assert len(lines) == 1 + len(rows)
    first = lines[1].split(",")
    assert int(first[1]) == rows[0]["category_id"] and float(first[6]) == pytest.approx(rows[0]["AP"], abs=1e-6)
    # per_class keys become strings after JSON; the table maps them back
    assert per_class_table(json.loads(json.dumps(base)), gt) == rows
    png = plot_ap_by_frequency({"baseline": base, "ACSL": better}, gt, tmp_path / "ap_by_frequency.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files
