"""``ltsweep confirm SWEEP --top K --seeds N``: rerun the K best configurations of a finished sweep to the full
schedule with N training seeds, as a new sweep linked to the first one in MLflow, and say whether the winner's lead
is larger than the seed-to-seed noise.

An ASHA sweep ranks configurations on a few evaluations of one seed each, so its winner may be noise. Confirming:

1. reads the finished sweep back: its config from ``<storage>/<SWEEP>/ltsweep_sweep.json`` (written when it
   started) and its trial runs from MLflow, ranked by the sweep's own rule
   (:func:`pipelines.analysis.aggregate.ranked`);
2. runs the top K configurations, plus the best configuration matching ``report.baseline`` when the top K miss
   it, as the sweep ``<SWEEP>-confirm`` (``search.configs``, FIFO: every trial runs the full schedule) with the
   seeds of the first sweep extended to N (so their stage-1 checkpoints are reused);
3. tags both sweep runs with each other's run id (``ltsweep.confirms`` / ``ltsweep.confirmed_by``) and prints the
   summary: n, mean and 95% CI per configuration, and the paired comparisons of the winner with the runner-up and
   with the baseline (scipy.stats.ttest_rel), in words.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lt_models.errors import ConfigError
from pipelines.analysis import aggregate
from pipelines.analysis.summary import SweepSummary
from pipelines.config.experiment import SEARCHABLE, ExperimentConfig
from pipelines.config.sections import Stage2Config
from pipelines.names import (
    CONFIRMED_BY_TAG,
    CONFIRMS_TAG,
    MAX_T_TAG,
    METRIC_TAG,
    MODE_TAG,
    SEARCHED_KEYS_TAG,
    SEED_PARAM,
)

CONFIRM_SUFFIX = "-confirm"


def load_sweep_config(name: str, storage_path: str | Path) -> ExperimentConfig:
    """The config a sweep ran with, from the record it wrote at its start (a directory or an object-store URI,
    :mod:`pipelines.storage.location`)."""
    from pipelines.storage import location as storage
    from pipelines.tune.sweep import SWEEP_RECORD

    record = storage.join(storage.as_location(storage_path), name, SWEEP_RECORD)
    shown = storage.display(record)
    if not storage.is_file(record):
        raise ConfigError(
            f"ltsweep confirm: no sweep {name!r} under {storage.display(storage_path)} ({shown} is "
            "missing); pass the sweep's name and its --storage-path"
        )
    data = storage.read_json(record)
    if "config" not in data:
        raise ConfigError(
            f"ltsweep confirm: {shown} was written by an older ltsweep and holds no config; rerun "
            "the sweep, or run the configurations with search.configs in a new YAML"
        )
    return ExperimentConfig.model_validate(data["config"])


def _typed(cfg: ExperimentConfig, params: dict[str, str]) -> dict[str, Any]:
    """MLflow params (strings) of the searched stage-2 fields, as the config's typed values."""
    keys = [k for k in params if k in SEARCHABLE]
    s2 = Stage2Config.model_validate({**cfg.stage2.model_dump(), **{k: params[k] for k in keys}})
    return {k: getattr(s2, k) for k in keys}


def confirm_seeds(cfg: ExperimentConfig, n: int) -> list[int]:
    """The first sweep's seeds, extended with the next unused integers to n seeds."""
    seeds = list(cfg.seeds)[:n]
    candidate = 0
    while len(seeds) < n:
        if candidate not in seeds:
            seeds.append(candidate)
        candidate += 1
    return seeds


def plan(
    cfg: ExperimentConfig, client, top: int, seeds: int
) -> tuple[ExperimentConfig, list[aggregate.ConfigResult], str]:
    """The confirmation sweep's config, the first sweep's ranked configurations and its parent run id."""
    from pipelines.analysis.report import row_configs
    from pipelines.mlflow_io.reads import latest_sweep_run, trial_rows

    if top < 1 or seeds < 2:
        raise ConfigError(
            f"ltsweep confirm: --top must be >= 1 and --seeds >= 2 (a CI needs 2 seeds); got --top "
            f"{top} --seeds {seeds}"
        )
    parent = latest_sweep_run(client, cfg.name)
    if parent is None:
        raise ConfigError(
            f"ltsweep confirm: sweep {cfg.name!r} has no MLflow sweep run in {client.tracking_uri}; "
            "pass the --tracking-uri the sweep logged to"
        )
    tags = parent.data.tags
    metric, mode = tags.get(METRIC_TAG, cfg.scheduler.metric), tags.get(MODE_TAG, cfg.scheduler.mode)
    max_t = int(tags.get(MAX_T_TAG) or cfg.evals_per_trial)
    searched = json.loads(tags.get(SEARCHED_KEYS_TAG, "[]")) or cfg.searched_keys()
    rows = trial_rows(client, parent.info.experiment_id, parent.info.run_id)
    ranking = aggregate.ranked(row_configs(rows, searched, max_t, metric), metric, mode)
    if not ranking:
        raise ConfigError(f"ltsweep confirm: no trial of sweep {cfg.name!r} reported {metric}; nothing to confirm")
    chosen = ranking[:top]
    baseline = cfg.report.baseline
    if baseline and not any(aggregate.matches(c.config, baseline) for c in chosen):
        chosen += [c for c in ranking if aggregate.matches(c.config, baseline)][:1]
    configs = [_typed(cfg, {k: v for k, v in c.config.items() if k != SEED_PARAM}) for c in chosen]
    new = cfg.model_copy(deep=True, update={"name": cfg.name + CONFIRM_SUFFIX, "space": {}})
    new.scheduler.type = "fifo"
    new.search = new.search.model_copy(
        update={"algorithm": "basic", "configs": configs, "num_samples": 1, "seeds": confirm_seeds(cfg, seeds)}
    )
    return ExperimentConfig.model_validate(new.model_dump()), ranking, parent.info.run_id


def confirm(
    name: str,
    *,
    top: int = 3,
    seeds: int = 3,
    storage_path: str | Path = Path("results"),
    tracking_uri: str | None = None,
    verbose: int = 0,
) -> SweepSummary:
    """Run the confirmation of sweep ``name`` (see the module docstring); returns its summary."""
    from pipelines.analysis.summary import print_summary
    from pipelines.mlflow_io.client import open_store
    from pipelines.mlflow_io.reads import latest_sweep_run
    from pipelines.tune.sweep import apply_run_overrides, run_sweep
    from pipelines.tune.tuner import tracking_uri_for

    cfg = load_sweep_config(name, storage_path)
    cfg = apply_run_overrides(cfg, storage_path, tracking_uri)
    client = open_store(tracking_uri_for(cfg))
    new, ranking, first_run = plan(cfg, client, top, seeds)
    assert new.search.configs is not None  # plan() sets the chosen configurations
    print(
        f"confirming {len(new.search.configs)} configuration(s) of sweep {name!r} with seeds {new.seeds} "
        f"(full schedule) as sweep {new.name!r}:"
    )
    for c in new.search.configs:
        print(f"  {c}")
    summary = run_sweep(new, verbose=verbose)
    run = latest_sweep_run(client, new.name)
    if run is not None:
        client.set_tag(run.info.run_id, CONFIRMS_TAG, first_run)
        client.set_tag(first_run, CONFIRMED_BY_TAG, run.info.run_id)
    print_summary(summary)
    return summary
