"""A validation file split by image into a selection part and a held-out part (``data.holdout``).

A sweep chooses its answer on the selection part (trials, ASHA, the best configuration); ``ltsweep confirm`` then
measures the chosen configurations on the held-out part, with fresh seeds, so the confirmed numbers are an
independent estimate and the gap between the two shows the winner's curse.

The split is by image, seeded, and stratified so that every class keeps instances on both sides: classes are
visited from the rarest (fewest images) up, and each one's images not yet placed go to the held-out side until it
holds round(fraction x its images) of them (at least 1 and at most all but 1), the rest to the selection side.
Images are shuffled by the seed first; images without annotations go to the held-out side with probability
``fraction``. A class with a single validation image cannot be on both sides; it stays on one and is counted.
The two parts are LVIS-format files with every category of the original (their ids and `frequency` fields), so a
run evaluates on either exactly as on the whole file. They are written once per (file content, fraction, seed)
into a cache folder, atomically, and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from lt_models.atomic import atomic_dir
from lt_models.data.annotations import read_json
from lt_models.errors import ConfigError

PARTS = ("select", "heldout")


def check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(
            f"data.holdout = {fraction!r}: the held-out share of the validation images must be in (0, 1), e.g. 0.5"
        )
    return float(fraction)


def split_images(image_classes: list[set[int]], fraction: float, seed: int) -> np.ndarray:
    """held_out [n_images] (bool): the stratified split of the module docstring. ``image_classes[i]``: the classes
    annotated in image i."""
    fraction = check_fraction(fraction)
    rng = np.random.default_rng(seed)
    n = len(image_classes)
    order = rng.permutation(n)
    by_class: dict[int, list[int]] = {}
    for i in order:
        for c in image_classes[i]:
            by_class.setdefault(c, []).append(int(i))
    side = np.full(n, -1, np.int8)  # -1 unplaced, 0 selection, 1 held out
    for c in sorted(by_class, key=lambda c: (len(by_class[c]), c)):
        imgs = by_class[c]
        want = min(max(round(fraction * len(imgs)), 1), len(imgs) - 1) if len(imgs) > 1 else round(fraction)
        held = sum(side[i] == 1 for i in imgs)
        for i in imgs:
            if side[i] == -1:
                side[i] = 1 if held < want else 0
                held += side[i] == 1
    rest = np.flatnonzero(side == -1)
    side[rest] = rng.random(len(rest)) < fraction
    return side == 1


def _class_sets(data: dict) -> list[set[int]]:
    index = {im["id"]: k for k, im in enumerate(data["images"])}
    sets: list[set[int]] = [set() for _ in data["images"]]
    for a in data["annotations"]:
        sets[index[a["image_id"]]].add(int(a["category_id"]))
    return sets


def one_sided_classes(data: dict, held_out: np.ndarray) -> list[int]:
    """Classes annotated in the file whose instances all lie on one side of the split."""
    sides: dict[int, set[bool]] = {}
    for k, classes in enumerate(_class_sets(data)):
        for c in classes:
            sides.setdefault(c, set()).add(bool(held_out[k]))
    return sorted(c for c, s in sides.items() if len(s) < 2)


def split_file(
    val_json: str | os.PathLike, fraction: float, seed: int, cache_dir: str | os.PathLike
) -> dict[str, Path]:
    """The selection and held-out files of ``val_json`` ({"select": path, "heldout": path}), written into
    ``cache_dir/holdout-<key>/`` once (key: the file's sha256, the fraction and the seed)."""
    fraction = check_fraction(fraction)
    raw = Path(val_json).read_bytes()
    key = hashlib.sha256(raw + f"\n{fraction!r} {int(seed)}".encode()).hexdigest()[:20]
    out = Path(cache_dir) / f"holdout-{key}"
    paths = {part: out / f"{part}.json" for part in PARTS}
    if all(p.is_file() for p in paths.values()):
        return paths
    data = read_json(Path(val_json), "validation annotations")
    held = split_images(_class_sets(data), fraction, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        for part, keep in (("select", ~held), ("heldout", held)):
            ids = {im["id"] for im, k in zip(data["images"], keep) if k}
            subset = dict(
                data,
                images=[im for im in data["images"] if im["id"] in ids],
                annotations=[a for a in data["annotations"] if a["image_id"] in ids],
            )
            (tmp / f"{part}.json").write_text(json.dumps(subset))
        (tmp / "split.json").write_text(
            json.dumps(
                {
                    "source": str(val_json),
                    "fraction": fraction,
                    "seed": int(seed),
                    "images": {"select": int((~held).sum()), "heldout": int(held.sum())},
                    "one_sided_classes": one_sided_classes(data, held),
                }
            )
        )
    return paths
