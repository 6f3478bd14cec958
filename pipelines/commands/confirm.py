"""``ltsweep confirm SWEEP --top K --seeds N``: rerun the K best configurations of a finished sweep to the full
schedule with N fresh training seeds, on images the sweep did not choose on, as a new sweep linked to the first one
in MLflow; report the independent estimate beside the sweep's own and their difference (the winner's curse), and
give the winner's comparisons their verdicts.

An ASHA sweep ranks configurations on a few evaluations of a few seeds on one set of images, so its winner's
numbers are optimistic: it won partly by luck. Confirming:

1. reads the finished sweep back: its config from ``<storage>/<SWEEP>/ltsweep_sweep.json`` (written when it
   started) and its trial runs from MLflow, ranked by the sweep's own rule
   (:func:`pipelines.analysis.aggregate.ranked`);
2. runs the top K configurations, plus the best configuration matching ``report.baseline`` when the top K miss
   it, as the sweep ``<SWEEP>-confirm`` (``search.configs``, FIFO: every trial runs the full schedule) with N seeds
   that the first sweep never used (:func:`confirm_seeds`; each trains its own stage 1), evaluated on the held-out
   part of the validation file (``data.holdout``) or on ``data.test``; without either, on the same validation
   images, which it says;
3. tags both sweep runs with each other's run id (``ltsweep.confirms`` / ``ltsweep.confirmed_by``), records the
   seeds and the images on the confirmation run, and prints the summary (the winner's comparisons with their
   verdicts, corrected together) and, per configuration and metric, the selection estimate, the independent
   estimate and their difference, each with its interval (:mod:`pipelines.analysis.evidence`); the same table is
   the artifact ``confirmation.json`` of the confirmation run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lt_models.errors import ConfigError
from pipelines.analysis import aggregate, evidence, replicates
from pipelines.analysis.summary import SweepSummary
from pipelines.config.experiment import SEARCHABLE, ExperimentConfig
from pipelines.config.sections import Stage2Config
from pipelines.names import (
    BUCKET_METRICS,
    CONFIRM_IMAGES_TAG,
    CONFIRM_SEEDS_TAG,
    CONFIRMED_BY_TAG,
    CONFIRMS_TAG,
    MAX_T_TAG,
    METRIC_TAG,
    MODE_TAG,
    SEARCHED_KEYS_TAG,
    SEED_PARAM,
)

CONFIRM_SUFFIX = "-confirm"
CONFIRMATION_JSON = "confirmation.json"


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
    """n training seeds that the first sweep never used (the integers after its largest seed): every confirmed run
    is a new run, with its own stage 1, so the winner's selection luck does not carry over."""
    start = max(cfg.seeds) + 1
    return list(range(start, start + n))


def confirmation_images(cfg: ExperimentConfig) -> tuple[dict[str, Any], str]:
    """The data section of the confirmation (its runs evaluate on images the sweep did not choose on) and, in
    words, which images those are."""
    d = cfg.data
    if d.holdout is not None:
        return {"evaluate_on": "holdout"}, f"the held-out {d.holdout:g} of the validation images (data.holdout)"
    if d.test is not None:
        update = {"val": d.test, "val_image_dir": d.test_image_dir, "test": None, "test_image_dir": None}
        return update, f"the test file {d.test} (data.test)"
    return {}, (
        "the same validation images the sweep chose on (set data.holdout or data.test for an independent estimate; "
        "this one is optimistic)"
    )


def plan(
    cfg: ExperimentConfig, client, top: int, seeds: int
) -> tuple[ExperimentConfig, list[aggregate.ConfigResult], str]:
    """The confirmation sweep's config, the first sweep's ranked configurations (with their image replicates) and
    its parent run id."""
    from pipelines.analysis.report import row_configs
    from pipelines.mlflow_io.reads import latest_sweep_run, trial_replicates_file, trial_rows

    if top < 1 or seeds < 2:
        raise ConfigError(
            f"ltsweep confirm: --top must be >= 1 and --seeds >= 2 (an interval needs 2 seeds); got --top "
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
    for c in chosen:  # the selection estimates count the images too
        for r in c.runs.values():
            data = trial_replicates_file(client, r["run_id"])
            r["replicates"] = None if data is None else replicates.from_bytes(data)
    ranking = aggregate.ranked(row_configs(rows, searched, max_t, metric), metric, mode)
    configs = [_typed(cfg, {k: v for k, v in c.config.items() if k != SEED_PARAM}) for c in chosen]
    new = cfg.model_copy(deep=True, update={"name": cfg.name + CONFIRM_SUFFIX, "space": {}})
    new.scheduler.type = "fifo"
    new.search = new.search.model_copy(
        update={"algorithm": "basic", "configs": configs, "num_samples": 1, "seeds": confirm_seeds(cfg, seeds)}
    )
    new.data = new.data.model_copy(update=confirmation_images(cfg)[0])
    return ExperimentConfig.model_validate(new.model_dump()), ranking, parent.info.run_id


def winners_curse(
    selection: list[aggregate.ConfigResult], confirmed: list[aggregate.ConfigResult]
) -> list[dict[str, Any]]:
    """Per confirmed configuration and metric: the sweep's estimate (selection), the confirmation's (independent)
    and independent - selection, with their intervals."""
    by_label = {c.label(): c for c in selection}
    rows = []
    for c in confirmed:
        sel = by_label.get(c.label())
        for m in BUCKET_METRICS:
            if sel is None or m not in c.stats or m not in sel.stats:
                continue
            a, b = c.stats[m].interval(), sel.stats[m].interval()
            rows.append(
                {
                    "config": c.label(),
                    "metric": m,
                    "selection": b.text(),
                    "independent": a.text(),
                    "difference": evidence.independent_difference(a, b).text(signed=True),
                    "method": c.stats[m].method,
                }
            )
    return rows


def format_winners_curse(rows: list[dict[str, Any]]) -> str:
    head = ["configuration", "metric", "selection", "independent", "independent - selection"]
    body = [[r["config"], r["metric"], r["selection"], r["independent"], r["difference"]] for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


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
    from pipelines.mlflow_io.client import log_bytes_artifact, open_store
    from pipelines.mlflow_io.reads import latest_sweep_run
    from pipelines.tune.sweep import apply_run_overrides, run_sweep
    from pipelines.tune.tuner import tracking_uri_for

    cfg = load_sweep_config(name, storage_path)
    cfg = apply_run_overrides(cfg, storage_path, tracking_uri)
    client = open_store(tracking_uri_for(cfg))
    new, ranking, first_run = plan(cfg, client, top, seeds)
    assert new.search.configs is not None  # plan() sets the chosen configurations
    images = confirmation_images(cfg)[1]
    print(
        f"confirming {len(new.search.configs)} configuration(s) of sweep {name!r} (seeds {cfg.seeds}) with fresh "
        f"seeds {new.seeds} (full schedule) on {images}, as sweep {new.name!r}:"
    )
    for c in new.search.configs:
        print(f"  {c}")
    summary = run_sweep(new, verbose=verbose)
    curse = winners_curse(ranking, summary.configs)
    run = latest_sweep_run(client, new.name)
    if run is not None:
        client.set_tag(run.info.run_id, CONFIRMS_TAG, first_run)
        client.set_tag(run.info.run_id, CONFIRM_SEEDS_TAG, json.dumps(new.seeds))
        client.set_tag(run.info.run_id, CONFIRM_IMAGES_TAG, images[:5000])
        client.set_tag(first_run, CONFIRMED_BY_TAG, run.info.run_id)
        log_bytes_artifact(client, run.info.run_id, CONFIRMATION_JSON, json.dumps(curse, indent=1).encode())
    print_summary(summary)
    print(f"\nselection (sweep {name!r}, seeds {cfg.seeds}) vs independent (seeds {new.seeds}, {images}):")
    print(format_winners_curse(curse))
    return summary
