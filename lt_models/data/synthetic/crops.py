"""The balanced classification task of stage 0 (``lt_models.engine.stage0``): small images of one object each, the
same number for every leaf class of a synthetic preset.

Each crop is drawn like a detection image of the benchmark (``lt_models.data.synthetic.render``: the same light
noisy background with distractor lines, the same shape masks, textures, colour jitter and luminance noise), with
one object of its leaf at a random size, aspect and position. Only the public layout is read (``build_layout``,
``Leaf.family`` / ``rgb`` / ``texture``), so every preset works. Crop ``i`` of leaf ``c`` is drawn from its own RNG
``np.random.default_rng([seed, CROP_STREAM, c, i])``; detection images use ``[seed, 1 | 2, index, 1]``
(``render.SPLIT_CODE``), so no crop ever repeats a benchmark image's random stream. The set is deterministic per
seed and pre-rendered into one uint8 array (``images_per_class`` x leaves x size² x 3 bytes: 48 crops of 64 px for
312 leaves is 184 MB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from lt_models.data.synthetic.layout import Layout, Preset, build_layout, get_preset
from lt_models.data.synthetic.render import background, finish_image, paint_object

CROP_STREAM = 7  # the second RNG seed word of every crop; never a SPLIT_CODE of the detection images
MIN_OBJECT = 12  # smallest object side in pixels (as the benchmark's boxes)


@dataclass(frozen=True)
class CropSet:
    """A balanced classification set: ``images`` uint8 [N, S, S, 3] and ``labels`` int64 [N] (the leaf index, 0..L-1),
    class-major (all crops of leaf 0, then leaf 1, ...), ``per_class`` crops per leaf."""

    images: np.ndarray
    labels: np.ndarray
    per_class: int
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, holdout_per_class: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, held-out) indices: the last ``holdout_per_class`` crops of every class are held out, so both
        parts stay balanced."""
        if not 0 <= holdout_per_class < self.per_class:
            raise ValueError(
                f"holdout_per_class = {holdout_per_class}: must be in [0, {self.per_class}) (crops per class)"
            )
        within = np.arange(len(self.labels)) % self.per_class
        held = within >= self.per_class - holdout_per_class
        return np.flatnonzero(~held), np.flatnonzero(held)


def object_sizes(preset: Preset, size: int) -> tuple[float, float]:
    """(smallest, largest) object side of a crop of ``size`` px: the preset's sizes in pixels (the scale the
    detector sees), capped so that the object fits inside the crop."""
    hi = min(float(preset.max_size), size - 2.0)
    lo = min(float(preset.min_size), hi)
    return max(float(MIN_OBJECT), lo), max(float(MIN_OBJECT), hi)


def render_crop(layout: Layout, leaf: int, index: int, seed: int, size: int = 64) -> np.ndarray:
    """uint8 [size, size, 3]: crop ``index`` of leaf ``leaf`` (the benchmark's background, one object of the leaf)."""
    p = layout.preset
    rng = np.random.default_rng([seed, CROP_STREAM, leaf, index])
    arr = background(rng, size)
    lo, hi = object_sizes(p, size)
    side = rng.uniform(lo, hi)
    aspect = math.exp(rng.uniform(-0.3, 0.3))  # as the benchmark's boxes
    w = min(max(round(side * math.sqrt(aspect)), MIN_OBJECT), size - 2)
    h = min(max(round(side / math.sqrt(aspect)), MIN_OBJECT), size - 2)
    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    paint_object(arr, rng, layout, layout.leaves[leaf].family, [leaf], [x, y, w, h])
    return finish_image(arr, rng, p.noise_std)


def build_crops(preset: str | Preset, per_class: int, seed: int = 0, size: int = 64, progress: bool = False) -> CropSet:
    """Render ``per_class`` crops of every leaf of ``preset`` (deterministic per seed; the same crops whatever
    ``per_class`` is, crop i of a leaf being drawn from its own RNG)."""
    if per_class < 1:
        raise ValueError(f"per_class = {per_class}: need at least one crop per class")
    if size < 2 * MIN_OBJECT:
        raise ValueError(f"size = {size}: crops must be at least {2 * MIN_OBJECT} px")
    layout = build_layout(get_preset(preset))
    n_leaves = len(layout.leaves)
    images = np.empty((n_leaves * per_class, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(n_leaves, dtype=np.int64), per_class)
    bar = tqdm(total=len(images), desc="stage 0: rendering crops", unit="img", disable=not progress, leave=False)
    with bar:
        for leaf in range(n_leaves):
            for i in range(per_class):
                images[leaf * per_class + i] = render_crop(layout, leaf, i, seed, size)
            bar.update(per_class)
    return CropSet(images, labels, per_class, tuple(leaf.name for leaf in layout.leaves))
