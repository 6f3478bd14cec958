"""scheduler.type asha_configs (pipelines.tune.asha.ConfigASHA): successive halving over configurations, each judged on
its mean over seeds, with paused trials resumed from their checkpoints. Real Tune, a stand-in trainable whose
metric is known in closed form."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402

from pipelines.tune.asha import ConfigASHA, config_key, rung_milestones  # noqa: E402

# configuration value + seed effect: seed 1's trials are all worse than seed 0's, so a trial-level ranking would
# stop every seed-1 trial; the configuration means rank c3 > c2 > c1 > c0
CONFIG_VALUE = {0: 0.10, 1: 0.20, 2: 0.30, 3: 0.40}
SEED_EFFECT = {0: 0.5, 1: 0.0}
MAX_T = 4


def metric(c: int, seed: int, it: int) -> float:
    return CONFIG_VALUE[c] + SEED_EFFECT[seed] + 0.001 * it


def fake_trial(config: dict) -> None:
    start = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # resumed after a pause: continue after the checkpointed iteration
        with ckpt.as_directory() as d:
            start = json.loads(Path(d, "state.json").read_text())["it"]
    log = Path(config["log_dir"], tune.get_context().get_trial_id() + ".jsonl")
    flag = Path(config["log_dir"], f"failed-{config['c']}-{config['seed']}")
    if config.get("fail_c") == config["c"] and not flag.exists():  # the first attempt of that config fails
        flag.write_text("injected")
        raise RuntimeError("injected failure before the first report")
    for it in range(start + 1, MAX_T + 1):
        t0 = time.time()
        time.sleep(0.05)  # the iteration's work; its interval is logged to measure how many trials ran at once
        with log.open("a") as f:
            f.write(json.dumps({"it": it, "t0": t0, "t1": time.time(), "resumed_from": start}) + "\n")
        with tempfile.TemporaryDirectory() as d:
            Path(d, "state.json").write_text(json.dumps({"it": it}))
            tune.report({"AP": metric(config["c"], config["seed"], it)}, checkpoint=tune.Checkpoint.from_directory(d))


def run_fake_sweep(root: Path, name: str, configs: list[int], max_running: int, max_failures: int = 0, **extra):
    """A real Tune run of fake_trial over configs x seeds {0, 1} under ConfigASHA (rungs 1 and 2 of MAX_T, η = 2);
    returns the ResultGrid and the per-trial iteration logs."""
    log_dir = root / "log"
    log_dir.mkdir()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # the trainable lives in this test module, which Ray's workers cannot import: ship it by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        scheduler = ConfigASHA(
            metric="AP",
            mode="max",
            time_attr="training_iteration",
            max_t=MAX_T,
            grace_period=1,
            reduction_factor=2,
            seeds=[0, 1],
            max_running=max_running,
            verbose=False,
        )
        results = tune.Tuner(
            tune.with_resources(fake_trial, {"cpu": 1}),
            param_space={
                "seed": tune.grid_search([0, 1]),
                "c": tune.grid_search(configs),
                "log_dir": str(log_dir),
                **extra,
            },
            tune_config=tune.TuneConfig(metric="AP", mode="max", scheduler=scheduler),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(root / "results"),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=max_failures),
            ),
        ).fit()
    finally:
        ray.shutdown()
    logs = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in log_dir.glob("*.jsonl")}
    return results, logs


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    return run_fake_sweep(tmp_path_factory.mktemp("asha_configs"), "asha_configs", [0, 1, 2, 3], max_running=1)


def test_milestones_and_keys():
    assert rung_milestones(1, 3, 8) == [1, 3] and rung_milestones(1, 2, 4) == [1, 2] and rung_milestones(4, 2, 4) == []
    assert config_key({"lam": 0.5, "seed": 1}) == config_key({"seed": 2, "lam": 0.5}) == '{"lam": 0.5}'
    # a searched loss branch is flattened: the same configuration whichever seed
    assert config_key({"loss": {"loss": "acsl", "xi": 0.3}, "seed": 0}) == '{"loss": "acsl", "xi": 0.3}'


@pytest.mark.slow
def test_configurations_are_halved_on_their_mean_over_seeds(swept):
    results, _ = swept
    iters = {(r.config["c"], r.config["seed"]): r.metrics["training_iteration"] for r in results}
    assert all(r.error is None for r in results) and len(iters) == 8
    # rung 1 (4 configurations): the top ⌊4/2⌋ = 2 means go on, both seeds of each; rung 2 (2): the top 1 runs
    # to max_t. Seed 1's trials are worse than every seed-0 trial, yet c3 and c2 keep them.
    assert iters == {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 1, (2, 0): 2, (2, 1): 2, (3, 0): MAX_T, (3, 1): MAX_T}
    assert sum(iters.values()) == 4 * 2 + 2 * 2 * 1 + 2 * 2  # 16 of the grid's 32 trial-iterations


@pytest.mark.slow
def test_paused_trials_resume_from_their_checkpoints(swept):
    results, logs = swept
    by_config = {(r.config["c"], r.config["seed"]): r for r in results}
    for (c, seed), r in by_config.items():
        its = [e["it"] for e in logs[r.metrics["trial_id"]]]
        assert its == list(range(1, len(its) + 1)), (c, seed, its)  # no iteration trained twice or skipped
    # c3's seed-0 trial started before the grid's last ones, so it waited at rung 1 (paused) and was restarted from
    # the checkpoint of iteration 1 once its configuration was promoted
    best = logs[by_config[(3, 0)].metrics["trial_id"]]
    assert best[1]["resumed_from"] == 1 and [e["it"] for e in best] == [1, 2, 3, 4]


@pytest.mark.slow
def test_max_running_counts_running_trials_not_paused_ones(swept):
    _, logs = swept
    spans = sorted((e["t0"], e["t1"]) for entries in logs.values() for e in entries)
    # 2 CPUs would fit 2 trials; max_running = 1 lets one run at a time (paused trials hold no slot)
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:]))


def asha_on_ap(**kw) -> ConfigASHA:
    """asha_configs ranking AP (max) at each training_iteration, quiet; the rest as given."""
    return ConfigASHA(metric="AP", mode="max", time_attr="training_iteration", verbose=False, **kw)


class FakeTrial:
    def __init__(self, trial_id, c, seed, status, last_result=None):
        self.trial_id, self.config, self.status = trial_id, {"c": c, "seed": seed}, status
        self.last_result = last_result or {}

    def set_status(self, status):
        self.status = status


class FakeController:
    def __init__(self, trials, finished=True):
        self.trials, self.search_alg = trials, type("S", (), {"is_finished": lambda self: finished})()
        self.stopped = []

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        self.stopped.append(trial.trial_id)
        trial.status = "TERMINATED"


def test_resumed_sweep_rebuilds_the_rungs_from_each_trials_last_result():
    """--resume brings the scheduler back empty (tuner.pkl) and re-adds the trials: a trial that waited at a rung
    keeps waiting, one that ran past a rung counts as promoted there, an errored one is left out."""
    from ray.tune.experiment import Trial

    sched = asha_on_ap(max_t=4, grace_period=1, reduction_factor=2, seeds=[0, 1])
    trials = [
        FakeTrial("a0", 0, 0, Trial.PAUSED, {"training_iteration": 1, "AP": 0.5}),
        FakeTrial("a1", 0, 1, Trial.PENDING, {"training_iteration": 1, "AP": 0.3}),
        FakeTrial("b0", 1, 0, Trial.PENDING, {"training_iteration": 3, "AP": 0.9}),  # past rungs 1 and 2
        FakeTrial("b1", 1, 1, Trial.ERROR, {"training_iteration": 1, "AP": 0.1}),
        FakeTrial("c0", 2, 0, Trial.PENDING),
    ]  # never started
    ctl = FakeController(trials)
    for t in trials:
        sched.on_trial_add(ctl, t)
    assert sched._held == ["b0", "c0"]  # may run: past its rungs / not started
    assert [t.status for t in trials[:2]] == [Trial.PAUSED, Trial.PAUSED]  # waiting at rung 1 for a decision
    assert list(sched._promoted[0]) == [config_key({"c": 1})] == list(sched._promoted[1])
    sched._decide(ctl)  # (the errored trials are read from the controller's statuses when a rung is decided)
    assert sched._rung_mean(0, config_key({"c": 1})) == 0.9  # the errored seed is left out of the mean
    assert sched._rung_mean(0, config_key({"c": 0})) == pytest.approx(0.4)
    assert ctl.trials[4].status == Trial.PAUSED and sched.choose_trial_to_run(ctl).trial_id == "b0"
    # Tune re-adds a trial it retries after a failure (and calls on_trial_error first): nothing changes for it
    trials[3].status = Trial.PENDING
    sched.on_trial_add(ctl, trials[3])
    sched.on_trial_error(ctl, trials[3])
    assert trials[3].status == Trial.PENDING and sched._held == ["c0"]


def test_when_nothing_can_run_the_best_of_the_highest_rung_goes_on_and_the_rest_stop():
    from ray.tune.experiment import Trial

    sched = asha_on_ap(max_t=4, grace_period=1, reduction_factor=3, seeds=[0])
    trials = [FakeTrial(f"t{c}", c, 0, Trial.PENDING) for c in range(2)]
    ctl = FakeController(trials)
    for t in trials:
        sched.on_trial_add(ctl, t)
    for t, ap in zip(trials, (0.2, 0.6)):
        assert sched.choose_trial_to_run(ctl) is t
        t.status = Trial.RUNNING
        # 2 configurations at rung 1 (η = 3): ⌊2/3⌋ = 0 promoted, so each pauses there
        assert sched.on_trial_result(ctl, t, {"training_iteration": 1, "AP": ap}) == "PAUSE"
        t.status = Trial.PAUSED
    chosen = sched.choose_trial_to_run(ctl)  # nothing runs: the rung's best goes on to max_t
    assert chosen.trial_id == "t1" and list(sched._promoted[0]) == [config_key({"c": 1})]
    chosen.status = Trial.RUNNING
    assert sched.on_trial_result(ctl, chosen, {"training_iteration": 2, "AP": 0.7}) == "CONTINUE"
    assert sched.on_trial_result(ctl, chosen, {"training_iteration": 4, "AP": 0.8}) == "STOP"
    chosen.status = Trial.TERMINATED
    assert sched.choose_trial_to_run(ctl) is None and ctl.stopped == ["t0"]


def test_a_none_answer_is_kept_until_an_event_or_a_status_change():
    """Tune asks at every step; the answer "none" is reused while nothing happened, and recomputed when a trial
    that Tune paused after its checkpoint (no scheduler event) freed a slot."""
    from ray.tune.experiment import Trial

    sched = asha_on_ap(max_t=4, grace_period=1, reduction_factor=2, seeds=[0], max_running=1)
    trials = [FakeTrial(f"t{c}", c, 0, Trial.PENDING) for c in range(3)]
    ctl = FakeController(trials)
    for t in trials:
        sched.on_trial_add(ctl, t)
    first = sched.choose_trial_to_run(ctl)
    first.status = Trial.RUNNING
    calls = []
    choose = sched._choose
    sched._choose = lambda *a: calls.append(1) or choose(*a)  # count the full looks at the trials
    assert sched.choose_trial_to_run(ctl) is None and sched.choose_trial_to_run(ctl) is None
    assert len(calls) == 1  # the second "none" came from the cache
    assert sched.on_trial_result(ctl, first, {"training_iteration": 1, "AP": 0.9}) == "PAUSE"  # alone at rung 1
    assert sched.choose_trial_to_run(ctl) is None and len(calls) == 2  # an event: looked again, still running
    first.status = Trial.PAUSED  # Tune pauses it once its checkpoint is saved: no event, one slot free
    assert sched.choose_trial_to_run(ctl).trial_id == "t1" and len(calls) == 3


@pytest.mark.slow
def test_a_failed_trial_is_retried_under_asha_configs(tmp_path):
    """Tune retries a failed trial (run.max_failures): it re-adds it to the scheduler and calls on_trial_error
    first. The retry runs, its configuration is judged with both seeds, and the sweep ends normally."""
    results, _ = run_fake_sweep(tmp_path, "retry", [0, 3], max_running=2, max_failures=1, fail_c=3)
    log_dir = tmp_path / "log"
    iters = {(r.config["c"], r.config["seed"]): r.metrics["training_iteration"] for r in results}
    assert not results.errors and len(list(log_dir.glob("failed-3-*"))) == 2  # both c3 trials failed once
    assert iters == {(0, 0): 1, (0, 1): 1, (3, 0): MAX_T, (3, 1): MAX_T}


def test_the_one_pass_clearance_agrees_with_the_rule_for_every_trial():
    """_clearance (one pass over a thousand trials per step) answers as _cleared (promoted at every rung reached)."""
    import random

    sched = asha_on_ap(max_t=16, grace_period=1, reduction_factor=2, seeds=[0, 1])
    rng = random.Random(0)
    keys = [config_key({"c": c}) for c in range(40)]
    for k in range(len(sched.milestones)):  # rungs 1, 2, 4, 8: each promotes a random part of the configurations
        sched._promoted[k] = {key: None for key in keys if rng.random() < 0.6}
    for i in range(400):
        tid = f"t{i}"
        sched._key[tid] = keys[i % len(keys)]
        if i % 5:  # a fifth never reached a rung
            sched._reached[tid] = rng.randint(1, len(sched.milestones))
    cleared = sched._clearance()
    answers = [(tid, sched._cleared(tid)) for tid in sched._key]
    assert [(tid, cleared(tid)) for tid in sched._key] == answers
    assert 0 < sum(ok for _, ok in answers) < len(answers)  # both answers occur
