"""`resources:` of an experiment: what one trial (and the stage-1 task) asks Ray for.

One-process trials (``workers_per_trial: 1``, the default) train inside the Tune trial's own process with
``cpus_per_trial`` CPUs and ``gpus_per_trial`` GPUs. Multi-worker trials (``workers_per_trial: N`` > 1) train as a
Ray Train ``TorchTrainer`` with N data-parallel workers (DDP: NCCL on GPUs, gloo on CPUs), each with
``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs; the Tune trial is then only the Ray Train driver
(``cpus_per_trial`` CPUs, no GPU), as in Ray Train V2's Tune integration, where the Train run reserves its workers
in its own placement group (``pipelines.tune.workers``).

Batch and learning rate: ``batch_size`` is per worker, so the total batch of one optimizer step is
``workers_per_trial x batch_size``; ``lr`` is the learning rate of that total batch (linear scaling rule: the
papers' 0.02 for 16 images, i.e. 0.00125 per image).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ResourcesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    cpus_per_trial: float = Field(
        default=1.0,
        gt=0.0,
        description="CPUs of one trial; with workers_per_trial > 1 the CPUs "
        "of its Ray Train driver (the Tune trial process, which only launches and watches "
        "the workers; 0.5 is enough)",
    )
    gpus_per_trial: float = Field(
        default=0.0,
        ge=0.0,
        description="GPUs of a one-process trial (workers_per_trial: 1); "
        "multi-worker trials give GPUs to their workers (gpus_per_worker)",
    )
    workers_per_trial: int = Field(
        default=1,
        ge=1,
        description="data-parallel Ray Train workers per trial (DDP; NCCL on "
        "GPUs, gloo on CPUs). batch_size is per worker: total batch = workers_per_trial x "
        "batch_size, and lr is the lr of that total batch (papers: 16 images, lr 0.02). "
        "Stage 1 trains with the same workers. 1 = the trial trains in its own process",
    )
    cpus_per_worker: float = Field(
        default=1.0, gt=0.0, description="CPUs (torch threads) of each worker (workers_per_trial > 1)"
    )
    gpus_per_worker: float = Field(
        default=0.0, ge=0.0, description="0 (CPU workers, gloo) or 1 (one GPU per worker, NCCL) (workers_per_trial > 1)"
    )
    custom: dict[str, float] = Field(
        default={}, description="Ray custom resources each trial, each worker and stage 1 also request"
    )

    @field_validator("custom")
    def _custom_resources(cls, v):
        if any(n.strip().lower() in ("", "cpu", "gpu", "memory") or not 0 < a < math.inf for n, a in v.items()):
            raise ValueError(f"needs non-empty names other than cpu/gpu/memory and amounts > 0; got {v}")
        return v

    @field_validator("gpus_per_worker")
    def _whole_gpu(cls, v):
        if v not in (0, 1):
            raise ValueError(
                f"each worker drives exactly one GPU (NCCL cannot share one between ranks, and a worker "
                f"uses one device); got {v}: set 0 (CPU workers) or 1, and scale with workers_per_trial"
            )
        return v

    @model_validator(mode="after")
    def _workers_fit(self):
        n = self.workers_per_trial
        if n > 1 and self.gpus_per_trial > 0:
            raise ValueError(
                f"gpus_per_trial = {self.gpus_per_trial:g} with workers_per_trial = {n}: a "
                "multi-worker trial's GPUs belong to its workers; set gpus_per_worker: 1 and "
                "gpus_per_trial: 0"
            )
        # values, not `model_fields_set`: a dumped and re-read config (the stage-1 task, Tune) sets every field
        unread = [
            k for k in ("cpus_per_worker", "gpus_per_worker") if getattr(self, k) != type(self).model_fields[k].default
        ]
        if n == 1 and unread:
            raise ValueError(
                f"{unread[0]} is ignored: workers_per_trial is 1, so the trial trains in its "
                "own process with cpus_per_trial / gpus_per_trial; remove it or set workers_per_trial "
                ">= 2"
            )
        return self

    @property
    def distributed(self) -> bool:
        """True when a trial trains on several Ray Train workers."""
        return self.workers_per_trial > 1

    def worker_bundle(self) -> dict[str, float]:
        """Ray resources of one Ray Train worker (``ScalingConfig.resources_per_worker``)."""
        return {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker, **self.custom}

    def trial_bundle(self) -> dict[str, float]:
        """What ``tune.with_resources`` (and the stage-1 Ray task) request for one trial: its CPUs, GPUs and custom
        resources. A multi-worker trial asks only for its driver (no GPU): Ray Train V2 reserves the workers
        itself, all at once, in a placement group of ``workers_per_trial`` x ``worker_bundle()``, so reserving them
        here too would hold every worker's resources twice and leave the Train run waiting for them forever."""
        gpus = 0.0 if self.distributed else self.gpus_per_trial
        return {"cpu": self.cpus_per_trial, "gpu": gpus, **self.custom}

    def trials_that_fit(self, nodes: list[dict[str, float]]) -> int:
        """How many multi-worker trials can hold all their resources at once on nodes with these Ray resource
        totals (``ray.nodes()``' ``Resources``: "CPU", "GPU", custom names): each trial's driver bundle
        (``trial_bundle()``) and its ``workers_per_trial`` worker bundles, placed first-fit, node by node (Ray
        Train's default PACK placement may spread a trial's workers over several nodes).

        A sweep runs at most this many at once (``pipelines.tune.sweep``): the drivers ask Tune only for themselves,
        so without a cap Tune starts a driver for every trial the CPUs allow, the drivers hold CPUs that the
        workers need, and no Train run ever gets its placement group."""
        driver = {k.upper() if k in ("cpu", "gpu") else k: v for k, v in self.trial_bundle().items() if v}
        worker = {k: v for k, v in self.worker_bundle().items() if v}
        free = [dict(n) for n in nodes]
        eps = 1e-9

        def place(bundle: dict[str, float]) -> bool:
            for node in free:
                if all(node.get(k, 0.0) + eps >= v for k, v in bundle.items()):
                    for k, v in bundle.items():
                        node[k] = node.get(k, 0.0) - v
                    return True
            return False

        count = 0
        while all(place(b) for b in [driver] + [worker] * self.workers_per_trial):
            count += 1
        return count
