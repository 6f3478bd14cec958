"""The runs of the fidelity benchmark: every arm of every study, its schedule and how it is evaluated.

One seed trains every arm below; the same seed means the same stage 1 for its stage-2 arms and the same sampler
draws. Unless an arm says ``init="scratch"``, the backbone starts from stage 0 (the balanced synthetic
classification pretraining, the CPU stand-in for the papers' ImageNet weights).

Protocols (epochs are those of ``Schedule``):
  one-stage (concurrent-softmax paper §5.2: one training run, lr x0.1 for the last epoch) ``os_*``
  hybrid (§5.5): ``stage1`` non-balance + conventional softmax, then stage 2 on all layers from its weights
      (a fresh lr and warm-up, as the paper's stage 2 is a 1x schedule) ``s2_*``
  decoupled (ACSL paper §4.2, official code: only the classifier trains, from the softmax stage 1) ``cls_*``
Ablation arms test the causes stated for the findings that do not hold: a stage 2 that keeps stage 1's final lr
(no restart), a stage 1 twice as long (closer to convergence) with a one-stage run of the same total length, the
hybrid and one-stage runs from scratch, and for Tables 1-3 class-aware softmax and concurrent-softmax runs as long as
the long λ = 0.7 run (the paper's mechanisms, over-sampling overfitting the rare classes and the suppression of
concurrent labels, act on a trained classifier; the 5-epoch schedule is far from converged).

``rescore``: inference scores evaluated besides the loss's own, without retraining (Table 2 crosses training loss x
test scores; Table 1's concurrent-softmax rows are the concurrent-softmax-trained model scored by softmax).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lt_models.data.sampler_spec import SamplerSpec
from lt_models.engine.spec import STAGE1_SAMPLER, TrainSpec
from lt_models.losses.registry import LossSpec

LAMBDAS = (0.0, 0.3, 0.5, 0.7, 1.0, 1.5)  # Table 3's curve (λ = 1: class-aware)
INTERIOR = (0.3, 0.5, 0.7)
XIS = (0.1, 0.3, 0.5, 0.7, 0.9)  # ACSL paper Table 2's ξ (0.01 left out)
HYBRID_LAM = 0.7
REPLICATES = 1000


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Epochs and image size of the benchmark (the one-stage runs train stage 1 + stage 2 epochs)."""

    s1: int
    s2: int
    cls: int
    image_size: int = 128
    batch_size: int = 8
    lr: float = 0.02

    @property
    def os(self) -> int:
        return self.s1 + self.s2


FULL = Schedule(s1=3, s2=2, cls=2)  # the schedule of results/fidelity.json (over 2.5 h: docs/evidence.md)
QUICK = Schedule(s1=1, s2=1, cls=1, image_size=64)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One run per seed. ``epochs``: a key of :func:`epochs_of`; ``parent``: the stage-1 arm a stage 2 starts from."""

    name: str
    stage: str
    sampler: SamplerSpec
    loss: LossSpec
    epochs: str
    parent: str | None = None
    init: str = "stage0"
    decoupled: str | bool = False
    restart: bool = True
    rescore: tuple[str, ...] = ()


def _sb(lam: float) -> SamplerSpec:
    return SamplerSpec("softbalance", lam=lam)


NB = SamplerSpec("nonbalance")
SOFTMAX, CS = LossSpec("softmax"), LossSpec("concurrent_softmax")


def arms() -> dict[str, Arm]:
    """Every arm, stage-1 arms first (their children wait for them)."""
    out = [
        Arm("stage1", "stage1", STAGE1_SAMPLER, SOFTMAX, "s1"),
        Arm("stage1_long", "stage1", STAGE1_SAMPLER, SOFTMAX, "s1_long"),
        Arm("stage1_scratch", "stage1", STAGE1_SAMPLER, SOFTMAX, "s1", init="scratch"),
        # one-stage: Tables 1-3
        Arm("os_softmax_nb", "one_stage", NB, SOFTMAX, "os"),
        Arm("os_cs_nb", "one_stage", NB, CS, "os", rescore=("softmax",)),
        Arm("os_cs_l1.0", "one_stage", _sb(1.0), CS, "os", rescore=("softmax",)),
        Arm("os_multihot_l1.0", "one_stage", _sb(1.0), LossSpec("softmax_multihot"), "os"),
        Arm("os_bce_l1.0", "one_stage", _sb(1.0), LossSpec("bce"), "os"),
    ]
    for lam in LAMBDAS:
        rescore = ("concurrent",) if lam == 1.0 else ()
        out.append(Arm(f"os_softmax_l{lam}", "one_stage", _sb(lam), SOFTMAX, "os", rescore=rescore))
    # hybrid: Table 3 in stage 2, Table 4
    out.append(Arm("s2_softmax_nb", "stage2", NB, SOFTMAX, "s2", parent="stage1"))
    out += [Arm(f"s2_softmax_l{lam}", "stage2", _sb(lam), SOFTMAX, "s2", parent="stage1") for lam in LAMBDAS]
    # decoupled classifier: ACSL paper Table 2
    out += [
        Arm(f"cls_acsl_{xi}", "stage2", NB, LossSpec("acsl", xi=xi), "cls", "stage1", decoupled="cls") for xi in XIS
    ]
    out += [Arm(f"cls_{n}", "stage2", NB, LossSpec(n), "cls", "stage1", decoupled="cls") for n in ("softmax", "bce")]
    # ablations of the hybrid's stated causes
    h = _sb(HYBRID_LAM)
    out += [
        Arm(f"s2_softmax_l{HYBRID_LAM}_norestart", "stage2", h, SOFTMAX, "s2", parent="stage1", restart=False),
        Arm(f"s2long_softmax_l{HYBRID_LAM}", "stage2", h, SOFTMAX, "s2", parent="stage1_long"),
        Arm(f"os_softmax_l{HYBRID_LAM}_long", "one_stage", h, SOFTMAX, "os_long"),
        Arm(f"s2scratch_softmax_l{HYBRID_LAM}", "stage2", h, SOFTMAX, "s2", parent="stage1_scratch", init="scratch"),
        Arm(f"os_softmax_l{HYBRID_LAM}_scratch", "one_stage", h, SOFTMAX, "os", init="scratch"),
    ]
    # ablations of Tables 1-3's stated cause (a short schedule): class-aware runs as long as os_softmax_l0.7_long
    out += [
        Arm("os_softmax_l1.0_long", "one_stage", _sb(1.0), SOFTMAX, "os_long"),
        Arm("os_cs_l1.0_long", "one_stage", _sb(1.0), CS, "os_long", rescore=("softmax",)),
    ]
    return {a.name: a for a in out}


def epochs_of(key: str, sched: Schedule) -> int:
    return {
        "s1": sched.s1,
        "s1_long": 2 * sched.s1,
        "s2": sched.s2,
        "cls": sched.cls,
        "os": sched.os,
        "os_long": 2 * sched.s1 + sched.s2,
    }[key]


def make_spec(arm: Arm, seed: int, data: Path, sched: Schedule, weights: str | None, device: str) -> TrainSpec:
    """The TrainSpec of ``arm`` for ``seed`` on the benchmark in ``data`` (``weights``: the stage-0 file)."""
    epochs = epochs_of(arm.epochs, sched)
    if arm.restart:  # a fresh lr with warm-up, x0.1 for the last epoch (none in a one-epoch run)
        hp = dict(lr=sched.lr, warmup=50 if arm.stage != "stage2" else 20, lr_steps=(epochs - 1,) if epochs > 1 else ())
    else:  # stage 1's final lr, no warm-up, no drop: training simply continues
        hp = dict(lr=sched.lr * 0.1, warmup=0, lr_steps=())
    return TrainSpec(
        train_ann=str(data / "train.json"),
        val_ann=str(data / "val.json"),
        train_image_dir=str(data / "images"),
        val_image_dir=str(data / "images"),
        hierarchy_file=str(data / "hierarchy.json"),
        stage=arm.stage,
        backbone="tiny",
        image_size=sched.image_size,
        weights=weights if arm.init == "stage0" else None,
        sampler=arm.sampler,
        loss=arm.loss,
        decoupled=arm.decoupled,
        batch_size=sched.batch_size,
        epochs=epochs,
        eval_every=epochs,
        seed=seed,
        num_threads=1,
        device=device,
        progress=False,
        keep_checkpoints=1,
        replicates=0 if arm.stage == "stage1" else REPLICATES,
        **hp,
    )
