"""Engine: LR schedule, non-finite loss, atomic checkpoints, exact resume, hybrid stage 2, predict, spec checks."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lt_models.data.datasets import LVISDetection, collate_detection
from lt_models.data.sampler_spec import SamplerSpec
from lt_models.engine import loop as engine
from lt_models.engine import run as engine_run
from lt_models.engine.build import build_lr_scheduler, build_optimizer
from lt_models.engine.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from lt_models.engine.loop import NonFiniteLossError, train, train_one_epoch
from lt_models.engine.spec import STAGE1_LOSS, STAGE1_SAMPLER, TrainSpec
from lt_models.engine.validation import evaluate, predict
from lt_models.errors import ConfigError
from lt_models.evaluation import evaluate_lvis
from lt_models.losses.registry import LossSpec, build_loss
from lt_models.modeling.detector import build_detector

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
COLOURS = {1: (220, 30, 30), 2: (30, 200, 30), 3: (40, 40, 230)}


def write_tiny_benchmark(root, n_train=8, n_val=4, seed=0):
    """A few 128 px images of coloured squares: classes 1-3 (leaves) and 4 (parent of 1, hierarchy.json); some
    class-1 squares are also annotated as the parent with the identical box (a merged multi-label object)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    cats = [
        {"id": i, "name": n, "frequency": f}
        for i, n, f in [(1, "red", "f"), (2, "green", "c"), (3, "blue", "r"), (4, "thing", "c")]
    ]
    out = {}
    ann_id = 1
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 1000)):
        images, anns = [], []
        for i in range(n):
            img_id = offset + i + 1
            arr = np.full((128, 128, 3), 128, np.uint8)
            for k in range(2):
                cls = int(rng.integers(1, 4)) if k else 1 + i % 3
                s = int(rng.integers(24, 40))
                x, y = (8 + 64 * k + int(rng.integers(0, 16)), int(rng.integers(8, 80)))
                arr[y : y + s, x : x + s] = COLOURS[cls]
                anns.append({"id": ann_id, "image_id": img_id, "category_id": cls, "bbox": [x, y, s, s], "area": s * s})
                ann_id += 1
                if cls == 1 and k == 0:
                    anns.append(
                        {"id": ann_id, "image_id": img_id, "category_id": 4, "bbox": [x, y, s, s], "area": s * s}
                    )
                    ann_id += 1
            name = f"{split}_{i}.png"
            Image.fromarray(arr).save(root / "images" / name)
            images.append(
                {
                    "id": img_id,
                    "file_name": name,
                    "width": 128,
                    "height": 128,
                    "neg_category_ids": [],
                    "not_exhaustive_category_ids": [],
                }
            )
        path = root / f"{split}.json"
        path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
        out[split] = str(path)
    hier = {
        "LabelName": "root",
        "Subcategory": [
            {"LabelName": "thing", "Subcategory": [{"LabelName": "red"}]},
            {"LabelName": "green"},
            {"LabelName": "blue"},
        ],
    }
    (root / "hierarchy.json").write_text(json.dumps(hier))
    out["hierarchy"] = str(root / "hierarchy.json")
    return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_tiny_benchmark(tmp_path_factory.mktemp("tiny_bench"))


def small_spec(bench, **kw) -> TrainSpec:
    base = dict(
        train_ann=bench["train"],
        val_ann=bench["val"],
        epochs=2,
        batch_size=4,
        lr=0.02,
        warmup=2,
        lr_steps=(1,),
        eval_every=1,
        seed=3,
        progress=False,
        num_threads=1,
        image_size=64,
    )
    base.update(kw)
    return TrainSpec(**base)


# ---------------------------------------------------------------------------------------------------------------
def test_lr_schedule_warmup_then_steps():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = build_lr_scheduler(opt, warmup=10, warmup_factor=0.001, milestones=[20, 30], gamma=0.1)
    lrs = []
    for _ in range(35):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1 * 0.001)
    assert lrs[5] == pytest.approx(0.1 * (0.001 * 0.5 + 0.5))
    assert lrs[10] == pytest.approx(0.1) and lrs[19] == pytest.approx(0.1)
    assert lrs[20] == pytest.approx(0.01) and lrs[30] == pytest.approx(0.001)


class NaNAt(torch.nn.Module):
    """A classification loss that turns NaN at its n-th call."""

    def __init__(self, inner, at):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0
        self.one_label = getattr(inner, "one_label", False)

    def forward(self, logits, targets):
        self.calls += 1
        out = self.inner(logits, targets)
        return out * float("nan") if self.calls == self.at else out

    def scores(self, logits):
        return self.inner.scores(logits)


def _batches(bench, n, start=0):
    ds = LVISDetection(bench["train"])
    return [collate_detection([ds[(start + 2 * i) % len(ds)], ds[(start + 2 * i + 1) % len(ds)]]) for i in range(n)]


def test_non_finite_loss_raises_naming_the_iteration_before_any_step(bench):
    torch.manual_seed(0)
    model = build_detector(4, image_size=64)
    model.roi_heads.cls_loss = NaNAt(model.roi_heads.cls_loss, at=2)
    opt = build_optimizer(model, lr=0.01)
    batches = _batches(bench, 3)
    train_one_epoch(model, opt, batches[:1], CPU, 0, progress=False)  # step 1 is fine
    snapshot = {k: v.clone() for k, v in model.named_parameters()}
    momentum = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters() if p in opt.state}
    with pytest.raises(NonFiniteLossError, match=r"iteration 41 \(epoch 0"):
        train_one_epoch(model, opt, batches[1:], CPU, 0, iteration=41, progress=False)
    for k, v in model.named_parameters():  # no optimizer step happened
        assert torch.equal(v, snapshot[k]), k
    for p in model.parameters():
        if p in opt.state:
            assert torch.equal(opt.state[p]["momentum_buffer"], momentum[id(p)])


def test_train_writes_no_checkpoint_from_a_non_finite_epoch(bench, tmp_path, monkeypatch):
    real_build = engine_run.build_detector

    def build_with_nan(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.roi_heads.cls_loss = NaNAt(model.roi_heads.cls_loss, at=3)  # epoch 2, first iteration
        return model

    monkeypatch.setattr(engine_run, "build_detector", build_with_nan)
    reports = []
    with pytest.raises(NonFiniteLossError, match="iteration 2 "):
        train(small_spec(bench), tmp_path, on_eval=lambda m, d: reports.append(m["epoch"]))
    assert reports == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch0001"]


@pytest.mark.parametrize("name", ["seesaw", "eqlv2"])
def test_the_loss_state_is_restored_on_resume_but_not_from_stage1(bench, tmp_path, name):
    """Seesaw's class counts and EQLv2's gradient statistics are training state: a resumed run continues them, a
    stage-2 run that starts from stage-1 weights starts them afresh."""
    torch.manual_seed(0)
    model = build_detector(4, cls_loss=build_loss(name, num_classes=4), image_size=64)
    opt = build_optimizer(model, lr=0.01)
    train_one_epoch(model, opt, _batches(bench, 2), CPU, 0, progress=False)
    state = model.roi_heads.cls_loss.state_dict()
    assert state and any(bool(v.abs().sum() > 0) for v in state.values())
    save_checkpoint(tmp_path / "c.pt", model, opt, epoch=1, iteration=2)
    fresh = build_detector(4, cls_loss=build_loss(name, num_classes=4), image_size=64)
    load_checkpoint(tmp_path / "c.pt", fresh, restore_rng=False)
    for k, v in fresh.roi_heads.cls_loss.state_dict().items():
        assert torch.equal(v, state[k]), k
    init = build_detector(4, cls_loss=build_loss(name, num_classes=4), image_size=64)
    load_model_weights(tmp_path / "c.pt", init)
    assert all(bool(v.abs().sum() == 0) for v in init.roi_heads.cls_loss.state_dict().values())
    other = build_detector(4, cls_loss=build_loss(name, num_classes=5), image_size=64)
    with pytest.raises(ConfigError, match="loss state does not fit"):
        load_checkpoint(tmp_path / "c.pt", other, restore_rng=False)


def test_save_load_reproduces_the_next_step_exactly(bench, tmp_path):
    batches = _batches(bench, 3)

    def fresh(seed):
        torch.manual_seed(seed)
        m = build_detector(4, cls_loss=build_loss("acsl", xi=0.5, frequency=["f", "c", "r", "c"]), image_size=64)
        o = build_optimizer(m, lr=0.02)
        s = build_lr_scheduler(o, warmup=2, warmup_factor=0.1, milestones=[2])
        return m, o, s

    model, opt, sched = fresh(0)
    train_one_epoch(model, opt, batches[:2], CPU, 0, scheduler=sched, grad_clip=5.0, progress=False)
    path = save_checkpoint(
        tmp_path / "ck" / "checkpoint.pt", model, opt, sched, epoch=1, iteration=2, extra={"note": "x"}
    )
    assert sorted(os.listdir(path.parent)) == ["checkpoint.pt"]  # no temp file left behind
    ref = train_one_epoch(model, opt, batches[2:], CPU, 1, scheduler=sched, grad_clip=5.0, progress=False)
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)  # different init and RNG state: the checkpoint must restore both
    model2, opt2, sched2 = fresh(7)
    state = load_checkpoint(path, model2, opt2, sched2)
    assert state == {"epoch": 1, "iteration": 2, "extra": {"note": "x"}}
    again = train_one_epoch(model2, opt2, batches[2:], CPU, 1, scheduler=sched2, grad_clip=5.0, progress=False)
    assert again["loss"] == ref["loss"]  # exactly, not approximately
    for k, v in model2.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    model = build_detector(2)
    path = save_checkpoint(tmp_path / "c.pt", model, epoch=0, iteration=0)
    good = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(engine.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, epoch=1, iteration=5)
    assert path.read_bytes() == good  # the old checkpoint is intact
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


def test_load_rejects_foreign_files(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="not an ltsweep checkpoint"):
        load_checkpoint(tmp_path / "x.pt", build_detector(2))
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", build_detector(2))


def _untrained_on_val(bench):
    """The validation set, its loader and an untrained detector (seeded)."""
    ds = LVISDetection(bench["val"], train=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_detection)
    torch.manual_seed(0)
    return ds, loader, build_detector(ds.num_classes, image_size=64)


def test_predict_returns_coco_results_in_image_coordinates(bench):
    ds, loader, model = _untrained_on_val(bench)
    dets = predict(model, loader, CPU, ds.label_to_cat_id, progress=False)
    assert dets, "an untrained detector with a 1e-4 threshold still returns detections"
    assert set(dets[0]) == {"image_id", "category_id", "bbox", "score"}
    assert {d["image_id"] for d in dets} <= set(ds.image_ids)
    assert {d["category_id"] for d in dets} <= set(ds.cat_ids)
    for d in dets:
        x, y, w, h = d["bbox"]
        assert w >= 0 and h >= 0 and x >= -0.01 and y >= -0.01 and x + w <= 128.01 and y + h <= 128.01
    per_image = {}
    for d in dets:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    assert max(per_image.values()) <= 300


def test_the_wider_validation_pass_leaves_lvis_ap_unchanged_and_feeds_ap_fixed(bench):
    # An untrained detector scores every class of every proposal above 1e-4, so 300 per image binds. LVIS AP of the
    # 1000-per-image pass (what evaluate() predicts) keeps the best 300 per image: the detector's own 300.
    ds, loader, model = _untrained_on_val(bench)
    own = predict(model, loader, CPU, ds.label_to_cat_id, progress=False)
    wide = predict(model, loader, CPU, ds.label_to_cat_id, progress=False, dets_per_image=1000)
    assert model.roi_heads.detections_per_img == 300  # restored after the pass
    per_image = np.bincount([d["image_id"] for d in wide])
    assert per_image.max() > 300 and len(wide) > len(own)
    a, b = evaluate_lvis(bench["val"], own), evaluate_lvis(bench["val"], wide)
    assert a["per_class"] == b["per_class"] and a["AP"] == b["AP"]
    res = evaluate(model, loader, ds, bench["val"], CPU, progress=False, keep_matches=True)
    assert res["AP"] == b["AP"] and "matches" in res
    for key in ("AP_fixed", "APr_fixed", "AP_pool", "APf_pool", "ECE", "ECEr", "dAP_Cls", "dAP_Miss_r"):
        assert isinstance(res[key], float), key
    assert set(res["reliability"]) == {"all", "r", "c", "f"}


def test_train_resume_matches_the_uninterrupted_run(bench, tmp_path):
    seen = []

    def on_eval(metrics, ckpt_dir):
        # the checkpoint dir is complete before on_eval runs
        assert (ckpt_dir / "checkpoint.pt").is_file() and (ckpt_dir / "metrics.json").is_file()
        seen.append(dict(metrics))

    full = train(small_spec(bench), tmp_path / "full", on_eval=on_eval)
    assert [m["epoch"] for m in seen] == [1, 2] and [m["iteration"] for m in seen] == [2, 4]
    for key in ("AP", "AP50", "APr", "APc", "APf", "loss", "epoch", "iteration", "per_class"):
        assert key in seen[-1]
    assert set(seen[-1]["per_class"]) == {1, 2, 3, 4}
    assert math.isfinite(seen[-1]["loss"]) and 0 <= seen[-1]["AP50"] <= 1
    # keep_checkpoints=1: only the newest checkpoint dir remains, no temp dirs
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["checkpoint_epoch0002"]
    assert full["checkpoint_dir"].endswith("checkpoint_epoch0002")

    half = train(small_spec(bench, epochs=1), tmp_path / "half")
    assert half["loss"] == seen[0]["loss"]
    resumed = train(small_spec(bench), tmp_path / "resumed", resume_checkpoint=half["checkpoint_dir"])
    assert resumed["loss"] == seen[1]["loss"]  # bit-identical continuation
    assert resumed["AP"] == seen[1]["AP"]
    a = torch.load(os.path.join(full["checkpoint_dir"], "checkpoint.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(resumed["checkpoint_dir"], "checkpoint.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_lam_schedule_equals_a_resume_with_the_new_lam_and_reports_lam(bench, tmp_path):
    """λ = 0 for the first epoch, then 1: the schedule's run equals a 1-epoch λ = 0 run resumed with λ = 1 (what a
    PBT exploit does: the donor's checkpoint, the new value), bit for bit; both report the λ each epoch used."""
    seen = []
    sched = SamplerSpec("softbalance", lam_schedule=[[0, 0.0], [1, 1.0]])
    kw = dict(stage="one_stage", loss=LossSpec("softmax"))
    full = train(small_spec(bench, sampler=sched, **kw), tmp_path / "sched", on_eval=lambda m, _: seen.append(m))
    assert [m["lam"] for m in seen] == [0.0, 1.0] and "xi" not in seen[-1]
    first = train(small_spec(bench, epochs=1, sampler=SamplerSpec("softbalance", lam=0.0), **kw), tmp_path / "a")
    spec = small_spec(bench, sampler=SamplerSpec("softbalance", lam=1.0), **kw)
    resumed = train(spec, tmp_path / "b", resume_checkpoint=first["checkpoint_dir"])
    assert resumed["loss"] == full["loss"] and resumed["lam"] == 1.0
    a = torch.load(os.path.join(full["checkpoint_dir"], "checkpoint.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(resumed["checkpoint_dir"], "checkpoint.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_with_a_new_lr_goes_on_at_the_same_point_of_the_schedule(bench, tmp_path):
    """What a PBT exploit that perturbed the learning rate does: the donor's checkpoint, the new base lr, the same
    point of the warm-up / step schedule (small_spec: warm-up 2 iterations, x0.1 after epoch 1 = iteration 2)."""
    first = train(small_spec(bench, epochs=1), tmp_path / "a")
    resumed = train(small_spec(bench, lr=0.05), tmp_path / "b", resume_checkpoint=first["checkpoint_dir"])
    state = torch.load(os.path.join(resumed["checkpoint_dir"], "checkpoint.pt"), weights_only=False)
    group = state["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == 0.05 and group["lr"] == pytest.approx(0.05 * 0.1)  # 4 iterations: after the step
    assert state["scheduler"]["base_lrs"] == [0.05]


def test_hybrid_stage2_restores_stage1_and_trains_only_the_classifier(bench, tmp_path):
    trial = small_spec(
        bench,
        stage="stage2",
        sampler=SamplerSpec("softbalance", lam=0.7),
        loss=LossSpec("acsl", xi=0.7),
        decoupled="cls",
        epochs=1,
        hierarchy_file=bench["hierarchy"],
    )
    s1 = small_spec(bench, stage="stage1", epochs=1, hierarchy_file=bench["hierarchy"])
    assert (s1.sampler, s1.loss, s1.decoupled) == (STAGE1_SAMPLER, STAGE1_LOSS, False)
    m1 = train(s1, tmp_path / "s1")
    m2 = train(trial, tmp_path / "s2", init_checkpoint=m1["checkpoint_dir"])
    w1 = torch.load(os.path.join(m1["checkpoint_dir"], "checkpoint.pt"), weights_only=True)["model"]
    w2 = torch.load(os.path.join(m2["checkpoint_dir"], "checkpoint.pt"), weights_only=True)["model"]
    changed = {k for k in w1 if not torch.equal(w1[k], w2[k])}
    assert changed == {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias"}
    with pytest.raises(ConfigError, match="init_checkpoint"):
        train(trial, tmp_path / "s2b")


def test_a_rerun_into_a_used_out_dir_keeps_other_runs_checkpoints(bench, tmp_path):
    """Rotation ranks this run's own checkpoints by the epoch in their run.json: a stale checkpoint_epoch0023 of an
    earlier run in the same folder neither outranks nor loses to the new ones, and the result points at a checkpoint
    that exists. Leftovers of a killed run are cleaned up first."""
    first = train(small_spec(bench, epochs=1), tmp_path)
    stale = tmp_path / "checkpoint_epoch0023"
    os.replace(first["checkpoint_dir"], stale)  # an earlier, longer run's last checkpoint
    (tmp_path / ".checkpoint_epoch0002.x1y2z3.tmp").mkdir()  # a kill in the middle of writing a checkpoint
    again = train(small_spec(bench, epochs=2), tmp_path)
    assert Path(again["checkpoint_dir"]).is_dir() and again["checkpoint_dir"].endswith("checkpoint_epoch0002")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch0002", "checkpoint_epoch0023"]
    run = json.loads((Path(again["checkpoint_dir"]) / "run.json").read_text())
    assert run["epoch"] == 2 and run["run_id"] != json.loads((stale / "run.json").read_text())["run_id"]


def test_evaluation_buckets_classes_by_training_frequency(bench, tmp_path, monkeypatch):
    """A validation file whose own `frequency` fields disagree with training: the engine still evaluates with the
    training set's r/c/f buckets (as LVIS does)."""
    from lt_models.engine import validation as evaluation  # where the engine looks the evaluator up

    val = json.loads(open(bench["val"]).read())
    for c in val["categories"]:
        c["frequency"] = "f"
    val_path = tmp_path / "val_all_frequent.json"
    val_path.write_text(json.dumps(val))
    seen = []
    real = evaluation.evaluate_lvis
    monkeypatch.setattr(
        evaluation,
        "evaluate_lvis",
        lambda gt, dets, frequency=None, **kw: seen.append(frequency) or real(gt, dets, frequency=frequency, **kw),
    )
    train(
        small_spec(bench, epochs=1, val_ann=str(val_path), val_image_dir=str(Path(bench["val"]).parent / "images")),
        tmp_path / "run",
    )
    train_ds = LVISDetection(bench["train"])
    assert seen == [dict(zip(train_ds.cat_ids, train_ds.frequency))]
    assert set(train_ds.frequency) != {"f"}  # the training buckets really differ from the file's


def test_concurrent_softmax_trains_with_the_rate_matrix_from_the_annotations(bench, tmp_path):
    spec = small_spec(
        bench,
        loss=LossSpec("concurrent_softmax"),
        sampler=SamplerSpec("softbalance", lam=0.5),
        epochs=1,
        hierarchy_file=bench["hierarchy"],
    )
    metrics = train(spec, tmp_path)
    assert math.isfinite(metrics["loss"]) and metrics["iteration"] == 2


def test_spec_validation_names_the_field():
    spec = TrainSpec(train_ann="t.json", val_ann="v.json")
    with pytest.raises(ConfigError, match="stage1"):
        dataclasses.replace(spec, stage="stage1", loss=LossSpec("acsl", xi=0.7)).validate()
    with pytest.raises(ConfigError, match="SamplerSpec"):
        dataclasses.replace(spec, sampler="softbalance").validate()
    with pytest.raises(ConfigError, match="decoupled"):
        dataclasses.replace(spec, decoupled="cls").validate()
    with pytest.raises(ConfigError, match="lr_steps"):
        dataclasses.replace(spec, lr_steps=(5, 2)).validate()
    with pytest.raises(ConfigError, match="backbone"):
        dataclasses.replace(spec, backbone="resnet9").validate()
    with pytest.raises(ConfigError, match="unknown field"):
        TrainSpec.from_dict({"train_ann": "a", "val_ann": "b", "learning_rate": 1})
    assert TrainSpec.from_dict(spec.to_dict()) == spec
    typed = dataclasses.replace(
        spec, sampler=SamplerSpec("softbalance", lam=0.7, num_samples=8), loss=LossSpec("acsl", xi=0.3)
    )
    assert TrainSpec.from_dict(json.loads(json.dumps(typed.to_dict()))) == typed


def test_evaluate_checkpoint_reproduces_the_run_and_rescores_without_retraining(bench, tmp_path):
    """evaluate_checkpoint: the run's own scores give its reported AP (same images, training buckets); another
    scores rule (Table 2 of the concurrent-softmax paper) changes the detections' scores but not the weights; the
    Open Images AP@0.5 comes from the same single prediction pass."""
    from lt_models.engine.reevaluate import evaluate_checkpoint

    spec = small_spec(bench, epochs=1, loss=LossSpec("concurrent_softmax"), hierarchy_file=bench["hierarchy"])
    run = train(spec, tmp_path / "cs")
    again = evaluate_checkpoint(run["checkpoint_dir"], metrics=("lvis", "openimages"))
    for key in ("AP", "AP50", "APr", "APc", "APf"):
        assert again["lvis"][key] == run[key], key
    assert again["lvis"]["matches"].n_images == 4 and 0 <= again["openimages"]["AP"] <= 1
    softmax = evaluate_checkpoint(run["checkpoint_dir"], scores="softmax")["lvis"]
    assert softmax["per_class"] != again["lvis"]["per_class"]  # eq 5 vs softmax: other scores, other ranking
    with pytest.raises(ConfigError, match="metrics"):
        evaluate_checkpoint(run["checkpoint_dir"], metrics=("coco",))
    with pytest.raises(ConfigError, match="scores"):
        evaluate_checkpoint(run["checkpoint_dir"], scores="argmax")
