"""The experiment config: one YAML file describes a whole sweep (or one `ltsweep train` run).

pydantic models with unknown keys forbidden; `pipelines.config.load` reads the YAML into them and reports every
problem as one line naming the file, the key path and the fix. Layout (every section but `name`/`data` has
defaults; see search_spaces/*.yaml):

    name: demo                      # sweep name: Tune run dir and MLflow experiment
    seed: 0
    data: {train, val, image_dir, val_image_dir, hierarchy, expand_parents, hierarchy_rate, synthetic, ...}
    model: {backbone, image_size, weights}
    stage1: {epochs, batch_size, lr, warmup, lr_steps, grad_clip, workers, loss}   # null: one-stage trials
    stage2: {... same fields ..., sampler, lam, samples_per_epoch, rfs_threshold,
             loss, scores, xi, eql_lambda, seesaw_p, seesaw_q, eqlv2_gamma, eqlv2_mu, eqlv2_alpha,
             fed_num_classes, decoupled}                                      # what every trial trains
    eval: {every, metric}           # evaluate (and report to Tune) every N epochs; metric: lvis | openimages
    resources: {cpus_per_trial, gpus_per_trial, workers_per_trial, cpus_per_worker, gpus_per_worker, custom}
                                    # pipelines.config.resources; custom: {ray_resource: amount}
    scheduler: {type: asha|asha_configs|fifo, metric, mode, time_attr, grace_period, reduction_factor, max_t}
    search: {algorithm: basic|optuna, num_samples, max_concurrent_trials, seed, seeds}
    space: {lam: {grid: [...]}, xi: {uniform: [lo, hi]}, loss: {choice: [...]}, ...}   # stage-2 fields
    run: {storage_path, tracking_uri, max_failures, checkpoints_to_keep, ray_num_cpus}
    train: {stage: hybrid|stage1|stage2, init_checkpoint}   # only used by `ltsweep train`
    report: {baseline}              # the configuration every other is compared with (paired over seeds)

Sampler fields (lam, samples_per_epoch, rfs_threshold) and loss fields (xi, eql_lambda, seesaw_*, eqlv2_*,
fed_num_classes) are read only by some samplers / losses: the space samples them only for those (pipelines.config.space),
and setting one that no trial reads is an error.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lt_models.modeling.detector import BACKBONES
from lt_models.errors import ConfigError
from lt_models.losses.registry import LOSS_PARAMS, LOSSES, SCORES, LossSpec, check_loss_param, loss_inputs
from lt_models.engine.spec import STAGE1_LOSSES
from lt_models.data.samplers import SAMPLER_OPTIONS, SAMPLERS, SamplerSpec, check_sampler_option
from pipelines.config.run_settings import RunSettings
from pipelines.config.resources import ResourcesConfig
from pipelines.names import SCHEDULER_METRICS
from pipelines.config.space import (CONFIGURATION_KEY, LOSS_FIELDS, SAMPLER_FIELDS, SpaceParam, is_read, owner_of, readers,
                             trial_values, tune_param_space)


def _one_of(value: str, known, what: str) -> str:
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(known)}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    train: Path = Field(description="training annotations (LVIS-format JSON)")
    val: Path = Field(description="validation annotations (LVIS-format JSON)")
    image_dir: Optional[Path] = Field(None, description="train images; default <train dir>/images")
    val_image_dir: Optional[Path] = Field(None, description="val images; default <val dir>/images")
    hierarchy: Optional[Path] = Field(None, description="class hierarchy JSON (Open Images style)")
    expand_parents: bool = Field(False, description="also label every object with its hierarchy parents")
    hierarchy_rate: float = Field(1.0, ge=0.0, le=1.0, description="r_ij of leaf/parent pairs: 1.0 = a parent "
                                  "never suppresses its leaf (eq 5 reading), 0.0 = the paper's literal r_ij = 0")
    synthetic: Optional[str] = Field(None, description="if the annotation files are absent, generate this "
                                     "synthetic preset there first (lt_models.data.synthetic.layout.PRESETS)")
    synthetic_seed: int = 0
    skip_invalid: bool = Field(False, description="skip malformed annotation records (counted) instead of stopping "
                                                  "with an error")


    @field_validator("synthetic")
    @classmethod
    def _synthetic_preset(cls, v):
        from lt_models.data.synthetic.layout import PRESETS

        return v if v is None else _one_of(v, PRESETS, "synthetic preset")


class ModelConfig(_Strict):
    backbone: str = Field("tiny", description="tiny (CPU), resnet18_fpn, resnet50_fpn (the papers')")
    image_size: Optional[int] = Field(None, ge=32, description="shorter image side in pixels; null = the "
                                      "backbone's default (tiny: 128, resnet50_fpn: 800)")
    weights: Optional[Path] = Field(None, description="local backbone weights file (never downloaded)")

    _backbone_name = field_validator("backbone")(lambda v: _one_of(v, BACKBONES, "backbone"))


class ScheduleConfig(_Strict):
    """Fields shared by both stages (units as in lt_models.engine.loop.TrainSpec)."""

    epochs: int = Field(ge=1)
    batch_size: int = Field(4, ge=1, description="images per optimizer step, per worker: the total batch is "
                            "resources.workers_per_trial x batch_size")
    lr: float = Field(0.02, gt=0.0, description="base LR for the total batch (linear scaling, papers: 0.00125 x total "
                      "batch size, 0.02 at 16)")
    warmup: int = Field(100, ge=0, description="linear warm-up iterations")
    lr_steps: list[int] = Field(default_factory=list, description="epochs after which lr is divided by 10")
    grad_clip: Optional[float] = Field(10.0, gt=0.0, description="max gradient norm; null disables clipping")
    workers: int = Field(0, ge=0, description="data loader worker processes")

    @model_validator(mode="after")
    def _steps_within_schedule(self):
        bad = [s for s in self.lr_steps if not 0 < s < self.epochs]
        if bad or self.lr_steps != sorted(set(self.lr_steps)):
            raise ValueError(f"lr_steps {self.lr_steps} must be increasing epochs strictly between 0 and "
                             f"epochs={self.epochs}")
        return self


class Stage1Config(ScheduleConfig):
    """The shared stage of the hybrid schedule (concurrent-softmax paper §4): non-balance sampling + conventional
    softmax CE (or concurrent softmax) on all layers, trained once per (config, dataset) and restored by every
    trial."""

    epochs: int = Field(4, ge=1)
    loss: str = Field("softmax", description="softmax (conventional: one label per RoI) or concurrent_softmax")

    _loss_name = field_validator("loss")(lambda v: _one_of(v, STAGE1_LOSSES, "stage-1 loss"))

    def loss_spec(self) -> LossSpec:
        return LossSpec(self.loss)


class Stage2Config(ScheduleConfig):
    """What every trial trains: a sampler + a loss, from stage 1 (or from scratch when stage1 is null). These are
    the fields a search space may vary. The sampler and loss fields are checked by the modules that own their
    equations (lt_models.data.samplers / lt_models.losses.registry); a field that the chosen sampler or loss does not read is an
    error at the experiment level."""

    epochs: int = Field(6, ge=1)
    lr: float = Field(0.01, gt=0.0)
    sampler: str = "softbalance"
    lam: float = Field(0.7, description="soft-balance λ >= 0 (sampler softbalance)")
    samples_per_epoch: Optional[int] = Field(
        None, description="images drawn per epoch by softbalance/classaware (default: the training set size)")
    rfs_threshold: Optional[float] = Field(None, description="repeat-factor threshold t (sampler repeatfactor; "
                                           "default 0.001)")
    loss: str = "concurrent_softmax"
    scores: str = Field("loss", description="inference scores: loss (the loss's own), softmax, concurrent (eq 5) "
                        "or sigmoid")
    xi: float = Field(0.7, description="ACSL threshold ξ in (0, 1) (loss acsl)")
    eql_lambda: Optional[float] = Field(None, description="EQL tail threshold λ in [0, 1] (loss eql; default "
                                        "1.76e-3)")
    seesaw_p: Optional[float] = Field(None, description="Seesaw mitigation exponent p (loss seesaw; default 0.8)")
    seesaw_q: Optional[float] = Field(None, description="Seesaw compensation exponent q (loss seesaw; default 2.0)")
    eqlv2_gamma: Optional[float] = Field(None, description="EQLv2 mapping steepness γ (loss eqlv2; default 12)")
    eqlv2_mu: Optional[float] = Field(None, description="EQLv2 mapping centre μ (loss eqlv2; default 0.8)")
    eqlv2_alpha: Optional[float] = Field(None, description="EQLv2 positive-weight factor α (loss eqlv2; default 4)")
    fed_num_classes: Optional[int] = Field(None, description="federated loss: classes per batch (loss federated; "
                                           "default 50)")
    decoupled: Union[bool, Literal["cls", "box_head"]] = Field(
        False, description="true/cls = train only the classifier (ACSL's decoupled stage 2); box_head = whole box head")

    _sampler_name = field_validator("sampler")(lambda v: _one_of(v, SAMPLERS, "sampler"))
    _loss_name = field_validator("loss")(lambda v: _one_of(v, LOSSES, "loss"))
    _scores_name = field_validator("scores")(lambda v: _one_of(v, SCORES, "scores"))

    @field_validator("lam", "samples_per_epoch", "rfs_threshold")
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
        """The typed sampler of these values: only the options the chosen sampler reads."""
        return SamplerSpec(self.sampler, **_read_by(self, SAMPLER_FIELDS, SAMPLER_OPTIONS[self.sampler]))

    def loss_spec(self) -> LossSpec:
        """The typed loss of these values: only the hyperparameters the chosen loss reads."""
        return LossSpec(self.loss, scores=self.scores, **_read_by(self, LOSS_FIELDS, LOSS_PARAMS[self.loss]))


def _read_by(values: Stage2Config, fields: dict[str, str], reads: tuple[str, ...]) -> dict[str, Any]:
    return {spec: getattr(values, yaml) for yaml, spec in fields.items()
            if spec in reads and getattr(values, yaml) is not None}


class EvalConfig(_Strict):
    every: int = Field(1, ge=1, description="evaluate and report to Tune every N epochs")
    metric: Literal["lvis", "openimages"] = Field(
        "lvis", description="lvis = LVIS AP; openimages = the Open Images challenge AP@0.5 (hierarchy expansion, "
                            "image-level labels, group-of; needs data.hierarchy), reported as AP and AP50")


# scheduler.time_attr -> the result key ASHA counts a trial's budget in
TIME_ATTRS = {"evaluations": "training_iteration", "iterations": "iteration", "images": "images"}


class SchedulerConfig(_Strict):
    type: Literal["asha", "asha_configs", "fifo"] = Field("asha", description="asha = Tune's ASHA (trials judged "
        "alone); asha_configs = halving over configurations on their mean over seeds (pipelines.tune.asha); fifo = none")
    metric: str = "AP"
    mode: Literal["max", "min"] = "max"
    time_attr: Literal["evaluations", "iterations", "images"] = Field(
        "evaluations", description="ASHA's budget unit: evaluations, optimizer iterations or training images seen "
                                   "(equal cost for samplers with different epoch lengths)")
    grace_period: int = Field(1, ge=1, description="budget (in time_attr units) before ASHA may stop a trial")
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: Optional[int] = Field(None, ge=1, description="a full trial's budget in time_attr units; default "
                                 "stage2.epochs / eval.every evaluations (required for iterations / images)")

    _metric_name = field_validator("metric")(lambda v: _one_of(v, SCHEDULER_METRICS, "metric (what trials report)"))


class SearchConfig(_Strict):
    algorithm: Literal["basic", "optuna"] = Field(
        "basic", description="basic = Tune's grid/random variant generator; optuna = TPE (needs `pip install optuna`)")
    num_samples: int = Field(1, ge=1, description="samples per grid point (basic) / trials (optuna)")
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = Field(None, description="the search algorithm's random state (not the training seed)")
    seeds: Optional[list[int]] = Field(None, min_length=1, description="training seeds: every configuration runs "
                                       "once per seed (its repeats); default [seed]")
    configs: Optional[list[dict[str, Any]]] = Field(None, min_length=1, description="run exactly these configurations "
                                                    "(stage-2 values each) instead of a space; confirm writes them")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"seeds {v} repeat a value; list each training seed once")
        return v


class ReportConfig(_Strict):
    baseline: Optional[dict[str, Any]] = Field(None, description="the configuration every other is compared with, "
                                               "paired over the same seeds, e.g. {loss: softmax, sampler: nonbalance}")


class TrainSettings(_Strict):
    stage: Literal["hybrid", "stage1", "stage2"] = Field(
        "hybrid", description="`ltsweep train`: hybrid = stage 1 (cached) then stage 2; or one stage only")
    init_checkpoint: Optional[Path] = Field(None, description="stage2: start here instead of the stage-1 cache")


# stage-2 fields a search space may vary (epochs would break ASHA's max_t; workers is not a hyperparameter)
SEARCHABLE = tuple(f for f in Stage2Config.model_fields if f not in ("epochs", "workers", "samples_per_epoch"))


class ExperimentConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    seed: int = 0
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    stage1: Optional[Stage1Config] = Field(default_factory=Stage1Config)
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    space: dict[str, SpaceParam] = Field(default_factory=dict)
    run: RunSettings = Field(default_factory=RunSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _seeds_and_baseline(self):
        if self.search.algorithm == "optuna" and len(self.seeds) > 1:
            raise ValueError("search.seeds: repeats need search.algorithm basic (Optuna samples each configuration "
                             "once); use basic, or run `ltsweep confirm` on the Optuna sweep's best configurations")
        for key, value in (self.report.baseline or {}).items():
            if key not in SEARCHABLE:
                raise ValueError(f"report.baseline.{key}: not a stage-2 field; the baseline names searched values, "
                                 f"e.g. {{loss: softmax, sampler: nonbalance}}")
            self._check_stage2({key: value}, f"report.baseline.{key} = {value!r}")
        return self

    def _check_stage2(self, values: dict[str, Any], where: str) -> None:
        """ValueError naming ``where`` unless stage2 with these values passes every field's check (the owners'
        range checks for λ, ξ, ...; known loss / sampler names)."""
        try:
            Stage2Config.model_validate({**self.stage2.model_dump(), **values})
        except ValidationError as exc:
            msg = "; ".join(strip_value_error(e["msg"]) for e in exc.errors())
            raise ValueError(f"{where}: {msg}") from None

    @model_validator(mode="after")
    def _space_is_valid(self):
        # Each searched key must be a stage-2 field, and each value a trial can get must pass that field's checks
        # (the owners' range checks for λ, ξ, ...; known loss / sampler names).
        if self.search.configs is not None:
            if self.space:
                raise ValueError("search.configs lists the configurations to run: leave space empty")
            for i, values in enumerate(self.search.configs):
                bad = sorted(set(values) - set(SEARCHABLE))
                if bad:
                    raise ValueError(f"search.configs[{i}]: {bad} are not searchable stage-2 fields")
                self._check_stage2(values, f"search.configs[{i}] = {values}")
        for key, param in self.space.items():
            if key not in SEARCHABLE:
                hint = difflib.get_close_matches(key, SEARCHABLE, n=1)
                raise ValueError(
                    f"space.{key}: not a searchable stage-2 field"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; searchable: {', '.join(SEARCHABLE)}")
            for i, value in enumerate(param.values_to_check()):
                self._check_stage2({key: value}, f"space.{key}.{param.kind}[{i}] = {value!r}")
        return self

    @model_validator(mode="after")
    def _metric_has_its_inputs(self):
        if self.eval.metric == "openimages" and self.data.hierarchy is None:
            raise ValueError("eval.metric openimages expands labels up the class hierarchy: set data.hierarchy (the "
                             "Open Images hierarchy JSON)")
        return self

    @model_validator(mode="after")
    def _scheduler_fits(self):
        sch = self.scheduler
        if sch.type == "asha_configs" and self.search.algorithm != "basic":
            raise ValueError("scheduler.type asha_configs pauses trials at rungs until the whole grid has reported "
                             "there, which needs search.algorithm: basic; with optuna use scheduler.type: asha")
        if sch.type != "fifo" and sch.time_attr != "evaluations":
            if sch.max_t is None:
                raise ValueError(f"scheduler.max_t is required with time_attr {sch.time_attr}: the {sch.time_attr} "
                                 "of a full-length trial (e.g. stage2.epochs x samples_per_epoch images); set it so "
                                 "that the trial with the longest epochs still fits")
            if sch.grace_period > sch.max_t:
                raise ValueError(f"scheduler.grace_period = {sch.grace_period} exceeds max_t = {sch.max_t} "
                                 f"({sch.time_attr}); lower grace_period")
            return self
        if sch.type != "fifo" and sch.grace_period > self.evals_per_trial:
            raise ValueError(f"scheduler.grace_period = {self.scheduler.grace_period} exceeds the evaluations per "
                             f"trial ({self.evals_per_trial} = scheduler.max_t or stage2.epochs / eval.every); "
                             "lower grace_period")
        return self

    # ---- derived values -------------------------------------------------------------------------------------
    @property
    def evals_per_trial(self) -> int:
        """How many times a full-length trial reports (ASHA's max_t when it counts evaluations)."""
        if self.scheduler.time_attr == "evaluations" and self.scheduler.max_t:
            return self.scheduler.max_t
        return math.ceil(self.stage2.epochs / self.eval.every)

    @property
    def seeds(self) -> list[int]:
        """The training seeds: each configuration runs once per seed (`search.seeds`, default [seed])."""
        return list(self.search.seeds) if self.search.seeds else [self.seed]

    def with_seed(self, seed: int) -> "ExperimentConfig":
        """This experiment trained with another seed (its stage 1 is that seed's own checkpoint)."""
        return self.model_copy(update={"seed": int(seed)})

    def searched_keys(self) -> list[str]:
        """The keys of a trial's config: the searched stage-2 fields, then `seed`."""
        if self.search.configs is not None:
            return list(dict.fromkeys(k for c in self.search.configs for k in c)) + ["seed"]
        return list(self.space) + ["seed"]

    def choices(self, selector: str) -> list[str]:
        """The samplers (selector 'sampler') or losses ('loss') that trials of this experiment can use."""
        if self.search.configs is not None:
            return list(dict.fromkeys(c.get(selector, getattr(self.stage2, selector)) for c in self.search.configs))
        param = self.space.get(selector)
        return list(param.values_to_check()) if param is not None else [getattr(self.stage2, selector)]

    def loss_inputs(self) -> set[str]:
        """The data-derived inputs that some run of this experiment builds its loss from (``LossSpec.inputs``: the
        stage-1 loss and every loss x scores a trial can get), e.g. {'concurrent_rate'} to compute r_ij once."""
        need = set(loss_inputs(self.stage1.loss)) if self.stage1 is not None else set()
        for name in self.choices("loss"):
            for scores in self.choices("scores"):
                need.update(loss_inputs(name, scores))
        return need

    def param_space(self) -> dict[str, Any]:
        """The Tune param_space of the variant generator: {stage-2 field: primitive}, conditional on the searched
        sampler / loss (pipelines.config.space)."""
        from ray import tune

        if self.search.configs is not None:  # exactly these configurations (unpacked by space.trial_values)
            space = {CONFIGURATION_KEY: tune.grid_search([dict(c) for c in self.search.configs])}
        else:
            space = tune_param_space(self.space)
        space["seed"] = tune.grid_search(self.seeds)  # every configuration once per training seed
        return space

    def stage2_for_trial(self, trial_config: dict[str, Any]) -> Stage2Config:
        """Stage-2 values with a trial's sampled values (a Tune trial config, see space.trial_values) applied and
        validated again."""
        values = trial_values(trial_config)
        values.pop("seed", None)
        unknown = set(values) - set(SEARCHABLE)
        if unknown:
            raise ConfigError(f"trial config has keys that are not stage-2 fields: {sorted(unknown)}")
        return Stage2Config.model_validate({**self.stage2.model_dump(), **values})

    def trial_seed(self, trial_config: Optional[dict[str, Any]]) -> int:
        """The training seed of a trial (its config's `seed`, else the experiment's)."""
        seed = (trial_config or {}).get("seed")
        return self.seed if seed is None else int(seed)

    def fingerprint(self) -> str:
        """sha256 of the canonical config (sorted JSON) without run.*, train.* and description: what must not
        change between a sweep's start and its --resume."""
        d = self.model_dump(mode="json", exclude={"run", "train", "description"})
        return hashlib.sha256(canonical_json(d).encode()).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def strip_value_error(msg: str) -> str:
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def unread_field(cfg: ExperimentConfig, stage2_keys) -> Optional[str]:
    """The message for a sampler / loss field that the YAML sets (`stage2_keys`: the keys written under stage2)
    or searches but that no sampler / loss of the experiment's trials reads; None when every such field is read."""
    for key in [k for k in stage2_keys if owner_of(k)] + [k for k in cfg.space if owner_of(k)]:
        where = f"space.{key}" if key in cfg.space else f"stage2.{key}"
        owner = owner_of(key)
        used = cfg.choices(owner)
        if not any(is_read(key, name) for name in used):
            return (f"{where} is ignored: {owner} {', '.join(repr(n) for n in used)} does not read it (only "
                    f"{' / '.join(readers(key))} does); remove {where} or set stage2.{owner}: {readers(key)[0]}")
    return None
