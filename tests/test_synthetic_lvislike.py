"""The LVIS-like synthetic preset (312 leaves, 3-level hierarchy, scenes, occlusion), the older presets' pinned bytes,
and `ltsweep data stats --vs-lvis`."""

import hashlib
import json
from collections import Counter, defaultdict
from itertools import combinations

import numpy as np
import pytest

from lt_models.data.annotations import hierarchy_ancestors, load_hierarchy, name_to_cat_id
from lt_models.data.stats import LVIS_V1_TRAIN, dataset_stats, format_stats
from lt_models.data.synthetic.generate import benchmark_spec
from lt_models.data.synthetic.layout import PRESETS, zipf_targets
from lt_models.data.synthetic.render import render_image, shape_mask
from lt_models.data.synthetic.scenes import occluded_shares, scene_of_family
from pipelines.cli import main


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# Computed on the generator before the lvislike preset existed (seed 0): the JSON of each split and the hierarchy
# (json.dumps with sorted keys) and the raw pixels of three rendered images (pixels, not PNG bytes, so that a
# different zlib cannot fail the test).
PINNED = {
    "demo": {
        "train": "4d0954424df02b7156291e71a77afe0b64d4f5abe73f33cb4969e291abe3238a",
        "val": "7ce25b769e84de449e1da7ed0ec31b157c8ec9e6db43c716e1b72b1069f46e65",
        "hierarchy": "c7f1df250e3befb9046c00a073dd6031f9db542ab6cbea1a265633d07e278001",
        "images": {
            "train_0": "9eebe26ad1c33a6a1297d9541943932c0aafba6eee33318b96d15e6b492aa443",
            "train_7": "fc23a67d1765aa96c8f8f9d6a9467c78a2eaeaaaba1f29515b22eccf54fa330f",
            "val_118": "41c1e0d867a93cd573281e1b136ef1fdf58782aec7eb12dda67cdad37f9fc31a",
        },
    },
    "bench": {
        "train": "a874d04f91e8cd1ac8561027fa804cede2cdf430919fbfb7c4af85a393d244d0",
        "val": "a4cb8836ddff19de9a68abc8cc7c62d29cdbfac09f065c55b9b69115951dd133",
        "hierarchy": "32550bfc1373df6581a81e592181fe86bd880f19f415a818eeb21154dc9bdceb",
        "images": {
            "train_0": "232e0c1135b26da92ae2d5e5c3630271afd11b6a1ff0cab7875c4bfaeda42f0c",
            "train_7": "df57018362844cd4cd812f9b7f4b67cf43c59f23ba8b14eab812941e3846f0c4",
            "val_641": "120cfcfb3e3f2c2c956a35d76dae9cbbe56bfec9861d69f7f7fee9037a418936",
        },
    },
    "study": {
        "train": "8ee06c5dce89db2be0857b5c6882b9d9a0300ffe3cbb605245c49e2b19d3543d",
        "val": "36dcf959646d848610d39e76119e5b44d9fb55e03b44f6842642313e1e31775b",
        "hierarchy": "b5a7603e6734ca72226bed5825519326c743833c135f15d7b4636994f03ea16a",
        "images": {
            "train_0": "e6af58f226ae33c46e89d8c04ee9b88fa6ac5f459e682b01b582b20b75bb9d62",
            "train_7": "3f76090d957f6505677ec6b80374f8e3a7e71158c5bc783d0a2ec6ffcdac8e66",
            "val_390": "f4770dd1b7315a8c21973c35ff27e9cdd89570dcc9b1837b578310e3187c3b61",
        },
    },
}


@pytest.mark.parametrize("preset", sorted(PINNED))
def test_older_presets_are_byte_identical(preset):
    """The new Preset fields default to off: demo, bench and study give exactly the output they gave before."""
    spec = benchmark_spec(preset, 0)
    for key in ("train", "val", "hierarchy"):
        assert _sha(json.dumps(spec[key], sort_keys=True).encode()) == PINNED[preset][key], key
    render = spec["render"]
    for i in (0, 7, len(render) - 1):
        split, image = render[i]
        pixels = render_image(spec["layout"], split, image, 0).tobytes()
        assert _sha(pixels) == PINNED[preset]["images"][f"{split}_{image['index']}"], (split, image["index"])


@pytest.fixture(scope="module")
def spec():
    return benchmark_spec("lvislike", seed=0)


def _leaf_counts(d, num_leaves):
    """Per leaf category id: (images with an annotation of it, annotations of it)."""
    imgs, inst = defaultdict(set), Counter()
    for a in d["annotations"]:
        imgs[a["category_id"]].add(a["image_id"])
        inst[a["category_id"]] += 1
    return {c: len(imgs[c]) for c in range(1, num_leaves + 1)}, inst


def test_size_and_long_tail_buckets(spec):
    layout, train, val = spec["layout"], spec["train"], spec["val"]
    L = len(layout.leaves)
    assert L >= 300 and len(layout.family_names) == 12 and len(layout.super_names) == 3
    assert len(train["categories"]) == L + 12 + 3
    assert 1000 <= len(train["images"]) <= 1500 and 350 <= len(val["images"]) <= 500
    freq = Counter(c["frequency"] for c in train["categories"][:L])
    shares = {b: freq[b] / L for b in "rcf"}
    assert 0.40 <= shares["r"] <= 0.50 and 0.35 <= shares["c"] <= 0.45 and 0.10 <= shares["f"] <= 0.20, shares
    objects = [len(im["objects"]) for _, im in spec["render"]]
    assert min(objects) >= 1 and max(objects) <= 12 and np.mean(objects) >= 7


def test_rare_leaves_have_1_to_10_train_images_and_val_min_val_instances(spec):
    layout, train, val = spec["layout"], spec["train"], spec["val"]
    L, p = len(layout.leaves), layout.preset
    train_imgs, _ = _leaf_counts(train, L)
    _, val_inst = _leaf_counts(val, L)
    rare = [c["id"] for c in train["categories"][:L] if c["frequency"] == "r"]
    assert all(1 <= train_imgs[c] <= 10 for c in rare)
    assert min(val_inst[c] for c in rare) >= p.val_min >= 8


def test_per_leaf_object_totals_follow_the_zipf_targets(spec):
    """Scene pools reshuffle which image an object lands in, never how many objects a leaf has."""
    layout = spec["layout"]
    p = layout.preset
    t = zipf_targets(len(layout.leaves), p.t_max, p.t_min, p.q)
    drawn = Counter(o["tones"][0] for s, im in spec["render"] if s == "train" for o in im["objects"])
    assert all(drawn[leaf.index] == t[leaf.rank] for leaf in layout.leaves)


def test_three_level_hierarchy_parses(spec):
    layout, cats = spec["layout"], spec["train"]["categories"]
    tree = load_hierarchy(spec["hierarchy"], name_to_cat_id(cats))
    ancestors = hierarchy_ancestors(tree)
    fam_ids = {layout.parent_cat_id(f) for f in range(len(layout.family_names))}
    super_ids = {layout.super_cat_id(f) for f in range(len(layout.family_names))}
    assert len(super_ids) == 3 and set(tree) == fam_ids | super_ids
    for leaf in layout.leaves:
        ancs = ancestors[layout.leaf_cat_id(leaf.index)]
        assert ancs == {layout.parent_cat_id(leaf.family), layout.super_cat_id(leaf.family)}
    assert all(ancestors[f] <= super_ids and len(ancestors[f]) == 1 for f in fam_ids)
    assert not any(s in ancestors for s in super_ids)  # the super-categories hang off the (non-category) root


def test_objects_carry_concurrent_and_parent_only_labels_of_both_levels(spec):
    layout = spec["layout"]
    kinds = Counter()
    for _, im in spec["render"]:
        for o in im["objects"]:
            fam, sup = layout.parent_cat_id(o["family"]), layout.super_cat_id(o["family"])
            leaf = layout.leaf_cat_id(o["tones"][0])
            ls = o["labels"]
            kinds["leaf + family"] += leaf in ls and fam in ls
            kinds["leaf + super"] += leaf in ls and sup in ls
            kinds["family only"] += ls == [fam]
            kinds["super only"] += ls == [sup]
    assert min(kinds.values()) >= 50, kinds


def test_objects_of_an_image_co_occur_by_scene(spec):
    """P(two objects of one image share a scene) is far above what independent objects would give."""
    p = spec["layout"].preset
    scene_of = scene_of_family(p)
    same, pairs, per_scene = 0, 0, Counter()
    for s, im in spec["render"]:
        if s != "train":
            continue
        scenes = [scene_of[o["family"]] for o in im["objects"]]
        per_scene.update(scenes)
        for a, b in combinations(scenes, 2):
            same += a == b
            pairs += 1
    n = sum(per_scene.values())
    chance = sum((k / n) ** 2 for k in per_scene.values())  # independent objects
    assert chance < 0.3 and same / pairs > chance + 0.3, (same / pairs, chance)


def test_occlusion_exists_and_is_capped(spec):
    p = spec["layout"].preset
    shares = [x for _, im in spec["render"] for x in occluded_shares([o["box"] for o in im["objects"]])]
    assert max(shares) <= p.max_occlusion + 1e-9
    assert np.mean([x > 0.05 for x in shares]) >= 0.2  # occlusion is common, not a corner case
    for _, im in spec["render"]:
        for o in im["objects"]:
            x, y, w, h = o["box"]
            assert 0 <= x and 0 <= y and x + w <= p.image_size and y + h <= p.image_size and w >= 12 and h >= 12


def test_federated_fields_are_consistent(spec):
    layout = spec["layout"]
    for split in ("train", "val"):
        d = spec[split]
        pos, fams = defaultdict(set), defaultdict(set)
        for a in d["annotations"]:
            pos[a["image_id"]].add(a["category_id"])
        spec_imgs = [im for s, im in spec["render"] if s == split]
        for img, im in zip(d["images"], spec_imgs):
            fams[img["id"]] = {o["family"] for o in im["objects"]}
            neg, ne = set(img["neg_category_ids"]), set(img["not_exhaustive_category_ids"])
            assert not neg & pos[img["id"]] and ne <= pos[img["id"]]
            # a super-category is present (never negative) when an object of any of its families is
            assert not neg & {layout.super_cat_id(f) for f in fams[img["id"]]}
            assert not neg & {layout.parent_cat_id(f) for f in fams[img["id"]]}


def test_leaves_differ_by_texture_or_a_close_colour(spec):
    layout = spec["layout"]
    names = [leaf.name for leaf in layout.leaves]
    assert len(set(names)) == len(names)
    by_family_colour = Counter((leaf.family, leaf.colour) for leaf in layout.leaves)
    assert sum(n >= 3 for n in by_family_colour.values()) >= 6 * 12  # solid / striped / dotted of one colour
    assert len(layout.confusable) >= 6  # twin-colour pairs (red / crimson), with label swaps


def test_rendered_images_draw_later_objects_on_top(spec):
    """A handful of images: the last-drawn solid object shows its own colour over whatever it overlaps."""
    layout = spec["layout"]
    checked = 0
    for split, im in spec["render"][:12]:
        pix = render_image(layout, split, im, 0).astype(np.float64)
        assert pix.shape == (128, 128, 3)
        top = im["objects"][-1]
        leaf = layout.leaves[top["tones"][0]]
        if len(top["tones"]) == 1 and leaf.texture == "solid":
            x, y, w, h = top["box"]
            mean = pix[y : y + h, x : x + w][shape_mask(layout.family_names[top["family"]], w, h)].mean(0)
            assert np.abs(mean - np.array(leaf.rgb)).max() < 14, (leaf.name, mean)
            checked += 1
    assert checked >= 2


def test_lvis_reference_figures_are_self_consistent():
    lv = LVIS_V1_TRAIN
    assert sum(lv["buckets"].values()) == lv["categories"] == 1203
    assert lv["objects_per_image"] == round(lv["annotations"] / lv["images"], 2)
    assert lv["labels_per_object"] == 1.0 and lv["rare_instances"]["of"] <= lv["buckets"]["r"]


def test_stats_beside_lvis(spec, tmp_path, capsys):
    for name in ("train", "val", "hierarchy"):
        (tmp_path / f"{name}.json").write_text(json.dumps(spec[name]))
    stats = dataset_stats(tmp_path / "train.json")
    assert stats["labels_per_object"] > 1.1  # leaf + family / super annotations share one box
    assert stats["objects_per_image"] == pytest.approx(
        sum(len(im["objects"]) for s, im in spec["render"] if s == "train") / len(spec["train"]["images"])
    )
    assert 1 <= stats["rare_instances"]["median"] <= 10
    assert "beside LVIS v1" not in format_stats(stats)  # only when asked
    assert main(["data", "stats", str(tmp_path / "train.json"), "--vs-lvis", "--no-plots"]) == 0
    out = capsys.readouterr().out
    table = out.split("beside LVIS v1 train")[1]
    for row in ("buckets rare / common / frequent", "imbalance", "labels per object", "instances per rare class"):
        assert row in table
    assert "337 / 461 / 405" in table and "1977" in table and "12.68" in table


def test_lvislike_preset_is_registered():
    assert "lvislike" in PRESETS and PRESETS["lvislike"].workers == 0
