"""Stage 1 of the hybrid schedule: one shared non-balance checkpoint that every stage-2 trial restores.

The checkpoint is content-addressed: its key is the sha256 of the canonical stage-1 config (sorted JSON of the
model, the stage-1 schedule and the seed) plus the dataset fingerprint (sha256 of the training annotation bytes
and the training image list) and a fingerprint of the training code (every lt_models module, and the
torch/torchvision versions), so an edited detector never restores an incompatible checkpoint. It lives in
`<storage_path>/pretrain/<sha256>/`:

    checkpoint/   the engine's checkpoint dir (what `engine.train(init_checkpoint=...)` takes)
    meta.json     sha256, the canonical config, the dataset fingerprint, final stage-1 metrics

It is trained once, as a Ray task with the resources a trial gets (so on a cluster it lands on a GPU node), into
a temp dir that is renamed into place when complete (atomic). A lock file (`<sha256>.lock`, via `filelock`)
stops two drivers training the same key at once: the second waits and then reuses the first one's result.
Sweeps with the same key reuse it; `force=True` (`--force-pretrain`) retrains and replaces it.
On a multi-node cluster `storage_path` must be shared storage (NFS) so trials on other nodes can read it, or an
object store (`s3://bucket/prefix`, :mod:`pipelines.storage.location`). There the training node trains into a local
temp dir and uploads `checkpoint/`; the driver then reads the upload back for its digests and writes `meta.json`
last, so a cache without `meta.json` is incomplete and never used. The lock is `pipelines.storage.location.lock`'s
owner markers (`<sha256>.lock/<token>`, a heartbeat and a stale timeout). Trials restore a node-local copy
(`pipelines.storage.stage1_cache.local_stage1`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from lt_models.atomic import atomic_dir, write_json_atomic
from pipelines.config.experiment import ExperimentConfig
from pipelines.config.identity import dataset_fingerprint, frequency_source, stage1_identity, stage1_key
from pipelines.config.spec import compute, train_spec
from pipelines.names import PRETRAIN_METRICS
from pipelines.storage import annotation_stores
from pipelines.storage import location as storage
from pipelines.storage.stage1_cache import Stage1Checkpoint, file_digests, pretrain_root, verify_stage1

log = logging.getLogger(__name__)


def find_stage1(cfg: ExperimentConfig, report: bool = True) -> Stage1Checkpoint | None:
    """The finished, verified stage-1 checkpoint for this config, or None. A cache whose files do not match their
    recorded digests (a truncated or edited checkpoint) is never trusted: it is reported in one line (unless
    ``report`` is False: the caller reported it already) and treated as absent, so it is trained again and replaced
    atomically."""
    sha = stage1_key(cfg)
    final = storage.join(pretrain_root(cfg.run.storage_path), sha)
    meta = storage.join(final, "meta.json")
    if not storage.is_file(meta):
        return None
    problem = verify_stage1(final)
    if problem is not None:
        if report:
            log.warning("%s; training it again (as --force-pretrain would)", problem)
        return None
    info = storage.read_json(meta)
    return Stage1Checkpoint(
        sha, final, trained=False, metrics=info.get("metrics", {}), seconds=float(info.get("seconds", 0.0))
    )


def train_stage1_into(cfg: ExperimentConfig, out_dir: Path) -> dict[str, Any]:
    """Train stage 1 into out_dir (a fresh temp dir) and return its final metrics (incl. per_class).

    Runs inside a Ray task with a trial's resources (or locally). Leaves out_dir/checkpoint = the engine's last
    checkpoint dir. With `resources.workers_per_trial` > 1 (stage 1 has no workers field of its own: it trains
    with the trials' workers, batch_size per worker) it is the driver of a Ray Train run, like a multi-worker trial
    (`pipelines.tune.workers`), whose uploads go to a scratch dir under `<storage_path>/pretrain/`."""
    from lt_models.engine import loop as engine

    distributed = cfg.resources.distributed and _ray_is_up()
    device, threads = compute(cfg, worker=distributed)
    assert cfg.stage1 is not None  # reached only through ensure_stage1, which returns first for `stage1: null`
    spec = train_spec(
        cfg, "stage1", device=device, num_threads=threads, eval_every=cfg.stage1.epochs
    )  # evaluate once, at the end of stage 1
    annotation_stores.fetch(cfg.run.storage_path, spec)  # object storage: this node's copy of the stores
    if distributed:
        from pipelines.tune.workers import train_into

        scratch_under = str(storage.join(cfg.run.storage_path, "pretrain"))
        return _jsonable(train_into(cfg, spec, out_dir / "checkpoint", scratch_under=scratch_under))
    metrics = engine.train(spec, out_dir / "work")
    ckpt = Path(metrics.pop("checkpoint_dir"))
    os.replace(ckpt, out_dir / "checkpoint")
    shutil.rmtree(out_dir / "work", ignore_errors=True)
    return _jsonable(metrics)


def _ray_is_up() -> bool:
    import ray

    return ray.is_initialized()


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if k == "per_class" and isinstance(v, dict):
            out[k] = {str(c): float(ap) for c, ap in v.items()}
        elif isinstance(v, (int, float, str, bool)):
            out[k] = v
    return out


def train_stage1_to(cfg: ExperimentConfig, location: storage.Location, train: Callable | None = None) -> dict[str, Any]:
    """Train stage 1 on this node into a local temp dir (``train(cfg, tmp)``, default :func:`train_stage1_into`)
    and upload its checkpoint/ to ``<location>/checkpoint`` (object storage); returns the final metrics."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ltsweep-stage1-") as tmp:
        metrics = (train or train_stage1_into)(cfg, Path(tmp))
        storage.upload_dir(Path(tmp, "checkpoint"), storage.join(location, "checkpoint"))
    return metrics


def _train_stage1_task(cfg_json: str, out_dir: str) -> dict[str, Any]:
    """The Ray task: train into out_dir (a local temp dir), or on object storage (a URI) train here and upload."""
    cfg = ExperimentConfig.model_validate_json(cfg_json)
    return train_stage1_to(cfg, out_dir) if storage.is_uri(out_dir) else train_stage1_into(cfg, Path(out_dir))


def ensure_stage1(
    cfg: ExperimentConfig,
    *,
    force: bool = False,
    use_ray: bool | None = None,
    tracking_uri: str | None = None,
    sweep_name: str | None = None,
    lock_timeout: float = -1,
) -> Stage1Checkpoint | None:
    """Return the shared stage-1 checkpoint for cfg, training it first if it is absent (or if force).

    use_ray: run the training as a Ray task with the trial's resources (default: when Ray is initialised).
    tracking_uri: record it as the `ltsweep.role=pretrain` MLflow run of the sweep's experiment (idempotent: one
        run per sha256 and experiment, also when the checkpoint is reused from an earlier sweep).
    Returns None when cfg has no stage1 (one-stage trials)."""
    if cfg.stage1 is None:
        return None
    ckpt = None if force else find_stage1(cfg)
    if ckpt is not None:
        log.info("stage 1: reusing %s", ckpt.path)
    else:
        ckpt = _train_locked(cfg, force, use_ray, lock_timeout)
    if tracking_uri is not None:
        _log_stage1(cfg, ckpt, tracking_uri, sweep_name)
    return ckpt


def ensure_stage1_per_seed(
    cfg: ExperimentConfig, *, force: bool = False, tracking_uri: str | None = None, sweep_name: str | None = None
) -> dict[int, Stage1Checkpoint] | None:
    """The stage-1 checkpoint of every training seed of the sweep (`cfg.seeds`): each seed's trials restore their
    own seed's stage 1. The missing ones train at the same time (as Ray tasks when Ray is up; multi-worker ones as
    many as the cluster holds together, `pipelines.tune.cluster.concurrent_trials_cap`); each stays
    content-addressed (the seed is part of its key), so a later sweep with the same seeds reuses them. MLflow gets
    one pretrain run per seed, written one after the other (a single writer). None for one-stage trials."""
    if cfg.stage1 is None:
        return None
    from concurrent.futures import ThreadPoolExecutor

    seeds, at_once = cfg.seeds, len(cfg.seeds)
    if cfg.resources.distributed and _ray_is_up():  # as many multi-worker runs as the cluster holds together
        from pipelines.tune.cluster import concurrent_trials_cap

        cap = concurrent_trials_cap(cfg)
        assert cap is not None  # a count for multi-worker trials (None only for one-process ones)
        at_once = min(at_once, cap)
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = {s: pool.submit(ensure_stage1, cfg.with_seed(s), force=force) for s in seeds}
        # cfg.stage1 is set (checked above), so ensure_stage1 returns a checkpoint for every seed
        ckpts = {s: cast(Stage1Checkpoint, f.result()) for s, f in futures.items()}
    if tracking_uri is not None:
        for s, ckpt in ckpts.items():
            _log_stage1(cfg.with_seed(s), ckpt, tracking_uri, sweep_name)
    return ckpts


def _log_stage1(cfg: ExperimentConfig, ckpt: Stage1Checkpoint, tracking_uri: str, sweep_name: str | None) -> None:
    from pipelines.tracking.stage1_run import log_pretrain_run

    metrics = {k: v for k, v in ckpt.metrics.items() if k in PRETRAIN_METRICS}
    log_pretrain_run(
        tracking_uri,
        sweep_name or cfg.name,
        ckpt.sha256,
        _pretrain_params(cfg),
        metrics,
        str(ckpt.checkpoint_dir),
        val_annotations=str(cfg.data.val),
    )


def _train_locked(cfg: ExperimentConfig, force: bool, use_ray: bool | None, lock_timeout: float) -> Stage1Checkpoint:
    sha = stage1_key(cfg)
    final = storage.join(pretrain_root(cfg.run.storage_path), sha)
    # local/NFS: the file lock <sha>.lock; object storage: owner markers <sha>.lock/<token> (storage.lock)
    with storage.lock(final, timeout=lock_timeout):
        if not force:  # another driver may have finished it while we waited for the lock
            found = find_stage1(cfg, report=False)  # ensure_stage1 reported a corrupt cache already
            if found is not None:
                log.info("stage 1: %s was trained by another driver meanwhile; reusing it", found.path)
                return found  # (a corrupt cache is not "found": it is trained again and swapped out below)
        t0 = time.time()
        assert cfg.stage1 is not None  # ensure_stage1 returns before training a config without a stage 1
        log.info("stage 1: training %s (non-balance + %s, %d epochs)", sha[:12], cfg.stage1.loss, cfg.stage1.epochs)
        if storage.is_uri(final):
            # no rename on object storage: meta.json goes first and comes back last, when checkpoint/ is complete
            storage.delete_file(storage.join(final, "meta.json"))
            storage.delete_dir(storage.join(final, "checkpoint"))
            if use_ray if use_ray is not None else _ray_is_up():  # the Ray task trains and uploads on its node
                metrics = _run_stage1(cfg, final, True)
            else:
                metrics = train_stage1_to(cfg, final, lambda c, tmp: _run_stage1(c, tmp, False))
            seconds = time.time() - t0
            meta = _meta(cfg, sha, metrics, seconds, file_digests(storage.join(final, "checkpoint")))
            storage.write_json(storage.join(final, "meta.json"), meta, indent=2, sort_keys=True, default=str)
        else:
            with atomic_dir(final) as tmp:  # --force-pretrain: the old checkpoint is swapped out only on success
                metrics = _run_stage1(cfg, tmp, use_ray)
                seconds = time.time() - t0
                meta = _meta(cfg, sha, metrics, seconds, file_digests(tmp / "checkpoint"))
                write_json_atomic(tmp / "meta.json", meta, indent=2, sort_keys=True, default=str)
    log.info("stage 1: trained %s in %.1fs", storage.display(final), seconds)
    return Stage1Checkpoint(sha, final, trained=True, metrics=metrics, seconds=seconds)


def _meta(
    cfg: ExperimentConfig, sha: str, metrics: dict[str, Any], seconds: float, files: dict[str, str]
) -> dict[str, Any]:
    """meta.json of a stage-1 cache."""
    return {
        "sha256": sha,
        "identity": stage1_identity(cfg),
        "metrics": metrics,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(seconds, 2),
        "files": files,
    }


def _run_stage1(cfg: ExperimentConfig, tmp: storage.Location, use_ray: bool | None) -> dict[str, Any]:
    """`tmp`: a local dir, or an object-store URI (only with use_ray=True: the Ray task trains and uploads)."""
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    if not use_ray:  # in this process; with several workers it drives a Ray Train run, so Ray must be up
        if cfg.resources.distributed:  # `ltsweep train`: RAY_ADDRESS's cluster or a local Ray
            from pipelines.tune.cluster import ensure_ray

            ensure_ray()
        assert isinstance(tmp, Path)  # a URI comes only with use_ray=True (_train_locked)
        return train_stage1_into(cfg, tmp)
    import ray

    from pipelines.tune.cluster import trial_resources

    res = trial_resources(cfg)
    task = ray.remote(
        num_cpus=res.pop("cpu"),
        num_gpus=res.pop("gpu"),
        resources=res or None,  # type: ignore[arg-type]  # Ray's stubs leave out None, the parameter's default
        max_retries=0,
    )(_train_stage1_task)
    try:
        return ray.get(task.remote(cfg.model_dump_json(), str(tmp)))
    except ray.exceptions.RayTaskError as exc:  # bad input inside the task: the original one-line error
        from lt_models.errors import LtsweepInputError

        if isinstance(exc.cause, LtsweepInputError):
            raise exc.cause from None
        raise


def _pretrain_params(cfg: ExperimentConfig) -> dict[str, Any]:
    assert cfg.stage1 is not None  # called only for configs with a stage 1 (ensure_stage1 / _per_seed check it)
    return {
        "model": cfg.model.model_dump(mode="json"),
        "stage1": cfg.stage1.model_dump(mode="json"),
        "sampler": "nonbalance",
        "loss": cfg.stage1.loss,
        "seed": cfg.seed,
        "train_annotations": str(cfg.data.train),
        "dataset_fingerprint": dataset_fingerprint(cfg),
        "frequency_source": frequency_source(cfg),
    }
