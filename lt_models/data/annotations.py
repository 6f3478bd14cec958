"""Annotation semantics, written once: JSON reading, LVIS frequency buckets and the class hierarchy.

The dataset (`lt_models.data.datasets`), the statistics (`lt_models.data.stats`), the concurrent rates
(`lt_models.data.rate_matrix`), the Open Images converter (`lt_models.data.openimages.convert`) and both evaluators
(`lt_models.evaluation`) read these rules from here and nowhere else.

Frequency buckets (LVIS): a category is rare with 1-10 training images (0 counts as rare), common with 11-100
and frequent with more than 100. Buckets always come from the training set.

Hierarchy: an Open Images hierarchy JSON, {"LabelName": ..., "Subcategory": [{"LabelName": ..., ...}, ...]}.
A LabelName is either a category `name` (the synthetic benchmark) or an Open Images MID such as "/m/0bl9f" (the
official ``bbox_labels_600_hierarchy.json``); `lt_models.data.openimages.convert.convert_openimages` keeps each class's
MID in its category's `mid` field, so `name_to_cat_id` maps both. Parsed, a hierarchy is {parent category id: [direct
child category ids]}; `hierarchy_ancestors` / `hierarchy_descendants` close it transitively.

numpy only (no torch), so light commands can import it.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lt_models.errors import AnnotationError

RARE_MAX = 10  # LVIS: rare = 1-10 training images
COMMON_MAX = 100  # LVIS: common = 11-100, frequent > 100
FREQ_LABELS = ("r", "c", "f")


def read_json(path: str | os.PathLike, what: str = "annotations") -> Any:
    """Parse a JSON file; `AnnotationError` naming the file, the problem and the fix when it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: {what} file not found; check the path") from None
    except IsADirectoryError:
        raise AnnotationError(f"{path}: is a directory, expected a JSON {what} file") from None
    except UnicodeDecodeError:
        raise AnnotationError(f"{path}: not a UTF-8 text file; fix: pass the {what} JSON file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(
            f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg}); "
            f"fix the file (truncated or hand-edited?)"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# Frequency buckets
# ---------------------------------------------------------------------------------------------------------


def frequency_buckets(
    image_counts: Sequence[int] | np.ndarray, rare_max: int = RARE_MAX, common_max: int = COMMON_MAX
) -> list[str]:
    """LVIS buckets from training image counts: 'r' (<= rare_max, including 0), 'c' (<= common_max), else 'f'."""
    if not 0 <= rare_max < common_max:
        raise ValueError(f"frequency thresholds need 0 <= rare_max < common_max, got {rare_max}, {common_max}")
    return ["r" if n <= rare_max else "c" if n <= common_max else "f" for n in np.asarray(image_counts).tolist()]


def category_image_counts(data: dict) -> tuple[dict[int, int], dict[int, int]]:
    """(images per category id, annotations per category id) over non-crowd annotations."""
    imgs: dict[int, set] = {c["id"]: set() for c in data["categories"]}
    inst: dict[int, int] = {c["id"]: 0 for c in data["categories"]}
    for a in data["annotations"]:
        if a.get("iscrowd", 0):
            continue
        imgs[a["category_id"]].add(a["image_id"])
        inst[a["category_id"]] += 1
    return {k: len(v) for k, v in imgs.items()}, inst


def category_frequencies(
    categories: Sequence[dict], image_counts: Mapping[int, int], rare_max: int = RARE_MAX, common_max: int = COMMON_MAX
) -> list[str]:
    """Bucket of each category: its own `frequency` field when valid, else from `image_counts` (id -> images)."""
    own = frequency_buckets([image_counts.get(c["id"], 0) for c in categories], rare_max, common_max)
    return [c["frequency"] if c.get("frequency") in FREQ_LABELS else b for c, b in zip(categories, own)]


def fill_frequency(
    data: dict, image_counts: dict[int, int] | None = None, rare_max: int = RARE_MAX, common_max: int = COMMON_MAX
) -> int:
    """Write `frequency` (and missing `image_count`/`instance_count`) into categories that lack it, in place.

    `image_counts` (category id -> training images) defaults to this file's own counts: right for a training
    file; for a val file pass the training counts (LVIS buckets always come from train). Returns how many
    categories were filled.
    """
    own_imgs, own_inst = category_image_counts(data)
    counts = own_imgs if image_counts is None else image_counts
    filled = 0
    for c in data["categories"]:
        c.setdefault("image_count", own_imgs[c["id"]])
        c.setdefault("instance_count", own_inst[c["id"]])
        if c.get("frequency") not in FREQ_LABELS:
            c["frequency"] = frequency_buckets([counts.get(c["id"], 0)], rare_max, common_max)[0]
            filled += 1
    return filled


# ---------------------------------------------------------------------------------------------------------
# Hierarchy
# ---------------------------------------------------------------------------------------------------------


def name_to_cat_id(categories: Iterable[dict]) -> dict[str, Any]:
    """Keys a hierarchy may use for a category: its `name`, and its Open Images MID (`mid`) when present."""
    out: dict[str, Any] = {}
    for c in categories:
        for key in ("name", "mid"):
            if c.get(key) not in (None, ""):
                out[str(c[key])] = c["id"]
    return out


def load_hierarchy(hierarchy: str | os.PathLike | Mapping, name_to_cat_id: Mapping[str, Any]) -> dict[Any, list]:
    """Open Images hierarchy (a JSON path or the parsed tree) -> {parent category id: [child category ids]}.

    LabelNames are matched through `name_to_cat_id` (category names and MIDs, see `name_to_cat_id`). Nodes that
    are not categories (the root, classes outside this label set) are transparent: their children attach to the
    nearest ancestor that is a category. "Part" lists are ignored (not an is-a relation, as in the Open Images
    expansion tool). Parents and children come out sorted.
    """
    if isinstance(hierarchy, Mapping):
        tree, source = hierarchy, "hierarchy (dict)"
    else:
        tree, source = read_json(hierarchy, "hierarchy"), str(hierarchy)
    children: dict[Any, set] = defaultdict(set)
    matched: set = set()

    def walk(node: object, cat_trail: tuple, trail: tuple) -> None:
        if not isinstance(node, Mapping) or not isinstance(node.get("LabelName"), str):
            raise AnnotationError(
                f"{source}: hierarchy node {str(node)[:80]!r} under {'/'.join(trail) or 'top'} "
                f"needs a string 'LabelName'"
            )
        name = node["LabelName"]
        cid = name_to_cat_id.get(name)
        if name in trail or (cid is not None and cid in cat_trail):
            raise AnnotationError(
                f"{source}: hierarchy cycle at LabelName {name!r} ({'/'.join(trail)}); "
                f"a class cannot be its own ancestor"
            )
        if cid is not None:
            matched.add(cid)
            if cat_trail:
                children[cat_trail[-1]].add(cid)
            cat_trail = cat_trail + (cid,)
        subs = node.get("Subcategory", [])
        if not isinstance(subs, list):
            raise AnnotationError(f"{source}: LabelName {name!r}: field 'Subcategory' must be a list")
        for sub in subs:
            walk(sub, cat_trail, trail + (name,))

    walk(tree, (), ())
    if not matched:
        raise AnnotationError(
            f"{source}: no hierarchy LabelName matches a category name or MID of the dataset; "
            f"fix: LabelNames must be category names or the Open Images MIDs kept in category "
            f"'mid' (as `ltsweep data convert-openimages` writes them)"
        )
    return {p: sorted(c) for p, c in sorted(children.items())}


def _closure(edges: Mapping[Hashable, Iterable]) -> dict[Hashable, set]:
    """Every node reachable from each key of `edges` in one or more steps (a cycle reaches its own start)."""
    out: dict[Hashable, set] = {}
    for start in edges:
        seen: set = set()
        stack = list(edges[start])
        while stack:
            x = stack.pop()
            if x not in seen:
                seen.add(x)
                stack.extend(edges.get(x, ()))
        out[start] = seen
    return out


def hierarchy_ancestors(hierarchy: Mapping[Any, Iterable]) -> dict[Any, set]:
    """Transitive ancestors of every category id that has a parent."""
    parents: dict[Any, list] = defaultdict(list)
    for p, cs in hierarchy.items():
        for c in cs:
            parents[c].append(p)
    return _closure(parents)


def hierarchy_descendants(hierarchy: Mapping[Any, Iterable]) -> dict[Any, set]:
    """Transitive descendants of every category id that has a child."""
    return _closure(hierarchy)
