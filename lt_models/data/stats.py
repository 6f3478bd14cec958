"""Long-tail and multi-label statistics of an LVIS-format file, and their plots (`ltsweep data stats`).

What is measured (the concurrent-softmax paper, "Large-Scale Object Detection in the Wild from Imbalanced
Multi-Labels", Peng et al., CVPR 2020):

- imbalance magnitude: images of the largest category / images of the smallest non-empty one (its Fig 2);
- categories per LVIS frequency bucket (`lt_models.data.annotations`);
- the most concurrent label pairs after merging duplicate boxes (`lt_models.data.merge.merged_objects`), i.e. the
  rate P(object labelled i is also labelled j) for pairs not related in the hierarchy (its Fig 3a);
- the share of objects that carry a parent label but none of its descendants (its Fig 3b);
- for a soft-balance λ: the expected views per image of the head and tail class in one epoch (its eq 8, computed
  by `lt_models.data.samplers.soft_balance_probabilities`).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from lt_models.atomic import atomic_path
from lt_models.data.annotations import (
    COMMON_MAX,
    FREQ_LABELS,
    RARE_MAX,
    category_frequencies,
    category_image_counts,
    hierarchy_ancestors,
    load_hierarchy,
    name_to_cat_id,
)
from lt_models.data.lvis_json import load_lvis_json
from lt_models.data.merge import merged_objects
from lt_models.data.samplers import soft_balance_probabilities

# LVIS v1 train, for `format_stats(..., vs_lvis=True)`. Computed from the category records of the LVIS v1 train
# annotation file (lvis_v1_train.json "categories": image_count, instance_count, frequency) as redistributed by
# Detic's datasets/metadata/lvis_v1_train_cat_info.json (copy read: github.com/empMEMORY/vision-language-fsod,
# commit 0065478d). The stored copy ends inside record 1117 of 1203, so:
# - categories, buckets, imbalance: image_count of ids 1-1116 from that file, of ids 1117-1203 from detectron2's
#   lvis_v1_category_image_count.py (also generated from lvis_v1_train.json; it agrees on the 30 overlapping ids).
#   Buckets by the LVIS rule (rare <= 10 < common <= 100 < frequent images) give 337 / 461 / 405, the published
#   split, and match every record's `frequency`. Imbalance = max image_count (tennis_racket, 1977) / min (1).
# - instances per rare class: mean and median of instance_count over the 320 of the 337 rare categories whose
#   record is readable (ids <= 1117); the 17 rare categories among ids 1118-1203 are missing.
# - objects per image = annotations / images of the LVIS website (1,270,141 / 100,170). The instance_count sum over
#   ids 1-1117 is 1,192,832, which leaves 77,309 for the 86 unread records (3.1 per image_count, 3.5 elsewhere):
#   consistent, but the full sum could not be checked.
# - labels per object: LVIS gives every instance exactly one category, so 1.0 by construction.
LVIS_V1_TRAIN: dict = {
    "images": 100_170,
    "annotations": 1_270_141,
    "categories": 1203,
    "buckets": {"r": 337, "c": 461, "f": 405},
    "imbalance": 1977.0,
    "labels_per_object": 1.0,
    "rare_instances": {"mean": 15.73, "median": 7.0, "of": 320},
    "objects_per_image": 12.68,
}


def _class_views(
    counts: np.ndarray, pairs: tuple[np.ndarray, np.ndarray], num_images: int, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per class: (mean views of its images, share of its images never drawn) in one soft-balance epoch.

    `pairs` = (image index, class index) for every class present in every image; an epoch is `num_images` draws.
    The sampler draws class i with P*_s(i) (paper eq 8, `lt_models.data.samplers.soft_balance_probabilities`), then one
    of the n_i images containing i uniformly, so image j is drawn v_j = num_images * sum_{i in L_j} P*_s(i) / n_i times
    on average; draws are with replacement, so it is missed with probability ~exp(-v_j).
    """
    img, cls = pairs
    per_class = np.zeros(len(counts))
    nz = counts > 0
    per_class[nz] = num_images * soft_balance_probabilities(counts[nz], lam) / counts[nz]
    views = np.bincount(img, weights=per_class[cls], minlength=num_images)
    n = np.maximum(np.bincount(cls, minlength=len(counts)), 1)
    mean = np.bincount(cls, weights=views[img], minlength=len(counts)) / n
    unseen = np.bincount(cls, weights=np.exp(-views[img]), minlength=len(counts)) / n
    return mean, unseen


def _label_statistics(objects: dict, ancestors: dict[int, set[int]], names: dict[int, str], top_k: int) -> dict:
    """Object counts, the `top_k` most concurrent unrelated label pairs (Fig 3a) and parent-only counts (Fig 3b)."""
    n_obj: Counter[int] = Counter()
    n_pair: Counter[tuple[int, int]] = Counter()
    n_multi = 0
    n_objects = 0
    parent_only: Counter[int] = Counter()
    parent_any: Counter[int] = Counter()
    descendants: dict[int, set[int]] = defaultdict(set)
    for c, ancs in ancestors.items():
        for a in ancs:
            descendants[a].add(c)
    for objs in objects.values():
        for _box, _primary, labels in objs:
            n_objects += 1
            n_multi += len(labels) > 1
            for i in labels:
                n_obj[i] += 1
                for j in labels:
                    if i != j and j not in ancestors.get(i, ()) and i not in ancestors.get(j, ()):
                        n_pair[i, j] += 1
            ls = set(labels)
            for p in {a for c in ls for a in ancestors.get(c, ())} | (ls & descendants.keys()):
                parent_any[p] += 1
                if p in ls and not ls & descendants[p]:
                    parent_only[p] += 1
    pairs = sorted(((n / n_obj[i], n, i, j) for (i, j), n in n_pair.items()), key=lambda t: (-t[0], -t[1], t[2], t[3]))
    confused = [
        {"label": names[i], "also_labelled": names[j], "rate": round(r, 4), "objects": int(n), "of": int(n_obj[i])}
        for r, n, i, j in pairs[:top_k]
    ]
    out: dict = {"objects": n_objects, "multi_label_objects": n_multi, "confused_pairs": confused}
    if ancestors:
        tot_any = sum(parent_any.values())
        out["parent_only_share"] = (sum(parent_only.values()) / tot_any) if tot_any else 0.0
        out["parent_only"] = {
            names[p]: {
                "objects": int(parent_any[p]),
                "parent_only": int(parent_only[p]),
                "share": round(parent_only[p] / parent_any[p], 4) if parent_any[p] else 0.0,
            }
            for p in sorted(descendants)
        }
    else:
        out["parent_only_share"] = None
    return out


def _image_class_pairs(objects: dict, cats: list[dict]) -> tuple[int, tuple[np.ndarray, np.ndarray]]:
    """(images with an object, (image index, class index) for every class present in each of them)."""
    cat_index = {c["id"]: k for k, c in enumerate(cats)}
    present = [sorted({cat_index[c] for o in objs for c in o[2]}) for objs in objects.values() if objs]
    pairs = (
        np.repeat(np.arange(len(present)), [len(p) for p in present]),
        np.array([c for p in present for c in p], dtype=np.int64),
    )
    return len(present), pairs


def _sampling_rows(
    counts: np.ndarray, pairs: tuple[np.ndarray, np.ndarray], n_images: int, lam: float, head: int, tail: int
) -> dict:
    """Head/tail views and never-drawn shares for non-balance, soft-balance λ and class-aware sampling."""
    rows = {
        "non-balance (each image once)": {
            "lam": None,
            "head_views": 1.0,
            "tail_views": 1.0,
            "head_unseen": 0.0,
            "tail_unseen": 0.0,
        }
    }
    for name, lv in ((f"soft-balance λ={lam:g}", float(lam)), ("class-aware (λ=1)", 1.0)):
        mean, unseen = _class_views(counts.astype(np.float64), pairs, n_images, lv)
        rows[name] = {
            "lam": lv,
            "head_views": float(mean[head]),
            "tail_views": float(mean[tail]),
            "head_unseen": float(unseen[head]),
            "tail_unseen": float(unseen[tail]),
        }
    return rows


def _per_object_figures(n_images: int, n_annotations: int, n_objects: int, rare_instances: list[int]) -> dict:
    """Labels per merged object, objects per image, and training instances per rare category (mean, median)."""
    return {
        "labels_per_object": n_annotations / n_objects if n_objects else 0.0,
        "objects_per_image": n_objects / n_images if n_images else 0.0,
        "rare_instances": {
            "mean": float(np.mean(rare_instances)) if rare_instances else 0.0,
            "median": float(np.median(rare_instances)) if rare_instances else 0.0,
            "of": len(rare_instances),
        },
    }


def dataset_stats(
    ann_file: str | os.PathLike,
    lam: float | None = None,
    hierarchy_file: str | os.PathLike | None = None,
    plot_dir: str | os.PathLike | None = None,
    *,
    image_dir: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    rare_max: int = RARE_MAX,
    common_max: int = COMMON_MAX,
    top_k: int = 10,
) -> dict:
    """Long-tail and multi-label statistics of an LVIS-format file (the paper's Fig 2, Fig 3a/3b, §3 sampling).

    - imbalance: images of the largest category / images of the smallest non-empty one (Fig 2);
    - buckets: categories per LVIS bucket (the file's `frequency`, else from its own image counts);
    - confused pairs: after merging boxes (IoU >= 0.95), the rate r_ij = P(object labelled i also labelled j) for
      pairs not related in the hierarchy, the highest `top_k` (Fig 3a);
    - parent-only share: objects whose labels include a parent but none of its descendants (Fig 3b; needs a
      hierarchy: `hierarchy_file`, else ``hierarchy.json`` beside the file when present);
    - with `lam`: views per image of the head and tail class in one epoch for non-balance (each image once), λ and
      class-aware (λ=1) sampling, and the share of their images never drawn (≈ exp(-views)).
    `image_dir` (default ``<file dir>/images`` when it exists) is checked for missing image files.
    PNG plots go to `plot_dir` (``<stem>_imbalance.png`` ...).
    """
    ann_file = Path(ann_file)
    if image_dir is None and (ann_file.parent / "images").is_dir():
        image_dir = ann_file.parent / "images"
    data = load_lvis_json(ann_file, image_dir=image_dir, skip_invalid=skip_invalid)
    if hierarchy_file is None and (ann_file.parent / "hierarchy.json").is_file():
        hierarchy_file = ann_file.parent / "hierarchy.json"
    cats = sorted(data["categories"], key=lambda c: c["id"])
    names = {c["id"]: c["name"] for c in cats}
    hierarchy = load_hierarchy(hierarchy_file, name_to_cat_id(cats)) if hierarchy_file is not None else {}
    ancestors = hierarchy_ancestors(hierarchy)
    img_counts, inst_counts = category_image_counts(data)
    counts = np.array([img_counts[c["id"]] for c in cats], dtype=np.int64)
    freq = category_frequencies(cats, img_counts, rare_max, common_max)
    nz = counts[counts > 0]
    head = int(np.argmax(counts)) if len(cats) else None
    tail = int(np.flatnonzero(counts == nz.min())[0]) if len(nz) else None
    objects = merged_objects(data, ancestors, expand_parents=False)
    labels = _label_statistics(objects, ancestors, names, top_k)

    rare_inst = [inst_counts[c["id"]] for c, f in zip(cats, freq) if f == "r"]
    stats: dict = {
        "file": str(ann_file),
        "images": len(data["images"]),
        "annotations": len(data["annotations"]),
        "objects": labels["objects"],
        **_per_object_figures(len(data["images"]), len(data["annotations"]), labels["objects"], rare_inst),
        "multi_label_objects": labels["multi_label_objects"],
        "categories": len(cats),
        "empty_categories": int((counts == 0).sum()),
        "imbalance": float(nz.max() / nz.min()) if len(nz) else 0.0,
        "head": {"name": names[cats[head]["id"]], "images": int(counts[head])} if head is not None else None,
        "tail": {"name": names[cats[tail]["id"]], "images": int(counts[tail])} if tail is not None else None,
        "buckets": {b: freq.count(b) for b in "rcf"},
        "bucket_source": ("file" if all(c.get("frequency") in FREQ_LABELS for c in cats) else "image counts"),
        "thresholds": {"rare_max": rare_max, "common_max": common_max},
        "confused_pairs": labels["confused_pairs"],
        "hierarchy": str(hierarchy_file) if hierarchy_file is not None else None,
        "images_checked": str(image_dir) if image_dir is not None else None,
        "invalid_skipped": data["invalid_skipped"],
        "invalid_reasons": data["invalid_reasons"],
        "image_counts": {names[c["id"]]: int(n) for c, n in zip(cats, counts)},
        "instance_counts": {names[c["id"]]: int(inst_counts[c["id"]]) for c in cats},
        "frequency": {names[c["id"]]: f for c, f in zip(cats, freq)},
        "parent_only_share": labels["parent_only_share"],
    }
    if "parent_only" in labels:
        stats["parent_only"] = labels["parent_only"]
    pairs = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if lam is not None and len(nz):
        assert head is not None and tail is not None  # some category has images, so both are set
        n_images, pairs = _image_class_pairs(objects, cats)
        stats["sampling"] = {"epoch_draws": n_images, "rows": _sampling_rows(counts, pairs, n_images, lam, head, tail)}
    if plot_dir is not None:
        stats["plots"] = _plot_stats(stats, counts, freq, lam, pairs, Path(plot_dir), ann_file.stem)
    return stats


def _save(fig, plt, path: Path, written: list[str]) -> None:
    """Write `fig` as PNG atomically (temp file + rename), close it and record the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(str(path))


def _plot_stats(
    stats: dict,
    counts: np.ndarray,
    freq: list[str],
    lam: float | None,
    pairs: tuple[np.ndarray, np.ndarray],
    plot_dir: Path,
    stem: str,
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    plot_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    colours = {"r": "tab:red", "c": "tab:orange", "f": "tab:blue"}
    order = np.argsort(-counts, kind="stable")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(np.arange(len(counts)), np.maximum(counts[order], 0.8), color=[colours[freq[i]] for i in order], width=1.0)
    ax.set_yscale("log")
    ax.set_xlabel("category (sorted by training images)")
    ax.set_ylabel("images")
    ax.set_title(
        f"imbalance magnitude {stats['imbalance']:.0f} (Fig 2); "
        + ", ".join(f"{b}={stats['buckets'][b]}" for b in "rcf")
    )
    ax.legend(
        handles=[Patch(color=c, label={"r": "rare", "c": "common", "f": "frequent"}[b]) for b, c in colours.items()],
        loc="upper right",
        fontsize=8,
    )
    _save(fig, plt, plot_dir / f"{stem}_imbalance.png", written)

    if stats["confused_pairs"]:
        top = stats["confused_pairs"][::-1]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(top) + 1))
        ax.barh([f"{p['label']} → {p['also_labelled']}" for p in top], [p["rate"] for p in top], color="tab:purple")
        ax.set_xlabel("P(object labelled i is also labelled j)")
        ax.set_title("most concurrent label pairs (Fig 3a)")
        _save(fig, plt, plot_dir / f"{stem}_confusion.png", written)

    if stats.get("parent_only"):
        po = stats["parent_only"]
        names = list(po)
        leaf = [po[n]["objects"] - po[n]["parent_only"] for n in names]
        only = [po[n]["parent_only"] for n in names]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar(names, leaf, label="with leaf label", color="tab:green")
        ax.bar(names, only, bottom=leaf, label="parent label only", color="tab:gray")
        ax.set_ylabel("objects")
        ax.set_title(f"parent-only labels: {stats['parent_only_share']:.1%} (Fig 3b)")
        ax.tick_params(axis="x", rotation=60)
        ax.legend(fontsize=8)
        _save(fig, plt, plot_dir / f"{stem}_parent_only.png", written)

    if lam is not None and "sampling" in stats:
        n = stats["sampling"]["epoch_draws"]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        x = np.arange(len(counts))
        ax.plot(x, np.ones(len(counts)), label="non-balance", color="black", lw=1)
        for lv in sorted({float(lam), 1.0}):
            mean, _ = _class_views(counts.astype(np.float64), pairs, n, lv)
            ax.plot(x, np.where(counts[order] > 0, mean[order], np.nan), label=f"soft-balance λ={lv:g}")
        ax.set_yscale("log")
        ax.set_xlabel("category (sorted by training images)")
        ax.set_ylabel("mean views per image per epoch")
        ax.set_title("soft-balance sampling (eq 8)")
        ax.legend(fontsize=8)
        _save(fig, plt, plot_dir / f"{stem}_soft_balance.png", written)
    return written


def format_vs_lvis(stats: dict) -> list[str]:
    """Lines of a table: the file's long-tail figures beside LVIS v1 train's (`LVIS_V1_TRAIN`)."""
    lv = LVIS_V1_TRAIN

    def buckets(b: dict, n: int) -> tuple[str, str]:
        """("r / c / f" counts, "r% / c% / f%" shares of all categories)."""
        return " / ".join(str(b[k]) for k in "rcf"), " / ".join(f"{b[k] / max(n, 1):.0%}" for k in "rcf")

    ours_b, ours_share = buckets(stats["buckets"], stats["categories"])
    lv_b, lv_share = buckets(lv["buckets"], lv["categories"])
    ri, lri = stats["rare_instances"], lv["rare_instances"]
    rows = [
        ("images", f"{stats['images']}", f"{lv['images']}"),
        ("annotations", f"{stats['annotations']}", f"{lv['annotations']}"),
        ("categories", f"{stats['categories']}", f"{lv['categories']}"),
        ("buckets rare / common / frequent", ours_b, lv_b),
        ("  share of categories", ours_share, lv_share),
        ("imbalance (max / min images per category)", f"{stats['imbalance']:.0f}", f"{lv['imbalance']:.0f}"),
        ("labels per object (annotations / object)", f"{stats['labels_per_object']:.2f}", "1.00 (one per instance)"),
        (
            "instances per rare class (mean / median)",
            f"{ri['mean']:.1f} / {ri['median']:g}",
            f"{lri['mean']:.1f} / {lri['median']:g} ({lri['of']} of {lv['buckets']['r']} rare)",
        ),
        ("objects per image", f"{stats['objects_per_image']:.2f}", f"{lv['objects_per_image']:.2f}"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "this file", "")])
    lines = [
        "beside LVIS v1 train (lt_models.data.stats.LVIS_V1_TRAIN):",
        f"  {'':<{w0}}  {'this file':>{w1}}  LVIS v1",
    ]
    lines += [f"  {name:<{w0}}  {ours:>{w1}}  {ref}" for name, ours, ref in rows]
    return lines


def format_stats(stats: dict, vs_lvis: bool = False) -> str:
    """Human-readable table of `dataset_stats` output; `vs_lvis` adds the file's figures beside LVIS v1 train's."""
    lines = [
        f"{stats['file']}: {stats['images']} images, {stats['annotations']} annotations, "
        f"{stats['objects']} objects after merging duplicate boxes ({stats['multi_label_objects']} multi-label), "
        f"{stats['categories']} categories ({stats['empty_categories']} without images)"
    ]
    if stats.get("invalid_skipped"):
        lines.append(
            f"skipped {stats['invalid_skipped']} invalid records: "
            + ", ".join(f"{k} {v}" for k, v in stats["invalid_reasons"].items())
        )
    if stats["head"]:
        lines.append(
            f"imbalance magnitude (Fig 2): {stats['imbalance']:.1f}  "
            f"(head {stats['head']['name']}: {stats['head']['images']} images, "
            f"tail {stats['tail']['name']}: {stats['tail']['images']})"
        )
    b, t = stats["buckets"], stats["thresholds"]
    lines.append(
        f"buckets ({stats['bucket_source']}; rare <= {t['rare_max']} < common <= {t['common_max']} < "
        f"frequent images): rare {b['r']}  common {b['c']}  frequent {b['f']}"
    )
    lines.append("")
    lines.append("most concurrent label pairs, excluding parent/child (Fig 3a):")
    if stats["confused_pairs"]:
        w = max(len(p["label"]) for p in stats["confused_pairs"])
        w2 = max(len(p["also_labelled"]) for p in stats["confused_pairs"])
        lines.append(f"  {'label i':<{w}}  {'also labelled j':<{w2}}  {'rate':>6}  objects")
        for p in stats["confused_pairs"]:
            lines.append(
                f"  {p['label']:<{w}}  {p['also_labelled']:<{w2}}  {p['rate']:>6.3f}  {p['objects']}/{p['of']}"
            )
    else:
        lines.append("  (no object carries two unrelated labels)")
    lines.append("")
    if stats["parent_only_share"] is None:
        lines.append("parent-only labels (Fig 3b): n/a (no hierarchy; pass --hierarchy)")
    else:
        lines.append(
            f"parent-only labels (Fig 3b): {stats['parent_only_share']:.1%} of objects in a hierarchy "
            f"family carry the parent label only ({stats['hierarchy']})"
        )
        po = stats["parent_only"]
        w = max([len(n) for n in po] + [6])
        lines.append(f"  {'parent':<{w}}  objects  parent-only  share")
        for n, r in po.items():
            lines.append(f"  {n:<{w}}  {r['objects']:>7}  {r['parent_only']:>11}  {r['share']:>5.1%}")
    if "sampling" in stats:
        s = stats["sampling"]
        lines.append("")
        lines.append(
            f"expected views per image in one epoch of {s['epoch_draws']} draws "
            f"(head {stats['head']['name']}, tail {stats['tail']['name']}):"
        )
        lines.append(f"  {'sampler':<30} {'head views':>10} {'head unseen':>11} {'tail views':>10} {'tail unseen':>11}")
        for name, r in s["rows"].items():
            lines.append(
                f"  {name:<30} {r['head_views']:>10.3f} {r['head_unseen']:>11.1%} "
                f"{r['tail_views']:>10.2f} {r['tail_unseen']:>11.1%}"
            )
    if vs_lvis:
        lines.append("")
        lines.extend(format_vs_lvis(stats))
    if stats.get("plots"):
        lines.append("")
        lines.append("plots: " + ", ".join(stats["plots"]))
    return "\n".join(lines)
