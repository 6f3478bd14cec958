"""scheduler.type pbt: the seed-aware exploit rule on a population written by hand, and a small PBT sweep with the
production trainable (every trial logs the λ it trained with per evaluation; the best trial's schedule replays in
`ltsweep train` with the same first epoch)."""

import json
from types import SimpleNamespace

import pytest
import ray
import yaml
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.schedulers.pbt import _PBTTrialState

from faults.common import TINY, Workspace, config_dict
from lt_models.data.synthetic.generate import generate_benchmark
from pipelines.analysis.schedule import lam_schedule, trial_lam_schedule
from pipelines.analysis.summary import print_summary
from pipelines.config.load import load_experiment_config
from pipelines.tune import sweep
from pipelines.tune.pbt import SeedAwarePB2, SeedAwarePBT


class Member:
    """What SeedAwarePBT reads of a Tune trial: its config and whether it finished."""

    def __init__(self, lam, seed):
        self.config = {"lam": lam, "seed": seed}
        self.experiment_tag = f"lam={lam},seed={seed}"

    def is_finished(self):
        return False

    def __repr__(self):
        return f"Member(lam={self.config['lam']}, seed={self.config['seed']})"


def population(scores: dict[float, list[float]], max_t: int | None = None) -> tuple[SeedAwarePBT, dict]:
    """A SeedAwarePBT over configurations lam -> the last scores of seeds 0, 1, 2 (all at time 1)."""
    pbt = SeedAwarePBT(seeds=[0, 1, 2], default_seed=0, time_attr="training_iteration", perturbation_interval=1,
                       hyperparam_mutations={"lam": [0.0, 0.5, 1.0]}, quantile_fraction=0.34, max_t=max_t)  # fmt: skip
    members = {}
    for lam, per_seed in scores.items():
        for seed, s in enumerate(per_seed):
            members[(lam, seed)] = m = Member(lam, seed)
            pbt._trial_state[m] = SimpleNamespace(last_score=s, last_train_time=1, last_perturbation_time=1)
    return pbt, members


def test_a_member_copies_its_own_seed_of_a_configuration_that_is_better_by_the_verdict_rule():
    pbt, m = population({0.0: [0.10, 0.12, 0.11], 0.5: [0.20, 0.21, 0.19], 1.0: [0.30, 0.32, 0.31]})
    lower, upper = pbt._quantiles()  # ranked by configuration: all seeds of lam 0 at the bottom, of lam 1 at the top
    assert set(lower) == {m[(0.0, s)] for s in range(3)} and set(upper) == {m[(1.0, s)] for s in range(3)}
    assert pbt.donor(m[(0.0, 1)], upper) is m[(1.0, 1)]


def test_no_exploit_when_the_configurations_cannot_be_told_apart():
    # lam 1 has the higher mean, but its seeds straddle lam 0's: the paired interval includes 0
    pbt, m = population({0.0: [0.10, 0.30, 0.20], 0.5: [0.15, 0.25, 0.20], 1.0: [0.35, 0.12, 0.25]})
    lower, upper = pbt._quantiles()
    assert {t.config["lam"] for t in lower} == {0.0} and {t.config["lam"] for t in upper} == {1.0}
    assert pbt.donor(m[(0.0, 0)], upper) is None


def test_no_member_copies_or_is_copied_at_the_end_of_its_budget(monkeypatch):
    calls = []
    record = lambda self, trial, controller, upper, lower: calls.append((list(upper), list(lower)))  # noqa: E731
    monkeypatch.setattr(PopulationBasedTraining, "_checkpoint_or_exploit", record)
    pbt, m = population({0.0: [0.10, 0.12, 0.11], 0.5: [0.20, 0.21, 0.19], 1.0: [0.30, 0.32, 0.31]}, max_t=3)
    lower, upper = pbt._quantiles()
    me = m[(0.0, 0)]
    pbt._checkpoint_or_exploit(me, None, upper, lower)
    assert calls[-1] == ([m[(1.0, 0)]], [me])  # copies its own seed of the better configuration
    for s in range(3):  # the donors' checkpoints are at the end of their budget
        pbt._trial_state[m[(1.0, s)]].last_perturbation_time = 3
    pbt._checkpoint_or_exploit(me, None, upper, lower)
    assert calls[-1][1] == []
    for s in range(3):
        pbt._trial_state[m[(1.0, s)]].last_perturbation_time = 2
    pbt._trial_state[me].last_train_time = 3  # its own budget is spent
    pbt._checkpoint_or_exploit(me, None, upper, lower)
    assert calls[-1][1] == []


def test_the_seeds_of_a_configuration_take_the_same_explored_values():
    # each (configuration, donor configuration, time) is explored once: without that, seed 0 and seed 1 of lam 0
    # would perturb lam 1 independently (to 0.5, 1.0 or a fresh draw) and the configuration would split up
    pbt, m = population({0.0: [0.10, 0.12, 0.11], 0.5: [0.20, 0.21, 0.19], 1.0: [0.30, 0.32, 0.31]})
    drawn = []
    for time in range(1, 21):
        for t in m.values():
            pbt._trial_state[t].last_train_time = time
        news = [pbt._get_new_config(m[(0.0, s)], m[(1.0, s)])[0] for s in range(3)]
        assert [n["seed"] for n in news] == [0, 1, 2] and len({n["lam"] for n in news}) == 1
        drawn.append(news[0]["lam"])
    assert len(set(drawn)) > 1  # a new time draws again


def test_pb2_explores_within_the_searched_bounds_and_moves_a_configuration_together(tmp_path):
    pb2 = SeedAwarePB2(seeds=[0, 1, 2], default_seed=0, time_attr="training_iteration", perturbation_interval=1,
                       hyperparam_bounds={"lam": [0.0, 1.0]}, quantile_fraction=0.34, metric="AP",
                       mode="max")  # fmt: skip
    members = [Member(lam, seed) for lam in (0.0, 0.5, 1.0) for seed in range(3)]
    for t in members:
        pb2._trial_state[t] = _PBTTrialState(t)
        for time in (1, 2):  # the score grows with λ: the bandit's data
            state = pb2._trial_state[t]
            pb2._save_trial_state(
                state, time, {"training_iteration": time, "AP": 0.1 + 0.2 * t.config["lam"] * time}, t
            )
    news = [pb2._get_new_config(m, d)[0] for m, d in zip(members[:3], members[6:])]
    assert len({n["lam"] for n in news}) == 1 and 0.0 <= news[0]["lam"] <= 1.0
    assert [n["seed"] for n in news] == [0, 1, 2]


def test_lam_schedule_from_the_reports():
    assert lam_schedule([1, 2, 3, 4], [0.5, 0.5, 1.0, 1.0]) == [[0, 0.5], [2, 1.0]]
    assert lam_schedule([2, 4], [0.0, 0.7], every=2) == [[0, 0.0], [2, 0.7]]
    assert lam_schedule([1, 2], [None, None]) is None


@pytest.fixture(scope="module")
def pbt_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("pbt")
    generate_benchmark(root / "data", preset=TINY, seed=0)
    ws = Workspace(root, root / "data", root / "unused")
    raw = config_dict(ws, root / "store", "pbt", lams=(0.0, 1.0), epochs=3, max_concurrent=4)
    raw["scheduler"] = {"type": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5}
    raw["search"]["seeds"] = [0, 1]
    path = root / "pbt.yaml"
    path.write_text(yaml.safe_dump(raw))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = sweep.run_sweep(load_experiment_config(path), verbose=0, progress=False, register=False)
    finally:
        ray.shutdown()
    return root, raw, summary


def _trial_runs(summary):
    from mlflow import MlflowClient

    client = MlflowClient(summary.tracking_uri)
    exp = client.get_experiment_by_name("pbt")
    return client, client.search_runs([exp.experiment_id], "tags.`ltsweep.role` = 'trial'")


def test_a_pbt_sweep_runs_and_logs_lam_per_evaluation(pbt_sweep):
    _, _, summary = pbt_sweep
    assert summary.exit_code() == 0 and len(summary.trials) == 4
    client, runs = _trial_runs(summary)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:  # one λ per evaluation (step), the λ that evaluation's epoch trained with
        lams, epochs = (client.get_metric_history(run.info.run_id, k) for k in ("lam", "epoch"))
        assert sorted(m.step for m in lams) == sorted(m.step for m in epochs) and len(lams) >= 1
        assert {m.value for m in lams} <= {0.0, 1.0} and max(m.value for m in epochs) == 3
    parent = client.search_runs([runs[0].info.experiment_id], "tags.`ltsweep.role` = 'sweep'")[0]
    page = open(client.download_artifacts(parent.info.run_id, "sweep_report.html", str(pbt_sweep[0]))).read()
    assert "λ over each trial (population-based training)" in page and 'alt="lambda schedules"' in page


def test_the_best_schedule_replays_in_ltsweep_train_with_the_same_first_epoch(pbt_sweep, capsys):
    from pipelines import cli

    root, raw, summary = pbt_sweep
    best = summary.best
    schedule = trial_lam_schedule(summary.tracking_uri, "pbt", best.trial_id)
    print_summary(summary)
    assert ("its λ schedule: " in capsys.readouterr().out) == (len(schedule) > 1)  # shown when λ changed
    client, runs = _trial_runs(summary)
    run = next(r for r in runs if r.data.tags["ltsweep.trial_id"] == best.trial_id)
    first_loss = min(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step).value
    replay = dict(raw, name="replay", space={}, seed=int(best.config["seed"]))
    replay["search"], replay["scheduler"] = {"num_samples": 1}, {"type": "fifo"}
    replay["stage2"] = dict(raw["stage2"], epochs=1, lam_schedule=schedule)
    path = root / "replay.yaml"
    path.write_text(yaml.safe_dump(replay))
    assert cli.main(["train", str(path), "--out", str(root / "replay_out")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stage1"]["trained"] is False  # the sweep's own stage 1, from its storage_path
    assert out["metrics"]["loss"] == pytest.approx(first_loss, rel=1e-4)
