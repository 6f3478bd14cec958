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
"""
from __future__ import annotations

import math
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lt_models.atomic import atomic_path, write_json_atomic

SPLIT_CODE = {"train": 1, "val": 2}

# ---------------------------------------------------------------------------------------------------------
# Shapes: normalised outlines whose extent is exactly [0,1] x [0,1], so the box a shape is drawn in is its
# tight bounding box.
# ---------------------------------------------------------------------------------------------------------


def _normalise(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    p = np.asarray(points, dtype=np.float64)
    p = (p - p.min(0)) / (p.max(0) - p.min(0))
    return tuple((float(x), float(y)) for x, y in p)


def _star(n: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    pts = []
    for k in range(2 * n):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return _normalise(pts)


_ARM = 0.34  # half-width (normalised) of the cross arms: 0.5 +- 0.17
SHAPES: dict[str, object] = {
    "circle": "ellipse",
    "square": _normalise([(0, 0), (1, 0), (1, 1), (0, 1)]),
    "triangle": _normalise([(0.5, 0), (1, 1), (0, 1)]),
    "star": _star(),
    "ring": "ring",
    "cross": _normalise([(0.33, 0), (0.67, 0), (0.67, 0.33), (1, 0.33), (1, 0.67), (0.67, 0.67), (0.67, 1),
                         (0.33, 1), (0.33, 0.67), (0, 0.67), (0, 0.33), (0.33, 0.33)]),
    "diamond": _normalise([(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]),
    "hexagon": _normalise([(0.25, 0), (0.75, 0), (1, 0.5), (0.75, 1), (0.25, 1), (0, 0.5)]),
    "arrow": _normalise([(0, 0.3), (0.55, 0.3), (0.55, 0), (1, 0.5), (0.55, 1), (0.55, 0.7), (0, 0.7)]),
    "trapezoid": _normalise([(0.25, 0), (0.75, 0), (1, 1), (0, 1)]),
    "chevron": _normalise([(0, 0), (0.45, 0), (1, 0.5), (0.45, 1), (0, 1), (0.55, 0.5)]),
    "pentagon": _normalise([(math.cos(-math.pi / 2 + k * 2 * math.pi / 5),
                             math.sin(-math.pi / 2 + k * 2 * math.pi / 5)) for k in range(5)]),
}
FAMILY_ORDER = list(SHAPES)

# Saturated colours that stand out from the light background, each with a near-identical twin for the
# confusable (implicit multi-label) leaf pairs.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 45, 45), "blue": (45, 80, 210), "green": (40, 160, 60), "yellow": (225, 200, 30),
    "purple": (140, 60, 180), "orange": (235, 130, 30), "cyan": (30, 180, 200), "pink": (230, 90, 170),
    "brown": (130, 80, 40), "black": (35, 35, 35),
}
TWINS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "red": ("crimson", (196, 40, 62)), "blue": ("cobalt", (40, 68, 196)), "green": ("jade", (38, 150, 78)),
    "yellow": ("gold", (218, 186, 36)), "purple": ("violet", (152, 66, 190)), "orange": ("amber", (228, 146, 34)),
    "cyan": ("teal", (30, 166, 186)), "pink": ("rose", (218, 80, 156)), "brown": ("umber", (118, 74, 44)),
    "black": ("charcoal", (50, 50, 54)),
}
COLOUR_ORDER = list(COLOURS)
TEXTURES = ("solid", "striped", "dotted")


@dataclass(frozen=True)
class Preset:
    """Everything that defines a benchmark besides the seed."""

    name: str
    image_size: int
    families: int                 # shape families = parent categories
    appearances: int              # leaves per family
    t_max: int                    # training objects of the most frequent leaf
    t_min: int                    # training objects of the rarest leaf
    q: float                      # Zipf-Mandelbrot offset: larger q flattens the head
    val_ratio: float              # val objects per leaf = max(val_min, round(val_ratio * t))
    val_min: int
    objects_per_image: tuple[float, ...] = (0.35, 0.30, 0.20, 0.15)  # P(1..4 objects)
    min_size: int = 20
    max_size: int = 56
    n_confusable: int = 3         # twin leaf pairs (implicit multi-label)
    n_two_leaf: int = 2           # two-tone leaf pairs (explicit "car toy")
    # per confusable pair: P(twin labelled as base), P(base labelled as twin), P(labelled with both)
    swap_rates: tuple[tuple[float, float, float], ...] = ((0.35, 0.10, 0.20), (0.25, 0.08, 0.15),
                                                          (0.45, 0.12, 0.25))
    two_leaf_rate: float = 0.3    # P(object of the pair's first leaf is drawn two-tone with the second)
    leaf_parent_rate: float = 0.2  # P(an object also carries its parent label)
    parent_only_rates: tuple[float, ...] = (0.05, 0.12, 0.2, 0.3)  # P(parent label only), cycled per family
    noise_std: float = 6.0
    workers: int = 1              # default render processes, 0 = one per CPU (at most 8); output does not depend on it

    @property
    def num_leaves(self) -> int:
        return self.families * self.appearances


PRESETS: dict[str, Preset] = {
    # 6 families x 4 appearances = 24 leaves + 6 parents; ~490 train / ~110 val images of 128 px.
    "demo": Preset("demo", image_size=128, families=6, appearances=4, t_max=260, t_min=2, q=40,
                   val_ratio=0.2, val_min=4, objects_per_image=(0.25, 0.30, 0.25, 0.20)),
    # 10 families x 8 appearances = 80 leaves + 10 parents; ~6k train / ~700 val images of 128 px.
    "bench": Preset("bench", image_size=128, families=10, appearances=8, t_max=2000, t_min=3, q=15,
                    val_ratio=0.1, val_min=3, n_confusable=8, n_two_leaf=5, workers=0),
}


def _preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


# ---------------------------------------------------------------------------------------------------------
# Class layout (independent of the seed: `red_star` is the same class with the same frequency for every seed)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Leaf:
    index: int                    # 0..L-1 in (family, slot) order; category id = index + 1
    family: int
    rank: int                     # 0 = most frequent
    colour: str
    rgb: tuple[int, int, int]
    texture: str
    name: str
    twin_of: int | None = None    # leaf index of the confusable partner (set on both leaves of a pair)
    two_leaf_with: int | None = None  # partner of a two-tone pair (set on the first leaf only)


@dataclass
class Layout:
    preset: Preset
    leaves: list[Leaf]
    family_names: list[str]
    confusable: list[tuple[int, int, tuple[float, float, float]]] = field(default_factory=list)  # (base, twin, rates)
    two_leaf: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_categories(self) -> int:
        return len(self.leaves) + len(self.family_names)

    def leaf_cat_id(self, leaf: int) -> int:
        return leaf + 1

    def parent_cat_id(self, family: int) -> int:
        return len(self.leaves) + family + 1


def zipf_targets(num: int, t_max: int, t_min: int, q: float) -> np.ndarray:
    """Objects per frequency rank: Zipf-Mandelbrot ``t_max * ((1+q)/(r+q))**s``, r = 1..num, t(num) = t_min."""
    r = np.arange(1, num + 1, dtype=np.float64)
    s = math.log(t_max / t_min) / math.log((num + q) / (1 + q)) if num > 1 else 1.0
    return np.maximum(1, np.round(t_max * ((1 + q) / (r + q)) ** s)).astype(np.int64)


def build_layout(preset: str | Preset) -> Layout:
    p = _preset(preset)
    if p.families > len(FAMILY_ORDER) or p.appearances > len(COLOUR_ORDER):
        raise ValueError(f"preset {p.name}: at most {len(FAMILY_ORDER)} families and {len(COLOUR_ORDER)} appearances")
    F, A = p.families, p.appearances
    leaves: list[Leaf] = []
    level_of: dict[tuple[int, int], int] = {}
    for f in range(F):
        for a in range(A):
            j = (a - f) % A                    # frequency level inside the family (0 = head)
            level_of[(f, j)] = f * A + a
            colour = COLOUR_ORDER[(a + 3 * f) % len(COLOUR_ORDER)]
            texture = TEXTURES[(a + f) % len(TEXTURES)]
            leaves.append(Leaf(index=f * A + a, family=f, rank=F * j + f, colour=colour, rgb=COLOURS[colour],
                               texture=texture, name=""))
    layout = Layout(p, leaves, FAMILY_ORDER[:F])
    # Confusable twins: family f_k, levels (j, j+1); the rarer leaf takes the twin colour of the commoner one.
    for k in range(p.n_confusable):
        f = (2 * k) % F
        j = round(k * (A - 2) / max(1, p.n_confusable - 1))
        base, twin = leaves[level_of[(f, j)]], leaves[level_of[(f, j + 1)]]
        if base.twin_of is not None or twin.twin_of is not None:
            continue                       # custom presets with more pairs than free leaf slots
        twin.colour, twin.rgb = TWINS[base.colour]
        twin.texture = base.texture
        base.twin_of, twin.twin_of = twin.index, base.index
        layout.confusable.append((base.index, twin.index, p.swap_rates[k % len(p.swap_rates)]))
    # Two-tone pairs: other families, levels (j, j+1).
    for k in range(p.n_two_leaf):
        f = (2 * k + 1) % F
        j = round(k * (A - 2) / max(1, p.n_two_leaf - 1))
        first, second = leaves[level_of[(f, j)]], leaves[level_of[(f, j + 1)]]
        if first.twin_of is not None or second.twin_of is not None or first.two_leaf_with is not None:
            continue
        first.two_leaf_with = second.index
        layout.two_leaf.append((first.index, second.index))
    for leaf in leaves:
        tex = "" if leaf.texture == "solid" else leaf.texture + "_"
        leaf.name = f"{tex}{leaf.colour}_{layout.family_names[leaf.family]}"
    return layout


# ---------------------------------------------------------------------------------------------------------
# Split specification: which objects go where and which labels they get (no pixels yet)
# ---------------------------------------------------------------------------------------------------------


def _place_boxes(rng: random.Random, n: int, p: Preset) -> list[list[int]]:
    """n non-overlapping integer boxes [x, y, w, h] inside the image (2 px gap)."""
    S = p.image_size
    boxes: list[list[int]] = []

    def free(x: int, y: int, w: int, h: int) -> bool:
        return all(x + w + 2 <= bx or bx + bw + 2 <= x or y + h + 2 <= by or by + bh + 2 <= y
                   for bx, by, bw, bh in boxes)

    for _ in range(n):
        size = rng.uniform(p.min_size, p.max_size)
        for _attempt in range(60):
            aspect = math.exp(rng.uniform(-0.3, 0.3))
            w = min(max(round(size * math.sqrt(aspect)), 12), S - 2)
            h = min(max(round(size / math.sqrt(aspect)), 12), S - 2)
            x, y = rng.randrange(1, S - w), rng.randrange(1, S - h)
            if free(x, y, w, h):
                boxes.append([x, y, w, h])
                break
            size = max(12.0, size * 0.93)
        else:
            # crowded image: a small box in the first free spot of a coarse grid (always exists for n <= 4)
            spot = next((gx, gy) for gy in range(1, S - 14, 7) for gx in range(1, S - 14, 7) if free(gx, gy, 12, 12))
            boxes.append([spot[0], spot[1], 12, 12])
    return boxes


def _split_spec(layout: Layout, split: str, seed: int) -> list[dict]:
    """Images of one split: boxes, drawn leaves ("tones") and annotated category ids per object."""
    p = layout.preset
    L = len(layout.leaves)
    t = zipf_targets(L, p.t_max, p.t_min, p.q)
    per_leaf = np.array([t[leaf.rank] for leaf in layout.leaves])
    if split == "val":
        per_leaf = np.maximum(p.val_min, np.round(per_leaf * p.val_ratio)).astype(np.int64)
    rng = random.Random(f"ltsweep-synthetic/{seed}/{split}")  # str seeds are hashed with sha512: stable
    slots = np.repeat(np.arange(L), per_leaf).tolist()
    rng.shuffle(slots)
    sizes = []
    total = 0
    while total < len(slots):
        k = rng.choices(range(1, len(p.objects_per_image) + 1), weights=p.objects_per_image)[0]
        sizes.append(min(k, len(slots) - total))
        total += sizes[-1]
    twin_rates = {}
    for base, twin, (p_tb, p_bt, p_both) in layout.confusable:
        twin_rates[twin] = (base, p_tb, p_both)
        twin_rates[base] = (twin, p_bt, p_both)
    seen: set[int] = set()
    images = []
    pos = 0
    for idx, k in enumerate(sizes):
        boxes = _place_boxes(random.Random(f"ltsweep-synthetic/{seed}/{split}/{idx}"), k, p)
        objects = []
        for leaf_idx, box in zip(slots[pos:pos + k], boxes):
            leaf = layout.leaves[leaf_idx]
            clean = leaf_idx not in seen          # first object of a leaf keeps its own label
            seen.add(leaf_idx)
            u_two, u_swap, u_parent = rng.random(), rng.random(), rng.random()
            tones = [leaf_idx]
            if leaf.two_leaf_with is not None and u_two < p.two_leaf_rate:
                tones.append(leaf.two_leaf_with)  # explicit: a two-tone object is both leaves ("car toy")
            labels = [layout.leaf_cat_id(x) for x in tones]
            if leaf_idx in twin_rates and not clean:
                partner, p_swap, p_both = twin_rates[leaf_idx]
                if u_swap < p_swap:               # implicit: annotator used the twin's name
                    labels = [layout.leaf_cat_id(partner)]
                elif u_swap < p_swap + p_both:    # annotators disagreed; both boxes kept
                    labels = [layout.leaf_cat_id(leaf_idx), layout.leaf_cat_id(partner)]
            parent = layout.parent_cat_id(leaf.family)
            po = p.parent_only_rates[leaf.family % len(p.parent_only_rates)]
            if u_parent < po and not clean:
                labels = [parent]                 # implicit: parent-only (apple -> fruit)
            elif u_parent < po + p.leaf_parent_rate:
                labels = labels + [parent]        # explicit: leaf + parent, identical box
            objects.append({"box": box, "family": leaf.family, "tones": tones, "labels": labels})
        pos += k
        images.append({"index": idx, "objects": objects})
    return images


def _plausible(layout: Layout, obj: dict) -> set[int]:
    """Category ids an annotator could truthfully give this object (drawn leaves, their twins, the family)."""
    out = {layout.parent_cat_id(obj["family"])}
    for leaf_idx in obj["tones"]:
        out.add(layout.leaf_cat_id(leaf_idx))
        twin = layout.leaves[leaf_idx].twin_of
        if twin is not None:
            out.add(layout.leaf_cat_id(twin))
    return out


def _categories(layout: Layout) -> list[dict]:
    cats = []
    for leaf in layout.leaves:
        tex = "" if leaf.texture == "solid" else f" {leaf.texture}"
        cats.append({"id": layout.leaf_cat_id(leaf.index), "name": leaf.name,
                     "def": f"a{tex} {leaf.colour} {layout.family_names[leaf.family]} shape"})
    for f, fam in enumerate(layout.family_names):
        cats.append({"id": layout.parent_cat_id(f), "name": fam, "def": f"any {fam} shape (parent class)"})
    return cats


def _lvis_json(layout: Layout, split: str, images: list[dict], id_offset: int, ann_offset: int,
               seed: int) -> dict:
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
        not_exhaustive = {c for c in positives
                          for obj in img["objects"] if c in _plausible(layout, obj) and c not in obj["labels"]}
        img_recs.append({"id": image_id, "file_name": f"{split}_{img['index']:06d}.png",
                         "width": p.image_size, "height": p.image_size,
                         "neg_category_ids": sorted(all_ids - present),
                         "not_exhaustive_category_ids": sorted(not_exhaustive)})
        for obj in img["objects"]:
            x, y, w, h = obj["box"]
            for cat in obj["labels"]:
                ann_id += 1
                anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                             "area": w * h, "iscrowd": 0})
    return {"info": {"description": "ltsweep synthetic long-tail multi-label benchmark", "preset": p.name,
                     "seed": seed, "split": split, "version": 1},
            "images": img_recs, "annotations": anns, "categories": _categories(layout)}


def _fill_category_counts(train: dict, *others: dict) -> None:
    """LVIS convention: image_count / instance_count / frequency come from train, copied to every split."""
    imgs: dict[int, set[int]] = {c["id"]: set() for c in train["categories"]}
    inst: dict[int, int] = {c["id"]: 0 for c in train["categories"]}
    for a in train["annotations"]:
        imgs[a["category_id"]].add(a["image_id"])
        inst[a["category_id"]] += 1
    ids = [c["id"] for c in train["categories"]]
    # LVIS thresholds, the rule of `lt_models.datasets.frequency_buckets` (not imported: it would pull in torch,
    # seconds of start-up; tests check both agree)
    buckets = ["r" if len(imgs[i]) <= 10 else "c" if len(imgs[i]) <= 100 else "f" for i in ids]
    for d in (train, *others):
        for c, b in zip(d["categories"], buckets):
            c["image_count"] = len(imgs[c["id"]])
            c["instance_count"] = inst[c["id"]]
            c["frequency"] = b


def _hierarchy(layout: Layout) -> dict:
    return {"LabelName": "root", "Subcategory": [
        {"LabelName": fam, "Subcategory": [{"LabelName": leaf.name} for leaf in layout.leaves if leaf.family == f]}
        for f, fam in enumerate(layout.family_names)]}


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
# Rendering
# ---------------------------------------------------------------------------------------------------------


def shape_mask(family: str, w: int, h: int) -> np.ndarray:
    """Boolean [h, w] mask of a shape drawn to touch all four sides of a w x h box."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    kind = SHAPES[family]
    if kind == "ellipse":
        d.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif kind == "ring":
        d.ellipse([0, 0, w - 1, h - 1], fill=255)
        d.ellipse([w * 0.27, h * 0.27, (w - 1) * 0.73, (h - 1) * 0.73], fill=0)
    else:
        d.polygon([(u * (w - 1), v * (h - 1)) for u, v in kind], fill=255)
    return np.asarray(m) > 0


def _texture(rgb: np.ndarray, texture: str, w: int, h: int, phase: int) -> np.ndarray:
    fill = np.broadcast_to(rgb, (h, w, 3)).astype(np.float32).copy()
    if texture == "striped":
        rows = ((np.arange(h) + phase) // 3) % 2 == 1
        fill[rows] *= 0.55
    elif texture == "dotted":
        yy, xx = np.mgrid[0:h, 0:w]
        dots = (((yy + phase) % 6) < 2) & (((xx + phase) % 6) < 2)
        fill[dots] = fill[dots] * 0.3 + 255 * 0.7
    return fill


def render_image(layout: Layout, split: str, image: dict, seed: int) -> np.ndarray:
    """uint8 [S, S, 3] picture of one image spec: light noisy background, clutter lines, the objects."""
    p = layout.preset
    S = p.image_size
    rng = np.random.default_rng([seed, SPLIT_CODE[split], image["index"], 1])
    base = rng.uniform(175, 235) + rng.uniform(-12, 12, size=3)
    cell = 16                                     # soft colour blotches of 16 x 16 px
    low = rng.normal(0, 6, (S // cell + 1, S // cell + 1, 3)).repeat(cell, 0).repeat(cell, 1)[:S, :S]
    canvas = Image.fromarray(np.clip(base + low, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 4))):     # distractor lines (not objects)
        g = int(rng.uniform(110, 170))
        draw.line([tuple(rng.uniform(0, S, 2)), tuple(rng.uniform(0, S, 2))], fill=(g, g, g),
                  width=int(rng.integers(1, 3)))
    arr = np.asarray(canvas).astype(np.float32)
    for obj in image["objects"]:
        x, y, w, h = obj["box"]
        mask = shape_mask(layout.family_names[obj["family"]], w, h)
        jitter = rng.uniform(-10, 10, size=3)
        phase = int(rng.integers(0, 6))
        fills = [_texture(np.clip(np.array(layout.leaves[t].rgb) + jitter, 0, 255), layout.leaves[t].texture,
                          w, h, phase) for t in obj["tones"]]
        fill = fills[0]
        if len(fills) == 2:                      # two-tone: right half in the second leaf's appearance
            fill[:, w // 2:] = fills[1][:, w // 2:]
        region = arr[y:y + h, x:x + w]
        region[mask] = fill[mask]
    arr += rng.standard_normal((S, S, 1), dtype=np.float32) * np.float32(p.noise_std)  # luminance noise
    np.clip(arr, 0, 255, out=arr)
    return arr.astype(np.uint8)


def _save_png_atomic(arr: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG", compress_level=1)


def _render_chunk(args: tuple) -> int:
    preset, seed, image_dir, items = args
    layout = build_layout(preset)
    for split, image in items:
        path = Path(image_dir) / f"{split}_{image['index']:06d}.png"
        _save_png_atomic(render_image(layout, split, image, seed), path)
    return len(items)




def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def summarize(train: dict, val: dict, layout: Layout) -> dict:
    counts = np.array([c["image_count"] for c in train["categories"]])
    freq = [c["frequency"] for c in train["categories"]]
    leaf_counts = counts[: len(layout.leaves)]
    nz = counts[counts > 0]
    return {
        "preset": layout.preset.name,
        "train_images": len(train["images"]), "val_images": len(val["images"]),
        "train_annotations": len(train["annotations"]), "val_annotations": len(val["annotations"]),
        "categories": len(train["categories"]), "leaf_classes": len(layout.leaves),
        "parent_classes": len(layout.family_names),
        "buckets": {b: freq.count(b) for b in "rcf"},
        "imbalance": float(nz.max() / nz.min()) if len(nz) else 0.0,
        "leaf_image_count_range": [int(leaf_counts.min()), int(leaf_counts.max())],
        "confusable_pairs": [{"base": layout.leaves[b].name, "twin": layout.leaves[t].name,
                              "p_twin_as_base": r[0], "p_base_as_twin": r[1], "p_both": r[2]}
                             for b, t, r in layout.confusable],
        "two_leaf_pairs": [[layout.leaves[a].name, layout.leaves[b].name] for a, b in layout.two_leaf],
    }


def generate_benchmark(out_dir: str | os.PathLike, preset: str | Preset = "demo", seed: int = 0,
                       workers: int | None = None) -> dict:
    """Write DIR/train.json, DIR/val.json, DIR/hierarchy.json and DIR/images/*.png; return a summary.

    `workers` render processes (default: 1 for demo, up to 8 for bench); the bytes written do not depend on
    it. JSON files are written last and atomically, so an existing train.json means a complete benchmark.
    """
    t0 = time.perf_counter()
    p = _preset(preset)
    spec = benchmark_spec(p, seed)
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    items = spec["render"]
    n_workers = workers if workers is not None else (p.workers or _default_workers())
    if n_workers <= 1:
        _render_chunk((p, seed, str(image_dir), items))
    else:
        n_chunks = n_workers * 4
        chunks = [(p, seed, str(image_dir), items[i::n_chunks]) for i in range(n_chunks)]
        with ProcessPoolExecutor(n_workers, mp_context=get_context("spawn")) as ex:
            list(ex.map(_render_chunk, chunks))
    write_json_atomic(out / "hierarchy.json", spec["hierarchy"])
    write_json_atomic(out / "val.json", spec["val"])
    write_json_atomic(out / "train.json", spec["train"])
    summary = {"out_dir": str(out), "seed": seed, **summarize(spec["train"], spec["val"], spec["layout"]),
               "seconds": round(time.perf_counter() - t0, 2)}
    return summary


__all__ = ["PRESETS", "Preset", "benchmark_spec", "build_layout", "generate_benchmark", "render_image",
           "shape_mask", "zipf_targets"]
