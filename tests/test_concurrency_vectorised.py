"""The vectorised concurrent-rate matrix equals a straightforward per-image implementation, exactly."""

import math
import random
from collections import Counter, defaultdict
from itertools import permutations

import numpy as np
import pytest
import torch

import lt_models.data.merge as merge
import lt_models.data.rate_matrix as concurrency
from lt_models.data.annotations import hierarchy_ancestors, load_hierarchy, name_to_cat_id
from lt_models.data.lvis_json import load_lvis_json
from lt_models.data.merge import group_duplicate_boxes
from lt_models.data.rate_matrix import concurrent_rate_matrix
from lt_models.data.synthetic.generate import benchmark_spec, generate_benchmark


def reference(
    data: dict, tree: dict | None = None, hierarchy_rate: float = 1.0, min_rate: float = 0.0, iou_thr: float = 0.95
) -> torch.Tensor:
    """r_ij image by image: group_duplicate_boxes, label sets, Counter of label pairs (the module's definition)."""
    cat_ids = sorted(c["id"] for c in data["categories"])
    label = {cid: i + 1 for i, cid in enumerate(cat_ids)}
    by_image = defaultdict(list)
    for a in data["annotations"]:
        if not a.get("iscrowd", 0):
            by_image[a["image_id"]].append(a)
    objects, both = Counter(), Counter()
    for anns in by_image.values():
        anns.sort(key=lambda a: a["id"])
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64)
        groups = group_duplicate_boxes(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1), iou_thr)
        for g in set(groups.tolist()):
            labels = {label[a["category_id"]] for a, h in zip(anns, groups.tolist()) if h == g}
            objects.update(labels)
            both.update(permutations(labels, 2))
    rates = {(i, j): n / objects[i] for (i, j), n in both.items() if n / objects[i] >= min_rate}
    for cid, ancestors in hierarchy_ancestors(tree or {}).items():
        for anc in ancestors:
            rates[label[cid], label[anc]] = rates[label[anc], label[cid]] = hierarchy_rate
    r = torch.zeros(len(cat_ids) + 1, len(cat_ids) + 1)
    for (i, j), v in rates.items():
        r[i, j] = v if i != j else 0.0
    return r


def assert_identical(data: dict, **kw) -> torch.Tensor:
    tree = kw.pop("tree", None)
    ours = concurrent_rate_matrix(data, hierarchy=tree, **kw)
    expected = reference(data, tree, **kw)
    assert ours.dtype == expected.dtype and torch.equal(ours, expected)  # bit for bit, not allclose
    return ours


def same_partition(data: dict, iou_thr: float) -> None:
    """`object_ids` splits every image's boxes exactly as group_duplicate_boxes does."""
    anns = [a for a in data["annotations"] if not a.get("iscrowd", 0)]
    label = {c["id"]: i + 1 for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    images, _, xyxy = concurrency._box_table(data, label, "test")
    ids = merge.object_ids(images, xyxy, iou_thr)
    for img in set(images.tolist()):
        rows = np.flatnonzero(images == img)
        expected = group_duplicate_boxes(xyxy[rows], iou_thr)
        _, ours = np.unique(ids[rows], return_inverse=True)
        first = {}
        canonical = [first.setdefault(g, len(first)) for g in ours.tolist()]  # numbered by first appearance
        assert canonical == expected.tolist(), [anns[r]["bbox"] for r in rows]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    generate_benchmark(out, preset="demo", seed=3)
    return out


@pytest.mark.parametrize("split", ["train", "val"])
def test_synthetic_demo_files(demo, split):
    data = load_lvis_json(demo / f"{split}.json")
    tree = load_hierarchy(demo / "hierarchy.json", name_to_cat_id(data["categories"]))
    r = assert_identical(data)
    assert (r > 0).sum() > 0  # the benchmark has multi-label objects
    assert_identical(data, tree=tree, hierarchy_rate=0.0, min_rate=0.2)
    # the engine's call: a JSON path and an Open Images-style hierarchy file
    from_files = concurrent_rate_matrix(demo / f"{split}.json", hierarchy=demo / "hierarchy.json")
    assert torch.equal(from_files, reference(data, tree))


def test_synthetic_bench_spec():
    spec = benchmark_spec("bench", seed=1)
    assert_identical(spec["train"])
    assert_identical(spec["val"], min_rate=0.1)
    same_partition(spec["train"], 0.95)


def _random_case(rng: random.Random, n_images: int, n_cats: int = 6) -> dict:
    """Boxes with near-duplicates around IoU 0.95, exact duplicates, chains, degenerate and crowd boxes."""
    anns = []
    for img in range(n_images):
        image_id = rng.choice([img, f"im{img}"])  # any hashable image id
        boxes = []
        for _ in range(rng.randint(1, 12)):
            x, y = rng.choice([0.0, 3.5, rng.uniform(0, 50)]), rng.uniform(0, 50)
            w, h = rng.choice([100.0, 10.0, rng.uniform(1, 40)]), rng.uniform(1, 40)
            boxes.append([x, y, w, h])
            for _ in range(rng.choice([0, 0, 1, 2])):  # near-duplicates of the previous box
                bx, by, bw, bh = boxes[-1]
                kind = rng.randrange(6)
                if kind == 0:
                    boxes.append([bx, by, bw, bh])  # identical
                elif kind == 1:
                    boxes.append([bx, by, bw * 0.95, bh])  # IoU exactly 0.95 (or its float neighbour)
                elif kind == 2:
                    boxes.append([bx, by, bw * rng.uniform(0.93, 0.97), bh])
                elif kind == 3:
                    boxes.append([bx + bw * 0.01, by, bw, bh])  # shifted by 1 %
                elif kind == 4:
                    boxes.append([bx, by, 0.0, bh])  # zero width (unvalidated dict input)
                else:
                    boxes.append([bx, by, -bw, bh])  # negative width
        if rng.random() < 0.1:
            boxes += [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]  # identical zero-area boxes merge
        if rng.random() < 0.05:
            boxes.append([math.nan, 2.0, 5.0, 5.0])
        for b in boxes:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": 10 * rng.randint(1, n_cats),
                    "bbox": b,
                    "iscrowd": int(rng.random() < 0.03),
                }
            )
    rng.shuffle(anns)
    return {"annotations": anns, "categories": [{"id": 10 * c, "name": f"c{c}"} for c in range(1, n_cats + 1)]}


@pytest.mark.parametrize("seed", range(6))
def test_random_near_duplicates(seed, monkeypatch):
    monkeypatch.setattr(merge, "PAIR_CHUNK", 5)  # many chunk boundaries, inside images too
    rng = random.Random(seed)
    data = _random_case(rng, n_images=40)
    for iou_thr in (0.95, 0.5, 1.0, 0.0):
        same_partition(data, iou_thr)
        r = assert_identical(data, iou_thr=iou_thr)
        assert (r > 0).any()
    assert_identical(data, tree={10: [20, 30], 30: [40]}, hierarchy_rate=0.5, min_rate=0.3)


def test_many_boxes_in_one_image_and_no_boxes():
    rng = random.Random(7)
    data = _random_case(rng, n_images=1)
    big = [
        dict(a, id=1000 + k, image_id=-1, bbox=[rng.uniform(0, 500), rng.uniform(0, 500), 30.0, 30.0])
        for k, a in enumerate(data["annotations"] * 40)
    ]
    data["annotations"] += big + [dict(b, id=b["id"] + 100000, category_id=60) for b in big[:50]]
    same_partition(data, 0.95)
    assert_identical(data)
    empty = {"annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    assert torch.equal(concurrent_rate_matrix(empty), torch.zeros(3, 3))
