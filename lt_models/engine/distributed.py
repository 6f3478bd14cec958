"""Data-parallel training helpers for the engine: plain ``torch.distributed`` (no Ray here).

A multi-worker run is ``world_size`` processes that each call ``engine.train(spec, ..., rank=r,
world_size=n)`` inside an initialised default process group (Ray Train's ``TorchTrainer`` sets it up: gloo on
CPUs, NCCL on GPUs). Then:

- the model is wrapped in ``DistributedDataParallel`` (``wrap``): gradients are averaged over the ranks in
  ``backward``, so every rank takes the same optimizer step and the parameters stay identical;
- each rank trains on its own shard of the sampler's epoch (``lt_models.data.samplers.shard``); batch_size is per rank;
- the training loss of each step is averaged over the ranks before the finiteness check (``mean_over_ranks``), so a
  NaN on one rank stops every rank at the same step instead of leaving the others waiting in an all-reduce;
- evaluation is distributed: the validation batches (the same batches, in the same order, as a single-process
  evaluation) are dealt round-robin to the ranks (``eval_batches``), the detections are gathered on rank 0 in
  single-process order (``gather_in_order``) and scored there; the metrics are broadcast (``on_rank0``). Buffers
  (BatchNorm statistics, loss statistics) are first copied from rank 0 (``sync_buffers``), so every rank predicts
  with rank 0's model, the one the checkpoint holds, and the AP equals a single-process evaluation of that
  checkpoint;
- only rank 0 writes checkpoints (``on_rank0``: an error there is raised on every rank instead of a hang).

DDP also copies rank 0's buffers to the others at every forward (its default), so the running statistics that some
losses keep (Seesaw's class counts, EQLv2's gradient statistics) follow rank 0's samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from lt_models.errors import ConfigError

__all__ = [
    "check_process_group",
    "wrap",
    "unwrap",
    "mean_over_ranks",
    "sum_over_ranks",
    "sync_buffers",
    "eval_batches",
    "gather",
    "gather_in_order",
    "on_rank0",
    "rank_seed",
]


def check_process_group(rank: int, world_size: int) -> None:
    """Raise ``ConfigError`` unless ``rank`` / ``world_size`` describe this process's default process group (or a
    single process)."""
    if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(
            f"rank = {rank!r}, world_size = {world_size!r}: need an int world_size >= 1 and 0 <= rank < world_size"
        )
    if world_size == 1:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            f"world_size = {world_size} but torch.distributed is not initialised; launch multi-worker "
            "training through Ray Train (resources.workers_per_trial) or init_process_group first"
        )
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ConfigError(
            f"rank {rank} of {world_size} does not match the process group (rank "
            f"{dist.get_rank()} of {dist.get_world_size()})"
        )


def _device() -> torch.device:
    """Where collective tensors live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wrap(model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` when ``world_size`` > 1 (it broadcasts rank 0's weights once), else
    ``model`` itself."""
    if world_size == 1:
        return model
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The detector inside a DDP wrapper (what checkpoints and evaluation use)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def mean_over_ranks(value: float, world_size: int) -> float:
    """The mean of ``value`` over the ranks (one all-reduce). A NaN/inf on any rank makes it non-finite on all."""
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return float(t.item()) / world_size


def sum_over_ranks(value: float, world_size: int) -> float:
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return float(t.item())


@torch.no_grad()
def sync_buffers(model: torch.nn.Module, world_size: int) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics, loss statistics) to every rank."""
    if world_size == 1:
        return
    dev = _device()
    for buf in unwrap(model).buffers():
        if buf.device == dev:
            dist.broadcast(buf, src=0)
        else:  # a buffer kept on the CPU under NCCL: through the collective device and back
            moved = buf.to(dev)
            dist.broadcast(moved, src=0)
            buf.copy_(moved)


def eval_batches(n: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's validation batches: the single-process evaluation's batches (``range(n)`` in order, chunks of
    ``batch_size``) dealt round-robin, so every batch (and thus every prediction) is the one a single process
    would make."""
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    return batches[rank::world_size]


def gather(obj: Any, world_size: int) -> list | None:
    """Every rank's ``obj`` on rank 0 (a list by rank), None on the other ranks."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def gather_in_order(items: list, key: Callable[[Any], int], world_size: int) -> list | None:
    """All ranks' ``items`` on rank 0, stably sorted by ``key`` (e.g. an image's position in the validation set):
    the order a single process would have produced them in. None on the other ranks."""
    parts = gather(items, world_size)
    if parts is None:
        return None
    return sorted((x for part in parts for x in part), key=key)


def on_rank0(fn: Callable[[], Any], world_size: int) -> Any:
    """Run ``fn`` on rank 0 only and hand its result to every rank; if it raises there, raise the same error on
    every rank (instead of leaving the others waiting at their next collective)."""
    if world_size == 1:
        return fn()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def rank_seed(seed: int, rank: int) -> int:
    """The RNG seed of one rank after the (identical) model initialisation: each rank flips and samples RoIs on its
    own stream. Rank 0 keeps ``seed``."""
    return int(seed) + 1_000_003 * int(rank)
