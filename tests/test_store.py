"""The annotation store gives what the per-image JSON path gives: items, label table, sampler draws, r_ij, buckets.

The reference is the per-image implementation kept in `lt_models.data.datasets` (`load_lvis_json` + `merged_objects`,
one Python loop per image with `group_duplicate_boxes`), on random files full of near-duplicate boxes around IoU
0.95, identical boxes, chains, crowd boxes and a class hierarchy (so the "most specific label" primary rule and the
parent expansion are exercised). A store whose array file is truncated, whose meta is missing or that was built for
other inputs is refused by `open_store` and rebuilt by the dataset.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from lt_models.data.annotations import (
    category_frequencies,
    category_image_counts,
    hierarchy_ancestors,
    load_hierarchy,
    name_to_cat_id,
)
from lt_models.data.datasets import LVISDetection, dataset_store
from lt_models.data.lvis_json import load_lvis_json
from lt_models.data.merge import merged_objects
from lt_models.data.rate_matrix import concurrent_rate_matrix
from lt_models.data.sampler_spec import SamplerSpec, build_sampler
from lt_models.data.store import StoreError, open_store

CATS = [{"id": 10 * c, "name": f"c{c}"} for c in range(1, 8)]
HIERARCHY = {
    "LabelName": "root",
    "Subcategory": [
        {
            "LabelName": "c1",
            "Subcategory": [{"LabelName": "c2", "Subcategory": [{"LabelName": "c4"}]}, {"LabelName": "c3"}],
        },
        {"LabelName": "c5", "Subcategory": [{"LabelName": "c6"}]},
    ],
}


def _random_case(tmp_path, seed: int, n_images: int = 60):
    rng = random.Random(seed)
    images, anns = [], []
    for i in range(1, n_images + 1):
        images.append(
            {
                "id": 1000 - 7 * i,
                "file_name": f"{i}.png",
                "width": 120,
                "height": 90,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
            }
        )
        boxes = []
        for _ in range(rng.choice([0, 1, 3, 6])):
            x, y = rng.uniform(0, 40), rng.uniform(0, 30)
            w, h = rng.choice([50.0, rng.uniform(2, 60)]), rng.uniform(2, 50)
            boxes.append([x, y, w, h])
            for _ in range(rng.choice([0, 1, 2])):  # near-duplicates of the previous box
                bx, by, bw, bh = boxes[-1]
                boxes.append(
                    rng.choice(
                        [
                            [bx, by, bw, bh],
                            [bx, by, bw * 0.95, bh],
                            [bx, by, bw * rng.uniform(0.93, 0.97), bh],
                            [bx + bw * 0.01, by, bw, bh],
                        ]
                    )
                )
        for b in boxes:
            anns.append(
                {
                    "id": rng.randrange(1, 10**6) * 1000 + len(anns),
                    "image_id": images[-1]["id"],
                    "category_id": rng.choice(CATS)["id"],
                    "bbox": b,
                    "iscrowd": int(rng.random() < 0.05),
                }
            )
    rng.shuffle(anns)
    (tmp_path / "images").mkdir(exist_ok=True)
    for img in images:
        Image.new("RGB", (120, 90)).save(tmp_path / "images" / img["file_name"])
    ann = tmp_path / f"case{seed}.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    hier = tmp_path / "hierarchy.json"
    hier.write_text(json.dumps(HIERARCHY))
    return ann, hier


def _reference(ann, hier, expand: bool, train: bool = True):
    """Per image (in file order; train drops images without objects): (image id, boxes, primary labels, multi-hot)."""
    data = load_lvis_json(ann)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    label = {c["id"]: i + 1 for i, c in enumerate(cats)}
    ancestors = hierarchy_ancestors(load_hierarchy(hier, name_to_cat_id(cats))) if hier else {}
    objects = merged_objects(data, ancestors, expand)
    out = []
    for img in data["images"]:
        objs = objects.get(img["id"], [])
        if train and not objs:
            continue
        xywh = np.array([o[0] for o in objs], dtype=np.float32).reshape(-1, 4)
        multi_hot = torch.zeros(len(objs), len(cats) + 1)
        for k, o in enumerate(objs):
            for c in o[2]:
                multi_hot[k, label[c]] = 1
        out.append(
            (
                img["id"],
                np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                np.array([label[o[1]] for o in objs]),
                multi_hot,
            )
        )
    buckets = category_frequencies(cats, category_image_counts(data)[0])
    return out, buckets


def _assert_same_items(ds: LVISDetection, ref) -> None:
    items, buckets = ref
    assert ds.image_ids.tolist() == [r[0] for r in items]
    assert ds.frequency == buckets
    indptr, labels = ds.label_csr()
    for i, (iid, boxes, primary, multi_hot) in enumerate(items):
        t = ds.target(i)
        assert int(t["image_id"]) == iid
        assert t["boxes"].dtype == torch.float32 and np.array_equal(t["boxes"].numpy(), boxes)
        assert t["labels"].tolist() == primary.tolist()
        assert torch.equal(t["multi_hot"], multi_hot)
        present = sorted(set(np.nonzero(multi_hot.numpy())[1].tolist()))
        assert (labels[indptr[i] : indptr[i + 1]] + 1).tolist() == present


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("expand", [False, True])
def test_store_items_equal_the_per_image_json_path(tmp_path, seed, expand):
    ann, hier = _random_case(tmp_path, seed)
    for train in (True, False):
        ref = _reference(ann, hier, expand, train)
        cached = LVISDetection(ann, hierarchy_file=hier, expand_parents=expand, train=train, cache_root=tmp_path / "c")
        _assert_same_items(cached, ref)
        assert isinstance(cached.store["obj_box"], np.memmap)  # the trial maps the shared store
        in_memory = LVISDetection(ann, hierarchy_file=hier, expand_parents=expand, train=train)
        _assert_same_items(in_memory, ref)
    if not expand:
        _assert_same_items(LVISDetection(ann, cache_root=tmp_path / "c"), _reference(ann, None, False))


def test_sampler_draws_and_r_ij_equal_the_json_path(tmp_path):
    ann, hier = _random_case(tmp_path, seed=11, n_images=150)
    items, _ = _reference(ann, hier, expand=False)
    ds = LVISDetection(ann, hierarchy_file=hier, cache_root=tmp_path / "c")
    indptr, labels = ds.label_csr()
    ref_indptr = np.r_[0, np.cumsum([len(set(np.nonzero(m.numpy())[1])) for *_, m in items])]
    ref_labels = np.concatenate([np.unique(np.nonzero(m.numpy())[1]) - 1 for *_, m in items])
    assert np.array_equal(indptr, ref_indptr) and np.array_equal(labels, ref_labels)
    for spec in (SamplerSpec("softbalance", lam=0.5), SamplerSpec("repeatfactor", threshold=0.3)):
        a = build_sampler(spec, indptr, labels, ds.num_classes, seed=3)
        b = build_sampler(spec, ref_indptr, ref_labels, ds.num_classes, seed=3)
        a.set_epoch(2)
        b.set_epoch(2)
        assert list(a) == list(b)
    for h in (None, hier):
        from_json = concurrent_rate_matrix(ann, hierarchy=h)
        from_store = concurrent_rate_matrix(ds.store, hierarchy=h)
        assert torch.equal(from_json, from_store) and from_json.abs().sum() > 0
    # another merge IoU than the store's: merged again from the store's box columns, still the JSON path's answer
    assert torch.equal(concurrent_rate_matrix(ann, iou_thr=0.5), concurrent_rate_matrix(ds.store.path, iou_thr=0.5))


def test_truncated_or_foreign_store_is_refused_and_rebuilt(tmp_path, capsys):
    ann, hier = _random_case(tmp_path, seed=5)
    ref = _reference(ann, hier, expand=False)
    ds = LVISDetection(ann, hierarchy_file=hier, cache_root=tmp_path / "c")
    path = ds.store.path
    assert "building the annotation store" in capsys.readouterr().err
    LVISDetection(ann, hierarchy_file=hier, cache_root=tmp_path / "c")
    assert "building" not in capsys.readouterr().err  # built once, then reused

    box_file = path / "obj_box.npy"
    box_file.write_bytes(box_file.read_bytes()[:-10])  # a partly copied store
    with pytest.raises(StoreError, match=r"obj_box\.npy: .* bytes, the store recorded .* \(truncated"):
        open_store(path)
    again = LVISDetection(ann, hierarchy_file=hier, cache_root=tmp_path / "c")
    assert "truncated" in capsys.readouterr().err
    _assert_same_items(again, ref)

    meta = json.loads((path / "meta.json").read_text())
    with pytest.raises(StoreError, match="built for other inputs"):
        open_store(path, key="0" * 64)
    (path / "meta.json").unlink()
    with pytest.raises(StoreError, match="meta.json is missing"):
        open_store(path)
    _assert_same_items(LVISDetection(ann, hierarchy_file=hier, cache_root=tmp_path / "c"), ref)
    assert json.loads((path / "meta.json").read_text())["key"] == meta["key"]


def test_a_store_directory_can_stand_for_the_json_file(tmp_path):
    """A store written once (as the Open Images converter does) is opened directly; other options than the ones it
    was written with rebuild only its derived arrays, reading the raw columns from it."""
    ann, hier = _random_case(tmp_path, seed=2)
    built = dataset_store(ann, image_dir=tmp_path / "images", hierarchy_file=hier, cache_root=tmp_path / "c")
    direct = LVISDetection(built.path, image_dir=tmp_path / "images", hierarchy_file=hier)
    assert direct.store.path == built.path
    _assert_same_items(direct, _reference(ann, hier, expand=False))
    expanded = LVISDetection(
        built.path, image_dir=tmp_path / "images", hierarchy_file=hier, expand_parents=True, cache_root=tmp_path / "c2"
    )
    assert expanded.store.meta["raw_store"] == str(built.path.resolve())
    assert not (expanded.store.path / "ann_bbox.npy").exists()  # raw columns are not copied
    _assert_same_items(expanded, _reference(ann, hier, expand=True))


def test_a_run_over_the_shared_store_trains_and_scores_as_the_json_path(tmp_path):
    """engine.train with an annotation cache (what sweep trials do) gives the same losses and AP as without."""
    from test_engine import small_spec, write_tiny_benchmark

    from lt_models.engine.loop import train

    bench = write_tiny_benchmark(tmp_path / "bench")
    torch.set_num_threads(1)
    plain = train(small_spec(bench, epochs=1, loss=_concurrent()), tmp_path / "plain")
    cached = train(
        small_spec(bench, epochs=1, loss=_concurrent(), annotation_cache=str(tmp_path / "cache")), tmp_path / "cached"
    )
    assert any((tmp_path / "cache").iterdir())  # the run went through a store
    for key in ("loss", "AP", "AP50", "APr", "APc", "APf"):
        assert plain[key] == cached[key], key


def _concurrent():
    from lt_models.losses.registry import LossSpec

    return LossSpec("concurrent_softmax")
