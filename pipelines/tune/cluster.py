"""The Ray cluster a sweep runs on: joining it (or starting a local Ray), what one trial asks it for, and how many
trials it holds at once."""

from __future__ import annotations

import os

from lt_models.errors import ConfigError
from pipelines.config.experiment import ExperimentConfig


def init_ray(cfg: ExperimentConfig, include_dashboard: bool | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local Ray sized by run.ray_num_cpus."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(
            address="local",
            num_cpus=cfg.run.ray_num_cpus or os.cpu_count(),
            include_dashboard=include_dashboard,
            dashboard_host="127.0.0.1",
        )


def max_concurrent(cfg: ExperimentConfig) -> int | None:
    """How many trials run at once (None: as many as Tune can start): ``search.max_concurrent_trials``, capped for
    multi-worker trials at the number whose drivers and workers the Ray cluster holds together
    (`concurrent_trials_cap`, counted on the nodes alive now; on an autoscaling cluster start the
    nodes first). Without the cap Tune starts a driver for every CPU and the drivers starve the workers."""
    wanted, fit = cfg.search.max_concurrent_trials, concurrent_trials_cap(cfg)
    if fit is None or (wanted is not None and wanted <= fit):
        return wanted
    r = cfg.resources
    print(
        f"note: at most {fit} trial(s) at a time: the Ray cluster holds {fit} x (a driver and "
        f"{r.workers_per_trial} workers of {r.cpus_per_worker:g} CPU / {r.gpus_per_worker:g} GPU)"
        + (f"; search.max_concurrent_trials = {wanted} is lowered to {fit}" if wanted is not None else ""),
        flush=True,
    )
    return fit


def ensure_ray() -> None:
    """Ray for a Train run outside a sweep (`ltsweep train`): the cluster in RAY_ADDRESS (`ray job submit` sets it),
    else a local Ray with its dashboard, which Ray Train V2 needs."""
    import ray

    if not ray.is_initialized():
        ray.init(address=None if os.environ.get("RAY_ADDRESS") else "local")


def concurrent_trials_cap(cfg: ExperimentConfig) -> int | None:
    """The most multi-worker trials (or stage-1 runs) that the running Ray cluster fits at once, counted over its
    alive nodes now (`ResourcesConfig.trials_that_fit`); None for one-process trials, which Tune schedules by their
    own resources. A cluster that cannot fit a single trial is a config error: the Train run would wait forever."""
    r = cfg.resources
    if not r.distributed:
        return None
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fit = r.trials_that_fit(nodes)
    if fit == 0:
        need = {k: v for k, v in r.worker_bundle().items() if v}
        have = [{k: v for k, v in n.items() if k in ("CPU", "GPU") or k in r.custom} for n in nodes]
        raise ConfigError(
            f"resources: one trial needs a driver ({r.cpus_per_trial:g} CPU) and "
            f"workers_per_trial = {r.workers_per_trial} workers of {need}, but the Ray cluster's nodes "
            f"have {have}; lower workers_per_trial / cpus_per_worker / gpus_per_worker / "
            "cpus_per_trial, or add nodes"
        )
    return fit


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Resources of one trial (and of the stage-1 task), for `tune.with_resources`: CPUs, GPUs and the Ray custom
    resources of `resources.custom` (which pin trials to the nodes that have them). A multi-worker trial asks only
    for its Ray Train driver; Ray Train reserves its workers
    (`pipelines.config.resources.ResourcesConfig.trial_bundle`)."""
    return cfg.resources.trial_bundle()
