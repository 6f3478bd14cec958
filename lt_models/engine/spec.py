"""The run specification: everything one training run needs, as one typed, JSON-able object.

``TrainSpec`` holds the data files, the model, the schedule and two typed parts that their owners check:
``sampler`` (``lt_models.data.samplers.SamplerSpec``: name, λ, epoch length, repeat-factor threshold) and ``loss``
(``lt_models.losses.registry.LossSpec``: name, ξ, EQL's λ). A hyperparameter's range is checked once, by the module that
owns its equation, when its spec is built; ``TrainSpec.validate`` checks only how the parts fit together.

Hybrid training schedule (concurrent-softmax paper §4.2 / §5.5; ACSL paper §4.2):
  stage 1  ``STAGE1_SAMPLER`` (non-balance: every image once per epoch, in a seeded random order) with one of
           ``STAGE1_LOSSES`` on all layers (default ``STAGE1_LOSS``: conventional softmax CE, one label per RoI;
           or concurrent softmax), trained once and shared by every trial of a sweep;
  stage 2  the stage-1 weights (model only: a fresh optimizer, LR schedule and warm-up), then the trial's sampler
           and loss, optionally decoupled (only the classifier trains, as in the official ACSL code).
"""

from __future__ import annotations

import dataclasses
import math

from lt_models.data.holdout import PARTS, check_fraction
from lt_models.data.sampler_spec import SamplerSpec
from lt_models.errors import ConfigError
from lt_models.losses.registry import LossSpec
from lt_models.modeling.backbones import BACKBONES
from lt_models.modeling.detector import DECOUPLED_MODES

STAGES = ("stage1", "stage2", "one_stage")
EVAL_METRICS = ("lvis", "openimages")  # how a run evaluates: LVIS AP, or the Open Images challenge AP@0.5
STAGE1_SAMPLER = SamplerSpec("nonbalance")
STAGE1_LOSS = LossSpec("softmax")
STAGE1_LOSSES = ("softmax", "concurrent_softmax")  # the losses a stage 1 may train with (its scores: the loss's own)


@dataclasses.dataclass
class TrainSpec:
    """Everything one training run needs (``to_dict`` / ``from_dict`` round-trip through JSON).

    Units: ``epochs``, ``lr_steps`` and ``eval_every`` are epochs; ``warmup`` is iterations. ``lr`` is the
    base learning rate for the whole batch (the papers use 0.00125 x batch size, 0.02 at batch 16).
    ``decoupled``: false | "cls" | "box_head" (stage 2 only). ``device``: "auto" | "cpu" | "cuda[:i]".
    ``num_threads``: CPU threads for torch (None keeps torch's default). ``progress``: None = only on a tty.
    ``hflip``: random horizontal flips of training images (the papers' only augmentation). ``skip_invalid``: skip
    malformed annotation records (counted) instead of raising AnnotationError. ``eval_metric``: ``lvis`` (LVIS
    AP, the default) or ``openimages`` (the Open Images challenge AP@0.5 with hierarchy expansion, needs
    ``hierarchy_file``), reported as AP. ``annotation_cache``: folder of the shared annotation stores
    (``lt_models.data.store``; None builds the dataset's arrays in memory). ``replicates``: with LVIS AP, every
    checkpoint also holds the AP, AP50, APr, APc and APf of that many bootstrap draws of the validation images
    (``lt_models.evaluation.bootstrap``; 0: none, only the matching is kept). ``val_holdout``: the share of the
    validation images held out (``lt_models.data.holdout``, split by ``holdout_seed``); the run evaluates on the
    ``val_part`` ("select": the rest, or "heldout").
    """

    train_ann: str
    val_ann: str
    train_image_dir: str | None = None
    val_image_dir: str | None = None
    hierarchy_file: str | None = None
    expand_parents: bool = False
    hierarchy_rate: float = 1.0
    skip_invalid: bool = False
    annotation_cache: str | None = None
    stage: str = "one_stage"
    backbone: str = "tiny"
    image_size: int | None = None
    weights: str | None = None
    sampler: SamplerSpec = STAGE1_SAMPLER
    loss: LossSpec = STAGE1_LOSS
    box_reg_labels: str = "primary"
    epochs: int = 12
    batch_size: int = 8
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: int = 100
    warmup_factor: float = 0.001
    lr_steps: tuple[int, ...] = (8, 11)
    lr_gamma: float = 0.1
    grad_clip: float | None = 10.0
    decoupled: str | bool = False
    eval_every: int = 1
    seed: int = 0
    num_threads: int | None = None
    device: str = "auto"
    workers: int = 0
    amp: bool = True
    hflip: bool = True
    progress: bool | None = None
    keep_checkpoints: int = 1
    eval_metric: str = "lvis"
    replicates: int = 0
    val_holdout: float | None = None
    val_part: str = "select"
    holdout_seed: int = 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_steps"] = list(d["lr_steps"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"TrainSpec: unknown field(s) {unknown}; known fields are {sorted(names)}")
        d = dict(d)
        if d.get("lr_steps") is not None:
            d["lr_steps"] = tuple(d["lr_steps"])
        if isinstance(d.get("sampler"), dict):
            d["sampler"] = SamplerSpec(**d["sampler"])
        if isinstance(d.get("loss"), dict):
            d["loss"] = LossSpec(**d["loss"])
        return cls(**d)

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field and the fix for an inconsistent spec."""
        if self.stage not in STAGES:
            raise ConfigError(f"stage = {self.stage!r}: choose one of {', '.join(STAGES)}")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone = {self.backbone!r}: choose one of {', '.join(BACKBONES)}")
        if not isinstance(self.sampler, SamplerSpec) or not isinstance(self.loss, LossSpec):
            raise ConfigError(
                "sampler and loss must be a SamplerSpec and a LossSpec (e.g. SamplerSpec('softbalance', "
                "lam=0.7), LossSpec('acsl', xi=0.7))"
            )
        if self.decoupled is True:
            self.decoupled = "cls"
        if self.decoupled not in DECOUPLED_MODES:
            raise ConfigError(f"decoupled = {self.decoupled!r}: choose false, 'cls' or 'box_head'")
        if self.stage == "stage1" and (
            self.sampler != STAGE1_SAMPLER
            or self.decoupled
            or self.loss.name not in STAGE1_LOSSES
            or self.loss != LossSpec(self.loss.name)
        ):
            raise ConfigError(
                f"stage1 of the hybrid schedule is non-balance sampling + {' or '.join(STAGE1_LOSSES)} "
                f"on all layers; got sampler = {self.sampler}, loss = {self.loss}, decoupled = "
                f"{self.decoupled!r}; use STAGE1_SAMPLER and a loss of STAGE1_LOSSES for stage 1, or "
                "stage = 'one_stage'"
            )
        if self.decoupled and self.stage != "stage2":
            raise ConfigError(
                f"decoupled = {self.decoupled!r} needs stage = 'stage2' (it freezes a trained "
                f"representation), got stage = {self.stage!r}"
            )
        if self.eval_metric not in EVAL_METRICS:
            raise ConfigError(f"eval_metric = {self.eval_metric!r}: choose one of {', '.join(EVAL_METRICS)}")
        if self.eval_metric == "openimages" and not self.hierarchy_file:
            raise ConfigError(
                "eval_metric = 'openimages' expands labels up the class hierarchy: set hierarchy_file (data.hierarchy)"
            )
        if self.val_holdout is not None:
            check_fraction(self.val_holdout)
        if self.val_part not in PARTS:
            raise ConfigError(f"val_part = {self.val_part!r}: choose one of {', '.join(PARTS)}")
        if not isinstance(self.replicates, int) or isinstance(self.replicates, bool) or self.replicates < 0:
            raise ConfigError(f"replicates = {self.replicates!r}: must be an integer >= 0 (0: no bootstrap)")
        for name in ("epochs", "batch_size", "eval_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} = {v!r}: must be a positive integer")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr = {self.lr!r}: must be a positive number")
        if self.warmup < 0 or not 0 < self.warmup_factor <= 1:
            raise ConfigError(
                f"warmup = {self.warmup!r} / warmup_factor = {self.warmup_factor!r}: need "
                "warmup >= 0 iterations and 0 < warmup_factor <= 1"
            )
        if any(not isinstance(s, int) or s < 1 for s in self.lr_steps) or list(self.lr_steps) != sorted(self.lr_steps):
            raise ConfigError(f"lr_steps = {list(self.lr_steps)!r}: need increasing epoch numbers >= 1")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip = {self.grad_clip!r}: a positive max gradient norm, or null to disable")
        if self.workers < 0:
            raise ConfigError(f"workers = {self.workers!r}: must be >= 0")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads = {self.num_threads!r}: must be >= 1 (or null for torch's default)")
