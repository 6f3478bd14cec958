"""Experiment configs: one YAML file describes a whole sweep (or one `ltsweep train` run).

The YAML is validated by pydantic models (unknown keys are errors) and the `space:` section is turned into Ray
Tune sampling primitives through the fixed table `SPACE_PRIMITIVES` (never `eval`). Every problem is raised as a
one-line `ConfigError` naming the file, the key path and the fix.

Relative paths (data files, storage path, weights) are resolved against the current working directory when the
file is loaded (the repository root for `ray job submit --working-dir .`), so trials that Ray runs in their own
directories see absolute paths.

Layout of a file (every section but `name`/`data` has defaults; see search_spaces/*.yaml):

    name: demo                      # sweep name: Tune run dir and MLflow experiment
    seed: 0
    data: {train, val, image_dir, val_image_dir, hierarchy, hierarchy_rate, synthetic, synthetic_seed}
    model: {backbone, image_size, weights}
    stage1: {epochs, batch_size, lr, warmup, lr_steps, grad_clip, workers}   # null: one-stage trials
    stage2: {... same fields ..., sampler, lam, loss, xi, decoupled}          # what every trial trains
    eval: {every}                   # evaluate (and report to Tune) every N epochs
    resources: {cpus_per_trial, gpus_per_trial}
    scheduler: {type: asha|fifo, metric, mode, grace_period, reduction_factor, max_t}   # counted in evaluations
    search: {algorithm: basic|optuna, num_samples, max_concurrent_trials, seed}
    space: {lam: {grid: [...]}, xi: {uniform: [lo, hi]}, loss: {choice: [...]}, ...}   # stage-2 fields
    run: {storage_path, tracking_uri, max_failures, checkpoints_to_keep, ray_num_cpus}
    train: {stage: hybrid|stage1|stage2, init_checkpoint}   # only used by `ltsweep train`
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lt_models.errors import ConfigError

REPORTED_METRICS = ("AP", "AP50", "APr", "APc", "APf", "loss")


def _known_losses() -> tuple[str, ...]:
    from lt_models.losses import LOSSES

    return tuple(LOSSES)


def _known_samplers() -> tuple[str, ...]:
    from lt_models.samplers import SAMPLERS

    return tuple(SAMPLERS)


def _known_backbones() -> tuple[str, ...]:
    from lt_models.detector import BACKBONES

    return tuple(BACKBONES)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    train: Path = Field(description="training annotations (LVIS-format JSON)")
    val: Path = Field(description="validation annotations (LVIS-format JSON)")
    image_dir: Optional[Path] = Field(None, description="train images; default <train dir>/images")
    val_image_dir: Optional[Path] = Field(None, description="val images; default <val dir>/images")
    hierarchy: Optional[Path] = Field(None, description="class hierarchy JSON (Open Images style)")
    expand_parents: bool = Field(False, description="also label every object with its hierarchy parents")
    hierarchy_rate: float = Field(1.0, ge=0.0, le=1.0, description="r_ij for leaf/parent pairs (DESIGN.md)")
    synthetic: Optional[Literal["demo", "bench"]] = Field(
        None, description="if the annotation files are absent, generate this synthetic preset there first")
    synthetic_seed: int = 0


class ModelConfig(_Strict):
    backbone: str = Field("tiny", description="tiny (CPU), resnet18_fpn, resnet50_fpn (the papers')")
    image_size: Optional[int] = Field(None, ge=32, description="shorter image side in pixels; null = the "
                                      "backbone's default (tiny: 128, resnet50_fpn: 800)")
    weights: Optional[Path] = Field(None, description="local backbone weights file (never downloaded)")

    @field_validator("backbone")
    @classmethod
    def _backbone_name(cls, v: str) -> str:
        if v not in _known_backbones():
            raise ValueError(f"unknown backbone {v!r}; use one of {', '.join(_known_backbones())}")
        return v


class ScheduleConfig(_Strict):
    """Fields shared by both stages (units as in lt_models.engine.TrainSpec)."""

    epochs: int = Field(ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(0.02, gt=0.0, description="base LR for the whole batch (papers: 0.00125 x batch size)")
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
    """The shared stage of the hybrid schedule (concurrent-softmax paper §4): non-balance sampling + softmax CE on
    all layers, trained once per (config, dataset) and restored by every trial."""

    epochs: int = Field(4, ge=1)


class Stage2Config(ScheduleConfig):
    """What every trial trains: soft-balance sampling (λ) + the chosen loss, from stage 1 (or from scratch when
    stage1 is null). These are the fields a search space may vary."""

    epochs: int = Field(6, ge=1)
    lr: float = Field(0.01, gt=0.0)
    sampler: str = "softbalance"
    lam: float = Field(0.7, description="soft-balance λ, in [0, 2]")
    loss: str = "concurrent_softmax"
    xi: float = Field(0.7, description="ACSL threshold ξ, in (0, 1); used when loss is acsl")
    samples_per_epoch: Optional[int] = Field(
        None, ge=1, description="images drawn per epoch by softbalance/classaware (default: the training set size)")
    decoupled: Union[bool, Literal["cls", "box_head"]] = Field(
        False, description="true/cls = train only the classifier (ACSL's decoupled stage 2); box_head = whole box head")

    @field_validator("lam")
    @classmethod
    def _lam_range(cls, v: float) -> float:
        if not (0.0 <= v <= 2.0):
            raise ValueError(f"soft-balance λ (lam) must be in [0, 2] (0 = non-balance, 1 = class-aware), got {v}")
        return v

    @field_validator("xi")
    @classmethod
    def _xi_range(cls, v: float) -> float:
        if not (0.0 < v < 1.0):
            raise ValueError(f"ACSL threshold ξ (xi) must be in the open interval (0, 1), got {v}")
        return v

    @field_validator("sampler")
    @classmethod
    def _sampler_name(cls, v: str) -> str:
        if v not in _known_samplers():
            raise ValueError(f"unknown sampler {v!r}; use one of {', '.join(_known_samplers())}")
        return v

    @field_validator("loss")
    @classmethod
    def _loss_name(cls, v: str) -> str:
        known = _known_losses()
        if v not in known:
            raise ValueError(f"unknown loss {v!r}; use one of {', '.join(known)}")
        return v

    @field_validator("decoupled")
    @classmethod
    def _decoupled_mode(cls, v):
        return "cls" if v is True else v


class EvalConfig(_Strict):
    every: int = Field(1, ge=1, description="evaluate and report to Tune every N epochs")


class ResourcesConfig(_Strict):
    cpus_per_trial: float = Field(1.0, gt=0.0)
    gpus_per_trial: float = Field(0.0, ge=0.0)


class SchedulerConfig(_Strict):
    type: Literal["asha", "fifo"] = "asha"
    metric: str = "AP"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1, description="evaluations before ASHA may stop a trial")
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: Optional[int] = Field(None, ge=1, description="evaluations per trial; default stage2.epochs / eval.every")

    @field_validator("metric")
    @classmethod
    def _metric_name(cls, v: str) -> str:
        if v not in REPORTED_METRICS:
            raise ValueError(f"unknown metric {v!r}; trials report {', '.join(REPORTED_METRICS)}")
        return v


class SearchConfig(_Strict):
    algorithm: Literal["basic", "optuna"] = Field(
        "basic", description="basic = Tune's grid/random variant generator; optuna = TPE (needs `pip install optuna`)")
    num_samples: int = Field(1, ge=1, description="samples per grid point (basic) / trials (optuna)")
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = None


class RunSettings(_Strict):
    storage_path: Path = Field(Path("results"), description="Tune results, checkpoints, stage-1 cache, mlflow.db")
    tracking_uri: Optional[str] = Field(None, description="MLflow URI; default sqlite:///<storage_path>/mlflow.db")
    max_failures: int = Field(2, ge=0, description="retries of a failed trial (from its last checkpoint)")
    checkpoints_to_keep: int = Field(2, ge=1)
    ray_num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of a local Ray instance (default: all)")


class TrainSettings(_Strict):
    stage: Literal["hybrid", "stage1", "stage2"] = Field(
        "hybrid", description="`ltsweep train`: hybrid = stage 1 (cached) then stage 2; or one stage only")
    init_checkpoint: Optional[Path] = Field(None, description="stage2: start here instead of the stage-1 cache")


class SpaceParam(_Strict):
    """One searched hyperparameter: exactly one key of SPACE_PRIMITIVES."""

    grid: Optional[list[Any]] = None
    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    quniform: Optional[tuple[float, float, float]] = None
    qloguniform: Optional[tuple[float, float, float]] = None
    randint: Optional[tuple[int, int]] = None
    qrandint: Optional[tuple[int, int, int]] = None

    @model_validator(mode="after")
    def _exactly_one(self):
        set_keys = [k for k in SPACE_PRIMITIVES if getattr(self, k) is not None]
        if len(set_keys) != 1:
            raise ValueError(f"give exactly one of {', '.join(SPACE_PRIMITIVES)} (got {set_keys or 'none'})")
        kind = set_keys[0]
        args = getattr(self, kind)
        if kind in ("grid", "choice"):
            if not args:
                raise ValueError(f"{kind} needs a non-empty list of values")
        else:
            lo, hi = args[0], args[1]
            if not lo < hi:
                raise ValueError(f"{kind}: lower bound {lo} must be < upper bound {hi}")
            if kind in ("loguniform", "qloguniform") and lo <= 0:
                raise ValueError(f"{kind}: bounds must be > 0, got lower bound {lo}")
            if len(args) == 3 and args[2] <= 0:
                raise ValueError(f"{kind}: quantum q must be > 0, got {args[2]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SPACE_PRIMITIVES if getattr(self, k) is not None)

    @property
    def args(self):
        return getattr(self, self.kind)

    def values_to_check(self) -> list[Any]:
        """Values a trial can receive (list kinds) or the bounds of the range (continuous kinds)."""
        if self.kind in ("grid", "choice"):
            return list(self.args)
        return list(self.args[:2])

    def to_tune(self):
        from ray import tune

        fn_name, unpack = SPACE_PRIMITIVES[self.kind]
        fn = getattr(tune, fn_name)
        return fn(list(self.args)) if not unpack else fn(*self.args)


# YAML key -> (ray.tune function name, unpack the argument list?). The only way YAML reaches Tune.
SPACE_PRIMITIVES: dict[str, tuple[str, bool]] = {
    "grid": ("grid_search", False),
    "choice": ("choice", False),
    "uniform": ("uniform", True),
    "loguniform": ("loguniform", True),
    "quniform": ("quniform", True),
    "qloguniform": ("qloguniform", True),
    "randint": ("randint", True),
    "qrandint": ("qrandint", True),
}
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

    @model_validator(mode="after")
    def _space_is_valid(self):
        # Each searched key must be a stage-2 field, and each value a trial can get must pass that field's checks
        # (λ in [0, 2], ξ in (0, 1), known loss/sampler names, ...).
        for key, param in self.space.items():
            if key not in SEARCHABLE:
                hint = difflib.get_close_matches(key, SEARCHABLE, n=1)
                raise ValueError(
                    f"space.{key}: not a searchable stage-2 field"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; searchable: {', '.join(SEARCHABLE)}")
            base = self.stage2.model_dump()
            for i, value in enumerate(param.values_to_check()):
                try:
                    Stage2Config.model_validate({**base, key: value})
                except ValidationError as exc:
                    msg = "; ".join(_strip_value_error(e["msg"]) for e in exc.errors())
                    raise ValueError(f"space.{key}.{param.kind}[{i}] = {value!r}: {msg}") from None
        return self

    @model_validator(mode="after")
    def _scheduler_fits(self):
        if self.scheduler.type == "asha" and self.scheduler.grace_period > self.evals_per_trial:
            raise ValueError(f"scheduler.grace_period = {self.scheduler.grace_period} exceeds the evaluations per "
                             f"trial ({self.evals_per_trial} = scheduler.max_t or stage2.epochs / eval.every); "
                             "lower grace_period")
        return self

    # ---- derived values -------------------------------------------------------------------------------------
    @property
    def evals_per_trial(self) -> int:
        """How many times a full-length trial reports (ASHA's max_t, in evaluations)."""
        return self.scheduler.max_t or math.ceil(self.stage2.epochs / self.eval.every)

    def searched_keys(self) -> list[str]:
        return list(self.space)

    def param_space(self) -> dict[str, Any]:
        """The Tune param_space: {stage-2 field: tune primitive}."""
        return {key: param.to_tune() for key, param in self.space.items()}

    def stage2_for_trial(self, trial_config: dict[str, Any]) -> Stage2Config:
        """Stage-2 schedule with a trial's sampled values applied (validated again)."""
        unknown = set(trial_config) - set(SEARCHABLE)
        if unknown:
            raise ConfigError(f"trial config has keys that are not stage-2 fields: {sorted(unknown)}")
        return Stage2Config.model_validate({**self.stage2.model_dump(), **trial_config})

    def fingerprint(self) -> str:
        """sha256 of the canonical config (sorted JSON) without run.*, train.* and description: what must not
        change between a sweep's start and its --resume."""
        d = self.model_dump(mode="json", exclude={"run", "train", "description"})
        return hashlib.sha256(canonical_json(d).encode()).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


# ---- loading -----------------------------------------------------------------------------------------------------

def _strip_value_error(msg: str) -> str:
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model class that owns the key at `loc` (for listing allowed keys)."""
    model: Any = ExperimentConfig
    for part in loc[:-1]:
        if model is None:
            return None
        if isinstance(model, type) and issubclass(model, BaseModel):
            field = model.model_fields.get(part)
            if field is None:
                return None
            model = field.annotation
        elif get_origin(model) is dict:
            model = get_args(model)[1]
        else:
            return None
        # unwrap Optional[...] / Union
        if get_origin(model) is Union:
            model = next((a for a in get_args(model) if a is not type(None)), None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p not in ("function-after", "tagged-union"))
        where = _fmt_loc(loc) or "<top level>"
        if err["type"] == "extra_forbidden":
            model = _model_at(loc)
            allowed = list(model.model_fields) if model else []
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            parts.append(f"unknown key '{where}'"
                         + (f" (did you mean '{_fmt_loc(loc[:-1] + (hint[0],))}'?)" if hint else "")
                         + (f"; allowed here: {', '.join(allowed)}" if allowed else "; remove it"))
        elif err["type"] == "missing":
            parts.append(f"'{where}' is required; add it")
        else:
            msg = _strip_value_error(err["msg"])
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None or str(got) in msg else f" (got {got!r})"
            parts.append(f"{where}: {msg}{shown}" if loc else f"{msg}{shown}")
    return "; ".join(parts)


def _set_dotted(raw: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"{source}: override key {dotted!r} is malformed; use --set section.key=value")
    node = raw
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise ConfigError(f"{source}: cannot set {dotted!r}: '{k}' is not a section")
        node = node[k]
    node[keys[-1]] = value


def apply_overrides(raw: dict, overrides: Optional[list[str]], source: str = "--set") -> dict:
    """Apply `a.b=value` overrides (value parsed as YAML: numbers, bools, null, lists) to the raw dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set stage2.lam=0.7")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc.problem})") from None
        _set_dotted(raw, key.strip(), value, f"--set {item}")
    return raw


def _resolve_paths(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    def res(p: Optional[Path]) -> Optional[Path]:
        if p is None:
            return None
        p = Path(p).expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    data = cfg.data
    data = data.model_copy(update=dict(
        train=res(data.train), val=res(data.val), image_dir=res(data.image_dir),
        val_image_dir=res(data.val_image_dir), hierarchy=res(data.hierarchy)))
    model = cfg.model.model_copy(update=dict(weights=res(cfg.model.weights)))
    run = cfg.run.model_copy(update=dict(storage_path=res(cfg.run.storage_path)))
    train = cfg.train.model_copy(update=dict(init_checkpoint=res(cfg.train.init_checkpoint)))
    return cfg.model_copy(update=dict(data=data, model=model, run=run, train=train))


def check_dataset(cfg: ExperimentConfig, source: str = "config") -> None:
    """Raise ConfigError if a data file the config names is missing (unless it will be synthesised)."""
    d = cfg.data
    fix = ("put the dataset there or fix the path (LVIS-format JSON; for the synthetic benchmark run "
           "`ltsweep data synth --out DIR` or set data.synthetic: demo)")
    for key in ("train", "val"):
        p = getattr(d, key)
        if not p.is_file() and d.synthetic is None:
            raise ConfigError(f"{source}: data.{key}: dataset file not found: {p}; {fix}")
    for key, ann in (("image_dir", d.train), ("val_image_dir", d.val)):
        p = getattr(d, key)
        if p is not None and not p.is_dir() and d.synthetic is None:
            raise ConfigError(f"{source}: data.{key}: image directory not found: {p}; fix the path "
                              f"(default is <dir of data.{'train' if key == 'image_dir' else 'val'}>/images)")
    if d.hierarchy is not None and not d.hierarchy.is_file() and d.synthetic is None:
        raise ConfigError(f"{source}: data.hierarchy: file not found: {d.hierarchy}; fix the path or remove the key")
    if cfg.model.weights is not None and not cfg.model.weights.is_file():
        raise ConfigError(f"{source}: model.weights: file not found: {cfg.model.weights}; give a local weights "
                          "file (nothing is downloaded) or remove the key to train from scratch")


def parse_config(raw: Any, source: str = "config", base_dir: Optional[Path] = None,
                 check_data: bool = True) -> ExperimentConfig:
    """Validate a raw dict (already YAML-parsed) into an ExperimentConfig; errors become ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_errors(exc)}") from None
    cfg = _resolve_paths(cfg, base_dir or Path.cwd())
    decoupled = [cfg.stage2.decoupled] + list(cfg.space["decoupled"].values_to_check() if "decoupled" in cfg.space
                                              and cfg.space["decoupled"].kind in ("grid", "choice") else [])
    if cfg.stage1 is None and any(decoupled):
        raise ConfigError(f"{source}: stage2.decoupled needs a trained representation to freeze, but stage1 is null; "
                          "add a stage1 section or set decoupled: false")
    if cfg.stage1 is None and cfg.train.stage == "stage1":
        raise ConfigError(f"{source}: train.stage is 'stage1' but stage1 is null; add a stage1 section")
    if cfg.search.algorithm == "optuna" and any(p.kind == "grid" for p in cfg.space.values()):
        raise ConfigError(f"{source}: search.algorithm optuna cannot take 'grid' entries in space; "
                          "use choice/uniform/... or search.algorithm: basic")
    if check_data:
        check_dataset(cfg, source)
    return cfg


def read_yaml(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; give a path to a YAML file "
                          "(packaged examples live in search_spaces/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    return raw if raw is not None else {}


def load_experiment_config(path: Union[str, Path], overrides: Optional[list[str]] = None,
                           check_data: bool = True) -> ExperimentConfig:
    """Read a sweep YAML (optionally with `a.b=value` overrides) into a validated ExperimentConfig."""
    raw = apply_overrides(read_yaml(path), overrides)
    return parse_config(raw, source=str(path), check_data=check_data)


def load_train_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """Config for `ltsweep train`: the same schema as a sweep; `space` is ignored (stage2 values are used)."""
    return load_experiment_config(path, overrides)


# ---- config -> lt_models.engine.TrainSpec ------------------------------------------------------------------------

def to_train_spec(cfg: ExperimentConfig, stage: Literal["stage1", "stage2", "one_stage"],
                  schedule: Optional[ScheduleConfig] = None, *, num_threads: int = 1,
                  device: Optional[str] = None, eval_every: Optional[int] = None, progress: Optional[bool] = False):
    """Build the engine's TrainSpec for one stage. `schedule` defaults to cfg.stage1 / cfg.stage2.
    progress: tqdm bars (None = only on a terminal; False in trials, whose output goes to Ray's logs)."""
    from lt_models.engine import TrainSpec

    if schedule is None:
        schedule = cfg.stage1 if stage == "stage1" else cfg.stage2
    if schedule is None:
        raise ConfigError("stage1 is null in this config; there is no stage-1 schedule to train")
    return TrainSpec(**_spec_kwargs(cfg, stage, schedule, num_threads=num_threads, device=device,
                                    eval_every=eval_every or cfg.eval.every), progress=progress)


def _spec_kwargs(cfg: ExperimentConfig, stage: str, s: ScheduleConfig, *, num_threads: int,
                 device: Optional[str], eval_every: int) -> dict[str, Any]:
    """Field mapping ExperimentConfig -> lt_models.engine.TrainSpec (kept in one place)."""
    d = cfg.data
    kw: dict[str, Any] = dict(
        train_ann=str(d.train), val_ann=str(d.val),
        train_image_dir=None if d.image_dir is None else str(d.image_dir),
        val_image_dir=None if d.val_image_dir is None else str(d.val_image_dir),
        hierarchy_file=None if d.hierarchy is None else str(d.hierarchy),
        expand_parents=d.expand_parents, hierarchy_rate=d.hierarchy_rate,
        stage=stage, backbone=cfg.model.backbone, image_size=cfg.model.image_size,
        weights=None if cfg.model.weights is None else str(cfg.model.weights),
        epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, warmup=s.warmup, lr_steps=tuple(s.lr_steps),
        grad_clip=s.grad_clip, eval_every=eval_every, seed=cfg.seed, num_threads=num_threads,
        device=device or "auto", workers=s.workers,
    )
    if stage == "stage1":
        kw.update(sampler="nonbalance", lam=None, loss="softmax", loss_kwargs={}, decoupled=False)
    else:
        assert isinstance(s, Stage2Config)
        kw.update(sampler=s.sampler, lam=s.lam, loss=s.loss, loss_kwargs={"xi": s.xi} if s.loss == "acsl" else {},
                  decoupled=s.decoupled,
                  sampler_kwargs={} if s.samples_per_epoch is None else {"num_samples": s.samples_per_epoch})
    return kw
