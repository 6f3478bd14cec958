"""Sweep report and `compare` (pipelines/analysis/report.py), plus the callback's run statuses
(pipelines/tracking/callback.py -> pipelines/tracking/writer.py), without Ray.

The callback is driven here by hand with stand-in trials (the real Tune path is tested in test_tracking.py), so
these tests take seconds; every MLflow read and write is real (a sqlite store shared by the module).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lt_models.errors import ConfigError
from pipelines.analysis.compare import compare_sweeps, format_compare_table
from pipelines.analysis.plots import PER_TRIAL_BARS, plot_ap_by_rank, plot_buckets, plot_iterations
from pipelines.analysis.report import build_sweep_report
from pipelines.mlflow_io.client import default_tracking_uri, open_store
from pipelines.mlflow_io.reads import search_tagged
from pipelines.tracking.callback import MLflowSweepCallback
from pipelines.tracking.stage1_run import log_pretrain_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(tid, AP, APr, APc, APf, iterations, status="FINISHED", **params):
    return {
        "trial_id": tid,
        "run_id": f"run-{tid}",
        "name": tid,
        "status": status,
        "tune_status": "",
        "iterations": iterations,
        "params": {k: str(v) for k, v in params.items()},
        "AP": AP,
        "AP50": None if AP is None else AP + 0.1,
        "APr": APr,
        "APc": APc,
        "APf": APf,
        "loss": 1.0,
        "epoch": iterations,
    }


ROWS = [
    row("t0", 0.20, 0.05, 0.20, 0.30, 4, lam=0.0, loss="concurrent_softmax", xi=0.3),
    row("t1", 0.25, 0.15, 0.24, 0.31, 4, lam=1.0, loss="acsl", xi=0.7),
    row("t2", 0.18, -1.0, 0.17, 0.28, 1, lam=1.5, loss="acsl", xi=0.5),
    row("t3", None, None, None, None, 0, status="FAILED", lam=0.5, loss="concurrent_softmax", xi=0.3),
]


def images(page: str) -> int:
    return page.count('src="data:image/png;base64,')


def test_report_has_every_figure_and_marks_the_best_trial():
    page = build_sweep_report(
        "s",
        ROWS,
        searched_keys=["lam", "loss", "xi"],
        best_per_class={1: 0.1, 2: 0.3},
        stage1_per_class={1: 0.0, 2: 0.2},
        max_t=4,
    )
    assert images(page) == 5
    assert re.search(r"<tr class='best'><td class='l'>t1</td>", page)  # highest AP
    assert "4 trials; 1 stopped early (before 4 evaluations); 1 failed" in page
    assert "ACSL trials only" in page  # concurrent-softmax trials have no ξ to plot
    assert "n/a" in page  # APr = -1 (empty bucket) and the failed trial's missing values
    assert "No stage-1 per-class AP" not in page


def test_report_explains_the_errors_and_shows_the_calibration():
    rows = [dict(r) for r in ROWS]
    for k, r in enumerate(rows[:3]):  # t1 (best AP) loses most to background errors, t0 to missed boxes
        r.update({f"dAP_{t}": 0.01 * k for t in ("Cls", "Loc", "Both", "Dupe")})
        r.update(dAP_Bkg=0.2 if k == 1 else 0.05, dAP_Miss=0.3 if k == 0 else 0.1, dAP_Bkg_r=0.4, dAP_Miss_r=-1.0)
    bins = {"edges": [0.0, 0.5, 1.0], "count": [3, 1], "confidence": [0.2, 0.9], "precision": [0.1, None]}
    calibration = {"reliability": {b: bins for b in ("all", "r", "c", "f")}, "ECE": 0.123, "ECEr": -1.0}
    page = build_sweep_report(
        "s", rows, searched_keys=["lam"], best_per_class={}, max_t=4, best_calibration=calibration
    )
    table = page.split("Where the AP goes")[1].split("</table>")[0]
    assert table.index(">t1<") < table.index(">t0<") < table.index(">t2<")  # by AP, best first; t3 has none
    assert "t3" not in table and "0.200 / 0.400" in table and "0.300 / n/a" in table
    assert re.search(r"<tr class='best'><td class='l'>t1</td>", table)
    assert 'alt="reliability diagram"' in page and "Calibration of the best trial" in page
    page = build_sweep_report("s", ROWS, searched_keys=["lam"], best_per_class={}, max_t=4)
    assert "No trial logged TIDE's breakdown" in page and "logged no reliability diagram" in page


def test_report_says_what_was_not_searched():
    page = build_sweep_report("s", ROWS[:2], searched_keys=["loss"], best_per_class={}, max_t=4)
    assert "λ was not searched in this sweep" in page and "ξ was not searched in this sweep" in page
    assert "The best trial reported no per-class AP" in page
    assert images(page) == 2  # buckets per trial + iterations per trial


def test_plot_ap_by_rank_writes_png_atomically(tmp_path):
    out = tmp_path / "plots" / "rank.png"
    data = plot_ap_by_rank({"a": {1: 0.5, 2: -1.0}, "b": {1: 0.2, 2: 0.1}}, out, order=[2, 1])
    assert out.read_bytes() == data and data[:8] == PNG_MAGIC
    assert [p.name for p in out.parent.iterdir()] == ["rank.png"]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # the IHDR chunk's width, height


def test_per_trial_figures_stay_readable_at_a_thousand_trials():
    many = [row(f"t{i}", i / 2000, 0.1, 0.2, 0.3, 1 + i % 4, lam=i / 1000) for i in range(1000)]
    few_w, few_h = png_size(plot_buckets(ROWS))
    w, h = png_size(plot_buckets(many))  # the 40 best trials by AP, not 1,000 bars
    assert w <= 0.55 * PER_TRIAL_BARS * 100 + 300 and h == few_h and w > few_w
    w, h = png_size(plot_iterations(many, 4))  # trials per number of evaluations, not 1,000 rows
    assert w <= 700 and h <= 400
    assert png_size(plot_iterations(ROWS, 4))[1] >= 240  # few trials: one row each


# ---------------------------------------------------------------------------------------------------------------
class FakeTrial:
    """What the callback reads from a Tune Trial (status, config, last_result, error_file)."""

    def __init__(self, trial_id, config):
        self.trial_id, self.config, self.status, self.last_result, self.error_file = (
            trial_id,
            config,
            "RUNNING",
            {},
            None,
        )

    def __str__(self):
        return f"fake_{self.trial_id}"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    return {"root": root, "uri": default_tracking_uri(root)}


def fake_sweep(
    uri, name, aps, *, sha="9" * 64, fail=(), leave_running=(), metric="AP", mode="max", configs=None, baseline=None
):
    """Drive the callback like Tune does: trial i reports len(aps[i]) results with AP = aps[i][step-1]; its
    config is configs[i] (default {"lam": 0.5 * i})."""
    cb = MLflowSweepCallback(
        uri,
        name,
        {"name": name, "scheduler": {"metric": metric, "mode": mode, "max_t": 3}, "report": {"baseline": baseline}},
        ["lam"] + (["seed"] if configs and "seed" in configs[0] else []),
    )
    cb.setup()
    trials = [FakeTrial(f"{name}_{i:05d}", configs[i] if configs else {"lam": 0.5 * i}) for i in range(len(aps))]
    for t, series in zip(trials, aps):
        cb.on_trial_start(0, trials, t)
        for step, ap in enumerate(series, 1):
            res = {
                "training_iteration": step,
                "AP": ap,
                "AP50": ap,
                "APr": ap / 2,
                "APc": ap,
                "APf": ap * 1.5,
                "loss": ap,
                "epoch": step,
                "pretrain_sha256": sha,
                "per_class": {"1": ap / 2, "2": ap, "3": ap * 1.5},
            }
            t.last_result = res
            cb.on_trial_result(0, trials, t, res)
        if t.trial_id.endswith(tuple(f"_{i:05d}" for i in fail)):
            t.status = "ERROR"
            cb.on_trial_error(0, trials, t)
        elif not t.trial_id.endswith(tuple(f"_{i:05d}" for i in leave_running)):
            cb.on_trial_complete(0, trials, t)
            t.status = "TERMINATED"
    cb.on_experiment_end(trials)
    return cb


def test_params_reach_the_runs_of_trials_that_never_reported(store):
    """A trial's params go out with its first result; one that fails, or is left running, before any result gets
    them at its end."""
    cb = fake_sweep(store["uri"], "no-report", [[0.2], [], []], fail=(1,), leave_running=(2,))
    runs = search_tagged(MlflowClient(store["uri"]), cb.experiment_id, {"ltsweep.role": "trial"})
    got = {r.data.tags["ltsweep.trial_id"]: (r.info.status, r.data.params.get("lam")) for r in runs}
    assert got == {
        "no-report_00000": ("FINISHED", "0.0"),
        "no-report_00001": ("FAILED", "0.5"),
        "no-report_00002": ("KILLED", "1.0"),
    }


def test_run_statuses_report_and_stage1_baseline_from_another_experiment(store):
    uri = store["uri"]
    # the stage-1 checkpoint was trained (and logged) by another sweep, then reused by this one
    log_pretrain_run(
        uri, "other-sweep", "9" * 64, {"epochs": 1}, {"AP": 0.1, "per_class": {1: 0.0, 2: 0.1, 3: 0.2}}, None
    )
    cb = fake_sweep(uri, "statuses", [[0.1, 0.2, 0.3], [0.1, 0.15], [0.2], [0.05, 0.1]], fail=(2,), leave_running=(3,))
    client = MlflowClient(uri)
    status = {
        r.data.tags["ltsweep.trial_id"]: r.info.status
        for r in search_tagged(client, cb.experiment_id, {"ltsweep.role": "trial"})
    }
    assert status == {
        "statuses_00000": "FINISHED",
        "statuses_00001": "FINISHED",
        "statuses_00002": "FAILED",
        "statuses_00003": "KILLED",
    }
    failed = client.get_run(cb.trial_run_id("statuses_00002"))
    assert "raised an error" in failed.data.tags["ltsweep.error"]
    parent = client.get_run(cb.parent_run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["ltsweep.errored_trials"] == "1"
    assert parent.data.tags["ltsweep.max_t"] == "3"
    page = Path(client.download_artifacts(cb.parent_run_id, "sweep_report.html", str(store["root"]))).read_text()
    assert "<b>statuses_00000</b> with AP = 0.300" in page
    assert "No stage-1 per-class AP" not in page  # found in experiment "other-sweep" by sha256
    assert "2 stopped early (before 3 evaluations); 1 failed" in page


def test_compare_picks_each_sweeps_best_trial(store, tmp_path, capsys):
    uri = store["uri"]
    fake_sweep(uri, "cmp-a", [[0.1, 0.4], [0.3, 0.35]])
    fake_sweep(uri, "cmp-b", [[0.7], [0.5, 0.45, 0.6]])
    fake_sweep(uri, "cmp-loss", [[0.1, 0.4, 0.5], [0.3, 0.35, 0.2], [0.05]], metric="loss", mode="min")
    rows = compare_sweeps(open_store(uri), ["cmp-a", "cmp-b", "cmp-loss"], out_png=tmp_path / "c.png")
    out = capsys.readouterr().out
    # best = best final metric among trials that ran all max_t=3 evaluations (ASHA's survivors), as in the sweep
    # summary: cmp-a has none, so all count; cmp-b's survivor beats the higher AP of a trial stopped after one
    # evaluation; cmp-loss is mode min (loss = AP here) and ignores the stopped trial's lower loss
    assert [(r["sweep"], r["trial_id"], r["AP"], r["iterations"]) for r in rows] == [
        ("cmp-a", "cmp-a_00000", 0.4, 2),
        ("cmp-b", "cmp-b_00001", 0.6, 3),
        ("cmp-loss", "cmp-loss_00001", 0.2, 3),
    ]
    assert rows[1]["params"] == {"lam": "0.5"} and rows[1]["APf"] == pytest.approx(0.9)
    assert out.splitlines()[0].split()[:5] == ["sweep", "best", "trial", "n", "AP"]
    assert "cmp-b_00001" in out and "0.600" in out and "0.900" in out
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC
    # a sweep run id names the same sweep as its experiment name
    by_id = compare_sweeps(open_store(uri), [rows[1]["parent_run_id"]], out_png=tmp_path / "d.png", quiet=True)
    assert (
        by_id[0]["sweep"] == "cmp-b"
        and by_id[0]["trial_id"] == "cmp-b_00001"
        and by_id[0]["parent_run_id"] == rows[1]["parent_run_id"]
    )


def test_compare_errors_name_the_problem(store, tmp_path):
    missing = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(
        ConfigError,
        match=r"ltsweep compare: MLflow store .*nowhere/mlflow.db does not exist.*"
        r"--tracking-uri",
    ):
        open_store(f"sqlite:///{missing}")
    assert not missing.parent.exists()  # no empty store was created on the way
    fake_sweep(store["uri"], "known-sweep", [[0.1]])
    with pytest.raises(ConfigError, match=r"no sweep named 'unknwon'.*known-sweep"):
        compare_sweeps(open_store(store["uri"]), ["unknwon"], out_png=tmp_path / "c.png")
    with pytest.raises(ConfigError, match="name at least one sweep"):
        compare_sweeps(open_store(store["uri"]), [])
    assert not (tmp_path / "c.png").exists()


def test_compare_table_is_aligned():
    rows = [
        {
            "sweep": "a",
            "trial_id": "a_1",
            "AP": 0.5,
            "AP50": 0.7,
            "APr": -1,
            "APc": 0.4,
            "APf": 0.6,
            "iterations": 3,
            "n_trials": 8,
            "params": {"lam": "1.0"},
        },
        {
            "sweep": "longer-name",
            "trial_id": "b_2",
            "AP": 0.25,
            "AP50": 0.5,
            "APr": 0.1,
            "APc": 0.2,
            "APf": 0.3,
            "iterations": 1,
            "n_trials": 2,
            "params": {"lam": "0.5", "xi": "0.3"},
        },
    ]
    lines = format_compare_table(rows).splitlines()
    assert len({len(l.rstrip()) for l in lines[:2]}) == 1
    assert "n/a" in lines[2] and lines[2].rstrip().endswith("—")  # APr -1 = empty bucket; xi not searched in a


def test_seeds_are_aggregated_in_the_report_the_run_and_compare(store, tmp_path, capsys):
    """Two configurations x 3 seeds: the report, the sweep run's metrics and artifact, and `compare` show n, mean and
    95% interval per configuration, and the paired comparison with the baseline has a p-value and a verdict."""
    uri = store["uri"]
    aps = {(0.7, 0): 0.30, (0.7, 1): 0.34, (0.7, 2): 0.32, (0.0, 0): 0.28, (0.0, 1): 0.31, (0.0, 2): 0.29}
    configs = [{"lam": lam, "seed": seed} for lam, seed in aps]
    cb = fake_sweep(uri, "seeded", [[0.1, 0.2, ap] for ap in aps.values()], configs=configs, baseline={"lam": 0.0})
    client = MlflowClient(uri)
    page = Path(client.download_artifacts(cb.parent_run_id, "sweep_report.html", str(tmp_path))).read_text()
    assert "Per configuration over its seeds" in page and "0.320 [" in page
    assert "the baseline" in page and "p = " in page and ": better (p = " in page
    assert "95% intervals: seeds only" in page  # these fake trials have no image replicates: said so
    metrics = client.get_run(cb.parent_run_id).data.metrics
    assert metrics["best_n"] == 3 and metrics["AP"] == pytest.approx(0.32)
    assert metrics["AP_ci_low"] < 0.32 < metrics["AP_ci_high"]
    assert (metrics["trials"], metrics["errored"], metrics["stopped_early"], metrics["trial_epochs"]) == (6, 0, 0, 18)
    exp = client.get_experiment(cb.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs table
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert client.get_run(cb.parent_run_id).data.tags["mlflow.source.git.commit"] == head.stdout.strip()
    table = json.loads(
        Path(client.download_artifacts(cb.parent_run_id, "config_aggregates.json", str(tmp_path))).read_text()
    )
    assert sorted((t["config"]["lam"], t["n"], t["best"]) for t in table) == [("0.0", 3, False), ("0.7", 3, True)]
    trial_params = [r.data.params for r in search_tagged(client, cb.experiment_id, {"ltsweep.role": "trial"})]
    assert sorted(p["seed"] for p in trial_params) == ["0", "0", "1", "1", "2", "2"]
    (row,) = compare_sweeps(open_store(uri), ["seeded"], out_png=tmp_path / "c.png")
    assert row["n"] == 3 and row["params"] == {"lam": "0.7"} and row["AP"] == pytest.approx(0.32)
    assert "0.320 [" in capsys.readouterr().out
    from pipelines import cli

    assert cli.main(["compare", "seeded", "--json", "--tracking-uri", uri, "--out", str(tmp_path / "j.png")]) == 0
    (doc,) = json.loads(capsys.readouterr().out)  # one strict JSON document
    assert doc["n"] == 3 and doc["AP"] == pytest.approx(0.32) and doc["stats"]["AP"]["ci_low"] < 0.32
    sweep_metrics = doc["sweep_metrics"]  # read back from the sweep run, as logged there
    assert sweep_metrics["trials"] == 6 and sweep_metrics["errored"] == 0 and sweep_metrics["best_n"] == 3
    assert sweep_metrics["AP"] == pytest.approx(0.32) and sweep_metrics["AP_ci_low"] < 0.32
    assert {"stopped_early", "trial_epochs", "AP50", "APr", "APc", "APf"} <= set(sweep_metrics)
