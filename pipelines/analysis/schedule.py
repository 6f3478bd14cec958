"""A trial's hyperparameter schedule from what it reported: the λ each evaluation trained with, as the
``stage2.lam_schedule`` that replays it (a PBT sweep's result). The reports are read back from the trial's MLflow
run (its ``lam`` and ``epoch`` series), which keeps every evaluation even when PBT restarted the trial from
another trial's checkpoint."""

from __future__ import annotations

from collections.abc import Sequence

from pipelines.mlflow_io.reads import search_tagged
from pipelines.names import ROLE_TAG, ROLE_TRIAL, TRIAL_ID_TAG


def lam_schedule(epochs: Sequence[float], lams: Sequence[float | None], every: int = 1) -> list[list] | None:
    """``[[epoch, λ], ...]`` (epochs counted from 0, a new entry where λ changes) from the reports of one trial:
    the evaluation after epoch ``e`` (1-based) reports the λ of the ``every`` epochs before it. None without λ."""
    out: list[list] = []
    for epoch, lam in sorted(zip(epochs, lams), key=lambda p: p[0]):
        if lam is None:
            return None
        if not out or out[-1][1] != lam:
            out.append([0 if not out else max(int(epoch) - every, 0), float(lam)])
    return out or None


def run_lam_schedule(client, run_id: str, every: int = 1) -> list[list] | None:
    """The λ schedule of a trial's MLflow run (its ``epoch`` and ``lam`` series, joined on the step), or None."""
    epoch = {m.step: m.value for m in client.get_metric_history(run_id, "epoch")}
    lam = {m.step: m.value for m in client.get_metric_history(run_id, "lam")}
    steps = sorted(set(epoch) & set(lam))
    return lam_schedule([epoch[s] for s in steps], [lam[s] for s in steps], every) if steps else None


def trial_lam_schedule(tracking_uri: str, sweep: str, trial_id: str, every: int = 1) -> list[list] | None:
    """The λ schedule of trial ``trial_id`` of ``sweep`` in the store at ``tracking_uri``, or None."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(sweep)
    runs = (
        [] if exp is None else search_tagged(client, exp.experiment_id, {ROLE_TAG: ROLE_TRIAL, TRIAL_ID_TAG: trial_id})
    )
    return run_lam_schedule(client, runs[-1].info.run_id, every) if runs else None
