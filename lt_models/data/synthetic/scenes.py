"""Co-occurrence and occlusion of the synthetic benchmark (see ``lt_models.data.synthetic.generate``).

Used only by presets that ask for them (``Preset.scenes``, ``Preset.max_occlusion``, e.g. ``lvislike``); the other
presets keep independent objects on non-overlapping boxes.

* Scenes. The families are grouped into scenes. Every leaf slot of a split (one slot per object the Zipf targets ask
  for) goes into the pool of its family's scene. An image picks a scene (weighted by what its pool has left) and
  takes each object from that pool with probability ``scene_share``, else from another pool. Every slot is used
  exactly once, so the per-leaf object totals stay the Zipf targets while objects of one image are related: a rare
  leaf appears next to frequent leaves of the families it shares a scene with.
* Occlusion. Boxes may overlap. Objects are drawn in list order, so a later object hides part of an earlier one. A
  box is accepted only if, for every earlier box, the share of that box covered by the later boxes stays at most
  ``max_occlusion``: every object stays recognisable. Boxes remain the full (amodal) box of the drawn shape.
"""

from __future__ import annotations

import math
import random

import numpy as np

from lt_models.data.synthetic.layout import Layout, Preset


def scene_of_family(p: Preset) -> list[int]:
    """Family index -> scene index of `p.scenes` (ValueError unless every family is in exactly one scene)."""
    owner: dict[int, int] = {}
    for s, fams in enumerate(p.scenes):
        for f in fams:
            if f in owner or not 0 <= f < p.families:
                raise ValueError(f"preset {p.name}: family {f} is out of range or in two scenes")
            owner[f] = s
    if len(owner) != p.families:
        raise ValueError(f"preset {p.name}: every family needs a scene")
    return [owner[f] for f in range(p.families)]


def scene_image_slots(rng: random.Random, per_leaf: np.ndarray, layout: Layout) -> list[list[int]]:
    """The leaf of every object of a split, grouped into images that each draw mostly from one scene.

    `per_leaf[i]` objects of leaf i are split over the images exactly. Image sizes follow
    `preset.objects_per_image`; the last images of a split may be smaller when the pools run dry.
    """
    p = layout.preset
    scene_of = scene_of_family(p)
    pools: list[list[int]] = [[] for _ in p.scenes]
    for leaf in layout.leaves:
        pools[scene_of[leaf.family]].extend([leaf.index] * int(per_leaf[leaf.index]))
    for pool in pools:
        rng.shuffle(pool)
    scene_ids = range(len(pools))
    sizes = range(1, len(p.objects_per_image) + 1)
    images: list[list[int]] = []
    left = sum(len(pool) for pool in pools)
    while left:
        scene = rng.choices(scene_ids, weights=[len(pool) for pool in pools])[0]
        k = min(rng.choices(sizes, weights=p.objects_per_image)[0], left)
        objects = []
        for _ in range(k):
            own = rng.random() < p.scene_share
            others = [0 if s == scene else len(pool) for s, pool in enumerate(pools)]
            if (own and pools[scene]) or not any(others):
                src = scene
            else:
                src = rng.choices(scene_ids, weights=others)[0]
            objects.append(pools[src].pop())
        left -= k
        images.append(objects)
    return images


def _cover(boxes: list[list[int]], covered: list[np.ndarray], cand: tuple[int, int, int, int], cap: float):
    """Covered masks of the earlier boxes once `cand` is drawn on top, or None if one would pass `cap`."""
    x, y, w, h = cand
    out = []
    for (bx, by, bw, bh), mask in zip(boxes, covered):
        x0, y0, x1, y1 = max(x, bx), max(y, by), min(x + w, bx + bw), min(y + h, by + bh)
        if x0 >= x1 or y0 >= y1:
            out.append(mask)
            continue
        m = mask.copy()
        m[y0 - by : y1 - by, x0 - bx : x1 - bx] = True
        if m.mean() > cap:
            return None
        out.append(m)
    return out


def candidate_boxes(rng: random.Random, p: Preset, attempts: int = 60):
    """Up to ``attempts`` candidate boxes (x, y, w, h) for one object: a size from the preset, a random aspect and
    position, the size shrunk by 7% after each candidate the caller rejects (it stops asking once one fits)."""
    S = p.image_size
    size = rng.uniform(p.min_size, p.max_size)
    for _ in range(attempts):
        aspect = math.exp(rng.uniform(-0.3, 0.3))
        w = min(max(round(size * math.sqrt(aspect)), 12), S - 2)
        h = min(max(round(size / math.sqrt(aspect)), 12), S - 2)
        yield rng.randrange(1, S - w), rng.randrange(1, S - h), w, h
        size = max(12.0, size * 0.93)


def place_boxes_occluding(rng: random.Random, n: int, p: Preset) -> list[list[int]]:
    """n integer boxes [x, y, w, h] inside the image, drawn in order; later boxes cover <= p.max_occlusion of any."""
    S = p.image_size
    boxes: list[list[int]] = []
    covered: list[np.ndarray] = []  # per box: which of its pixels later boxes cover

    def accept(cand: tuple[int, int, int, int]) -> bool:
        """Add box `cand` on top if no earlier box would pass the cap; say whether it was added."""
        nonlocal covered
        masks = _cover(boxes, covered, cand, p.max_occlusion)
        if masks is None:
            return False
        covered = masks + [np.zeros((cand[3], cand[2]), dtype=bool)]
        boxes.append(list(cand))
        return True

    for _ in range(n):
        for cand in candidate_boxes(rng, p):
            if accept(cand):
                break
        else:  # crowded image: the first 12 x 12 spot of a coarse grid that keeps every cap
            spots = ((gx, gy, 12, 12) for gy in range(1, S - 13, 5) for gx in range(1, S - 13, 5))
            if not any(accept(spot) for spot in spots):
                raise RuntimeError(f"preset {p.name}: no room for {n} objects under max_occlusion={p.max_occlusion}")
    return boxes


def occluded_shares(boxes: list[list[int]]) -> list[float]:
    """Per box: the share of its area that the boxes after it cover (0 for the last one)."""
    shares = []
    for i, (bx, by, bw, bh) in enumerate(boxes):
        mask = np.zeros((bh, bw), dtype=bool)
        for x, y, w, h in boxes[i + 1 :]:
            x0, y0, x1, y1 = max(x, bx), max(y, by), min(x + w, bx + bw), min(y + h, by + bh)
            if x0 < x1 and y0 < y1:
                mask[y0 - by : y1 - by, x0 - bx : x1 - bx] = True
        shares.append(float(mask.mean()))
    return shares
