"""The classifier switch (softmax stage 1 -> sigmoid-type stage 2): the closed form of the background-relative
conversion, which losses count as sigmoid-type, and that the engine converts only a stage-2 run with a sigmoid-type
loss that starts from a stage-1 checkpoint (init_checkpoint), never on resume."""

from __future__ import annotations

import math

import pytest
import torch
from test_engine import small_spec, write_tiny_benchmark  # the tiny benchmark of the engine tests
from torch import nn

from lt_models.data.sampler_spec import SamplerSpec
from lt_models.engine import loop as engine
from lt_models.engine import run as engine_run
from lt_models.losses.registry import LOSSES, LossSpec, RescoredLoss
from lt_models.modeling import classifier_switch
from lt_models.modeling.classifier_switch import (
    background_relative_classifier,
    is_sigmoid_loss,
    needs_switch,
    switch_classifier,
)
from lt_models.modeling.detector import build_detector

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMOID_TYPE = ("bce", "acsl", "eql", "eqlv2", "federated")
SOFTMAX_TYPE = ("softmax", "softmax_multihot", "concurrent_softmax", "seesaw")
C = 4
RATE = torch.zeros(C + 1, C + 1)
RATE[1, 4] = RATE[4, 1] = 0.5
INPUTS = dict(concurrent_rate=RATE, frequency=["f", "c", "r", "c"], class_freq=[0.5, 0.2, 0.05, 0.2], num_classes=C)


def _loss(name: str, scores: str = "loss") -> nn.Module:
    return LossSpec(name, scores=scores, **({"xi": 0.7} if name == "acsl" else {})).build(**INPUTS)


# ---------------------------------------------------------------------------------------------------------------
# The conversion in closed form
# ---------------------------------------------------------------------------------------------------------------
def test_background_relative_logits_in_closed_form():
    """z'_j = z_j − z_0 for every column; sigmoid(z'_j) = p_j / (p_j + p_0) under the softmax model (j ≥ 1);
    column 0 is the constant 0; the softmax scores do not change. Element by element in float64."""
    torch.manual_seed(0)
    lin = nn.Linear(6, C + 1).double()
    with torch.no_grad():
        lin.weight.mul_(5.0)
        lin.bias.uniform_(-3.0, 3.0)
    x = torch.randn(7, 6, dtype=torch.float64)
    z = lin(x).detach().tolist()
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    background_relative_classifier(lin)
    zc = lin(x).detach().tolist()
    for j in range(C + 1):
        for d in range(6):
            assert lin.weight[j, d].item() == pytest.approx(w0[j, d].item() - w0[0, d].item(), abs=1e-12)
        assert lin.bias[j].item() == pytest.approx(b0[j].item() - b0[0].item(), abs=1e-12)
    for n in range(7):
        denom = sum(math.exp(v) for v in z[n])
        p = [math.exp(v) / denom for v in z[n]]
        denom_c = sum(math.exp(v) for v in zc[n])
        assert zc[n][0] == pytest.approx(0.0, abs=1e-12)
        for j in range(C + 1):
            assert zc[n][j] == pytest.approx(z[n][j] - z[n][0], abs=1e-9)
            assert math.exp(zc[n][j]) / denom_c == pytest.approx(p[j], rel=1e-9, abs=1e-12)
            if j:
                assert 1.0 / (1.0 + math.exp(-zc[n][j])) == pytest.approx(p[j] / (p[j] + p[0]), rel=1e-9)


def test_conversion_without_bias_and_of_a_float32_layer():
    lin = nn.Linear(3, 4, bias=False)
    w0 = lin.weight.detach().clone()
    background_relative_classifier(lin)
    torch.testing.assert_close(lin.weight, w0 - w0[0:1], rtol=0, atol=1e-7)
    assert lin.weight.dtype == torch.float32 and not lin.weight.grad_fn


# ---------------------------------------------------------------------------------------------------------------
# Which losses are sigmoid-type
# ---------------------------------------------------------------------------------------------------------------
def test_every_registered_loss_is_classified():
    assert set(SIGMOID_TYPE) | set(SOFTMAX_TYPE) == set(LOSSES)


@pytest.mark.parametrize("name", SIGMOID_TYPE + SOFTMAX_TYPE)
@pytest.mark.parametrize("scores", ["loss", "softmax", "sigmoid"])
def test_sigmoid_type_is_the_training_loss_not_the_inference_scores(name, scores):
    loss = _loss(name, scores)
    assert isinstance(loss, RescoredLoss) == (scores != "loss")
    assert is_sigmoid_loss(loss, C + 1) == (name in SIGMOID_TYPE)


def test_needs_switch_only_from_a_stage1_checkpoint_with_a_sigmoid_loss(monkeypatch):
    acsl = build_detector(C, cls_loss=_loss("acsl"), image_size=64)
    softmax = build_detector(C, cls_loss=_loss("softmax"), image_size=64)
    assert needs_switch(acsl, {"stage": "stage1"})
    for model, extra in (
        (softmax, {"stage": "stage1"}),
        (acsl, {"stage": "stage2"}),
        (acsl, {"stage": "one_stage"}),
        (acsl, {}),
        (acsl, None),
    ):
        assert not needs_switch(model, extra)
    w = acsl.roi_heads.box_predictor.cls_score.weight.detach().clone()
    assert not switch_classifier(acsl, {"stage": "stage2"})
    assert torch.equal(acsl.roi_heads.box_predictor.cls_score.weight, w)
    monkeypatch.setattr(classifier_switch, "AUTO_SWITCH", False)
    assert not switch_classifier(acsl, {"stage": "stage1"})
    monkeypatch.setattr(classifier_switch, "AUTO_SWITCH", True)
    assert switch_classifier(acsl, {"stage": "stage1"})
    torch.testing.assert_close(acsl.roi_heads.box_predictor.cls_score.weight, w - w[0:1], rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# The engine: init_checkpoint yes (sigmoid-type only), resume no
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("switch_bench")
    bench = write_tiny_benchmark(root)
    m1 = engine.train(small_spec(bench, stage="stage1", epochs=1, eval_every=1), root / "s1")
    ckpt = torch.load(f"{m1['checkpoint_dir']}/checkpoint.pt", weights_only=True)["model"]
    return bench, m1["checkpoint_dir"], ckpt


@pytest.fixture
def classifier_at_start(monkeypatch):
    """The classifier weight of each run as `build_run` hands the model on (right after loading and switching)."""
    seen = []
    original = engine_run.set_decoupled

    def spy(model, mode):
        seen.append(model.roi_heads.box_predictor.cls_score.weight.detach().clone())
        return original(model, mode)

    monkeypatch.setattr(engine_run, "set_decoupled", spy)
    return seen


def _stage2(bench, loss, **kw):
    return small_spec(
        bench,
        **{
            "stage": "stage2",
            "sampler": SamplerSpec("softbalance", lam=0.7),
            "loss": loss,
            "epochs": 1,
            "eval_every": 1,
            **kw,
        },
    )


@pytest.mark.parametrize("name", ["acsl", "bce"])
def test_engine_converts_a_sigmoid_stage2_from_the_stage1_checkpoint(stage1, tmp_path, classifier_at_start, name):
    bench, ckpt_dir, w1 = stage1
    loss = LossSpec("acsl", xi=0.7) if name == "acsl" else LossSpec(name)
    engine.train(_stage2(bench, loss, decoupled="cls"), tmp_path / "s2", init_checkpoint=ckpt_dir)
    w = w1["roi_heads.box_predictor.cls_score.weight"]
    torch.testing.assert_close(classifier_at_start[-1], w - w[0:1], rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "loss",
    [LossSpec("softmax"), LossSpec("concurrent_softmax"), LossSpec("seesaw"), LossSpec("softmax", scores="sigmoid")],
)
def test_engine_leaves_a_softmax_type_stage2_alone(stage1, tmp_path, classifier_at_start, loss):
    bench, ckpt_dir, w1 = stage1
    engine.train(_stage2(bench, loss), tmp_path / "s2", init_checkpoint=ckpt_dir)
    assert torch.equal(classifier_at_start[-1], w1["roi_heads.box_predictor.cls_score.weight"])


def test_engine_does_not_convert_on_resume(stage1, tmp_path, classifier_at_start, monkeypatch):
    """A resumed run restores its own (already converted and trained) classifier and converts nothing, also when
    the caller passes the stage-1 init_checkpoint along with resume_checkpoint; a run that starts from a stage-2
    checkpoint is not converted either."""
    bench, ckpt_dir, _ = stage1
    acsl = LossSpec("acsl", xi=0.7)
    calls = []
    original = classifier_switch.background_relative_classifier
    monkeypatch.setattr(
        classifier_switch, "background_relative_classifier", lambda layer: calls.append(1) or original(layer)
    )
    first = engine.train(_stage2(bench, acsl), tmp_path / "s2", init_checkpoint=ckpt_dir)
    assert len(calls) == 1
    trained = torch.load(f"{first['checkpoint_dir']}/checkpoint.pt", weights_only=True)["model"]
    second = engine.train(
        _stage2(bench, acsl, epochs=2),
        tmp_path / "s2",
        init_checkpoint=ckpt_dir,
        resume_checkpoint=first["checkpoint_dir"],
    )
    assert len(calls) == 1 and second["epoch"] == 2  # resumed: its classifier comes from first's checkpoint
    trained = torch.load(f"{second['checkpoint_dir']}/checkpoint.pt", weights_only=True)["model"]
    engine.train(_stage2(bench, acsl), tmp_path / "from_s2", init_checkpoint=second["checkpoint_dir"])
    assert len(calls) == 1
    assert torch.equal(classifier_at_start[-1], trained["roi_heads.box_predictor.cls_score.weight"])
