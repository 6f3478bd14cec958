"""Pixels of the synthetic benchmark (see ``lt_models.data.synthetic.generate``): shape masks, textures, one image per
spec, and the PNG writer the render processes run. Each image is drawn from its own seeded RNG, so the bytes do not
depend on how many processes render them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lt_models.atomic import atomic_path
from lt_models.data.synthetic.layout import SHAPES, Layout, build_layout

SPLIT_CODE = {"train": 1, "val": 2}  # part of each image's RNG seed


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
        assert not isinstance(kind, str)  # "ellipse" and "ring" are the only named kinds: the rest are outlines
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


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [size, size, 3] backdrop of the benchmark, drawn from ``rng``: a light base colour with soft 16 x 16 px
    blotches and 0-3 grey distractor lines (not objects)."""
    S = size
    base = rng.uniform(175, 235) + rng.uniform(-12, 12, size=3)
    cell = 16  # soft colour blotches of 16 x 16 px
    low = rng.normal(0, 6, (S // cell + 1, S // cell + 1, 3)).repeat(cell, 0).repeat(cell, 1)[:S, :S]
    canvas = Image.fromarray(np.clip(base + low, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 4))):  # distractor lines (not objects)
        g = int(rng.uniform(110, 170))
        draw.line(
            [tuple(rng.uniform(0, S, 2)), tuple(rng.uniform(0, S, 2))], fill=(g, g, g), width=int(rng.integers(1, 3))
        )
    return np.asarray(canvas).astype(np.float32)


def paint_object(
    arr: np.ndarray, rng: np.random.Generator, layout: Layout, family: int, tones: list[int], box: list[int]
) -> None:
    """Draw one object into ``arr`` (float32, in place): the shape of ``family`` filling ``box`` = [x, y, w, h],
    in the appearance of leaf ``tones[0]`` (two tones: the right half in leaf ``tones[1]``'s), colour-jittered."""
    x, y, w, h = box
    mask = shape_mask(layout.family_names[family], w, h)
    jitter = rng.uniform(-10, 10, size=3)
    phase = int(rng.integers(0, 6))
    fills = [
        _texture(np.clip(np.array(layout.leaves[t].rgb) + jitter, 0, 255), layout.leaves[t].texture, w, h, phase)
        for t in tones
    ]
    fill = fills[0]
    if len(fills) == 2:  # two-tone: right half in the second leaf's appearance
        fill[:, w // 2 :] = fills[1][:, w // 2 :]
    region = arr[y : y + h, x : x + w]
    region[mask] = fill[mask]


def finish_image(arr: np.ndarray, rng: np.random.Generator, noise_std: float) -> np.ndarray:
    """Luminance noise on ``arr`` (float32 [S, S, 3], in place), clipped: the uint8 picture."""
    S = arr.shape[0]
    arr += rng.standard_normal((S, S, 1), dtype=np.float32) * np.float32(noise_std)  # luminance noise
    np.clip(arr, 0, 255, out=arr)
    return arr.astype(np.uint8)


def render_image(layout: Layout, split: str, image: dict, seed: int) -> np.ndarray:
    """uint8 [S, S, 3] picture of one image spec: light noisy background, clutter lines, the objects."""
    p = layout.preset
    rng = np.random.default_rng([seed, SPLIT_CODE[split], image["index"], 1])
    arr = background(rng, p.image_size)
    for obj in image["objects"]:
        paint_object(arr, rng, layout, obj["family"], obj["tones"], obj["box"])
    return finish_image(arr, rng, p.noise_std)


def _save_png_atomic(arr: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG", compress_level=1)


def render_chunk(args: tuple) -> int:
    """Render and save ``(preset, seed, image_dir, [(split, image spec), ...])``; return the image count."""
    preset, seed, image_dir, items = args
    layout = build_layout(preset)
    for split, image in items:
        path = Path(image_dir) / f"{split}_{image['index']:06d}.png"
        _save_png_atomic(render_image(layout, split, image, seed), path)
    return len(items)
