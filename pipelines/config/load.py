"""Reading experiment YAMLs.

`load_experiment_config(path)` reads a YAML (pipelines.config.experiment's pydantic models; `--set a.b=value`
overrides) and raises every problem as a one-line `ConfigError` naming the file, the key path and the fix.
Relative paths (data files, storage path, weights) are resolved against the current working directory when the
file is loaded (the repository root for `ray job submit --working-dir .`), so trials that Ray runs in their own
directories see absolute paths.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from lt_models.errors import ConfigError
from pipelines.config.experiment import ExperimentConfig, unread_field
from pipelines.config.sections import strip_value_error
from pipelines.storage.location import is_uri

__all__ = [
    "apply_overrides",
    "check_dataset",
    "load_experiment_config",
    "load_train_config",
    "parse_config",
    "read_yaml",
]


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
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
            parts.append(
                f"unknown key '{where}'"
                + (f" (did you mean '{_fmt_loc(loc[:-1] + (hint[0],))}'?)" if hint else "")
                + (f"; allowed here: {', '.join(allowed)}" if allowed else "; remove it")
            )
        elif err["type"] == "missing":
            parts.append(f"'{where}' is required; add it")
        else:
            msg = strip_value_error(err["msg"])
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


def apply_overrides(raw: dict, overrides: list[str] | None, source: str = "--set") -> dict:
    """Apply `a.b=value` overrides (value parsed as YAML: numbers, bools, null, lists) to the raw dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set stage2.lam=0.7")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            # scanner / parser errors (MarkedYAMLError) say what is wrong in `problem`; a ReaderError (a control
            # character) only in its message
            problem = getattr(exc, "problem", None) or exc
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({problem})") from None
        _set_dotted(raw, key.strip(), value, f"--set {item}")
    return raw


def _resolve_paths(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    def res(p: Path | str | None) -> Path | str | None:
        if p is None or is_uri(p):  # an object-store URI (run.storage_path, pipelines.storage.location) stays as it is
            return p
        p = Path(p).expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    data = cfg.data
    data = data.model_copy(
        update=dict(
            train=res(data.train),
            val=res(data.val),
            image_dir=res(data.image_dir),
            val_image_dir=res(data.val_image_dir),
            hierarchy=res(data.hierarchy),
            test=res(data.test),
            test_image_dir=res(data.test_image_dir),
        )
    )
    model = cfg.model.model_copy(update=dict(weights=res(cfg.model.weights)))
    run = cfg.run.model_copy(update=dict(storage_path=res(cfg.run.storage_path)))
    train = cfg.train.model_copy(update=dict(init_checkpoint=res(cfg.train.init_checkpoint)))
    return cfg.model_copy(update=dict(data=data, model=model, run=run, train=train))


def check_dataset(cfg: ExperimentConfig, source: str = "config") -> None:
    """Raise ConfigError if a data file the config names is missing (unless it will be synthesised)."""
    d = cfg.data
    fix = (
        "put the dataset there or fix the path (LVIS-format JSON; for the synthetic benchmark run "
        "`ltsweep data synth --out DIR` or set data.synthetic: demo)"
    )
    for key in ("train", "val"):
        p = getattr(d, key)
        if not (p.is_file() or (key == "train" and (p / "meta.json").is_file())) and d.synthetic is None:  # or a store
            raise ConfigError(f"{source}: data.{key}: dataset file not found: {p}; {fix}")
    for key, _ann in (("image_dir", d.train), ("val_image_dir", d.val)):
        p = getattr(d, key)
        if p is not None and not p.is_dir() and d.synthetic is None:
            raise ConfigError(
                f"{source}: data.{key}: image directory not found: {p}; fix the path "
                f"(default is <dir of data.{'train' if key == 'image_dir' else 'val'}>/images)"
            )
    if d.test is not None and not d.test.is_file():
        raise ConfigError(f"{source}: data.test: file not found: {d.test}; fix the path or remove the key")
    if d.hierarchy is not None and not d.hierarchy.is_file() and d.synthetic is None:
        raise ConfigError(f"{source}: data.hierarchy: file not found: {d.hierarchy}; fix the path or remove the key")
    if cfg.model.weights is not None and not cfg.model.weights.is_file():
        raise ConfigError(
            f"{source}: model.weights: file not found: {cfg.model.weights}; give a local weights "
            "file (nothing is downloaded) or remove the key to train from scratch"
        )


def parse_config(
    raw: Any, source: str = "config", base_dir: Path | None = None, check_data: bool = True
) -> ExperimentConfig:
    """Validate a raw dict (already YAML-parsed) into an ExperimentConfig; errors become ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_errors(exc)}") from None
    cfg = _resolve_paths(cfg, base_dir or Path.cwd())
    stage2 = raw.get("stage2")
    unread = unread_field(cfg, list(stage2) if isinstance(stage2, dict) else [])
    if unread:
        raise ConfigError(f"{source}: {unread}")
    decoupled = [cfg.stage2.decoupled] + list(
        cfg.space["decoupled"].values_to_check()
        if "decoupled" in cfg.space and cfg.space["decoupled"].kind in ("grid", "choice")
        else []
    )
    if cfg.stage1 is None and any(decoupled):
        raise ConfigError(
            f"{source}: stage2.decoupled needs a trained representation to freeze, but stage1 is null; "
            "add a stage1 section or set decoupled: false"
        )
    if cfg.stage1 is None and cfg.train.stage == "stage1":
        raise ConfigError(f"{source}: train.stage is 'stage1' but stage1 is null; add a stage1 section")
    if cfg.search.algorithm == "optuna" and any(p.kind in ("grid", "qloguniform") for p in cfg.space.values()):
        raise ConfigError(
            f"{source}: search.algorithm optuna cannot take 'grid' or 'qloguniform' entries in space; "
            "use choice/uniform/loguniform/quniform/randint/qrandint or search.algorithm: basic"
        )
    if check_data:
        check_dataset(cfg, source)
    return cfg


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: config file not found; give a path to a YAML file (packaged examples live in search_spaces/)"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    return raw if raw is not None else {}


def load_experiment_config(
    path: str | Path, overrides: list[str] | None = None, check_data: bool = True
) -> ExperimentConfig:
    """Read a sweep YAML (optionally with `a.b=value` overrides) into a validated ExperimentConfig."""
    raw = apply_overrides(read_yaml(path), overrides)
    return parse_config(raw, source=str(path), check_data=check_data)


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Config for `ltsweep train`: the same schema as a sweep; `space` is ignored (stage2 values are used)."""
    return load_experiment_config(path, overrides)
