"""data.holdout: the validation file split by image, seeded and stratified, into a selection and a held-out part."""

import json

import numpy as np
import pytest
from test_evaluation import make_case

from lt_models.data.holdout import one_sided_classes, split_file, split_images
from lt_models.engine.run import validation_source
from lt_models.engine.spec import TrainSpec
from lt_models.errors import ConfigError


def test_every_class_with_two_images_keeps_instances_on_both_sides():
    rng = np.random.default_rng(0)
    # a long tail: class c is in an image with probability 1/(c+1); some classes have 1-3 images
    images = [{int(c) for c in np.flatnonzero(rng.random(40) < 1.0 / (np.arange(40) + 1))} for _ in range(300)]
    for fraction in (0.2, 0.5, 0.8):
        held = split_images(images, fraction, seed=0)
        counts = {}
        for classes, h in zip(images, held):
            for c in classes:
                counts.setdefault(c, [0, 0])[int(h)] += 1
        assert all(sel >= 1 and ho >= 1 for sel, ho in counts.values() if sel + ho >= 2), fraction
        assert abs(held.mean() - fraction) < 0.1
        assert np.array_equal(held, split_images(images, fraction, seed=0))  # seeded
    assert not np.array_equal(split_images(images, 0.5, 0), split_images(images, 0.5, 1))


def test_the_two_files_partition_the_images_and_keep_every_category(tmp_path):
    gt, _ = make_case(seed=1, n_img=50)
    val = tmp_path / "val.json"
    val.write_text(json.dumps(gt))
    parts = split_file(val, 0.5, seed=3, cache_dir=tmp_path / "cache")
    sel, held = (json.loads(parts[p].read_text()) for p in ("select", "heldout"))
    ids = [{im["id"] for im in d["images"]} for d in (sel, held)]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {im["id"] for im in gt["images"]}
    for d, own in zip((sel, held), ids):
        assert {a["image_id"] for a in d["annotations"]} <= own and d["categories"] == gt["categories"]
    info = json.loads((parts["select"].parent / "split.json").read_text())
    held_mask = np.array([im["id"] in ids[1] for im in gt["images"]])
    assert info["one_sided_classes"] == one_sided_classes(gt, held_mask)
    # the same file, share and seed: the same cached files
    assert split_file(val, 0.5, seed=3, cache_dir=tmp_path / "cache") == parts
    with pytest.raises(ConfigError, match="data.holdout"):
        split_file(val, 1.0, seed=3, cache_dir=tmp_path / "cache")


def test_a_run_evaluates_on_its_part(tmp_path):
    gt, _ = make_case(seed=2, n_img=30)
    val = tmp_path / "val.json"
    val.write_text(json.dumps(gt))
    common = dict(train_ann=str(val), val_ann=str(val), annotation_cache=str(tmp_path / "cache"))
    whole = validation_source(TrainSpec(**common))
    select = validation_source(TrainSpec(**common, val_holdout=0.5))
    heldout = validation_source(TrainSpec(**common, val_holdout=0.5, val_part="heldout"))
    assert whole[0] == str(val) and select[0] != heldout[0]
    assert whole[1] == select[1] == heldout[1] == str(tmp_path / "images")  # the original file's image folder
    with pytest.raises(ConfigError, match="val_part"):
        TrainSpec(**common, val_holdout=0.5, val_part="test").validate()
