"""Sweep configs: packaged YAMLs load, YAML maps onto Ray Tune primitives, and bad input gives one clear error."""

import json
import math
from pathlib import Path

import pytest
import yaml

import search_spaces
from lt_models.errors import ConfigError
from pipelines.config.experiment import ExperimentConfig
from pipelines.config.load import apply_overrides, load_experiment_config, load_train_config


def _write(tmp_path, cfg: dict, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture
def base(tmp_path):
    for f in ("train.json", "val.json"):
        (tmp_path / f).write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return {
        "name": "t",
        "data": {"train": str(tmp_path / "train.json"), "val": str(tmp_path / "val.json")},
        "stage2": {"epochs": 4},
        "space": {"lam": {"grid": [0.0, 0.5]}},
    }


def _error(tmp_path, cfg, overrides=None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_experiment_config(_write(tmp_path, cfg), overrides)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "name", ["demo", "soft_balance", "acsl_xi", "joint", "lvis_r50", "openimages_r50", "pbt_lambda"]
)
def test_packaged_search_spaces_load(name):
    from ray import tune

    cfg = load_experiment_config(search_spaces.path(name), check_data=False)
    space = cfg.param_space()
    from pipelines.config.space import owner_of

    assert space and set(space) == {k for k in cfg.space if owner_of(k) not in cfg.space} | {"seed"}
    assert space["seed"] == tune.grid_search(cfg.seeds)
    for key, prim in space.items():
        assert isinstance(prim, (dict, tune.search.sample.Domain)), (key, prim)
    assert cfg.run.storage_path.is_absolute() and cfg.data.train.is_absolute()


def test_paper_grids_and_demo_size():
    from ray.tune.search.variant_generator import generate_variants

    from pipelines.config.space import trial_values

    sb = load_experiment_config(search_spaces.path("soft_balance"), check_data=False)
    # Table 3's rows: non-balance (its own sampler, not λ = 0), class-aware, soft-balance λ ∈ {0.3, ..., 1.5}
    rows = [trial_values(v) for _, v in generate_variants(sb.param_space())]
    assert {r.pop("seed") for r in rows} == {0}
    assert sorted((r["sampler"], r.get("lam")) for r in rows) == sorted(
        [("nonbalance", None), ("classaware", None)] + [("softbalance", lam) for lam in (0.3, 0.5, 0.7, 1.0, 1.5)]
    )
    t2 = load_experiment_config(search_spaces.path("concurrent_table2"), check_data=False)
    cells = [trial_values(v) for _, v in generate_variants(t2.param_space())]
    assert len(cells) == 4 and sorted((c["loss"], c["scores"]) for c in cells) == [
        ("concurrent_softmax", "concurrent"),
        ("concurrent_softmax", "softmax"),
        ("softmax", "concurrent"),
        ("softmax", "softmax"),
    ]
    assert t2.loss_inputs() == {"concurrent_rate"} and t2.stage1.loss == "softmax"
    ax = load_experiment_config(search_spaces.path("acsl_xi"), check_data=False)
    assert ax.space["xi"].grid == [0.01, 0.1, 0.3, 0.5, 0.7, 0.9]
    demo = load_experiment_config(search_spaces.path("demo"), check_data=False)
    grid_points = 1
    for p in demo.space.values():
        grid_points *= len(p.grid) if p.grid is not None else 1
    assert grid_points * demo.search.num_samples >= 8
    assert {"lam", "xi", "loss"} <= set(demo.space) and demo.scheduler.type == "asha"
    assert demo.resources.gpus_per_trial == 0


def test_primitive_table(tmp_path, base):
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer, Quantized

    base["space"] = {
        "lam": {"uniform": [0.1, 1.5]},
        "lr": {"loguniform": [0.001, 0.1]},
        "xi": {"quniform": [0.1, 0.9, 0.1]},
        "loss": {"choice": ["acsl", "concurrent_softmax"]},
        "batch_size": {"randint": [2, 9]},
    }
    space = load_experiment_config(_write(tmp_path, base)).param_space()
    assert isinstance(space["lam"], Float) and (space["lam"].lower, space["lam"].upper) == (0.1, 1.5)
    assert isinstance(space["lr"], Float) and isinstance(space["lr"].get_sampler(), Float._LogUniform)
    assert isinstance(space["batch_size"], Integer)
    # xi is ACSL's alone: it is sampled inside the acsl branch of the searched loss, never at the top level
    assert "xi" not in space and isinstance(space["loss"], Categorical)
    acsl, softmax = space["loss"].categories
    assert softmax == "concurrent_softmax" and set(acsl) == {"loss", "xi"} and acsl["loss"] == "acsl"
    assert isinstance(acsl["xi"].get_sampler(), Quantized) and acsl["xi"].get_sampler().q == 0.1
    base["space"] = {"lam": {"grid": [0.0, 1.0]}}
    assert load_experiment_config(_write(tmp_path, base)).param_space() == {
        "lam": tune.grid_search([0.0, 1.0]),
        "seed": tune.grid_search([0]),
    }


def test_unknown_keys_name_the_path_and_suggest(tmp_path, base):
    base["stage2"]["lamda"] = 0.5
    msg = _error(tmp_path, base)
    assert "unknown key 'stage2.lamda'" in msg and "did you mean 'stage2.lam'" in msg and "exp.yaml" in msg
    del base["stage2"]["lamda"]
    base["schedular"] = {}
    assert "unknown key 'schedular'" in _error(tmp_path, base)
    base.pop("schedular")
    base["space"] = {"lam": {"normal": [0, 1]}}
    assert "unknown key 'space.lam.normal'" in _error(tmp_path, base)
    base["space"] = {"epochs": {"grid": [1, 2]}}
    msg = _error(tmp_path, base)
    assert "space.epochs" in msg and "searchable" in msg


def test_lambda_range_fixed_and_searched(tmp_path, base):
    base["stage2"]["lam"] = -0.5
    msg = _error(tmp_path, base)
    assert "stage2.lam" in msg and "finite number >= 0" in msg
    base["stage2"]["lam"] = 0.7
    base["space"] = {"lam": {"grid": [0.5, float("inf")]}}
    msg = _error(tmp_path, base)
    assert "space.lam.grid[1] = inf" in msg and "finite number >= 0" in msg
    base["space"] = {"lam": {"uniform": [-0.1, 1.0]}}
    assert "space.lam.uniform[0] = -0.1" in _error(tmp_path, base)


def test_xi_range_fixed_and_searched(tmp_path, base):
    base["stage2"]["xi"] = 1.0
    msg = _error(tmp_path, base)
    assert "stage2.xi" in msg and "(0, 1)" in msg
    base["stage2"].update(xi=0.7, loss="acsl")
    base["space"] = {"xi": {"uniform": [0.0, 0.9]}}
    msg = _error(tmp_path, base)
    assert "space.xi.uniform[0] = 0.0" in msg and "(0, 1)" in msg
    base["space"] = {"xi": {"choice": [0.5, 1.2]}}
    assert "space.xi.choice[1] = 1.2" in _error(tmp_path, base)


def test_missing_dataset_names_key_and_fix(tmp_path, base):
    base["data"]["val"] = str(tmp_path / "nope" / "val.json")
    msg = _error(tmp_path, base)
    assert "data.val" in msg and "not found" in msg and "nope/val.json" in msg and "ltsweep data synth" in msg
    # GPU presets point at placeholders: loading them says the dataset is missing
    with pytest.raises(ConfigError, match=r"data\.train: dataset file not found"):
        load_experiment_config(search_spaces.path("lvis_r50"))


def test_other_config_errors(tmp_path, base):
    bad = dict(base, space={"loss": {"choice": ["acsl", "focal"]}})
    assert "unknown loss 'focal'" in _error(tmp_path, bad)
    bad = dict(base, space={"lam": {"uniform": [1.0, 0.5]}})
    assert "lower bound 1.0 must be < upper bound 0.5" in _error(tmp_path, bad)
    bad = dict(base, scheduler={"grace_period": 9})
    assert "grace_period" in _error(tmp_path, bad)
    bad = dict(base, scheduler={"metric": "mAP"})
    assert "scheduler.metric" in _error(tmp_path, bad)
    oi = dict(base["data"], hierarchy=base["data"]["train"])
    bad = dict(base, data=oi, eval={"metric": "openimages"}, scheduler={"metric": "AP_fixed"})
    assert "scheduler.metric AP_fixed (AP-fixed / AP-pool) comes from an LVIS evaluation" in _error(tmp_path, bad)
    bad = dict(base, stage1=None, stage2={"epochs": 4, "decoupled": True})
    assert "decoupled" in _error(tmp_path, bad)
    p = tmp_path / "broken.yaml"
    p.write_text("name: x\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_experiment_config(tmp_path / "absent.yaml")


def test_overrides(tmp_path, base):
    p = _write(tmp_path, base)
    cfg = load_train_config(
        p, ["stage2.lam=0.3", "stage2.loss=acsl", "stage1=null", "train.stage=stage2", "stage2.lr_steps=[2, 3]"]
    )
    assert cfg.stage2.lam == 0.3 and cfg.stage2.loss == "acsl" and cfg.stage1 is None
    assert cfg.stage2.lr_steps == [2, 3] and cfg.train.stage == "stage2"
    with pytest.raises(ConfigError, match=r"unknown key 'stage2\.lamb'"):
        load_train_config(p, ["stage2.lamb=0.3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_train_config(p, ["stage2.lam"])
    with pytest.raises(ConfigError, match=r"stage2\.lam"):
        load_train_config(p, ["stage2.lam=-3"])
    raw = apply_overrides({"a": {"b": 1}}, ["a.c=x", "d.e=2"])
    assert raw == {"a": {"b": 1, "c": "x"}, "d": {"e": 2}}
    for bad in ("a.b=[1, 2", "a.b=x\x07y"):  # a parser error; a control character (a ReaderError, no `problem`)
        with pytest.raises(ConfigError, match=r"--set .*: value is not valid YAML \("):
            apply_overrides({}, [bad])


def test_trial_values_are_applied_and_revalidated(tmp_path, base):
    cfg = load_experiment_config(_write(tmp_path, base))
    s2 = cfg.stage2_for_trial({"lam": 1.5, "loss": "acsl", "xi": 0.3, "decoupled": True})
    assert (s2.lam, s2.loss, s2.xi, s2.decoupled) == (1.5, "acsl", 0.3, "cls")
    with pytest.raises(ValueError):
        cfg.stage2_for_trial({"xi": 1.5})
    assert isinstance(cfg, ExperimentConfig) and cfg.evals_per_trial == 4


def test_optuna_search_is_optional(tmp_path, base):
    import importlib.util

    from pipelines.tune import cluster, tuner

    base["search"] = {"algorithm": "optuna", "seed": 0}
    base["space"] = {"lam": {"grid": [0.0, 1.0]}}
    assert "cannot take 'grid'" in _error(tmp_path, base)
    base["space"] = {"lam": {"uniform": [0.0, 1.5]}}
    cfg = load_experiment_config(_write(tmp_path, base))
    if importlib.util.find_spec("optuna") is None:
        with pytest.raises(ConfigError, match="pip install optuna"):
            tuner._search_alg(cfg, cluster.max_concurrent(cfg))
    else:
        from ray.tune.search.optuna import OptunaSearch

        assert isinstance(tuner._search_alg(cfg, cluster.max_concurrent(cfg)), OptunaSearch)
    base["search"] = {"algorithm": "basic", "seed": 0, "max_concurrent_trials": 3}
    cfg = load_experiment_config(_write(tmp_path, base))
    gen = tuner._search_alg(cfg, cluster.max_concurrent(cfg))
    assert gen.max_concurrent == 3  # Tune ignores TuneConfig.max_concurrent_trials for a variant generator


def test_openimages_metric_needs_the_hierarchy_and_reaches_the_train_spec(tmp_path, base):
    from pipelines.config.spec import train_spec

    (tmp_path / "hierarchy.json").write_text(json.dumps({"LabelName": "root"}))
    base["data"]["hierarchy"] = str(tmp_path / "hierarchy.json")
    base["eval"] = {"every": 1, "metric": "openimages"}
    cfg = load_experiment_config(_write(tmp_path, base))
    assert train_spec(cfg, "stage2", {}).eval_metric == "openimages"
    assert train_spec(cfg, "stage1").eval_metric == "openimages"  # stage 1 is scored the same way
    base["data"] = {k: v for k, v in base["data"].items() if k != "hierarchy"}
    with pytest.raises(ConfigError, match="eval.metric openimages .*set data.hierarchy"):
        load_experiment_config(_write(tmp_path, base))
    base["eval"] = {"every": 1, "metric": "coco"}
    with pytest.raises(ConfigError, match="eval.metric"):
        load_experiment_config(_write(tmp_path, base))


def test_asha_with_several_seeds_gets_a_note(tmp_path, base):
    from pipelines.tune.sweep import scheduler_advice

    base["search"] = {"seeds": [0, 1, 2]}
    assert "asha_configs" in scheduler_advice(load_experiment_config(_write(tmp_path, base)))
    base["scheduler"] = {"type": "asha_configs"}
    assert scheduler_advice(load_experiment_config(_write(tmp_path, base))) is None
    base["scheduler"], base["search"] = {"type": "asha"}, {"seeds": [0]}
    assert scheduler_advice(load_experiment_config(_write(tmp_path, base))) is None


def test_asha_over_configurations_is_built_from_the_config(tmp_path, base):
    from pipelines.tune import cluster, tuner
    from pipelines.tune.asha import ConfigASHA

    base["scheduler"] = {
        "type": "asha_configs",
        "time_attr": "images",
        "grace_period": 160,
        "reduction_factor": 2,
        "max_t": 1000,
    }
    base["search"] = {"algorithm": "basic", "seed": 0, "max_concurrent_trials": 3, "seeds": [4, 5]}
    cfg = load_experiment_config(_write(tmp_path, base))
    sched = tuner._scheduler(cfg, cluster.max_concurrent(cfg))
    assert isinstance(sched, ConfigASHA) and sched.milestones == [160, 320, 640] and sched.seeds == [4, 5]
    assert sched.max_running == 3 and sched.max_t == 1000
    # the variant generator counts paused trials as running, so the scheduler applies the limit instead
    assert tuner._search_alg(cfg, cluster.max_concurrent(cfg)).max_concurrent == 0
    base["search"] = {"algorithm": "optuna", "seed": 0}
    with pytest.raises(ConfigError, match="asha_configs .*needs search.algorithm: basic"):
        load_experiment_config(_write(tmp_path, base))


def test_train_spec_mapping_satisfies_the_engine(tmp_path, base):
    from lt_models.data.sampler_spec import SamplerSpec
    from lt_models.engine.spec import STAGE1_LOSS, STAGE1_SAMPLER
    from lt_models.losses.registry import LossSpec
    from pipelines.config.spec import train_spec

    base["stage1"] = {"epochs": 2, "lr": 0.03, "lr_steps": [1]}
    base["stage2"] = {"epochs": 4, "loss": "acsl", "xi": 0.3, "lam": 1.5, "decoupled": True, "samples_per_epoch": 32}
    cfg = load_experiment_config(_write(tmp_path, base))
    s1 = train_spec(cfg, "stage1")
    s1.validate()  # the engine's own checks: stage 1 is non-balance + conventional softmax on all layers
    assert (s1.stage, s1.sampler, s1.loss, s1.epochs, s1.lr, s1.lr_steps) == (
        "stage1",
        STAGE1_SAMPLER,
        STAGE1_LOSS,
        2,
        0.03,
        (1,),
    )
    base["stage1"]["loss"] = "concurrent_softmax"
    s1c = train_spec(load_experiment_config(_write(tmp_path, base)), "stage1")
    s1c.validate()
    assert s1c.loss == LossSpec("concurrent_softmax")
    s2 = train_spec(cfg, "stage2", {"lam": 0.3}, num_threads=2, device="cpu")
    s2.validate()
    assert (s2.stage, s2.sampler, s2.loss, s2.decoupled) == (
        "stage2",
        SamplerSpec("softbalance", lam=0.3, num_samples=32),
        LossSpec("acsl", xi=0.3),
        "cls",
    )
    assert s2.num_threads == 2 and s2.device == "cpu"
    assert s2.train_ann == str(cfg.data.train) and s2.eval_every == cfg.eval.every
    # a Tune trial config from a conditional space (the chosen loss branch) gives the same typed spec
    s3 = train_spec(cfg, "stage2", {"lam": 0.3, "loss": {"loss": "acsl", "xi": 0.3}}, num_threads=2, device="cpu")
    assert s3 == s2


def test_a_field_the_sampler_or_loss_does_not_read_is_an_error(tmp_path, base):
    base["stage2"].update(sampler="nonbalance", lam=0.0)
    base["space"] = {}
    msg = _error(tmp_path, base)
    assert "stage2.lam is ignored" in msg and "'nonbalance'" in msg and "softbalance" in msg
    base["stage2"] = {"epochs": 4, "loss": "concurrent_softmax", "xi": 0.7}
    assert "stage2.xi is ignored: loss 'concurrent_softmax' does not read it (only acsl does)" in _error(tmp_path, base)
    base["stage2"] = {"epochs": 4, "sampler": "nonbalance"}
    base["space"] = {"lam": {"grid": [0.0, 0.7]}}
    assert "space.lam is ignored" in _error(tmp_path, base)
    # read by one of the searched samplers / losses: fine, and sampled only for those
    base["space"] = {"sampler": {"grid": ["nonbalance", "softbalance"]}, "lam": {"grid": [0.0, 0.7]}}
    cfg = load_experiment_config(_write(tmp_path, base))
    trials = _variants(cfg)
    assert sorted(map(str, trials)) == sorted(
        map(
            str,
            [{"sampler": "nonbalance"}, {"sampler": "softbalance", "lam": 0.0}, {"sampler": "softbalance", "lam": 0.7}],
        )
    )


def _variants(cfg) -> list[dict]:
    """The flat stage-2 values of every trial Tune's variant generator makes from cfg's space."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    from pipelines.config.space import trial_values

    out = []
    for _ in range(cfg.search.num_samples):
        for _, spec in generate_variants(cfg.param_space(), random_state=np.random.default_rng(0)):
            values = trial_values(spec)
            assert values.pop("seed") in cfg.seeds  # every trial carries its training seed
            out.append(values)
    return out


@pytest.mark.parametrize("xi", [{"choice": [0.3, 0.5, 0.7]}, {"grid": [0.3, 0.5]}, {"uniform": [0.05, 0.95]}])
def test_conditional_space_never_gives_a_non_acsl_trial_a_xi(tmp_path, base, xi):
    base["space"] = {
        "lam": {"grid": [0.0, 0.5, 1.0]},
        "loss": {"grid": ["concurrent_softmax", "acsl", "softmax"]},
        "xi": xi,
    }
    trials = _variants(load_experiment_config(_write(tmp_path, base)))
    n_xi = len(xi["grid"]) if "grid" in xi else 1
    assert len(trials) == 3 * (2 + n_xi)  # no duplicate trials that differ only in an unread ξ
    for t in trials:
        assert ("xi" in t) == (t["loss"] == "acsl"), t
        if "xi" in t:
            assert 0.0 < t["xi"] < 1.0
    assert len({tuple(sorted(t.items())) for t in trials}) == len(trials)
    # random search (joint.yaml): every sample is conditional too
    joint = load_experiment_config(search_spaces.path("joint"), check_data=False)
    for t in _variants(joint):
        assert ("xi" in t) == (t["loss"] == "acsl"), t


def test_optuna_define_by_run_is_conditional_too(tmp_path, base):
    from pipelines.config.space import optuna_space

    class FakeTrial:  # records what Optuna would be asked to suggest
        def __init__(self, loss):
            self.loss, self.asked = loss, []

        def suggest_categorical(self, name, choices):
            self.asked.append(name)
            return self.loss if name == "loss" else choices[0]

        def suggest_float(self, name, low, high, log=False, step=None):
            self.asked.append(name)
            return low

    base["search"] = {"algorithm": "optuna"}
    base["space"] = {
        "xi": {"uniform": [0.1, 0.9]},
        "loss": {"choice": ["acsl", "softmax"]},
        "lam": {"uniform": [0.0, 1.5]},
    }
    define = optuna_space(load_experiment_config(_write(tmp_path, base)).space)
    for loss, asked in (("acsl", ["loss", "lam", "xi"]), ("softmax", ["loss", "lam"])):
        trial = FakeTrial(loss)
        define(trial)
        assert sorted(trial.asked) == sorted(asked)


def test_stage1_loss_scores_and_new_loss_parameters(tmp_path, base):
    from lt_models.losses.registry import LossSpec
    from pipelines.config.spec import train_spec

    base["stage1"] = {"epochs": 1, "loss": "acsl"}
    with pytest.raises(
        ConfigError, match="stage1.loss.*unknown stage-1 loss 'acsl'; use one of softmax, concurrent_softmax"
    ):
        load_experiment_config(_write(tmp_path, base))
    base["stage1"] = {"epochs": 1}
    base["stage2"] = {"epochs": 2, "loss": "seesaw", "seesaw_p": 0.5, "scores": "concurrent"}
    cfg = load_experiment_config(_write(tmp_path, base))
    assert train_spec(cfg, "stage2").loss == LossSpec("seesaw", scores="concurrent", seesaw_p=0.5)
    assert cfg.loss_inputs() == {"num_classes", "concurrent_rate"}
    base["stage2"] = {"epochs": 2, "loss": "seesaw", "scores": "logit"}
    with pytest.raises(ConfigError, match="stage2.scores.*unknown scores 'logit'"):
        load_experiment_config(_write(tmp_path, base))
    base["stage2"] = {"epochs": 2, "loss": "eqlv2", "eqlv2_gamma": -1}
    with pytest.raises(ConfigError, match="stage2.eqlv2_gamma"):
        load_experiment_config(_write(tmp_path, base))
    base["stage2"] = {"epochs": 2, "loss": "softmax", "seesaw_q": 1.0}
    with pytest.raises(ConfigError, match="stage2.seesaw_q is ignored: loss 'softmax' does not read it"):
        load_experiment_config(_write(tmp_path, base))


def test_new_loss_parameters_are_searched_in_their_branches(tmp_path, base):
    from ray.tune.search.variant_generator import generate_variants

    from pipelines.config.space import trial_values

    base["stage2"] = {"epochs": 2, "sampler": "repeatfactor"}
    base["space"] = {
        "loss": {"grid": ["seesaw", "eqlv2", "federated", "eql", "softmax"]},
        "seesaw_q": {"grid": [1.0, 2.0]},
        "eqlv2_mu": {"grid": [0.6, 0.8]},
        "fed_num_classes": {"grid": [10, 50]},
        "eql_lambda": {"grid": [1e-3, 1e-2]},
        "rfs_threshold": {"grid": [0.001, 0.01]},
    }
    cfg = load_experiment_config(_write(tmp_path, base))
    trials = [trial_values(v) for _, v in generate_variants(cfg.param_space())]
    assert len(trials) == (2 + 2 + 2 + 2 + 1) * 2
    for t in trials:
        read = {"seesaw": "seesaw_q", "eqlv2": "eqlv2_mu", "federated": "fed_num_classes", "eql": "eql_lambda"}
        own = read.get(t["loss"])
        assert set(t) == {"loss", "rfs_threshold", "seed"} | ({own} if own else set())
        spec = cfg.stage2_for_trial(t).loss_spec()
        assert spec.name == t["loss"] and (own is None or getattr(spec, own) == t[own])
        assert cfg.stage2_for_trial(t).sampler_spec().threshold == t["rfs_threshold"]


def test_asha_budget_can_count_images_or_iterations(tmp_path, base):
    from pipelines.tune import cluster, tuner

    base["scheduler"] = {"type": "asha", "time_attr": "images", "grace_period": 160, "reduction_factor": 2}
    with pytest.raises(ConfigError, match="scheduler.max_t is required with time_attr images"):
        load_experiment_config(_write(tmp_path, base))
    base["scheduler"]["max_t"] = 640
    cfg = load_experiment_config(_write(tmp_path, base))
    asha = tuner._scheduler(cfg, cluster.max_concurrent(cfg))
    assert (asha._time_attr, asha._max_t) == ("images", 640)
    assert asha._brackets[0]._rungs[-1][0] == 160  # the first rung: 160 images
    assert cfg.evals_per_trial == math.ceil(cfg.stage2.epochs / cfg.eval.every)  # max_t is not in evaluations
    base["scheduler"] = {"type": "asha", "grace_period": 1, "max_t": 2}
    asha = tuner._scheduler(load_experiment_config(_write(tmp_path, base)), None)
    assert (asha._time_attr, asha._max_t) == ("training_iteration", 2)


def test_skip_invalid_reaches_the_run_spec(tmp_path, base):
    from pipelines.config.spec import train_spec

    assert train_spec(load_experiment_config(_write(tmp_path, base)), "stage1").skip_invalid is False
    base["data"]["skip_invalid"] = True
    assert train_spec(load_experiment_config(_write(tmp_path, base)), "stage2").skip_invalid is True


def test_trials_keep_their_best_checkpoints_by_the_sweep_metric(tmp_path, base):
    from pipelines.tune.tuner import build_tuner

    base["scheduler"] = {"type": "fifo", "metric": "APr", "mode": "max"}
    base["run"] = {"storage_path": str(tmp_path / "results"), "checkpoints_to_keep": 1}
    cfg = load_experiment_config(_write(tmp_path, base))
    tuner = build_tuner(
        cfg, None, trainable_fn=lambda config, experiment, stage1=None, shared=None: None, progress=False
    )
    ckpt = tuner._local_tuner._run_config.checkpoint_config
    assert (ckpt.num_to_keep, ckpt.checkpoint_score_attribute, ckpt.checkpoint_score_order) == (1, "APr", "max")


def test_data_seeds_give_every_seed_its_own_draw_of_the_synthetic_benchmark(tmp_path, base):
    from pipelines.config.spec import train_spec

    base["search"] = {"seeds": [0, 1], "data_seeds": True}
    with pytest.raises(ConfigError, match="data_seeds .* needs data.synthetic"):
        load_experiment_config(_write(tmp_path, base))
    base["data"]["synthetic"] = "demo"
    cfg = load_experiment_config(_write(tmp_path, base))
    root = Path(base["data"]["train"]).parent
    one = cfg.with_seed(1)
    assert one.data.train == root.parent / f"{root.name}-data1" / "train.json" and one.data.synthetic_seed == 1
    assert one.data.val.parent == one.data.train.parent and not one.search.data_seeds
    assert one.with_seed(1).data == one.data  # seeding the seeded copy again moves nothing
    spec = train_spec(cfg, "stage2", {"seed": 1})
    assert spec.train_ann == str(one.data.train) and spec.val_ann == str(one.data.val) and spec.seed == 1
    assert cfg.data_for(0).train.parent.name == f"{root.name}-data0" and cfg.data.train.parent == root


def test_a_lam_schedule_replaces_lam_and_is_never_mixed_with_it(tmp_path, base):
    sched = [[0, 0.0], [2, 0.7]]
    cfg = load_experiment_config(_write(tmp_path, dict(base, space={}, stage2={"epochs": 4, "lam_schedule": sched})))
    spec = cfg.stage2.sampler_spec()
    assert spec.lam is None and spec.lam_schedule == ((0, 0.0), (2, 0.7)) and spec.lam_at(3) == 0.7
    both = dict(base, space={}, stage2={"epochs": 4, "lam": 0.5, "lam_schedule": sched})
    assert "stage2.lam_schedule sets λ per epoch: remove stage2.lam" in _error(tmp_path, both)
    searched = dict(base, stage2={"epochs": 4, "lam_schedule": sched})  # base searches space.lam
    assert "remove space.lam / search.configs" in _error(tmp_path, searched)
    other = dict(base, space={}, stage2={"epochs": 4, "sampler": "nonbalance", "lam_schedule": sched})
    assert "stage2.lam_schedule is ignored" in _error(tmp_path, other)
    bad = dict(base, space={}, stage2={"epochs": 4, "lam_schedule": [[1, 0.5]]})
    assert "first at epoch 0" in _error(tmp_path, bad)


def test_pbt_perturbs_lam_xi_or_lr_of_a_population(tmp_path, base):
    pbt = {"type": "pbt", "perturbation_interval": 2, "quantile_fraction": 0.5}
    cfg = load_experiment_config(_write(tmp_path, dict(base, scheduler=pbt, space={"lr": {"loguniform": [1e-3, 0.1]}})))
    assert cfg.scheduler.type == "pbt" and cfg.scheduler.perturbation_interval == 2
    bad = dict(base, scheduler=pbt, space={"loss": {"grid": ["acsl", "concurrent_softmax"]}})
    assert "space of lam, xi and / or lr (got ['loss'])" in _error(tmp_path, bad)
    assert "quantile_fraction" in _error(tmp_path, dict(base, scheduler={"type": "pbt", "quantile_fraction": 0.8}))


def test_pb2_explores_between_the_grid_bounds(tmp_path, base):
    from pipelines.tune.pbt import SeedAwarePB2, pbt_scheduler

    raw = dict(
        base, scheduler={"type": "pb2"}, space={"lam": {"grid": [0.0, 0.5, 1.0]}, "lr": {"uniform": [0.01, 0.04]}}
    )
    scheduler = pbt_scheduler(load_experiment_config(_write(tmp_path, raw)))
    assert isinstance(scheduler, SeedAwarePB2)
    assert scheduler._hyperparam_bounds == {"lam": [0.0, 1.0], "lr": [0.01, 0.04]}
    bad = dict(raw, space={"sampler": {"grid": ["softbalance", "nonbalance"]}})
    assert "scheduler.type pb2 perturbs the searched λ / ξ / lr" in _error(tmp_path, bad)
