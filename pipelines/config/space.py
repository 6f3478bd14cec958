"""Search spaces: the YAML `space:` section → Ray Tune primitives, conditional on the sampler and the loss.

Each searched key is a stage-2 field with exactly one primitive (`grid`, `choice`, `uniform`, ...; the fixed table
`SPACE_PRIMITIVES`, never `eval`). Fields that belong to one sampler or one loss (λ to soft-balance, ξ to ACSL,
...: `SAMPLER_FIELDS`, `LOSS_FIELDS`) are *conditional*: when the sampler or the loss is searched too, such a field
is sampled only in the branches that read it, so an ACSL-only ξ never reaches a softmax trial and trials that
would differ only in an unread value are never generated.

With Tune's variant generator (`search.algorithm: basic`) a searched `loss` becomes a grid or choice over
branches: the plain name for a loss that reads none of the searched fields, `{"loss": "acsl", "xi": <primitive>}`
for one that does. Tune resolves the nested primitive inside the chosen branch. With Optuna the same rule is a
define-by-run function (`optuna_space`). `trial_values` turns either trial config into flat stage-2 values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, model_validator

from lt_models.data.sampler_spec import SAMPLER_OPTIONS
from lt_models.losses.registry import LOSS_PARAMS

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

# Stage-2 fields owned by the sampler or the loss: YAML field -> the SamplerSpec / LossSpec field it sets.
SAMPLER_FIELDS = {
    "lam": "lam",
    "samples_per_epoch": "num_samples",
    "rfs_threshold": "threshold",
    "lam_schedule": "lam_schedule",
}
LOSS_FIELDS = {
    k: k
    for k in ("xi", "eql_lambda", "seesaw_p", "seesaw_q", "eqlv2_gamma", "eqlv2_mu", "eqlv2_alpha", "fed_num_classes")
}
SELECTORS = {"sampler": (SAMPLER_FIELDS, SAMPLER_OPTIONS), "loss": (LOSS_FIELDS, LOSS_PARAMS)}


def owner_of(field: str) -> str | None:
    """'sampler' or 'loss' for a field that only some samplers / losses read, else None."""
    return next((sel for sel, (fields, _) in SELECTORS.items() if field in fields), None)


def readers(field: str) -> list[str]:
    """The samplers or losses that read a conditional stage-2 field (e.g. lam -> ['softbalance'])."""
    # defined for conditional fields only: for any other, owner_of is None and the lookup raises KeyError
    fields, reads = SELECTORS[cast(str, owner_of(field))]
    return [name for name, options in reads.items() if fields[field] in options]


def is_read(field: str, selector_value: str) -> bool:
    """Does the sampler / loss named `selector_value` read the conditional field `field`?"""
    return selector_value in readers(field)


class SpaceParam(BaseModel):
    """One searched hyperparameter: exactly one key of SPACE_PRIMITIVES."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    quniform: tuple[float, float, float] | None = None
    qloguniform: tuple[float, float, float] | None = None
    randint: tuple[int, int] | None = None
    qrandint: tuple[int, int, int] | None = None

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

    @property
    def is_list(self) -> bool:
        return self.kind in ("grid", "choice")

    def values_to_check(self) -> list[Any]:
        """Values a trial can receive (list kinds) or the bounds of the range (continuous kinds)."""
        return list(self.args) if self.is_list else list(self.args[:2])

    def to_tune(self, values: list[Any] | None = None):
        """The Tune primitive; `values` replaces the list of a grid / choice (the branches of a selector)."""
        from ray import tune

        fn_name, unpack = SPACE_PRIMITIVES[self.kind]
        fn = getattr(tune, fn_name)
        if values is not None or not unpack:
            return fn(list(self.args) if values is None else values)
        return fn(*self.args)


def conditional_keys(space: dict[str, SpaceParam], selector: str) -> list[str]:
    """Searched fields that depend on a searched `selector` (empty when the selector is fixed)."""
    return [k for k in space if selector in space and owner_of(k) == selector]


def tune_param_space(space: dict[str, SpaceParam]) -> dict[str, Any]:
    """The Tune param_space for the variant generator: unconditional keys as they are (in YAML order, which is
    Tune's sampling order), a searched sampler / loss as a grid or choice over its branches."""
    out: dict[str, Any] = {}
    for key, param in space.items():
        if owner_of(key) in space:
            continue  # sampled inside its selector's branches
        if key not in SELECTORS or not conditional_keys(space, key):
            out[key] = param.to_tune()
            continue
        branches = []
        for name in param.args:
            nested = {k: space[k].to_tune() for k in conditional_keys(space, key) if is_read(k, name)}
            branches.append({key: name, **nested} if nested else name)
        out[key] = param.to_tune(branches)
    return out


def optuna_space(space: dict[str, SpaceParam]) -> Callable[[Any], None]:
    """The same conditional space as an Optuna define-by-run function (selectors are suggested first)."""
    order = sorted(space, key=lambda k: owner_of(k) is not None)

    def define(trial) -> None:
        chosen: dict[str, Any] = {}
        for key in order:
            owner = owner_of(key)
            if owner in chosen and not is_read(key, chosen[owner]):
                continue
            chosen[key] = _suggest(trial, key, space[key])

    return define


def _suggest(trial, key: str, p: SpaceParam):
    a = p.args
    if p.kind == "choice":
        return trial.suggest_categorical(key, list(a))
    if p.kind in ("uniform", "loguniform"):
        return trial.suggest_float(key, a[0], a[1], log=p.kind == "loguniform")
    if p.kind == "quniform":
        return trial.suggest_float(key, a[0], a[1], step=a[2])
    if p.kind == "randint":  # Tune's randint excludes the upper bound
        return trial.suggest_int(key, a[0], a[1] - 1)
    if p.kind == "qrandint":
        return trial.suggest_int(key, a[0], a[1], step=a[2])
    raise ValueError(f"space.{key}: {p.kind} is not available with search.algorithm optuna")


# A trial config key whose value is a whole configuration (search.configs, `ltsweep confirm`)
CONFIGURATION_KEY = "configuration"


def trial_values(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled values as flat stage-2 fields: the chosen branch of a searched sampler / loss, or a whole
    listed configuration, is unpacked (`{"loss": {"loss": "acsl", "xi": 0.3}}` -> `{"loss": "acsl", "xi": 0.3}`)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if (key in SELECTORS or key == CONFIGURATION_KEY) and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat
