"""The kernels every loss shares: input checks, the compute dtype, the (row, class) pairs of a multi-hot target, and
row blocks mapped over a pool of single-threaded workers (eq 5 of concurrent softmax and Seesaw use it)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor


def check_inputs(logits: Tensor, targets: Tensor) -> None:
    """Raise ValueError unless ``logits`` is floating [N, K] (K >= 2) and ``targets`` has the same shape."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [N, K] with K >= 2 (column 0 = background), got {tuple(logits.shape)}")
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets must be multi-hot [N, K] like logits {tuple(logits.shape)}, got {tuple(targets.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def compute_dtype(logits: Tensor) -> torch.dtype:
    """The dtype a loss computes in: half / bfloat16 logits (AMP) are computed in float32 (the gradient is cast
    back to the logits' dtype)."""
    return logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32


def take(t: Tensor, flat: Tensor) -> Tensor:
    """t.view(-1)[flat]; index_select is much cheaper than advanced indexing on CPU."""
    return t.reshape(-1).index_select(0, flat)


def label_pairs(y: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) of every non-zero entry of a 0/1 target matrix.

    One matrix-vector pass instead of ``nonzero`` over N×K. With L a row's label set, code = Σ_{l∈L} (l + 1).
    If m = code − 1 is itself a label, Σ_{l∈L, l≠m} (l + 1) = 0, so L = {m}: "y[code − 1] = 1" holds exactly for the
    single-label rows. The other rows with labels (multi-label) go through ``nonzero`` on just those rows.
    """
    n, k = y.shape
    if y.dtype != torch.float64 and k * (k + 1) // 2 >= 1 << 24:  # codes would not be exact in float32
        rows, cols = torch.nonzero(y, as_tuple=True)  # y is 2-D: exactly (rows, columns)
        return rows, cols
    code = torch.mv(y, torch.arange(1, k + 1, dtype=y.dtype, device=y.device))
    cand = code.round().clamp(1, k).to(torch.int64) - 1
    rows_all = torch.arange(n, device=y.device)
    single = (take(y, rows_all * k + cand) == 1) & (code == cand + 1)
    rows = torch.nonzero(single).squeeze(1)
    cols = cand.index_select(0, rows)
    multi = torch.nonzero(~single & (code != 0)).squeeze(1)
    if multi.numel():
        sub_rows, sub_cols = torch.nonzero(y.index_select(0, multi), as_tuple=True)
        rows = torch.cat([rows, multi.index_select(0, sub_rows)])
        cols = torch.cat([cols, sub_cols])
    return rows, cols


_POOLS: dict[int, ThreadPoolExecutor] = {}


_POOLS_LOCK = threading.Lock()


def _forget_pools_after_fork() -> None:
    """A forked child (e.g. a DataLoader worker) has none of the parent's threads: start fresh pools there."""
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


def _row_pool(n_threads: int) -> ThreadPoolExecutor:
    """``n_threads`` worker threads whose torch ops run single-threaded.

    Intra-op parallelism splits every op statically over the OpenMP threads, so a long sequence of small ops stalls
    whenever another process holds one of the cores. Workers that take row blocks from a queue balance dynamically
    instead. OpenMP's and MKL's thread counts are per thread, so ``torch.set_num_threads(1)`` in a worker leaves the
    caller's setting alone; the process-wide default it also overwrites is restored before returning.
    """
    with _POOLS_LOCK:
        pool = _POOLS.get(n_threads)
        if pool is None:
            barrier = threading.Barrier(n_threads + 1)

            def single_threaded() -> None:
                torch.get_num_threads()  # torch's lazy per-thread init first, so it cannot undo the next line
                torch.set_num_threads(1)
                barrier.wait()

            pool = ThreadPoolExecutor(n_threads, thread_name_prefix="ltsweep-rows", initializer=single_threaded)
            for _ in range(n_threads):
                pool.submit(int)
            barrier.wait()
            torch.set_num_threads(n_threads)
            _POOLS[n_threads] = pool
    return pool


def map_row_blocks(fn: Callable[[int, int], Tensor | None], n_rows: int, block: int) -> list[tuple[int, Tensor]]:
    """Call ``fn(start, stop)`` on consecutive row blocks (in parallel on CPU); collect non-None results."""
    starts = list(range(0, n_rows, block))
    n_threads = torch.get_num_threads()
    if n_threads <= 1 or len(starts) < 4:
        results = [(s, fn(s, min(s + block, n_rows))) for s in starts]
    else:
        per_task = max(1, len(starts) // (8 * n_threads))

        def task(group: list[int]) -> list[tuple[int, Tensor | None]]:
            return [(s, fn(s, min(s + block, n_rows))) for s in group]

        pool = _row_pool(n_threads)
        futures = [pool.submit(task, starts[i : i + per_task]) for i in range(0, len(starts), per_task)]
        results = [item for f in futures for item in f.result()]
    return [(s, r) for s, r in results if r is not None]
