"""The sections of an experiment config (`pipelines.config.experiment.ExperimentConfig`): data, model, the stage-1
and stage-2 schedules, evaluation, scheduler, search, report and the `ltsweep train` settings, each a pydantic model
with unknown keys forbidden. A sampler or loss field is range-checked by the module that owns its equation
(`lt_models.data.sampler_spec.check_sampler_option`, `lt_models.losses.registry.check_loss_param`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lt_models.data.holdout import check_fraction
from lt_models.data.sampler_spec import SAMPLER_OPTIONS, SAMPLERS, SamplerSpec, check_sampler_option
from lt_models.engine.spec import STAGE1_LOSSES
from lt_models.losses.registry import LOSS_PARAMS, LOSSES, SCORES, LossSpec, check_loss_param
from lt_models.modeling.backbones import BACKBONES
from pipelines.config.space import (
    LOSS_FIELDS,
    SAMPLER_FIELDS,
)
from pipelines.names import SCHEDULER_METRICS


def one_of(value: str, known, what: str) -> str:
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(known)}")
    return value


# Field defaults are given as `default=...`: type checkers (dataclass_transform) ignore a positional default and
# would take the field as required.
class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(StrictModel):
    train: Path = Field(description="training annotations (LVIS-format JSON)")
    val: Path = Field(description="validation annotations (LVIS-format JSON)")
    image_dir: Path | None = Field(default=None, description="train images; default <train dir>/images")
    val_image_dir: Path | None = Field(default=None, description="val images; default <val dir>/images")
    hierarchy: Path | None = Field(default=None, description="class hierarchy JSON (Open Images style)")
    expand_parents: bool = Field(default=False, description="also label every object with its hierarchy parents")
    hierarchy_rate: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="r_ij of leaf/parent pairs: 1.0 = a parent "
        "never suppresses its leaf (eq 5 reading), 0.0 = the paper's literal r_ij = 0",
    )
    synthetic: str | None = Field(
        default=None,
        description="if the annotation files are absent, generate this "
        "synthetic preset there first (lt_models.data.synthetic.layout.PRESETS)",
    )
    synthetic_seed: int = 0
    skip_invalid: bool = Field(
        default=False, description="skip malformed annotation records (counted) instead of stopping with an error"
    )
    holdout: float | None = Field(
        default=None,
        description="share of the validation images held out: the sweep chooses on the rest, `ltsweep confirm` "
        "reports on these (split by image, seeded, stratified; lt_models.data.holdout)",
    )
    holdout_seed: int = Field(default=0, description="the seed of the held-out split")
    test: Path | None = Field(
        default=None, description="a test file that `ltsweep confirm` reports on (the sweep never sees it)"
    )
    test_image_dir: Path | None = Field(default=None, description="test images; default <test dir>/images")
    evaluate_on: Literal["selection", "holdout"] = Field(
        default="selection",
        description="which part of the validation file runs evaluate on with data.holdout (`ltsweep confirm` "
        "sets holdout)",
    )

    @field_validator("holdout")
    @classmethod
    def _holdout_share(cls, v):
        return v if v is None else check_fraction(v)

    @model_validator(mode="after")
    def _one_independent_set(self):
        if self.holdout is not None and self.test is not None:
            raise ValueError("data.holdout and data.test both give confirmation images; set one of them")
        if self.evaluate_on == "holdout" and self.holdout is None:
            raise ValueError("data.evaluate_on = holdout needs data.holdout (the share of validation images held out)")
        return self

    @field_validator("synthetic")
    @classmethod
    def _synthetic_preset(cls, v):
        from lt_models.data.synthetic.layout import PRESETS

        return v if v is None else one_of(v, PRESETS, "synthetic preset")


class ModelConfig(StrictModel):
    backbone: str = Field(default="tiny", description="tiny (CPU), resnet18_fpn, resnet50_fpn (the papers')")
    image_size: int | None = Field(
        default=None,
        ge=32,
        description="shorter image side in pixels; null = the backbone's default (tiny: 128, resnet50_fpn: 800)",
    )
    weights: Path | None = Field(default=None, description="local backbone weights file (never downloaded)")

    _backbone_name = field_validator("backbone")(lambda v: one_of(v, BACKBONES, "backbone"))


class ScheduleConfig(StrictModel):
    """Fields shared by both stages (units as in lt_models.engine.loop.TrainSpec)."""

    epochs: int = Field(ge=1)
    batch_size: int = Field(
        default=4,
        ge=1,
        description="images per optimizer step, per worker: the total batch is "
        "resources.workers_per_trial x batch_size",
    )
    lr: float = Field(
        default=0.02,
        gt=0.0,
        description="base LR for the total batch (linear scaling, papers: 0.00125 x total batch size, 0.02 at 16)",
    )
    warmup: int = Field(default=100, ge=0, description="linear warm-up iterations")
    lr_steps: list[int] = Field(default_factory=list, description="epochs after which lr is divided by 10")
    grad_clip: float | None = Field(default=10.0, gt=0.0, description="max gradient norm; null disables clipping")
    workers: int = Field(default=0, ge=0, description="data loader worker processes")

    @model_validator(mode="after")
    def _steps_within_schedule(self):
        bad = [s for s in self.lr_steps if not 0 < s < self.epochs]
        if bad or self.lr_steps != sorted(set(self.lr_steps)):
            raise ValueError(
                f"lr_steps {self.lr_steps} must be increasing epochs strictly between 0 and epochs={self.epochs}"
            )
        return self


class Stage1Config(ScheduleConfig):
    """The shared stage of the hybrid schedule (concurrent-softmax paper §4): non-balance sampling + conventional
    softmax CE (or concurrent softmax) on all layers, trained once per (config, dataset) and restored by every
    trial."""

    epochs: int = Field(default=4, ge=1)
    loss: str = Field(default="softmax", description="softmax (conventional: one label per RoI) or concurrent_softmax")

    _loss_name = field_validator("loss")(lambda v: one_of(v, STAGE1_LOSSES, "stage-1 loss"))

    def loss_spec(self) -> LossSpec:
        return LossSpec(self.loss)


class Stage2Config(ScheduleConfig):
    """What every trial trains: a sampler + a loss, from stage 1 (or from scratch when stage1 is null). These are
    the fields a search space may vary. The sampler and loss fields are checked by the modules that own their
    equations (lt_models.data.samplers / lt_models.losses.registry); a field that the chosen sampler or loss does not
    read is an error at the experiment level."""

    epochs: int = Field(default=6, ge=1)
    lr: float = Field(default=0.01, gt=0.0)
    sampler: str = "softbalance"
    lam: float = Field(default=0.7, description="soft-balance λ >= 0 (sampler softbalance)")
    lam_schedule: tuple[tuple[int, float], ...] | None = Field(
        default=None,
        description="soft-balance λ per epoch instead of lam: [[epoch, λ], ...], λ from that epoch on (epochs count "
        "from 0; the first entry at 0), e.g. a PBT sweep's best schedule (sampler softbalance)",
    )
    samples_per_epoch: int | None = Field(
        default=None, description="images drawn per epoch by softbalance/classaware (default: the training set size)"
    )
    rfs_threshold: float | None = Field(
        default=None, description="repeat-factor threshold t (sampler repeatfactor; default 0.001)"
    )
    loss: str = "concurrent_softmax"
    scores: str = Field(
        default="loss", description="inference scores: loss (the loss's own), softmax, concurrent (eq 5) or sigmoid"
    )
    xi: float = Field(default=0.7, description="ACSL threshold ξ in (0, 1) (loss acsl)")
    eql_lambda: float | None = Field(
        default=None, description="EQL tail threshold λ in [0, 1] (loss eql; default 1.76e-3)"
    )
    seesaw_p: float | None = Field(default=None, description="Seesaw mitigation exponent p (loss seesaw; default 0.8)")
    seesaw_q: float | None = Field(
        default=None, description="Seesaw compensation exponent q (loss seesaw; default 2.0)"
    )
    eqlv2_gamma: float | None = Field(default=None, description="EQLv2 mapping steepness γ (loss eqlv2; default 12)")
    eqlv2_mu: float | None = Field(default=None, description="EQLv2 mapping centre μ (loss eqlv2; default 0.8)")
    eqlv2_alpha: float | None = Field(
        default=None, description="EQLv2 positive-weight factor α (loss eqlv2; default 4)"
    )
    fed_num_classes: int | None = Field(
        default=None, description="federated loss: classes per batch (loss federated; default 50)"
    )
    decoupled: bool | Literal["cls", "box_head"] = Field(
        default=False,
        description="true/cls = train only the classifier (ACSL's decoupled stage 2); box_head = whole box head",
    )

    _sampler_name = field_validator("sampler")(lambda v: one_of(v, SAMPLERS, "sampler"))
    _loss_name = field_validator("loss")(lambda v: one_of(v, LOSSES, "loss"))
    _scores_name = field_validator("scores")(lambda v: one_of(v, SCORES, "scores"))

    @field_validator("lam", "samples_per_epoch", "rfs_threshold", "lam_schedule")
    @classmethod
    def _sampler_option(cls, v, info):
        return v if v is None else check_sampler_option(SAMPLER_FIELDS[info.field_name], v)

    @field_validator(*LOSS_FIELDS)
    @classmethod
    def _loss_param(cls, v, info):
        return v if v is None else check_loss_param(LOSS_FIELDS[info.field_name], v)

    @field_validator("decoupled")
    @classmethod
    def _decoupled_mode(cls, v):
        return "cls" if v is True else v

    def sampler_spec(self) -> SamplerSpec:
        """The typed sampler of these values: only the options the chosen sampler reads (a λ schedule replaces λ)."""
        options = _read_by(self, SAMPLER_FIELDS, SAMPLER_OPTIONS[self.sampler])
        if "lam_schedule" in options:
            options.pop("lam", None)
        return SamplerSpec(self.sampler, **options)

    def loss_spec(self) -> LossSpec:
        """The typed loss of these values: only the hyperparameters the chosen loss reads."""
        return LossSpec(self.loss, scores=self.scores, **_read_by(self, LOSS_FIELDS, LOSS_PARAMS[self.loss]))


def _read_by(values: Stage2Config, fields: dict[str, str], reads: tuple[str, ...]) -> dict[str, Any]:
    return {
        spec: getattr(values, yaml)
        for yaml, spec in fields.items()
        if spec in reads and getattr(values, yaml) is not None
    }


class EvalConfig(StrictModel):
    every: int = Field(default=1, ge=1, description="evaluate and report to Tune every N epochs")
    metric: Literal["lvis", "openimages"] = Field(
        default="lvis",
        description="lvis = LVIS AP; openimages = the Open Images challenge AP@0.5 (hierarchy expansion, "
        "image-level labels, group-of; needs data.hierarchy), reported as AP and AP50",
    )


# what a PBT / PB2 perturbation may change (scheduler.type pbt / pb2): the sampler's λ, ACSL's ξ, the learning rate
PBT_KEYS = ("lam", "xi", "lr")
# the schedulers that evolve a population (pipelines.tune.pbt)
POPULATION_SCHEDULERS = ("pbt", "pb2")

# scheduler.time_attr -> the result key ASHA counts a trial's budget in
TIME_ATTRS = {"evaluations": "training_iteration", "iterations": "iteration", "images": "images"}


class SchedulerConfig(StrictModel):
    type: Literal["asha", "asha_configs", "fifo", "pbt", "pb2"] = Field(
        default="asha",
        description="asha = Tune's ASHA (trials judged alone); asha_configs = halving over configurations on "
        "their mean over seeds (pipelines.tune.asha); pbt = population-based training of the searched λ / ξ / lr, "
        "seed-aware with search.seeds (pipelines.tune.pbt); pb2 = the same population, explored by a Gaussian-"
        "process bandit within the searched bounds (Tune's PB2, needs scikit-learn); fifo = none",
    )
    metric: str = "AP"
    mode: Literal["max", "min"] = "max"
    time_attr: Literal["evaluations", "iterations", "images"] = Field(
        default="evaluations",
        description="ASHA's budget unit: evaluations, optimizer iterations or training images seen "
        "(equal cost for samplers with different epoch lengths)",
    )
    grace_period: int = Field(default=1, ge=1, description="budget (in time_attr units) before ASHA may stop a trial")
    reduction_factor: float = Field(default=2.0, gt=1.0)
    max_t: int | None = Field(
        default=None,
        ge=1,
        description="a full trial's budget in time_attr units; default "
        "stage2.epochs / eval.every evaluations (required for iterations / images)",
    )

    perturbation_interval: int = Field(
        default=1, ge=1, description="pbt / pb2: exploit / explore every N units of time_attr (default 1)"
    )
    quantile_fraction: float = Field(
        default=0.25, gt=0.0, le=0.5, description="pbt / pb2: the population's bottom / top share (copier / copied)"
    )
    resample_probability: float = Field(
        default=0.25, ge=0.0, le=1.0, description="pbt: chance that an explored value is drawn anew (pb2: unused)"
    )

    _metric_name = field_validator("metric")(lambda v: one_of(v, SCHEDULER_METRICS, "metric (what trials report)"))


class SearchConfig(StrictModel):
    algorithm: Literal["basic", "optuna"] = Field(
        default="basic",
        description="basic = Tune's grid/random variant generator; optuna = TPE (needs `pip install optuna`)",
    )
    num_samples: int = Field(default=1, ge=1, description="samples per grid point (basic) / trials (optuna)")
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, description="the search algorithm's random state (not the training seed)")
    seeds: list[int] | None = Field(
        default=None,
        min_length=1,
        description="training seeds: every configuration runs once per seed (its repeats); default [seed]",
    )
    configs: list[dict[str, Any]] | None = Field(
        default=None,
        min_length=1,
        description="run exactly these configurations (stage-2 values each) instead of a space; confirm writes them",
    )
    data_seeds: bool = Field(
        default=False,
        description="redraw the synthetic benchmark (data.synthetic) for every training seed: seed s trains and "
        "evaluates on the draw with data seed s, in <data dir>-data<s>/, so the spread over seeds counts the data "
        "draw too",
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"seeds {v} repeat a value; list each training seed once")
        return v


class ReportConfig(StrictModel):
    baseline: dict[str, Any] | None = Field(
        default=None,
        description="the configuration every other is compared with, "
        "paired over the same seeds, e.g. {loss: softmax, sampler: nonbalance}",
    )
    replicates: int = Field(
        default=1000,
        ge=0,
        description="bootstrap draws of the validation images behind every interval (0: the intervals count the "
        "seeds only); each trial computes them at each evaluation from its matched detections",
    )


class TrainSettings(StrictModel):
    stage: Literal["hybrid", "stage1", "stage2"] = Field(
        default="hybrid", description="`ltsweep train`: hybrid = stage 1 (cached) then stage 2; or one stage only"
    )
    init_checkpoint: Path | None = Field(default=None, description="stage2: start here instead of the stage-1 cache")


def strip_value_error(msg: str) -> str:
    return msg[len("Value error, ") :] if msg.startswith("Value error, ") else msg
