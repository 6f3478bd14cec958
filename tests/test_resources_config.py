"""`resources.custom`: Ray custom resources reach every trial (tune.with_resources) and the stage-1 task, and bad
names or amounts are one-line config errors."""

from __future__ import annotations

from test_config import _error, _write, base  # noqa: F401  (the `base` fixture)

from pipelines.config.load import load_experiment_config


def test_custom_resources_reach_every_trial_and_stage1(tmp_path, base, monkeypatch):  # noqa: F811  (the fixture)
    import sys

    from pipelines.tune import stage1 as pretrain
    from pipelines.tune.cluster import trial_resources

    assert trial_resources(load_experiment_config(_write(tmp_path, base))) == {"cpu": 1.0, "gpu": 0.0}
    base["resources"] = {"cpus_per_trial": 2, "custom": {"node2": 0.5}}
    cfg = load_experiment_config(_write(tmp_path, base))
    assert trial_resources(cfg) == {"cpu": 2.0, "gpu": 0.0, "node2": 0.5}  # what tune.with_resources gets

    class FakeRay:  # records the stage-1 task's ray.remote options, without a Ray session
        options: dict = {}

        @staticmethod
        def remote(**options):
            FakeRay.options = options
            return lambda fn: type("Task", (), {"remote": staticmethod(lambda *args: {"AP": 0.0})})

        get = staticmethod(lambda value: value)

    monkeypatch.setitem(sys.modules, "ray", FakeRay)
    assert pretrain._run_stage1(cfg, tmp_path, use_ray=True) == {"AP": 0.0}
    assert FakeRay.options == {"num_cpus": 2.0, "num_gpus": 0.0, "resources": {"node2": 0.5}, "max_retries": 0}
    for bad in ({"": 1}, {"node2": 0}, {"node2": -1}, {"GPU": 1}, {"memory": 1}):
        base["resources"]["custom"] = bad
        msg = _error(tmp_path, base)
        assert msg.startswith(f"{tmp_path / 'exp.yaml'}: resources.custom: needs non-empty names") and "> 0" in msg
