"""Stage 1 of the hybrid schedule: one shared non-balance checkpoint that every stage-2 trial restores.

The checkpoint is content-addressed: its key is the sha256 of the canonical stage-1 config (sorted JSON of the
model, the stage-1 schedule and the seed) plus the dataset fingerprint (sha256 of the training annotation bytes
and the training image list) and a fingerprint of the training code (every lt_models module, and the
torch/torchvision versions), so an edited detector never restores an incompatible checkpoint. It lives in `<storage_path>/pretrain/<sha256>/`:

    checkpoint/   the engine's checkpoint dir (what `engine.train(init_checkpoint=...)` takes)
    meta.json     sha256, the canonical config, the dataset fingerprint, final stage-1 metrics

It is trained once, as a Ray task with the resources a trial gets (so on a cluster it lands on a GPU node), into
a temp dir that is renamed into place when complete (atomic). A lock file (`<sha256>.lock`, via `filelock`)
stops two drivers training the same key at once: the second waits and then reuses the first one's result.
Sweeps with the same key reuse it; `force=True` (`--force-pretrain`) retrains and replaces it.
On a multi-node cluster `storage_path` must be shared storage (NFS) so trials on other nodes can read it, or an
object store (`s3://bucket/prefix`, :mod:`pipelines.storage.location`). There the training node trains into a local temp
dir and uploads `checkpoint/`; the driver then reads the upload back for its digests and writes `meta.json` last,
so a cache without `meta.json` is incomplete and never used. The lock is `pipelines.storage.location.lock`'s owner markers
(`<sha256>.lock/<token>`, a heartbeat and a stale timeout). Trials restore a node-local copy (`local_stage1`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from lt_models.atomic import atomic_dir, write_json_atomic
from pipelines.storage import annotation_stores
from pipelines.storage import location as storage
from pipelines.config.load import ExperimentConfig, canonical_json, compute, train_spec
from pipelines.names import PRETRAIN_METRICS

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Stage1Checkpoint:
    sha256: str
    path: storage.Location      # <storage>/pretrain/<sha256> (a Path, or a URI on object storage)
    trained: bool               # True if this call trained it, False if it was reused
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def checkpoint_dir(self) -> storage.Location:
        return storage.join(self.path, "checkpoint")


_FINGERPRINTS: dict[tuple, str] = {}


def dataset_fingerprint(cfg: ExperimentConfig) -> str:
    """sha256 of the training annotation file's bytes plus the sorted training image list (paths below the image
    folder, and sizes).

    Cached per (path, size, mtime) within a process: LVIS's train JSON is ~1 GB."""
    train = Path(cfg.data.train)
    st = train.stat()
    key = (str(train), str(cfg.data.image_dir), st.st_size, st.st_mtime_ns)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = _fingerprint(cfg)
    return _FINGERPRINTS[key]


def _fingerprint(cfg: ExperimentConfig) -> str:
    h = hashlib.sha256()
    train = Path(cfg.data.train)
    with open(train / "meta.json" if train.is_dir() else train, "rb") as f:   # an annotation store: its meta
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    image_dir = Path(cfg.data.image_dir) if cfg.data.image_dir else train.parent / "images"
    for rel, size in _image_files(image_dir):
        h.update(f"\n{rel}\t{size}".encode())
    return h.hexdigest()


def _image_files(root: Path) -> list[tuple[str, int]]:
    """(path relative to root, size) of every image below root, sorted by path: a flat folder, or a COCO root with
    train2017/ and val2017/ (LVIS v1 resolves images through `coco_url` below it)."""
    out = []
    for dirpath, _, files in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        for name in files:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                out.append(((rel_dir / name).as_posix(), os.stat(os.path.join(dirpath, name)).st_size))
    return sorted(out)


def frequency_source(cfg: ExperimentConfig) -> str:
    """Whose counts the rare / common / frequent buckets of every evaluation come from (the engine always passes
    the training set's buckets): recorded on the MLflow runs."""
    return f"training set {cfg.data.train}: categories[].frequency, else its image counts"


def stage1_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """Everything that determines the stage-1 weights (paths excluded: the data enters via its fingerprint)."""
    if cfg.stage1 is None:
        raise ValueError("this config has no stage1 section (one-stage trials); there is nothing to pretrain")
    model = cfg.model.model_dump(mode="json")
    if cfg.model.weights is not None:  # the initial weights matter by content, not by path
        model["weights"] = hashlib.sha256(Path(cfg.model.weights).read_bytes()).hexdigest()
    identity = {
        "recipe": "stage1: non-balance sampler + stage1.loss, all layers",
        "model": model,
        "stage1": cfg.stage1.model_dump(mode="json", exclude={"workers"}),
        "seed": cfg.seed,
        "dataset_fingerprint": dataset_fingerprint(cfg),
        "expand_parents": cfg.data.expand_parents,
        "code": code_fingerprint(),
    }
    if cfg.resources.workers_per_trial > 1:  # trained on several workers: a total batch of workers x batch_size
        identity["workers_per_trial"] = cfg.resources.workers_per_trial
    if cfg.eval.metric != "lvis":  # the cached stage-1 metrics are in this metric
        identity["eval_metric"] = cfg.eval.metric
    uses_rate = cfg.stage1.loss == "concurrent_softmax"  # r_ij depends on the hierarchy and its leaf/parent rate
    if cfg.data.hierarchy is not None and (cfg.data.expand_parents or uses_rate):  # parents change labels or r_ij
        identity["hierarchy"] = hashlib.sha256(Path(cfg.data.hierarchy).read_bytes()).hexdigest()
    if uses_rate:
        identity["hierarchy_rate"] = cfg.data.hierarchy_rate
    return identity


def code_fingerprint() -> str:
    """sha256 of the training code (every lt_models module's source) and the torch/torchvision versions: an edited
    dataset, sampler, loss, detector or engine must not reuse a checkpoint trained by the old code."""
    import torch
    import torchvision

    import lt_models

    h = hashlib.sha256(f"torch {torch.__version__} torchvision {torchvision.__version__}".encode())
    root = Path(lt_models.__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(f"\n{path.relative_to(root).as_posix()}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def stage1_key(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(canonical_json(stage1_identity(cfg)).encode()).hexdigest()


def pretrain_root(storage_path: storage.Location) -> storage.Location:
    return storage.join(storage_path, "pretrain")


def file_digests(checkpoint_dir: storage.Location) -> dict[str, str]:
    """sha256 of every file of a stage-1 checkpoint directory, local or on object storage (relative path -> hex
    digest)."""
    out = {}
    for rel in storage.list_files(checkpoint_dir):
        h = hashlib.sha256()
        with storage.open_input(checkpoint_dir, rel) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[rel] = h.hexdigest()
    return out


def verify_stage1(path: storage.Location) -> Optional[str]:
    """None when the stage-1 cache at ``path`` is complete and its files match the digests its meta.json recorded;
    else one line saying what is wrong (path, expected and found)."""
    info = storage.read_json(storage.join(path, "meta.json"))
    expected = info.get("files")
    if not expected:
        return f"stage-1 cache {storage.display(path)} records no file digests (written by an older ltsweep)"
    found = file_digests(storage.join(path, "checkpoint"))
    for name, digest in expected.items():
        got = found.get(name)
        if got != digest:
            return (f"stage-1 cache {storage.display(storage.join(path, 'checkpoint', name))} is corrupt: expected "
                    f"sha256 {digest[:12]}…, found " + (f"{got[:12]}…" if got else "no such file"))
    return None


def local_stage1(checkpoint_dir: str) -> str:
    """The stage-1 checkpoint dir a trial restores, readable on this node: ``checkpoint_dir`` itself on local or
    NFS storage; on object storage a node-local copy of its ``<sha256>/`` (meta.json and checkpoint/), downloaded
    once per node and verified against meta.json's digests (:func:`pipelines.storage.location.local_copy`)."""
    if not storage.is_uri(checkpoint_dir):
        return checkpoint_dir
    return str(storage.local_copy(storage.parent(checkpoint_dir), verify=verify_stage1) / "checkpoint")


def find_stage1(cfg: ExperimentConfig, report: bool = True) -> Optional[Stage1Checkpoint]:
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
    return Stage1Checkpoint(sha, final, trained=False, metrics=info.get("metrics", {}),
                            seconds=float(info.get("seconds", 0.0)))


def train_stage1_into(cfg: ExperimentConfig, out_dir: Path) -> dict[str, Any]:
    """Train stage 1 into out_dir (a fresh temp dir) and return its final metrics (incl. per_class).

    Runs inside a Ray task with a trial's resources (or locally). Leaves out_dir/checkpoint = the engine's last
    checkpoint dir. With `resources.workers_per_trial` > 1 (stage 1 has no workers field of its own: it trains
    with the trials' workers, batch_size per worker) it is the driver of a Ray Train run, like a multi-worker trial
    (`pipelines.tune.workers`), whose uploads go to a scratch dir under `<storage_path>/pretrain/`."""
    from lt_models.engine import loop as engine

    distributed = cfg.resources.distributed and _ray_is_up()
    device, threads = compute(cfg, worker=distributed)
    spec = train_spec(cfg, "stage1", device=device, num_threads=threads,
                      eval_every=cfg.stage1.epochs)  # evaluate once, at the end of stage 1
    annotation_stores.fetch(cfg.run.storage_path, spec)   # object storage: this node's copy of the stores
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


def train_stage1_to(cfg: ExperimentConfig, location: str, train: Optional[Callable] = None) -> dict[str, Any]:
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


def ensure_stage1(cfg: ExperimentConfig, *, force: bool = False, use_ray: Optional[bool] = None,
                  tracking_uri: Optional[str] = None, sweep_name: Optional[str] = None,
                  lock_timeout: float = -1) -> Optional[Stage1Checkpoint]:
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


def ensure_stage1_per_seed(cfg: ExperimentConfig, *, force: bool = False, tracking_uri: Optional[str] = None,
                           sweep_name: Optional[str] = None) -> Optional[dict[int, Stage1Checkpoint]]:
    """The stage-1 checkpoint of every training seed of the sweep (`cfg.seeds`): each seed's trials restore their
    own seed's stage 1. The missing ones train at the same time (as Ray tasks when Ray is up; multi-worker ones as
    many as the cluster holds together, `train_workers.concurrent_trials_cap`); each stays
    content-addressed (the seed is part of its key), so a later sweep with the same seeds reuses them. MLflow gets
    one pretrain run per seed, written one after the other (a single writer). None for one-stage trials."""
    if cfg.stage1 is None:
        return None
    from concurrent.futures import ThreadPoolExecutor

    seeds, at_once = cfg.seeds, len(cfg.seeds)
    if cfg.resources.distributed and _ray_is_up():  # as many multi-worker runs as the cluster holds together
        from pipelines.tune.workers import concurrent_trials_cap

        at_once = min(at_once, concurrent_trials_cap(cfg))
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = {s: pool.submit(ensure_stage1, cfg.with_seed(s), force=force) for s in seeds}
        ckpts = {s: f.result() for s, f in futures.items()}
    if tracking_uri is not None:
        for s, ckpt in ckpts.items():
            _log_stage1(cfg.with_seed(s), ckpt, tracking_uri, sweep_name)
    return ckpts


def _log_stage1(cfg: ExperimentConfig, ckpt: Stage1Checkpoint, tracking_uri: str, sweep_name: Optional[str]) -> None:
    from pipelines.tracking import callback as tracking

    metrics = {k: v for k, v in ckpt.metrics.items() if k in PRETRAIN_METRICS}
    tracking.log_pretrain_run(tracking_uri, sweep_name or cfg.name, ckpt.sha256, _pretrain_params(cfg),
                              metrics, str(ckpt.checkpoint_dir), val_annotations=str(cfg.data.val))


def _train_locked(cfg: ExperimentConfig, force: bool, use_ray: Optional[bool], lock_timeout: float
                  ) -> Stage1Checkpoint:
    sha = stage1_key(cfg)
    final = storage.join(pretrain_root(cfg.run.storage_path), sha)
    # local/NFS: the file lock <sha>.lock; object storage: owner markers <sha>.lock/<token> (pipelines.storage.location.lock)
    with storage.lock(final, timeout=lock_timeout):
        if not force:  # another driver may have finished it while we waited for the lock
            found = find_stage1(cfg, report=False)  # ensure_stage1 reported a corrupt cache already
            if found is not None:
                log.info("stage 1: %s was trained by another driver meanwhile; reusing it", found.path)
                return found  # (a corrupt cache is not "found": it is trained again and swapped out below)
        t0 = time.time()
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


def _meta(cfg: ExperimentConfig, sha: str, metrics: dict[str, Any], seconds: float, files: dict[str, str]
          ) -> dict[str, Any]:
    """meta.json of a stage-1 cache."""
    return {"sha256": sha, "identity": stage1_identity(cfg), "metrics": metrics,
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 2), "files": files}


def _run_stage1(cfg: ExperimentConfig, tmp: Path, use_ray: Optional[bool]) -> dict[str, Any]:
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    if not use_ray:  # in this process; with several workers it drives a Ray Train run, so Ray must be up
        if cfg.resources.distributed:  # `ltsweep train`: RAY_ADDRESS's cluster or a local Ray
            from pipelines.tune.workers import ensure_ray

            ensure_ray()
        return train_stage1_into(cfg, tmp)
    import ray

    from pipelines.tune.trainable import trial_resources

    res = trial_resources(cfg)
    task = ray.remote(num_cpus=res.pop("cpu"), num_gpus=res.pop("gpu"), resources=res or None,
                      max_retries=0)(_train_stage1_task)
    try:
        return ray.get(task.remote(cfg.model_dump_json(), str(tmp)))
    except ray.exceptions.RayTaskError as exc:  # bad input inside the task: the original one-line error
        from lt_models.errors import LtsweepInputError

        if isinstance(exc.cause, LtsweepInputError):
            raise exc.cause from None
        raise


def _pretrain_params(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"model": cfg.model.model_dump(mode="json"), "stage1": cfg.stage1.model_dump(mode="json"),
            "sampler": "nonbalance", "loss": cfg.stage1.loss, "seed": cfg.seed,
            "train_annotations": str(cfg.data.train),
            "dataset_fingerprint": dataset_fingerprint(cfg), "frequency_source": frequency_source(cfg)}


