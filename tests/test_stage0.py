"""Stage 0: the balanced synthetic crops, the pretrained tiny backbone, its content-addressed cache and
`ltsweep stage0`. Tiny settings: a few seconds on 2 CPU cores."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lt_models.data.synthetic.crops import CROP_STREAM, build_crops
from lt_models.data.synthetic.layout import build_layout
from lt_models.data.synthetic.render import SPLIT_CODE
from lt_models.engine.stage0 import IMAGE_MEAN, IMAGE_STD, Stage0Spec, pretrain_backbone
from lt_models.errors import ConfigError
from lt_models.modeling.backbones import TinyBody
from lt_models.modeling.detector import build_detector
from pipelines.cli import main
from pipelines.storage import stage0_cache
from pipelines.storage.stage0_cache import Stage0CacheError, ensure_stage0, find_stage0, stage0_key

# ~1 s of training: 16 crops of each of demo's 24 classes (12 train + 4 held out), 6 epochs of batch 32
FAST = dict(preset="demo", images_per_class=16, holdout_per_class=4, epochs=6, batch_size=32, lr=0.1, num_threads=2)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(spec, weights file, metrics) of one short pretraining on demo."""
    spec = Stage0Spec(**FAST)
    out = tmp_path_factory.mktemp("stage0") / "backbone.pt"
    return spec, out, pretrain_backbone(spec, out, progress=False)


def _fake_pretrain(calls: list, delay: float = 0.0):
    """A stand-in for pretrain_backbone that writes a random TinyBody and counts its calls."""

    def fake(spec, out_path, progress=None):
        calls.append(spec.seed)
        time.sleep(delay)
        torch.save(TinyBody().state_dict(), out_path)
        return {"heldout_accuracy": 0.5, "train_accuracy": 0.6, "seconds": delay}

    return fake


# ---- the balanced crops ------------------------------------------------------------------------------------------


def test_crops_are_balanced_and_deterministic():
    a = build_crops("demo", 5, seed=0, size=48)
    n_leaves = len(build_layout("demo").leaves)
    assert a.images.shape == (n_leaves * 5, 48, 48, 3) and a.images.dtype == np.uint8
    assert set(Counter(a.labels.tolist()).values()) == {5} and a.num_classes == n_leaves
    assert np.array_equal(a.images, build_crops("demo", 5, seed=0, size=48).images)
    assert not np.array_equal(a.images, build_crops("demo", 5, seed=1, size=48).images)
    # crop i of a leaf has its own random stream: more crops per class keep the first ones
    more = build_crops("demo", 7, seed=0, size=48)
    assert np.array_equal(more.images.reshape(n_leaves, 7, -1)[:, :5], a.images.reshape(n_leaves, 5, -1))
    train, held = a.split(2)
    assert set(Counter(a.labels[train].tolist()).values()) == {3}
    assert set(Counter(a.labels[held].tolist()).values()) == {2}
    assert CROP_STREAM not in SPLIT_CODE.values()  # never the random stream of a benchmark image


def test_spec_errors_name_the_field_and_the_fix():
    for bad, field in [
        (dict(backbone="resnet18_fpn"), "backbone"),
        (dict(preset="nope"), "preset"),
        (dict(images_per_class=8, holdout_per_class=8), "holdout_per_class"),
        (dict(epochs=0), "epochs"),
        (dict(lr=-1.0), "lr"),
        (dict(image_size=16), "image_size"),
    ]:
        with pytest.raises(ConfigError, match=field):
            Stage0Spec(**bad).validate()
    assert Stage0Spec.from_dict(Stage0Spec(seed=3).to_dict()) == Stage0Spec(seed=3)


# ---- pretraining -------------------------------------------------------------------------------------------------


def test_short_pretraining_learns_the_classes(pretrained):
    spec, _, m = pretrained
    assert m["num_classes"] == 24 and m["train_images"] == 24 * 12 and m["heldout_images"] == 24 * 4
    assert m["heldout_accuracy"] > 5 * m["chance_accuracy"]  # chance is 1/24
    assert len(m["history"]) == spec.epochs and m["images_per_second"] > 0


def test_pretraining_is_deterministic_per_seed(pretrained, tmp_path):
    spec, out, _ = pretrained
    again = tmp_path / "again.pt"
    pretrain_backbone(Stage0Spec(**{**FAST, "epochs": spec.epochs}), again, progress=False)
    a, b = torch.load(out, weights_only=True), torch.load(again, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_weights_load_into_the_detector(pretrained):
    _, out, _ = pretrained
    saved = torch.load(out, weights_only=True)
    assert list(saved) == list(TinyBody().state_dict())  # exactly the body's keys: nothing else, nothing missing
    model = build_detector(num_classes=30, backbone="tiny", weights=out)
    body = model.backbone.body.state_dict()
    assert all(torch.equal(body[k], v) for k, v in saved.items())
    # the crops are normalised as the detector normalises its images
    assert list(model.transform.image_mean) == list(IMAGE_MEAN) and list(model.transform.image_std) == list(IMAGE_STD)


# ---- the cache ---------------------------------------------------------------------------------------------------


def test_the_cache_trains_once_and_retrains_for_another_spec(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(stage0_cache, "pretrain_backbone", _fake_pretrain(calls))
    spec = Stage0Spec(**FAST)
    first = ensure_stage0(spec, tmp_path)
    assert first.trained and first.weights == tmp_path.absolute() / "stage0" / first.sha256 / "backbone.pt"
    meta = json.loads((first.path / "meta.json").read_text())
    assert meta["spec"] == spec.to_dict() and meta["files"]["backbone.pt"] == stage0_cache.file_sha256(first.weights)
    second = ensure_stage0(Stage0Spec(**{**FAST, "num_threads": 1}), tmp_path)  # threads: not part of the key
    assert not second.trained and second.weights == first.weights and calls == [0]
    third = ensure_stage0(Stage0Spec(**{**FAST, "seed": 1}), tmp_path)
    assert third.trained and third.sha256 != first.sha256 and calls == [0, 1]
    assert not [p.name for p in (tmp_path / "stage0").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_two_processes_never_train_the_same_stage0_twice(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(stage0_cache, "pretrain_backbone", _fake_pretrain(calls, delay=0.5))
    spec = Stage0Spec(**FAST)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_stage0(spec, tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [0] and sorted(r.trained for r in results) == [False, True]


def test_a_corrupt_entry_is_an_error_naming_it_and_force_replaces_it(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(stage0_cache, "pretrain_backbone", _fake_pretrain(calls))
    spec = Stage0Spec(**FAST)
    entry = ensure_stage0(spec, tmp_path)
    entry.weights.write_bytes(entry.weights.read_bytes()[:-10])  # truncated
    with pytest.raises(Stage0CacheError, match=r"corrupt.*--force") as err:
        find_stage0(spec, tmp_path)
    assert str(entry.weights) in str(err.value)
    with pytest.raises(Stage0CacheError):
        ensure_stage0(spec, tmp_path)
    fixed = ensure_stage0(spec, tmp_path, force=True)
    assert fixed.trained and stage0_cache.verify_stage0(fixed.path) is None and len(calls) == 2


def test_object_storage_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="local or shared"):
        ensure_stage0(Stage0Spec(**FAST), "s3://bucket/prefix")


def test_the_key_follows_the_code(monkeypatch):
    spec = Stage0Spec(**FAST)
    before = stage0_key(spec)
    monkeypatch.setattr(stage0_cache, "code_fingerprint", lambda: "edited")
    assert stage0_key(spec) != before


# ---- `ltsweep stage0` --------------------------------------------------------------------------------------------


def test_ltsweep_stage0_end_to_end(tmp_path, capsys):
    # the command's defaults but 10 crops per class (2 train, 8 held out) and 2 epochs: a second
    argv = ["stage0", "--preset", "demo", "--storage-path", str(tmp_path), "--epochs", "2", "--images-per-class", "10"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    weights = Path(out.split("weights: ", 1)[1].splitlines()[0])
    assert weights.is_file() and weights.parent.parent == tmp_path.absolute() / "stage0"
    assert f"weights: {weights}" in out and "held-out" in out and "trained now" in out
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["weights"] == str(weights) and doc["trained"] is False and "heldout_accuracy" in doc["metrics"]
    weights.write_bytes(b"damaged")
    assert main(argv) == 1
    assert str(weights) in capsys.readouterr().err
    assert main([*argv[:-1], "5"]) == 2  # 5 crops per class, 8 of them held out: bad input
    assert "holdout_per_class" in capsys.readouterr().err
