"""Stage-1 checkpoint: content-addressed key, trained once (lock + atomic rename), reused, --force-pretrain."""

import hashlib
import json
import threading

import pytest
import torch
import yaml

from pipelines.config import identity
from pipelines.config.load import load_experiment_config
from pipelines.tune import stage1 as pretrain


@pytest.fixture
def cfg_factory(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "train.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}))
    (data / "val.json").write_text("{}")
    (data / "images" / "a.png").write_bytes(b"x" * 10)

    def make(**over):
        raw = {
            "name": "p",
            "data": {"train": str(data / "train.json"), "val": str(data / "val.json")},
            "stage1": {"epochs": 2, "lr": 0.02},
            "stage2": {"epochs": 3},
            "run": {"storage_path": str(tmp_path / "store")},
        }
        for k, v in over.items():
            if "__" in k:
                sec, key = k.split("__")
                raw.setdefault(sec, {})[key] = v
            else:
                raw[k] = v
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump(raw))
        return load_experiment_config(p)

    make.data = data
    return make


@pytest.fixture
def fake_train(monkeypatch):
    calls = []

    def train_stage1_into(cfg, out_dir):
        calls.append(out_dir)
        if getattr(train_stage1_into, "fail", False):
            (out_dir / "checkpoint").mkdir()
            raise RuntimeError("boom")
        hook = getattr(train_stage1_into, "hook", None)
        if hook:
            hook()
        (out_dir / "checkpoint").mkdir()
        (out_dir / "checkpoint" / "checkpoint.pt").write_bytes(b"w")
        return {"AP": 0.25, "epoch": 2, "per_class": {"1": 0.5}}

    train_stage1_into.calls = calls
    monkeypatch.setattr(pretrain, "train_stage1_into", train_stage1_into)
    return train_stage1_into


def test_key_depends_on_stage1_config_and_data_only(cfg_factory):
    base = pretrain.stage1_key(cfg_factory())
    assert len(base) == 64 and base == pretrain.stage1_key(cfg_factory())
    assert pretrain.stage1_key(cfg_factory(stage2__lam=1.5, stage2__epochs=9)) == base  # stage 2 is irrelevant
    assert pretrain.stage1_key(cfg_factory(stage1__workers=3)) == base  # so is the loader
    assert pretrain.stage1_key(cfg_factory(stage1__lr=0.01)) != base
    assert pretrain.stage1_key(cfg_factory(model__backbone="resnet18_fpn")) != base
    assert pretrain.stage1_key(cfg_factory(seed=1)) != base
    identity._FINGERPRINTS.clear()
    (cfg_factory.data / "images" / "b.png").write_bytes(b"y")  # image list changed
    k2 = pretrain.stage1_key(cfg_factory())
    assert k2 != base
    identity._FINGERPRINTS.clear()
    (cfg_factory.data / "train.json").write_text(json.dumps({"images": [{"id": 2}]}))  # annotations changed
    assert pretrain.stage1_key(cfg_factory()) not in (base, k2)


def test_fingerprint_covers_images_below_a_coco_root(cfg_factory):
    data = cfg_factory.data
    # a flat image folder: the annotation bytes, then "\n<name>\t<size>" per image in name order (by hand)
    flat = hashlib.sha256((data / "train.json").read_bytes() + b"\na.png\t10").hexdigest()
    identity._FINGERPRINTS.clear()
    assert pretrain.dataset_fingerprint(cfg_factory()) == flat
    # a COCO root (train2017/, val2017/): the images below it count, by their path under the root
    coco = data / "coco"
    (coco / "train2017").mkdir(parents=True)
    (coco / "val2017").mkdir()
    (coco / "train2017" / "1.jpg").write_bytes(b"x" * 3)
    (coco / "val2017" / "2.jpg").write_bytes(b"x" * 4)
    identity._FINGERPRINTS.clear()
    first = pretrain.dataset_fingerprint(cfg_factory(data__image_dir=str(coco)))
    assert (
        first
        == hashlib.sha256((data / "train.json").read_bytes() + b"\ntrain2017/1.jpg\t3\nval2017/2.jpg\t4").hexdigest()
    )
    (coco / "val2017" / "2.jpg").write_bytes(b"x" * 5)  # an image below the root changed
    identity._FINGERPRINTS.clear()
    assert pretrain.dataset_fingerprint(cfg_factory(data__image_dir=str(coco))) != first


def test_trained_once_then_reused_and_forced(cfg_factory, fake_train):
    cfg = cfg_factory()
    a = pretrain.ensure_stage1(cfg, use_ray=False)
    assert a.trained and len(fake_train.calls) == 1
    assert (a.checkpoint_dir / "checkpoint.pt").is_file()
    meta = json.loads((a.path / "meta.json").read_text())
    assert meta["sha256"] == a.sha256 == a.path.name and meta["metrics"]["AP"] == 0.25
    b = pretrain.ensure_stage1(cfg_factory(stage2__lam=0.0), use_ray=False)  # another sweep, same stage 1
    assert not b.trained and b.sha256 == a.sha256 and len(fake_train.calls) == 1
    c = pretrain.ensure_stage1(cfg, use_ray=False, force=True)
    assert c.trained and c.sha256 == a.sha256 and len(fake_train.calls) == 2
    assert sorted(p.name for p in a.path.parent.iterdir()) == sorted([a.sha256, f"{a.sha256}.lock"])


def test_one_stage_config_has_no_stage1(cfg_factory, fake_train):
    assert pretrain.ensure_stage1(cfg_factory(stage1=None), use_ray=False) is None
    assert fake_train.calls == []


def test_failed_training_leaves_nothing_behind(cfg_factory, fake_train):
    cfg = cfg_factory()
    fake_train.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        pretrain.ensure_stage1(cfg, use_ray=False)
    root = pretrain.pretrain_root(cfg.run.storage_path)
    assert [p.name for p in root.iterdir()] == [f"{pretrain.stage1_key(cfg)}.lock"]
    assert pretrain.find_stage1(cfg) is None


def test_two_drivers_train_it_once(cfg_factory, fake_train):
    cfg = cfg_factory()
    second_started = threading.Event()
    results = {}

    def first_training_waits_for_second_driver():
        fake_train.hook = None  # only the first call waits
        assert second_started.wait(timeout=30)

    fake_train.hook = first_training_waits_for_second_driver

    def driver(name):
        if name == "b":
            second_started.set()
        results[name] = pretrain.ensure_stage1(cfg, use_ray=False)

    ta = threading.Thread(target=driver, args=("a",))
    ta.start()
    while not fake_train.calls:  # a holds the lock and is training
        ta.join(0.01)
    tb = threading.Thread(target=driver, args=("b",))
    tb.start()
    ta.join(30)
    tb.join(30)
    assert len(fake_train.calls) == 1
    assert results["a"].trained and not results["b"].trained
    assert results["a"].sha256 == results["b"].sha256


def test_a_corrupt_stage1_cache_is_not_trusted(cfg_factory, fake_train, caplog):
    """A truncated or edited checkpoint file no longer matches the digests in meta.json: the cache is reported in one
    line (path, expected, found) and trained again, replacing it atomically."""
    cfg = cfg_factory()
    a = pretrain.ensure_stage1(cfg, use_ray=False)
    meta = json.loads((a.path / "meta.json").read_text())
    assert meta["files"] == {"checkpoint.pt": hashlib.sha256(b"w").hexdigest()}
    assert pretrain.verify_stage1(a.path) is None
    (a.checkpoint_dir / "checkpoint.pt").write_bytes(b"")  # truncated
    problem = pretrain.verify_stage1(a.path)
    assert "checkpoint.pt is corrupt: expected sha256" in problem and "\n" not in problem
    with caplog.at_level("WARNING"):
        b = pretrain.ensure_stage1(cfg, use_ray=False)
    assert b.trained and len(fake_train.calls) == 2 and "is corrupt" in caplog.text
    assert pretrain.verify_stage1(b.path) is None and (b.checkpoint_dir / "checkpoint.pt").read_bytes() == b"w"
    (b.checkpoint_dir / "checkpoint.pt").unlink()  # a missing file
    assert "found no such file" in pretrain.verify_stage1(b.path)


def test_an_unreadable_checkpoint_is_one_clear_error(tmp_path):
    from lt_models.engine.checkpoint import load_model_weights
    from lt_models.errors import ConfigError

    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConfigError, match=r"checkpoint.pt' cannot be read .*truncated or corrupt.*--force-pretrain"):
        load_model_weights(bad, torch.nn.Linear(1, 1))
