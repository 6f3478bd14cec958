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
fed_num_classes) are read only by some samplers / losses: the space samples them only for those
(pipelines.config.space), and setting one that no trial reads is an error.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from lt_models.errors import ConfigError
from lt_models.losses.registry import loss_inputs
from pipelines.config.resources import ResourcesConfig
from pipelines.config.run_settings import RunSettings
from pipelines.config.sections import (
    PBT_KEYS,
    POPULATION_SCHEDULERS,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ReportConfig,
    SchedulerConfig,
    SearchConfig,
    Stage1Config,
    Stage2Config,
    StrictModel,
    TrainSettings,
    strip_value_error,
)
from pipelines.config.space import (
    CONFIGURATION_KEY,
    SpaceParam,
    is_read,
    owner_of,
    readers,
    trial_values,
    tune_param_space,
)
from pipelines.names import LVIS_ONLY_METRICS

# stage-2 fields a search space may vary (epochs would break ASHA's max_t; workers is not a hyperparameter)
SEARCHABLE = tuple(
    f for f in Stage2Config.model_fields if f not in ("epochs", "workers", "samples_per_epoch", "lam_schedule")
)


class ExperimentConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    seed: int = 0
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    stage1: Stage1Config | None = Field(default_factory=Stage1Config)
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
            raise ValueError(
                "search.seeds: repeats need search.algorithm basic (Optuna samples each configuration "
                "once); use basic, or run `ltsweep confirm` on the Optuna sweep's best configurations"
            )
        for key, value in (self.report.baseline or {}).items():
            if key not in SEARCHABLE:
                raise ValueError(
                    f"report.baseline.{key}: not a stage-2 field; the baseline names searched values, "
                    f"e.g. {{loss: softmax, sampler: nonbalance}}"
                )
            self._check_stage2({key: value}, f"report.baseline.{key} = {value!r}")
        if self.search.data_seeds and self.data.synthetic is None:
            raise ValueError(
                "search.data_seeds redraws the synthetic benchmark for every seed: it needs data.synthetic (a preset "
                "to generate); with real data, repeat the sweep on other data instead"
            )
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
                    + f"; searchable: {', '.join(SEARCHABLE)}"
                )
            for i, value in enumerate(param.values_to_check()):
                self._check_stage2({key: value}, f"space.{key}.{param.kind}[{i}] = {value!r}")
        return self

    @model_validator(mode="after")
    def _one_lam(self):
        if self.stage2.lam_schedule is None:
            return self
        varied = "lam" in self.space or any("lam" in c for c in self.search.configs or [])
        if "lam" in self.stage2.model_fields_set or varied:
            where = "space.lam / search.configs" if varied else "stage2.lam"
            raise ValueError(f"stage2.lam_schedule sets λ per epoch: remove {where}, or remove stage2.lam_schedule")
        return self

    @model_validator(mode="after")
    def _metric_has_its_inputs(self):
        if self.eval.metric == "openimages" and self.data.hierarchy is None:
            raise ValueError(
                "eval.metric openimages expands labels up the class hierarchy: set data.hierarchy (the "
                "Open Images hierarchy JSON)"
            )
        if self.eval.metric != "lvis" and self.scheduler.metric in LVIS_ONLY_METRICS:
            raise ValueError(
                f"scheduler.metric {self.scheduler.metric} (AP-fixed / AP-pool) comes from an LVIS evaluation: set "
                "eval.metric: lvis, or rank by AP"
            )
        return self

    @model_validator(mode="after")
    def _pbt_fits(self):
        kind = self.scheduler.type
        if kind not in POPULATION_SCHEDULERS:
            return self
        bad = sorted(set(self.space) - set(PBT_KEYS))
        if self.search.algorithm != "basic" or self.search.configs is not None or not self.space or bad:
            raise ValueError(
                f"scheduler.type {kind} perturbs the searched λ / ξ / lr of a population: search.algorithm basic, "
                f"a space of lam, xi and / or lr (got {sorted(self.space) or 'none'}), no search.configs"
            )
        return self

    @model_validator(mode="after")
    def _scheduler_fits(self):
        sch = self.scheduler
        if sch.type == "asha_configs" and self.search.algorithm != "basic":
            raise ValueError(
                "scheduler.type asha_configs pauses trials at rungs until the whole grid has reported "
                "there, which needs search.algorithm: basic; with optuna use scheduler.type: asha"
            )
        if sch.type != "fifo" and sch.time_attr != "evaluations":
            if sch.max_t is None:
                raise ValueError(
                    f"scheduler.max_t is required with time_attr {sch.time_attr}: the {sch.time_attr} "
                    "of a full-length trial (e.g. stage2.epochs x samples_per_epoch images); set it so "
                    "that the trial with the longest epochs still fits"
                )
            if sch.grace_period > sch.max_t:
                raise ValueError(
                    f"scheduler.grace_period = {sch.grace_period} exceeds max_t = {sch.max_t} "
                    f"({sch.time_attr}); lower grace_period"
                )
            return self
        if sch.type not in ("fifo", *POPULATION_SCHEDULERS) and sch.grace_period > self.evals_per_trial:
            raise ValueError(
                f"scheduler.grace_period = {self.scheduler.grace_period} exceeds the evaluations per "
                f"trial ({self.evals_per_trial} = scheduler.max_t or stage2.epochs / eval.every); "
                "lower grace_period"
            )
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

    def with_seed(self, seed: int) -> ExperimentConfig:
        """This experiment trained with another seed (its stage 1 is that seed's own checkpoint). With
        ``search.data_seeds`` its data is that seed's draw of the synthetic benchmark (:meth:`data_for`), and the
        copy no longer redraws (``search.data_seeds`` off): seeding it again changes the seed only."""
        if not self.search.data_seeds:
            return self.model_copy(update={"seed": int(seed)})
        search = self.search.model_copy(update={"data_seeds": False})
        return self.model_copy(update={"seed": int(seed), "data": self.data_for(seed), "search": search})

    def data_for(self, seed: int) -> DataConfig:
        """The data of training seed ``seed``: with ``search.data_seeds``, the synthetic benchmark drawn with data
        seed ``seed`` in ``<data dir>-data<seed>/`` (every path below the data dir moves there), else the data."""
        d = self.data
        if not self.search.data_seeds:
            return d
        root = d.train.parent
        moved = root.parent / f"{root.name}-data{int(seed)}"

        def move(p: Path | None) -> Path | None:
            return p if p is None or not p.is_relative_to(root) else moved / p.relative_to(root)

        fields = ("train", "val", "hierarchy", "image_dir", "val_image_dir", "test", "test_image_dir")
        return d.model_copy(update={"synthetic_seed": int(seed), **{f: move(getattr(d, f)) for f in fields}})

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

    def for_trial(self, trial_config: dict[str, Any] | None) -> ExperimentConfig:
        """The experiment as a trial of it trains: with ``search.data_seeds``, on its seed's data draw."""
        return self.with_seed(self.trial_seed(trial_config)) if self.search.data_seeds else self

    def stage2_for_trial(self, trial_config: dict[str, Any]) -> Stage2Config:
        """Stage-2 values with a trial's sampled values (a Tune trial config, see space.trial_values) applied and
        validated again."""
        values = trial_values(trial_config)
        values.pop("seed", None)
        unknown = set(values) - set(SEARCHABLE)
        if unknown:
            raise ConfigError(f"trial config has keys that are not stage-2 fields: {sorted(unknown)}")
        return Stage2Config.model_validate({**self.stage2.model_dump(), **values})

    def trial_seed(self, trial_config: dict[str, Any] | None) -> int:
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


def unread_field(cfg: ExperimentConfig, stage2_keys) -> str | None:
    """The message for a sampler / loss field that the YAML sets (`stage2_keys`: the keys written under stage2)
    or searches but that no sampler / loss of the experiment's trials reads; None when every such field is read."""
    for key in [k for k in stage2_keys if owner_of(k)] + [k for k in cfg.space if owner_of(k)]:
        where = f"space.{key}" if key in cfg.space else f"stage2.{key}"
        owner = owner_of(key)
        assert owner is not None  # the loop only visits keys with an owner
        used = cfg.choices(owner)
        if not any(is_read(key, name) for name in used):
            return (
                f"{where} is ignored: {owner} {', '.join(repr(n) for n in used)} does not read it (only "
                f"{' / '.join(readers(key))} does); remove {where} or set stage2.{owner}: {readers(key)[0]}"
            )
    return None
