"""The one best-trial rule (pipelines.analysis.aggregate.best_trial), on both kinds of trial records: the sweep's trial
summaries (pipelines.analysis.summary) and the trial rows read back from MLflow (pipelines.analysis.report)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from pipelines.analysis.aggregate import best_trial
from pipelines.analysis.report import best_row
from pipelines.analysis.summary import TrialSummary, summarize
from pipelines.names import per_class_dict

FAILED = "failed"


def as_summaries(trials):
    """(trial_id, AP or None, evaluations, FAILED or None) -> TrialSummary records, as summarize makes them."""
    return [
        TrialSummary(
            trial_id=tid,
            config={},
            metrics={} if ap is None else {"AP": ap, "loss": 1 - ap},
            epochs=n,
            evaluations=n,
            stopped_early=False,
            error="RuntimeError: x" if err else None,
        )
        for tid, ap, n, err in trials
    ]


def as_rows(trials):
    """The same trials as report.trial_rows gives them (MLflow run status, `iterations`, metric or None)."""
    return [
        {
            "trial_id": tid,
            "run_id": f"run-{tid}",
            "status": "FAILED" if err else "FINISHED",
            "iterations": n,
            "params": {},
            "AP": ap,
            "loss": None if ap is None else 1 - ap,
        }
        for tid, ap, n, err in trials
    ]


def best_summary(trials, metric="AP", mode="max", full_length=3):
    best = best_trial(
        as_summaries(trials),
        value=lambda t: t.metrics.get(metric),
        evaluations=lambda t: t.evaluations,
        failed=lambda t: t.error is not None,
        trial_id=lambda t: t.trial_id,
        mode=mode,
        full_length=full_length,
    )
    return None if best is None else best.trial_id


def best_of_rows(trials, metric="AP", mode="max", full_length=3):
    best = best_row(as_rows(trials), metric, mode, full_length)
    return None if best is None else best["trial_id"]


CASES = [
    # a full-length trial (ASHA's survivor) beats a higher AP of a trial stopped early
    ([("t0", 0.9, 1, None), ("t1", 0.5, 3, None), ("t2", 0.4, 3, None)], {}, "t1"),
    # a failed trial never wins, whatever it reported
    ([("t0", 0.99, 3, FAILED), ("t1", 0.5, 3, None)], {}, "t1"),
    # no trial ran the full schedule: every trial without error counts
    ([("t0", 0.3, 1, None), ("t1", 0.6, 2, None), ("t2", 0.9, 2, FAILED)], {}, "t1"),
    # without a full length, every trial without error counts
    ([("t0", 0.9, 1, None), ("t1", 0.5, 3, None)], {"full_length": None}, "t0"),
    ([("t0", 0.9, 1, None), ("t1", 0.5, 3, None)], {"full_length": 0}, "t0"),
    # mode min (loss = 1 - AP here)
    ([("t0", 0.9, 3, None), ("t1", 0.5, 3, None), ("t2", 0.95, 1, None)], {"metric": "loss", "mode": "min"}, "t0"),
    # missing and non-finite values do not count
    ([("t0", None, 3, None), ("t1", math.nan, 3, None), ("t2", 0.1, 1, None)], {}, "t2"),
    # ties: the larger trial id wins (deterministic, whatever the order of the records)
    ([("t2", 0.5, 3, None), ("t10", 0.5, 3, None), ("t1", 0.5, 3, None)], {}, "t2"),
    # nothing qualifies
    ([("t0", None, 3, None), ("t1", 0.9, 3, FAILED)], {}, None),
    ([], {}, None),
]


@pytest.mark.parametrize("trials,kw,expected", CASES)
def test_best_trial_is_the_same_on_summaries_and_mlflow_rows(trials, kw, expected):
    assert best_summary(trials, **kw) == expected
    assert best_of_rows(trials, **kw) == expected
    assert best_summary(list(reversed(trials)), **kw) == expected


def summary_cfg() -> SimpleNamespace:
    """What summarize reads of an ExperimentConfig: 3 evaluations per trial, AP / max."""
    return SimpleNamespace(
        name="s",
        evals_per_trial=3,
        scheduler=SimpleNamespace(metric="AP", mode="max"),
        run=SimpleNamespace(storage_path="/st"),
        report=SimpleNamespace(baseline=None),
        eval=SimpleNamespace(every=1),
    )


def test_summarize_uses_the_rule():
    """summarize picks the best trial of a Tune ResultGrid by the rule (stand-ins for Tune's results and the config)."""

    def result(tid, ap, n, error=None):
        return SimpleNamespace(
            metrics={"trial_id": tid, "training_iteration": n, "epoch": n, "AP": ap, "APr": ap / 2, "AP75": 0.1},
            config={"lam": 0.5},
            error=error,
            path=f"/x/{tid}",
        )

    cfg = summary_cfg()
    results = [result("a", 0.9, 1), result("b", 0.5, 3), result("c", 0.99, 3, error=RuntimeError("boom\nlast line"))]
    summary = summarize(cfg, results, None, False, experiment_path="/st/s", tracking_uri="sqlite:////st/mlflow.db")
    assert summary.best.trial_id == "b"
    assert summary.stopped_early == 1 and summary.errored == 1
    assert summary.trials[2].error == "RuntimeError: last line"
    assert summary.trials[0].metrics == {"AP": 0.9, "APr": 0.45}  # only the metrics a scheduler may rank by
    assert (summary.experiment_path, summary.tracking_uri) == ("/st/s", "sqlite:////st/mlflow.db")


def test_per_class_dict_normalises_results_and_json():
    assert per_class_dict({"1": 0.5, 2: -1, "x": 0.3, "3": None, "4": float("inf")}) == pytest.approx(
        {1: 0.5, 2: -1.0, 3: math.nan, 4: math.nan}, nan_ok=True
    )
    assert per_class_dict(None) == {} and per_class_dict([1, 2]) == {}


def test_a_trial_failing_on_bad_input_is_one_line_and_exit_2():
    """Tune hands back a RayTaskError whose `cause` is the trial's own exception: the summary shows the cause's one
    line, and bad input (AnnotationError / ConfigError) makes the sweep exit 2."""
    from lt_models.errors import AnnotationError

    class Wrapped(RuntimeError):  # stands in for ray.exceptions.RayTaskError
        def __init__(self, cause):
            super().__init__("ray::train_trial() (pid=1)\n  File ...\n  many lines of traceback")
            self.cause = cause

    def result(tid, error=None):
        return SimpleNamespace(
            metrics={"trial_id": tid, "training_iteration": 0 if error else 3, "epoch": 3, "AP": 0.3},
            config={"lam": 0.5},
            error=error,
            path=f"/x/{tid}",
        )

    cfg = summary_cfg()
    bad = Wrapped(AnnotationError("train.json: annotation id 7: field 'bbox' has w <= 0; fix it"))
    s = summarize(cfg, [result("a"), result("b", bad)], None, False, experiment_path="/st/s", tracking_uri="x")
    assert s.trials[1].error == "AnnotationError: train.json: annotation id 7: field 'bbox' has w <= 0; fix it"
    assert s.trials[1].bad_input and s.exit_code() == 2 and "ERROR: AnnotationError" in s.table()
    crash = Wrapped(RuntimeError("CUDA out of memory"))
    s = summarize(cfg, [result("a"), result("b", crash)], None, False, experiment_path="/st/s", tracking_uri="x")
    assert s.trials[1].error == "RuntimeError: CUDA out of memory" and s.exit_code() == 1
    assert summarize(cfg, [result("a")], None, False, experiment_path="/st/s", tracking_uri="x").exit_code() == 0


def test_ctrl_c_before_the_last_checkpoint_is_registered_leaves_the_trial_interrupted():
    """A trial that reported its last evaluation but whose checkpoint Tune had not registered when Ctrl+C came is
    restored one evaluation back by --resume: the summary calls it interrupted, neither finished nor stopped early."""

    def result(tid, n, kept):
        return SimpleNamespace(
            metrics={"trial_id": tid, "training_iteration": n, "epoch": n, "AP": 0.2},
            config={"lam": 0.5},
            error=None,
            path=f"/x/{tid}",
            best_checkpoints=[(object(), {"training_iteration": k}) for k in kept],
        )

    cfg = summary_cfg()
    results = [result("behind", 3, [1, 2]), result("done", 3, [2, 3]), result("none-kept", 3, [])]
    s = summarize(
        cfg, results, None, False, experiment_path="/st/s", tracking_uri="x", interrupted=True, completed=set()
    )
    assert [t.interrupted for t in s.trials] == [True, False, False]
    assert s.unfinished == 1 and s.stopped_early == 0 and s.exit_code() == 1
    # not interrupted: the same results are a finished sweep
    s = summarize(cfg, results, None, False, experiment_path="/st/s", tracking_uri="x")
    assert s.unfinished == 0 and s.stopped_early == 0
