"""Reading sweeps back from MLflow: runs by their tags (`pipelines.names`), the newest sweep run of an experiment,
a sweep's trial rows, the per-class AP of a trial or of the stage-1 run, a trial's reliability diagram
(`calibration.json`) and its image-bootstrap replicates."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lt_models.evaluation.bootstrap import REPLICATES_FILE
from pipelines.names import (
    CALIBRATION_JSON,
    ITERATIONS_TAG,
    MLFLOW_TRIAL_METRICS,
    PARENT_TAG,
    PER_CLASS_JSON,
    PRETRAIN_SHA_TAG,
    ROLE_PRETRAIN,
    ROLE_SWEEP,
    ROLE_TAG,
    ROLE_TRIAL,
    TRIAL_ID_TAG,
    TRIAL_STATUS_TAG,
    per_class_dict,
)


def search_tagged(client, experiment_id: str, tags: Mapping[str, str]) -> list:
    """Active runs whose tags equal ``tags`` (keys given verbatim, e.g. ``{"ltsweep.role": "trial"}``), oldest
    first."""
    from mlflow.entities import ViewType
    from mlflow.utils import get_results_from_paginated_fn

    def q(value: str) -> str:  # a string literal of an MLflow filter string
        return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"

    flt = " and ".join(f"tags.`{k}` = {q(v)}" for k, v in tags.items())
    return get_results_from_paginated_fn(
        lambda n, token: client.search_runs(
            [experiment_id],
            filter_string=flt,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=n,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        ),
        1000,
    )


def latest_sweep_run(client, experiment_name: str):
    """The newest sweep run (``ltsweep.role=sweep``) of the experiment named ``experiment_name``, or None."""
    exp = client.get_experiment_by_name(experiment_name)
    runs = [] if exp is None else search_tagged(client, exp.experiment_id, {ROLE_TAG: ROLE_SWEEP})
    return runs[-1] if runs else None  # search_tagged lists oldest first


def trial_rows(client, experiment_id: str, parent_run_id: str) -> list[dict[str, Any]]:
    """One dict per trial run of the sweep: ids, status, iterations, params and the latest metric values."""
    rows = []
    for r in search_tagged(client, experiment_id, {ROLE_TAG: ROLE_TRIAL, PARENT_TAG: parent_run_id}):
        tags, metrics = r.data.tags, r.data.metrics
        iters = tags.get(ITERATIONS_TAG)
        if iters is None:  # still running, or ended without our tag: the last step logged
            hist = client.get_metric_history(r.info.run_id, "epoch") or client.get_metric_history(r.info.run_id, "AP")
            iters = max((m.step for m in hist), default=0)
        row = {
            "trial_id": tags.get(TRIAL_ID_TAG, ""),
            "run_id": r.info.run_id,
            "name": r.info.run_name or "",
            "status": r.info.status,
            "tune_status": tags.get(TRIAL_STATUS_TAG, ""),
            "iterations": int(iters),
            "params": dict(r.data.params),
        }
        for k in MLFLOW_TRIAL_METRICS:
            row[k] = metrics.get(k)
        rows.append(row)
    rows.sort(key=lambda row: row["trial_id"])
    return rows


def download_per_class(client, run_id: str) -> dict[int, float]:
    try:
        with tempfile.TemporaryDirectory(prefix="ltsweep-report-") as tmp:
            p = client.download_artifacts(run_id, PER_CLASS_JSON, tmp)
            return per_class_dict(json.loads(Path(p).read_text()))
    except Exception:
        return {}


def download_calibration(client, run_id: str) -> dict[str, Any]:
    """A trial run's ``calibration.json`` ({"reliability": per bucket, "ECE": …}), or {} when it has none."""
    try:
        with tempfile.TemporaryDirectory(prefix="ltsweep-report-") as tmp:
            data = json.loads(Path(client.download_artifacts(run_id, CALIBRATION_JSON, tmp)).read_text())
            return data if isinstance(data, dict) else {}
    except Exception:
        return {}


def trial_replicates_file(client, run_id: str) -> bytes | None:
    """The image-bootstrap replicates file logged on a trial run (``replicates.npz``), or None."""
    try:
        with tempfile.TemporaryDirectory(prefix="ltsweep-reps-") as tmp:
            return Path(client.download_artifacts(run_id, REPLICATES_FILE, tmp)).read_bytes()
    except Exception:
        return None


def stage1_per_class(client, experiment_id: str, sha256: str | None) -> tuple[dict[int, float], str | None]:
    """Per-class AP of the stage-1 (pretrain) run with this sha256: this experiment first, then any experiment
    (a reused stage-1 checkpoint is logged where it was trained). Returns ({}, None) if none is found."""
    candidates = []
    tags = {ROLE_TAG: ROLE_PRETRAIN, **({PRETRAIN_SHA_TAG: sha256} if sha256 else {})}
    candidates.extend(search_tagged(client, experiment_id, tags))
    if not candidates and sha256:
        for exp in client.search_experiments():
            if exp.experiment_id != experiment_id:
                candidates.extend(search_tagged(client, exp.experiment_id, tags))
    for run in reversed(candidates):  # the newest first
        pc = download_per_class(client, run.info.run_id)
        if pc:
            return pc, run.info.run_id
    return {}, None
