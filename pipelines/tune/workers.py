"""One training run on several data-parallel workers with Ray Train (`resources.workers_per_trial` > 1).

`train_on_workers(cfg, spec, ...)` runs a Ray Train V2 `TorchTrainer` (DDP: gloo on CPUs, NCCL on GPUs) with
`workers_per_trial` workers of `cpus_per_worker` / `gpus_per_worker` each; every worker runs `worker_loop`, which
is `lt_models.engine.loop.train(spec, ..., rank=r, world_size=n)`: its own shard of each epoch, gradients all-reduced,
a distributed evaluation, checkpoints written by rank 0 only. It is launched from the Tune trial (Ray Train V2's
Tune integration: the trial is the Train run's driver) or from the stage-1 Ray task.

How results travel. Every worker calls `ray.train.report(metrics, checkpoint)` after each evaluation (rank 0 with its
checkpoint dir, the others with none: V2's report is collective). Ray Train uploads rank 0's checkpoint to the run's
storage (`<storage_path>/ray_train/`, the trial's own directory on the sweep's storage, shared by every node) and
calls `_ForwardReports.after_report` on its controller, which hands (metrics, checkpoint) through a one-slot Ray queue
to the caller's thread; `on_eval` there calls `tune.report(..., checkpoint=...)`, which copies the checkpoint into
the trial's Tune checkpoints exactly as a one-process trial's, and the Train copy is deleted. So Tune, ASHA
(pausing and stopping), the best-model logic and MLflow see the same results and checkpoints whatever the number of
workers, and a retried trial resumes from `tune.get_checkpoint()`: the caller passes it as `resume`, every worker
restores it. Ray Train itself never retries (`FailureConfig(max_failures=0)`): a failed worker fails the trial and
Tune retries it (`run.max_failures`), like any trial; a worker's `NonFiniteLossError` or input error is raised
again here as itself, so divergence markers and exit code 2 work as for one-process trials.

`fit()` runs in a Ray task (no CPU, on this node) that owns the Train controller, so leaving early (Tune stops or
pauses the trial, or `on_eval` raises) cancels that task, and with it the controller and its workers.
"""

from __future__ import annotations

import posixpath
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lt_models.engine.spec import TrainSpec
from lt_models.errors import LtsweepInputError
from pipelines.config.experiment import ExperimentConfig
from pipelines.storage import annotation_stores
from pipelines.storage import location as storage

RUN_DIR = "ray_train"  # the Train run's directory under its storage path
_POLL_S = 0.5  # how often the driver looks whether fit() ended while no report is waiting


def scaling_config(cfg: ExperimentConfig):
    """Ray Train's ScalingConfig: `workers_per_trial` workers of `ResourcesConfig.worker_bundle()`."""
    from ray.train import ScalingConfig

    r = cfg.resources
    bundle = {k: v for k, v in r.worker_bundle().items() if v or k == "CPU"}
    return ScalingConfig(num_workers=r.workers_per_trial, use_gpu=r.gpus_per_worker > 0, resources_per_worker=bundle)


def worker_loop(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: `engine.train` as rank `r` of `n` (torch.distributed is set up by Ray Train)
    in a node-local scratch dir; reports after each evaluation through `ray.train.report` (rank 0 with its
    checkpoint)."""
    import ray.train
    import ray.train.torch

    from lt_models.engine import loop as engine

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    spec = TrainSpec.from_dict(config["spec"])
    if spec.device != "cpu":
        spec.device = str(ray.train.torch.get_device())  # this worker's own GPU

    annotation_stores.fetch(config["storage_path"], spec)  # object storage: this node's copy of the stores
    init = config.get("init_checkpoint")
    if init is not None:
        from pipelines.storage.stage1_cache import local_stage1  # object storage: a node-local copy of stage 1

        init = local_stage1(init)

    def on_eval(metrics: dict, checkpoint_dir: Path | None) -> None:
        ckpt = None if checkpoint_dir is None else ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=ckpt)

    out_dir = Path(tempfile.mkdtemp(prefix=f"ltsweep-rank{rank}-"))
    kw = dict(on_eval=on_eval, shared=config.get("shared"), rank=rank, world_size=world_size)
    try:
        resume = config.get("resume")
        if resume is not None:
            with resume.as_directory() as resume_dir:  # a local copy of the trial's Tune checkpoint, on every node
                engine.train(spec, out_dir / "train", resume_checkpoint=resume_dir, **kw)
        else:
            engine.train(spec, out_dir / "train", init_checkpoint=init, **kw)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _forward_reports_callback(queue):
    from ray.train import UserCallback

    class _ForwardReports(UserCallback):
        """On the Train controller: hand each consolidated report (rank 0's metrics, the uploaded checkpoint) to the
        driver's thread, waiting while the previous one is still being reported."""

        def after_report(self, run_context, metrics, checkpoint):
            queue.put((metrics[0], checkpoint))

    return _ForwardReports()


def _fit(loop: Callable, loop_config: dict, cfg_json: str, storage_path: str, storage_filesystem, queue):
    """The Ray task that builds and runs the TorchTrainer (it owns the Train controller)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = ExperimentConfig.model_validate_json(cfg_json)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.resources.gpus_per_worker > 0 else "gloo"),
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=RUN_DIR,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            callbacks=[_forward_reports_callback(queue)],
        ),
    )
    trainer.fit()


def _run_fs(storage_path: str, storage_filesystem):
    """(pyarrow filesystem, path on it) of the Train run's directory."""
    if storage_filesystem is None:
        storage_filesystem, storage_path = storage.resolve(storage_path)
    return storage_filesystem, posixpath.join(storage_path, RUN_DIR)


def _delete_dir(fs, path: str) -> None:
    from pyarrow import fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def remove_storage(storage_path: str) -> None:
    """Delete a Train run's storage path (a scratch dir) with everything below it."""
    fs, run_dir = _run_fs(storage_path, None)
    _delete_dir(fs, posixpath.dirname(run_dir))


def train_on_workers(
    cfg: ExperimentConfig,
    spec: TrainSpec,
    *,
    storage_path: str,
    storage_filesystem=None,
    init_checkpoint: str | Path | None = None,
    resume=None,
    shared: dict | None = None,
    on_eval: Callable[[dict, Any], None] | None = None,
    keep_last: bool = False,
) -> tuple[dict, Any]:
    """Train `spec` on `cfg.resources.workers_per_trial` Ray Train workers; return the last report's (metrics,
    checkpoint).

    storage_path / storage_filesystem: where the Train run keeps its uploads (`<storage_path>/ray_train/`): shared by
        every node (the trial's directory on the sweep's storage, a URI or a shared path). Cleared first, removed at
        the end.
    init_checkpoint: model weights to start from (stage 2 from stage 1); resume: a `ray.train.Checkpoint` (the
        trial's `tune.get_checkpoint()`) to continue exactly; shared: the engine's shared loss inputs.
    on_eval(metrics, checkpoint): called in this thread after each evaluation, with rank 0's metrics and the
        uploaded `ray.train.Checkpoint`, which is deleted when it returns (the Tune trial reports it, and Tune keeps
        its own copy) unless `keep_last`: then the checkpoints and the run directory stay (stage 1 copies the last
        one out and removes the directory)."""
    import ray
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if storage_filesystem is None and storage.is_uri(storage_path):  # its endpoint, as the sweep's storage has it
        storage_filesystem, storage_path = storage.resolve(storage_path)
    fs, run_dir = _run_fs(storage_path, storage_filesystem)
    _delete_dir(fs, run_dir)  # an earlier attempt's leftovers: a Train run of that name would restore from them
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0, "scheduling_strategy": here})
    loop_config = {
        "spec": spec.to_dict(),
        "init_checkpoint": None if init_checkpoint is None else str(init_checkpoint),
        "resume": resume,
        "shared": shared,
        "storage_path": str(cfg.run.storage_path),
    }
    # `worker_loop` is looked up now, when the run starts (tests replace it). max_calls=1: the task's process exits
    # when fit() returns, and the Train controller it owns (with the actors the controller owns) goes with it; in a
    # reused process the controller outlived its run (held by reference cycles), one idle process per finished trial
    # ignore: Ray's stubs leave NodeAffinitySchedulingStrategy out of ray.remote's scheduling_strategy (Ray takes it)
    fit = ray.remote(  # type: ignore[call-overload]
        num_cpus=0, max_retries=0, max_calls=1, scheduling_strategy=here
    )(_fit).remote(worker_loop, loop_config, cfg.model_dump_json(), storage_path, storage_filesystem, queue)
    last: tuple[dict, Any] = ({}, None)
    try:
        while True:
            try:
                item = queue.get(block=True, timeout=_POLL_S)
            except Empty:
                if ray.wait([fit], timeout=0)[0] and queue.empty():  # every report is put before fit() returns
                    break
                continue
            last = item
            if on_eval is not None:
                on_eval(*item)  # tune.report copies the checkpoint into the trial's own before it returns
            if item[1] is not None and not keep_last:
                _delete_dir(item[1].filesystem, item[1].path)
        try:
            ray.get(fit)
        except ray.exceptions.RayTaskError as exc:
            raise _worker_error(exc) from None
    finally:
        ray.cancel(fit, force=True)  # no-op once it ended; else takes the controller and the workers down with it
        ray.kill(queue.actor)  # type: ignore[arg-type]  # Ray types Queue.actor as handle | class; it is the handle
        if not keep_last:
            _delete_dir(fs, run_dir)
    return last


def _worker_error(exc: BaseException) -> BaseException:
    """The error a worker raised, unwrapped from Ray's and Ray Train's wrappers when it is one the caller handles
    (ltsweep's input errors, `NonFiniteLossError`); else the Train error itself."""
    from lt_models.engine.loop import NonFiniteLossError

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (LtsweepInputError, NonFiniteLossError)):
            return e
        todo.extend([getattr(e, "cause", None), e.__cause__, *getattr(e, "worker_failures", {}).values()])
    return getattr(exc, "cause", None) or exc


def train_into(
    cfg: ExperimentConfig,
    spec: TrainSpec,
    checkpoint_dir: Path,
    *,
    scratch_under: str,
    init_checkpoint: str | Path | None = None,
) -> dict:
    """Train `spec` on the workers outside Tune (stage 1, `ltsweep train`) and copy the run's last checkpoint into
    `checkpoint_dir`; return rank 0's last metrics. The run's uploads go to a fresh scratch dir under
    `scratch_under` (on storage every node reaches), removed at the end."""
    import uuid

    scratch = str(storage.join(scratch_under, f".ray_train-{uuid.uuid4().hex}"))
    try:
        metrics, ckpt = train_on_workers(
            cfg, spec, storage_path=scratch, init_checkpoint=init_checkpoint, keep_last=True
        )
        if ckpt is None:
            raise RuntimeError(f"the Ray Train run of {cfg.name} reported no checkpoint")
        ckpt.to_directory(str(checkpoint_dir))
    finally:
        remove_storage(scratch)
    return metrics
