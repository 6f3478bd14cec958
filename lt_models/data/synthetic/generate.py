"""Synthetic long-tail, multi-label detection benchmark with known truth.

`generate_benchmark(out_dir, preset, seed)` writes ``train.json`` and ``val.json`` (LVIS format),
``hierarchy.json`` (Open Images hierarchy shape) and ``images/*.png``. The benchmark reproduces the label
problems of the concurrent-softmax paper (CVPR 2020, §3) at a size a CPU can train on:

* Classes. An object is a drawn shape. Its *leaf* class is a pair (shape family, appearance), for example
  ``red_star`` or ``striped_blue_ring``. The appearance is a colour plus a texture (solid, striped, dotted).
  Each shape family (``star``, ``ring``, ...) is also a *parent* category. hierarchy.json links each parent
  to its leaves, and uses category names as LabelName.
* Long tail (paper Fig 2). The number of training objects per leaf follows a Zipf-Mandelbrot law,
  ``t(r) = t_max * ((1+q)/(r+q))**s``, over the leaf's frequency rank r. The exponent s is chosen so that
  the last rank gets exactly t_min. Ranks are interleaved over families (rank r belongs to family r % F),
  so every family owns head, body and tail leaves, and colour does not predict frequency. Training images
  fill all three LVIS buckets (rare 1-10 images, common 11-100, frequent >100).
* Explicit multi-label (paper Fig 1a/1b). An object can carry several annotations with the identical box:
  leaf + parent (apple + fruit), or two leaves (the paper's "car toy"). The two-leaf objects are two-tone
  shapes, drawn half in one leaf's appearance and half in the other's, for a fixed set of leaf pairs.
* Implicit multi-label (paper Fig 3a). In some families, one leaf is a "twin" of another: same shape and
  texture, a near-identical colour (``red``/``crimson``, like torch/flashlight). Annotators swap the labels
  of a twin pair at a set rate per direction. Sometimes they give both labels as duplicate boxes, and that is
  the concurrent rate the paper measures.
* Parent-only labels (paper Fig 3b). At a per-family rate an object gets only its parent label (apple
  annotated as "fruit" only).

The first object of each leaf in each split always keeps its own leaf label. So every leaf is a verified
positive in both splits, and val contains the rare leaves, so APr is defined.

LVIS federated fields. Every category absent from an image, judged by what is drawn, is listed in
``neg_category_ids``: the generator knows the truth, so absence is verified exhaustively. A category counts
as present for an object when it is one of the object's drawn leaves, a twin of one, or the object's
family. Such a category is never negative. ``not_exhaustive_category_ids`` lists the annotated categories
of an image for which some object that could carry the label does not. An example is an image with a
parent-labelled star and a second star that has only its leaf label. This follows LVIS: unmatched
detections of those categories are ignored, not counted as false positives.

Output is deterministic per (preset, seed), byte for byte. Each image is rendered from its own seeded RNG,
so the output does not depend on how many worker processes render it.

Modules: the class layout (shapes, colours, presets, leaf frequencies) is ``lt_models.data.synthetic.layout``, the
pixels ``lt_models.data.synthetic.render``, the scenes and occluding boxes of presets that ask for them (``lvislike``:
also a third hierarchy level, see docs/data.md) ``lt_models.data.synthetic.scenes``; this one draws each split's
objects and labels, writes the LVIS JSON and runs `generate_benchmark`.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from lt_models.atomic import write_json_atomic
from lt_models.data.annotations import frequency_buckets
from lt_models.data.synthetic.layout import (
    COLOURS,
    PRESETS,
    SHAPES,
    TWINS,
    Layout,
    Leaf,
    Preset,
    build_layout,
    get_preset,
    zipf_targets,
)
from lt_models.data.synthetic.render import render_chunk, render_image, shape_mask
from lt_models.data.synthetic.scenes import candidate_boxes, place_boxes_occluding, scene_image_slots

# ---------------------------------------------------------------------------------------------------------
# Split specification: which objects go where and which labels they get (no pixels yet)
# ---------------------------------------------------------------------------------------------------------


def _place_boxes(rng: random.Random, n: int, p: Preset) -> list[list[int]]:
    """n non-overlapping integer boxes [x, y, w, h] inside the image (2 px gap)."""
    S = p.image_size
    boxes: list[list[int]] = []

    def free(x: int, y: int, w: int, h: int) -> bool:
        return all(
            x + w + 2 <= bx or bx + bw + 2 <= x or y + h + 2 <= by or by + bh + 2 <= y for bx, by, bw, bh in boxes
        )

    for _ in range(n):
        for x, y, w, h in candidate_boxes(rng, p):
            if free(x, y, w, h):
                boxes.append([x, y, w, h])
                break
        else:
            # crowded image: a small box in the first free spot of a coarse grid (always exists for n <= 4)
            spot = next((gx, gy) for gy in range(1, S - 14, 7) for gx in range(1, S - 14, 7) if free(gx, gy, 12, 12))
            boxes.append([spot[0], spot[1], 12, 12])
    return boxes


def _image_slots(layout: Layout, per_leaf: np.ndarray, rng: random.Random) -> list[list[int]]:
    """The leaf of every object of a split, grouped into images (scene-based when the preset has scenes)."""
    p = layout.preset
    if p.scenes:
        return scene_image_slots(rng, per_leaf, layout)
    slots = np.repeat(np.arange(len(layout.leaves)), per_leaf).tolist()
    rng.shuffle(slots)
    sizes = []
    total = 0
    while total < len(slots):
        k = rng.choices(range(1, len(p.objects_per_image) + 1), weights=p.objects_per_image)[0]
        sizes.append(min(k, len(slots) - total))
        total += sizes[-1]
    groups, pos = [], 0
    for k in sizes:
        groups.append(slots[pos : pos + k])
        pos += k
    return groups


def _object_labels(layout: Layout, leaf_idx: int, clean: bool, rng: random.Random, twin_rates: dict) -> tuple:
    """(drawn leaves, annotated category ids) of one object of leaf `leaf_idx`; `clean` keeps its leaf label."""
    p = layout.preset
    leaf = layout.leaves[leaf_idx]
    u_two, u_swap, u_parent = rng.random(), rng.random(), rng.random()
    tones = [leaf_idx]
    if leaf.two_leaf_with is not None and u_two < p.two_leaf_rate:
        tones.append(leaf.two_leaf_with)  # explicit: a two-tone object is both leaves ("car toy")
    labels = [layout.leaf_cat_id(x) for x in tones]
    if leaf_idx in twin_rates and not clean:
        partner, p_swap, p_both = twin_rates[leaf_idx]
        if u_swap < p_swap:  # implicit: annotator used the twin's name
            labels = [layout.leaf_cat_id(partner)]
        elif u_swap < p_swap + p_both:  # annotators disagreed; both boxes kept
            labels = [layout.leaf_cat_id(leaf_idx), layout.leaf_cat_id(partner)]
    parent = layout.parent_cat_id(leaf.family)
    po = p.parent_only_rates[leaf.family % len(p.parent_only_rates)]
    if u_parent < po and not clean:
        labels = [parent]  # implicit: parent-only (apple -> fruit)
    elif u_parent < po + p.leaf_parent_rate:
        labels = labels + [parent]  # explicit: leaf + parent, identical box
    if layout.super_names:  # third level (drawn only then, so two-level presets keep their random stream)
        u_super = rng.random()
        sup = layout.super_cat_id(leaf.family)
        if u_super < p.super_only_rate and not clean:
            labels = [sup]  # super-category only (apple -> food)
        elif u_super < p.super_only_rate + p.leaf_super_rate:
            labels = labels + [sup]
    return tones, labels


def _split_spec(layout: Layout, split: str, seed: int) -> list[dict]:
    """Images of one split: boxes, drawn leaves ("tones") and annotated category ids per object."""
    p = layout.preset
    L = len(layout.leaves)
    t = zipf_targets(L, p.t_max, p.t_min, p.q)
    per_leaf = np.array([t[leaf.rank] for leaf in layout.leaves])
    if split == "val":
        per_leaf = np.maximum(p.val_min, np.round(per_leaf * p.val_ratio)).astype(np.int64)
    rng = random.Random(f"ltsweep-synthetic/{seed}/{split}")  # str seeds are hashed with sha512: stable
    groups = _image_slots(layout, per_leaf, rng)
    twin_rates = {}
    for base, twin, (p_tb, p_bt, p_both) in layout.confusable:
        twin_rates[twin] = (base, p_tb, p_both)
        twin_rates[base] = (twin, p_bt, p_both)
    n_clean = p.val_clean if split == "val" else 1  # the first objects of a leaf keep their own label
    seen = np.zeros(L, dtype=np.int64)
    place = place_boxes_occluding if p.max_occlusion > 0 else _place_boxes
    images = []
    for idx, group in enumerate(groups):
        boxes = place(random.Random(f"ltsweep-synthetic/{seed}/{split}/{idx}"), len(group), p)
        objects = []
        for leaf_idx, box in zip(group, boxes):
            clean = bool(seen[leaf_idx] < n_clean)
            seen[leaf_idx] += 1
            tones, labels = _object_labels(layout, leaf_idx, clean, rng, twin_rates)
            objects.append({"box": box, "family": layout.leaves[leaf_idx].family, "tones": tones, "labels": labels})
        images.append({"index": idx, "objects": objects})
    return images


def _plausible(layout: Layout, obj: dict) -> set[int]:
    """Category ids an annotator could truthfully give this object (drawn leaves, their twins, family, super)."""
    out = {layout.parent_cat_id(obj["family"])}
    if layout.super_names:
        out.add(layout.super_cat_id(obj["family"]))
    for leaf_idx in obj["tones"]:
        out.add(layout.leaf_cat_id(leaf_idx))
        twin = layout.leaves[leaf_idx].twin_of
        if twin is not None:
            out.add(layout.leaf_cat_id(twin))
    return out


def _categories(layout: Layout) -> list[dict]:
    """LVIS category records: leaves, then families (parents), then super-categories."""
    cats = []
    for leaf in layout.leaves:
        tex = "" if leaf.texture == "solid" else f" {leaf.texture}"
        cats.append(
            {
                "id": layout.leaf_cat_id(leaf.index),
                "name": leaf.name,
                "def": f"a{tex} {leaf.colour} {layout.family_names[leaf.family]} shape",
            }
        )
    for f, fam in enumerate(layout.family_names):
        cats.append({"id": layout.parent_cat_id(f), "name": fam, "def": f"any {fam} shape (parent class)"})
    for s, name in enumerate(layout.super_names):
        fams = [fam for f, fam in enumerate(layout.family_names) if layout.super_of_family[f] == s]
        first = layout.super_of_family.index(s)
        cats.append({"id": layout.super_cat_id(first), "name": name, "def": f"any {', '.join(fams)} (super-category)"})
    return cats


def _lvis_json(layout: Layout, split: str, images: list[dict], id_offset: int, ann_offset: int, seed: int) -> dict:
    p = layout.preset
    all_ids = set(range(1, layout.num_categories + 1))
    img_recs, anns = [], []
    ann_id = ann_offset
    for img in images:
        image_id = id_offset + img["index"] + 1
        present: set[int] = set()
        positives: set[int] = set()
        for obj in img["objects"]:
            present |= _plausible(layout, obj)
            positives |= set(obj["labels"])
        not_exhaustive = {
            c for c in positives for obj in img["objects"] if c in _plausible(layout, obj) and c not in obj["labels"]
        }
        img_recs.append(
            {
                "id": image_id,
                "file_name": f"{split}_{img['index']:06d}.png",
                "width": p.image_size,
                "height": p.image_size,
                "neg_category_ids": sorted(all_ids - present),
                "not_exhaustive_category_ids": sorted(not_exhaustive),
            }
        )
        for obj in img["objects"]:
            x, y, w, h = obj["box"]
            for cat in obj["labels"]:
                ann_id += 1
                anns.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": cat,
                        "bbox": [x, y, w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
    return {
        "info": {
            "description": "ltsweep synthetic long-tail multi-label benchmark",
            "preset": p.name,
            "seed": seed,
            "split": split,
            "version": 1,
        },
        "images": img_recs,
        "annotations": anns,
        "categories": _categories(layout),
    }


def _fill_category_counts(train: dict, *others: dict) -> None:
    """LVIS convention: image_count / instance_count / frequency come from train, copied to every split."""
    imgs: dict[int, set[int]] = {c["id"]: set() for c in train["categories"]}
    inst: dict[int, int] = {c["id"]: 0 for c in train["categories"]}
    for a in train["annotations"]:
        imgs[a["category_id"]].add(a["image_id"])
        inst[a["category_id"]] += 1
    ids = [c["id"] for c in train["categories"]]
    buckets = frequency_buckets([len(imgs[i]) for i in ids])
    for d in (train, *others):
        for c, b in zip(d["categories"], buckets):
            c["image_count"] = len(imgs[c["id"]])
            c["instance_count"] = inst[c["id"]]
            c["frequency"] = b


def _hierarchy(layout: Layout) -> dict:
    """Open Images hierarchy: root -> family -> leaves, or root -> super-category -> family -> leaves."""
    families = [
        {"LabelName": fam, "Subcategory": [{"LabelName": leaf.name} for leaf in layout.leaves if leaf.family == f]}
        for f, fam in enumerate(layout.family_names)
    ]
    if not layout.super_names:
        return {"LabelName": "root", "Subcategory": families}
    supers = [
        {"LabelName": name, "Subcategory": [n for f, n in enumerate(families) if layout.super_of_family[f] == s]}
        for s, name in enumerate(layout.super_names)
    ]
    return {"LabelName": "root", "Subcategory": supers}


def benchmark_spec(preset: str | Preset = "demo", seed: int = 0) -> dict:
    """Everything `generate_benchmark` writes except pixels: {"train", "val", "hierarchy", "render", "layout"}.

    Fast (no drawing), so tests can check the bench preset's statistics without rendering 6k images.
    """
    layout = build_layout(preset)
    train_imgs = _split_spec(layout, "train", seed)
    val_imgs = _split_spec(layout, "val", seed)
    n_train_anns = sum(len(o["labels"]) for im in train_imgs for o in im["objects"])
    train = _lvis_json(layout, "train", train_imgs, 0, 0, seed)
    val = _lvis_json(layout, "val", val_imgs, len(train_imgs), n_train_anns, seed)
    _fill_category_counts(train, val)
    render = [("train", im) for im in train_imgs] + [("val", im) for im in val_imgs]
    return {"train": train, "val": val, "hierarchy": _hierarchy(layout), "render": render, "layout": layout}


# ---------------------------------------------------------------------------------------------------------
# Writing the benchmark
# ---------------------------------------------------------------------------------------------------------


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def summarize(train: dict, val: dict, layout: Layout) -> dict:
    """Sizes, LVIS bucket counts, imbalance and the multi-label pairs of a generated benchmark (JSON-ready)."""
    counts = np.array([c["image_count"] for c in train["categories"]])
    freq = [c["frequency"] for c in train["categories"]]
    leaf_counts = counts[: len(layout.leaves)]
    nz = counts[counts > 0]
    return {
        "preset": layout.preset.name,
        "train_images": len(train["images"]),
        "val_images": len(val["images"]),
        "train_annotations": len(train["annotations"]),
        "val_annotations": len(val["annotations"]),
        "categories": len(train["categories"]),
        "leaf_classes": len(layout.leaves),
        "parent_classes": len(layout.family_names),
        **({"super_classes": len(layout.super_names)} if layout.super_names else {}),
        "buckets": {b: freq.count(b) for b in "rcf"},
        "imbalance": float(nz.max() / nz.min()) if len(nz) else 0.0,
        "leaf_image_count_range": [int(leaf_counts.min()), int(leaf_counts.max())],
        "confusable_pairs": [
            {
                "base": layout.leaves[b].name,
                "twin": layout.leaves[t].name,
                "p_twin_as_base": r[0],
                "p_base_as_twin": r[1],
                "p_both": r[2],
            }
            for b, t, r in layout.confusable
        ],
        "two_leaf_pairs": [[layout.leaves[a].name, layout.leaves[b].name] for a, b in layout.two_leaf],
    }


def generate_benchmark(
    out_dir: str | os.PathLike, preset: str | Preset = "demo", seed: int = 0, workers: int | None = None
) -> dict:
    """Write DIR/train.json, DIR/val.json, DIR/hierarchy.json and DIR/images/*.png; return a summary.

    `workers` render processes (default: 1 for demo, up to 8 for bench); the bytes written do not depend on
    it. JSON files are written last and atomically, so an existing train.json means a complete benchmark.
    """
    t0 = time.perf_counter()
    p = get_preset(preset)
    spec = benchmark_spec(p, seed)
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    items = spec["render"]
    n_workers = workers if workers is not None else (p.workers or _default_workers())
    if n_workers <= 1:
        render_chunk((p, seed, str(image_dir), items))
    else:
        n_chunks = n_workers * 4
        chunks = [(p, seed, str(image_dir), items[i::n_chunks]) for i in range(n_chunks)]
        with ProcessPoolExecutor(n_workers, mp_context=get_context("spawn")) as ex:
            list(ex.map(render_chunk, chunks))
    write_json_atomic(out / "hierarchy.json", spec["hierarchy"])
    write_json_atomic(out / "val.json", spec["val"])
    write_json_atomic(out / "train.json", spec["train"])
    summary = {
        "out_dir": str(out),
        "seed": seed,
        **summarize(spec["train"], spec["val"], spec["layout"]),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return summary


__all__ = [
    "COLOURS",
    "PRESETS",
    "SHAPES",
    "TWINS",
    "Layout",
    "Leaf",
    "Preset",
    "benchmark_spec",
    "build_layout",
    "generate_benchmark",
    "render_image",
    "shape_mask",
    "summarize",
    "zipf_targets",
]
