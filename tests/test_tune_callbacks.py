"""The sweep's loggers see a report only once Tune has registered the report's checkpoint (CheckpointedResults).

Tune calls its callbacks' ``on_trial_result`` before the trial's ``save`` comes back with the checkpoint; a sweep
interrupted in between restores the trial from its previous checkpoint. These tests drive the callbacks with Tune's
own hook calls in that order, without a Ray session.
"""

import json
import pickle
from types import SimpleNamespace

from ray.tune.result import SHOULD_CHECKPOINT

from pipelines.tracking.callback import CheckpointedResults
from pipelines.tune.callbacks import CSVLogger, JsonLogger, ProgressPrinter, TBXLogger, tune_callbacks


class Recorder:
    """A Tune callback's hooks, recording what reaches them."""

    def __init__(self):
        self.seen: list[tuple[str, object]] = []
        self.results: list[dict] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.seen.append(("result", result["training_iteration"]))
        self.results.append(dict(result))

    def on_trial_save(self, iteration, trials, trial, **info):
        self.seen.append(("save", trial.trial_id))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.seen.append(("recover", trial.trial_id))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.seen.append(("error", trial.trial_id))


class Held(CheckpointedResults, Recorder):
    pass


def report(n: int, checkpoint: bool = True) -> dict:
    return {"training_iteration": n, "AP": 0.1 * n, SHOULD_CHECKPOINT: checkpoint}


A, B = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")


def test_a_report_with_a_checkpoint_waits_for_its_save():
    cb = Held()
    cb.on_trial_result(1, [], A, report(1))
    cb.on_trial_result(1, [], B, report(1))
    assert cb.seen == []  # neither checkpoint is Tune's yet
    cb.on_trial_save(2, [], A)
    assert cb.seen == [("result", 1), ("save", "a")]  # a's report, then the save hook itself
    cb.on_trial_save(2, [], A)  # a save with nothing held (a pause's second save) passes on only the save
    cb.on_trial_save(3, [], B)
    assert cb.seen == [("result", 1), ("save", "a"), ("save", "a"), ("result", 1), ("save", "b")]


def test_a_report_without_a_checkpoint_is_passed_on_at_once():
    cb = Held()
    cb.on_trial_result(1, [], A, report(1, checkpoint=False))
    cb.on_trial_result(1, [], A, {"training_iteration": 2})
    assert cb.seen == [("result", 1), ("result", 2)]


def test_a_report_whose_save_never_comes_is_dropped():
    """Ctrl+C (or a failure) before the save: the trial restarts from its previous checkpoint and reports again;
    the log holds that report once."""
    cb = Held()
    cb.on_trial_result(1, [], A, report(3))
    cb.on_trial_recover(1, [], A)
    cb.on_trial_save(2, [], A)
    assert cb.seen == [("recover", "a"), ("save", "a")]
    cb.on_trial_result(3, [], B, report(2))
    cb.on_trial_error(3, [], B)
    cb.on_trial_save(4, [], B)
    assert ("result", 2) not in cb.seen
    # a sweep pickled (tuner.pkl) while a report is held does not bring it back on --resume
    cb.on_trial_result(5, [], A, report(4))
    again = pickle.loads(pickle.dumps(cb))
    again.on_trial_save(6, [], A)
    assert again.seen[-1] == ("save", "a") and ("result", 4) not in again.seen


def test_the_held_result_is_the_one_reported():
    """Tune adds keys to the result dict after the callbacks ran (update_last_result): the logger gets the report
    as it was handed over."""
    cb = Held()
    r = report(1)
    cb.on_trial_result(1, [], A, r)
    r["experiment_tag"] = "added later"
    cb.on_trial_save(2, [], A)
    assert cb.results == [report(1)]


def test_every_sweep_logger_holds_reports_and_tune_adds_no_json_logger(tmp_path, capsys):
    """result.json, TensorBoard, CSV and the progress lines all follow the rule; the sweep passes its own JSON
    logger, so Tune does not add an unheld one (it adds its default loggers only for the kinds missing)."""
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.utils.callback import _create_default_callbacks

    loggers = tune_callbacks(3, ["lam"], progress=True, experiment="x")
    kinds = (JsonLogger, TBXLogger, CSVLogger, ProgressPrinter)
    assert all(any(isinstance(c, k) for c in loggers) for k in kinds)
    assert all(isinstance(c, CheckpointedResults) for c in loggers if isinstance(c, kinds))
    made = _create_default_callbacks(list(loggers), metric="AP", mode="max")
    assert [c for c in made if isinstance(c, JsonLoggerCallback)] == [c for c in loggers if isinstance(c, JsonLogger)]
    # progress.csv is cut back on restart, except in PBT / PB2 sweeps (a member goes on from its donor's iteration)
    assert [c.cut_back for c in loggers if isinstance(c, CSVLogger)] == [True]
    population = tune_callbacks(3, ["lam"], progress=False, experiment="x", population=True)
    assert [c.cut_back for c in population if isinstance(c, CSVLogger)] == [False]

    class Trial:  # what Tune's JSON logger and the progress line read of a trial (hashable, as Tune's is)
        trial_id, config, local_path, checkpoint = "t1", {"lam": 0.5}, str(tmp_path), None

        def init_local_path(self):
            pass

    trial = Trial()
    printer, json_logger = ProgressPrinter(3, ["lam"]), JsonLogger()  # into trial.local_path (Tune's staging copy)
    for cb in (printer, json_logger):
        cb.on_trial_result(1, [], trial, {**report(1), "epoch": 1, "AP": 0.25})
    assert "evaluation 1/3" not in capsys.readouterr().out
    assert not (tmp_path / "result.json").exists() or (tmp_path / "result.json").read_text() == ""
    for cb in (printer, json_logger):
        cb.on_trial_save(2, [], trial)
    assert "[t1 lam=0.5000] evaluation 1/3 (epoch 1)" in capsys.readouterr().out
    lines = (tmp_path / "result.json").read_text().splitlines()
    assert [json.loads(line)["training_iteration"] for line in lines] == [1]


def test_a_restarting_trial_cuts_its_progress_csv_back_to_its_checkpoint(tmp_path):
    """progress.csv, written straight to the storage path, can be ahead of the state a killed driver stored; the
    trial restarts from its stored checkpoint and cuts it back to it (a row cut short goes too)."""
    from pipelines.tune.callbacks import drop_reports_after

    progress = tmp_path / "progress.csv"
    progress.write_text("AP,training_iteration,trial_id\r\n0.1,1,a\r\n0.2,2,a\r\n0.3,3,a\r\n0.4,")
    drop_reports_after(progress, 2)
    assert progress.read_bytes() == b"AP,training_iteration,trial_id\r\n0.1,1,a\r\n0.2,2,a\r\n"  # as written
    before = progress.stat().st_mtime_ns
    drop_reports_after(progress, 2)  # nothing past it: the file is not rewritten
    assert progress.stat().st_mtime_ns == before
    drop_reports_after(progress, 0)  # no checkpoint: the trial starts over, the header stays
    assert progress.read_bytes() == b"AP,training_iteration,trial_id\r\n"
    drop_reports_after(tmp_path / "missing.csv", 1)  # a trial that never wrote one
    assert not (tmp_path / "missing.csv").exists()


def test_the_restart_iteration_is_the_latest_registered_checkpoints():
    from pipelines.tune.callbacks import restart_iteration

    def trial(latest):
        return SimpleNamespace(
            run_metadata=SimpleNamespace(checkpoint_manager=SimpleNamespace(latest_checkpoint_result=latest))
        )

    assert restart_iteration(trial(SimpleNamespace(metrics={"training_iteration": 2}))) == 2
    assert restart_iteration(trial(None)) == 0
