"""The MLflow run of a stage-1 training (`ltsweep.role=pretrain`): one per checkpoint sha256 and experiment,
also when the checkpoint is reused from an earlier sweep."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

from pipelines.mlflow_io.client import (
    MAX_KEY_LEN,
    code_version,
    flatten,
    get_or_create_experiment,
    log_params,
    log_tags,
    make_client,
)
from pipelines.mlflow_io.reads import search_tagged
from pipelines.names import (
    CHECKPOINT_TAG,
    CODE_VERSION_TAG,
    PRETRAIN_SHA_TAG,
    ROLE_PRETRAIN,
    ROLE_TAG,
    SWEEP_TAG,
    finite_number,
    per_class_dict,
)
from pipelines.tracking.artifacts import log_per_class_artifacts
from pipelines.tracking.lineage import log_datasets, source_tags


# --------------------------------------------------------------------------------------------------------------
def log_pretrain_run(
    tracking_uri: str,
    sweep_name: str,
    sha256: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    checkpoint_path: str | os.PathLike | None,
    *,
    val_annotations: str | os.PathLike | None = None,
) -> str:
    """Record the shared stage-1 training as a run (``ltsweep.role=pretrain``, ``ltsweep.pretrain_sha256``) in the
    sweep's experiment and return its run id.

    Idempotent: if the experiment already holds a pretrain run with this sha256, that run is reused (finished if a
    previous driver died half-way), never duplicated. ``metrics``: numeric values are logged (step =
    ``metrics["iteration"]`` or ``metrics["epoch"]``); a ``per_class`` dict {category_id: AP} becomes the artifacts
    ``per_class_ap.json``/``.csv`` and ``ap_by_frequency.png``, which the sweep report uses as the stage-1 baseline.
    The checkpoint itself is not uploaded; its path is the tag ``ltsweep.checkpoint``. ``val_annotations`` (optional)
    names categories and frequency buckets in those artifacts, as for trial runs.
    """
    from mlflow.entities import Metric

    client = make_client(tracking_uri)
    exp_id = get_or_create_experiment(client, sweep_name, tracking_uri)
    runs = search_tagged(client, exp_id, {ROLE_TAG: ROLE_PRETRAIN, PRETRAIN_SHA_TAG: sha256})
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if finished:
        return finished[0].info.run_id
    if runs:
        run = runs[0]
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
    else:
        run = client.create_run(
            exp_id,
            run_name=f"pretrain-{sha256[:12]}",
            tags={ROLE_TAG: ROLE_PRETRAIN, PRETRAIN_SHA_TAG: sha256, SWEEP_TAG: sweep_name, **source_tags()},
        )
    run_id = run.info.run_id
    log_params(client, run_id, flatten(dict(params or {})), run.data.params)
    log_datasets(
        client,
        run_id,
        (params or {}).get("train_annotations"),
        os.fspath(val_annotations) if val_annotations else None,
        (params or {}).get("dataset_fingerprint"),
    )
    log_tags(
        client,
        run_id,
        {CHECKPOINT_TAG: os.fspath(checkpoint_path) if checkpoint_path else None, CODE_VERSION_TAG: code_version()},
    )
    metrics = dict(metrics or {})
    step = int(finite_number(metrics.get("iteration", metrics.get("epoch", 0))) or 0)
    ts = int(time.time() * 1000)
    ms = []
    for k, v in metrics.items():
        if k == "per_class":
            continue
        f = finite_number(v)
        if f is not None or (isinstance(v, float) and math.isnan(v)):
            ms.append(Metric(str(k)[:MAX_KEY_LEN], float(v), ts, step))
    for i in range(0, len(ms), 1000):
        client.log_batch(run_id, metrics=ms[i : i + 1000])
    per_class = per_class_dict(metrics.get("per_class"))
    if per_class:
        log_per_class_artifacts(
            client, run_id, per_class, metrics, os.fspath(val_annotations) if val_annotations else None, "stage 1"
        )
    client.set_terminated(run_id, status="FINISHED")
    return run_id
