"""What the MLflow writer reads from a sweep's params (the flattened sweep config it logs on the parent run): one
setting wherever the config put it, a full-length trial's evaluations, and the parent run's descriptive tags."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines.mlflow_io.client import code_version, find_key, flatten
from pipelines.names import (
    CODE_VERSION_TAG,
    FINGERPRINT_TAG,
    FREQUENCY_SOURCE_TAG,
    MAX_T_TAG,
    METRIC_TAG,
    MODE_TAG,
    SEARCH_SPACE_TAG,
    SEARCHED_KEYS_TAG,
)


def sweep_setting(sweep_params: Mapping[str, Any], name: str, default: Any) -> Any:
    """``name`` as the sweep config gives it, at the top or under scheduler / tune / sweep, else ``default``."""
    flat = flatten(dict(sweep_params))
    for key in (name, f"scheduler.{name}", f"tune.{name}", f"sweep.{name}"):
        if flat.get(key) not in (None, ""):
            return flat[key]
    return default


def max_evaluations(sweep_params: Mapping[str, Any]) -> int | None:
    """Evaluations of a full-length trial: the sweep's ``max_evaluations``, else ``scheduler.max_t``, else
    ceil(stage2.epochs / eval.every)."""
    flat = flatten(dict(sweep_params))
    v = sweep_params.get("max_evaluations")
    if v in (None, ""):
        v = sweep_setting(sweep_params, "max_t", None)
    if v in (None, "") and flat.get("stage2.epochs") is not None:
        v = math.ceil(float(flat["stage2.epochs"]) / float(flat.get("eval.every") or 1))
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def parent_tags(sweep_params: Mapping[str, Any], searched_keys: Sequence[str]) -> dict[str, Any]:
    """The sweep run's tags: its search space, searched keys, data fingerprint, code version, metric and mode."""
    flat = flatten(dict(sweep_params))
    space = next((sweep_params[k] for k in ("space", "search_space") if sweep_params.get(k)), None)
    return {
        SEARCH_SPACE_TAG: space if space is not None else list(searched_keys),
        SEARCHED_KEYS_TAG: list(searched_keys),
        FINGERPRINT_TAG: find_key(flat, "dataset_fingerprint"),
        FREQUENCY_SOURCE_TAG: find_key(flat, "frequency_source"),
        CODE_VERSION_TAG: code_version(),
        METRIC_TAG: sweep_setting(sweep_params, "metric", "AP"),
        MODE_TAG: sweep_setting(sweep_params, "mode", "max"),
        MAX_T_TAG: max_evaluations(sweep_params),
    }
