"""Training checkpoints: model, optimizer, LR scheduler, GradScaler, epoch, iteration and every RNG state.

A checkpoint is one ``torch.save`` file (``checkpoint.pt``) loadable with ``torch.load(weights_only=True)``; the
engine writes it inside a checkpoint directory (``write_checkpoint_dir``: checkpoint.pt, metrics.json, spec.json)
that appears atomically. Resuming from the checkpoint written after epoch e continues exactly as the
uninterrupted run would have (bit-identical on CPU): the samplers draw each epoch from (seed, epoch), and the
torch / CUDA / numpy / python RNG states come back with the weights.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lt_models.atomic import atomic_dir, atomic_path, remove_dir
from lt_models.errors import ConfigError

CHECKPOINT_FILE = "checkpoint.pt"
RUN_FILE = "run.json"  # {"run_id", "epoch"} of a checkpoint directory: what rotation ranks by
_FORMAT = "ltsweep-checkpoint-v1"


def capture_rng_state() -> dict:
    """torch / CUDA / numpy / python RNG states, as tensors and plain python (loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=True)  # the default; numpy's stubs type only an explicit True as the tuple
    assert isinstance(np_state, tuple)  # the global RandomState is MT19937: the legacy 5-tuple
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("roi_heads.cls_loss.")}


def _loss_module(model):
    return getattr(getattr(model, "roi_heads", None), "cls_loss", None)


def _loss_state(model) -> dict:
    """What the classification loss accumulates in training (Seesaw's class counts, EQLv2's gradient statistics):
    its persistent buffers. Inputs rebuilt from the data (r_ij, buckets) are non-persistent and not stored."""
    loss = _loss_module(model)
    return dict(loss.state_dict()) if loss is not None else {}


def save_checkpoint(
    path: str | Path,
    model,
    optimizer=None,
    scheduler=None,
    scaler=None,
    *,
    epoch: int,
    iteration: int,
    extra: dict | None = None,
) -> Path:
    """Write a training checkpoint atomically (temp file in the same directory, then ``os.replace``).

    ``epoch`` = epochs completed, ``iteration`` = optimizer steps done. Of the loss module only the state it
    accumulates in training is stored (``loss_state``; inputs rebuilt from the data such as the concurrent-rate
    matrix are not). ``extra`` must be plain python/tensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "format": _FORMAT,
        "model": _model_state(model),
        "loss_state": _loss_state(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "iteration": int(iteration),
        "rng": capture_rng_state(),
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
    return path


def _read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(
            f"checkpoint {str(path)!r} does not exist: give a checkpoint directory (holding "
            f"{CHECKPOINT_FILE}) or file written by ltsweep"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"checkpoint {str(path)!r} cannot be read ({first}): it is truncated or corrupt; for the "
            "shared stage-1 checkpoint rerun the sweep with --force-pretrain"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise ConfigError(
            f"checkpoint {str(path)!r} is not an ltsweep checkpoint (format {_FORMAT}); "
            "pass one written by lt_models.engine.loop.save_checkpoint"
        )
    return ckpt


def load_model_weights(path: str | Path, model) -> dict:
    """Load only the model weights of a checkpoint (hybrid stage 2 starting from stage 1). Returns the
    checkpoint's ``extra``. Shapes must match (same backbone and classes); the loss buffers are not loaded."""
    ckpt = _read_checkpoint(path)
    own = _model_state(model)
    state = ckpt["model"]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or bad:
        raise ConfigError(
            f"checkpoint {str(path)!r} does not fit this detector (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, shape mismatch {bad[:3]}); stage 1 and stage 2 must use the "
            "same backbone, image size and class list"
        )
    model.load_state_dict(state, strict=False)
    return ckpt["extra"]


def load_checkpoint(
    path: str | Path, model, optimizer=None, scheduler=None, scaler=None, *, restore_rng: bool = True
) -> dict:
    """Restore a checkpoint written by ``save_checkpoint`` (``torch.load(weights_only=True)``) into the given
    objects, the loss's accumulated state and (by default) the global RNGs. Returns ``{"epoch", "iteration",
    "extra"}``."""
    ckpt = _read_checkpoint(path)
    load_model_weights(path, model)
    loss = _loss_module(model)
    if loss is not None and ckpt.get("loss_state"):
        try:
            loss.load_state_dict(ckpt["loss_state"])
        except RuntimeError as exc:
            raise ConfigError(
                f"checkpoint {str(path)!r}: its loss state does not fit this run's loss "
                f"({type(loss).__name__}): {str(exc).splitlines()[0]}; resume with the spec that "
                "wrote it"
            ) from None
    if optimizer is not None and ckpt["optimizer"] is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt["scheduler"] is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if restore_rng:
        restore_rng_state(ckpt["rng"])
    return {"epoch": ckpt["epoch"], "iteration": ckpt["iteration"], "extra": ckpt["extra"]}


def _json_default(obj):
    if torch.is_tensor(obj):  # a tensor in metrics or spec: record its shape only
        return f"<tensor {list(obj.shape)}>"
    return str(obj)


def write_checkpoint_dir(
    out_dir: str | Path,
    name: str,
    model,
    optimizer=None,
    scheduler=None,
    scaler=None,
    *,
    epoch: int,
    iteration: int,
    metrics: dict | None = None,
    spec: dict | None = None,
    extra: dict | None = None,
    files: dict[str, Callable[[Path], Any]] | None = None,
) -> Path:
    """Write ``out_dir/name/`` = {checkpoint.pt, metrics.json, spec.json} atomically: everything goes into a temp
    directory beside it that is renamed into place, so a reader never sees a half-written checkpoint. ``files``:
    more files of the directory, {name: a function that writes it to the path it is given}."""
    final = Path(out_dir) / name
    with atomic_dir(final) as tmp:  # a re-run of the same epoch replaces the old directory
        save_checkpoint(
            tmp / CHECKPOINT_FILE, model, optimizer, scheduler, scaler, epoch=epoch, iteration=iteration, extra=extra
        )
        run = {"run_id": (extra or {}).get("run_id"), "epoch": int(epoch)}  # which run wrote it, and when
        for fname, obj in (("metrics.json", metrics), ("spec.json", spec), (RUN_FILE, run)):
            if obj is not None:
                (tmp / fname).write_text(json.dumps(obj, indent=1, sort_keys=True, default=_json_default))
        for fname, write in (files or {}).items():
            write(tmp / fname)
    return final


def rotate_checkpoints(out_dir: str | Path, run_id: str, keep: int, prefix: str = "checkpoint_epoch") -> list[Path]:
    """Keep the newest ``keep`` checkpoint directories of *this* run (``run.json``'s run_id, ranked by its epoch);
    remove the older ones with ``remove_dir`` (renamed away first, so a kill never leaves a damaged directory under
    a checkpoint's name). Directories of other runs in the same folder (an earlier ``ltsweep train`` into the same
    ``--out``) are never touched. Returns the removed paths."""
    mine = []
    for d in Path(out_dir).glob(f"{prefix}*"):
        try:
            run = json.loads((d / RUN_FILE).read_text())
        except (OSError, ValueError):
            continue
        if run.get("run_id") == run_id:
            mine.append((int(run.get("epoch", 0)), d))
    old = [d for _, d in sorted(mine)[:-keep]] if keep > 0 else [d for _, d in mine]
    for d in old:
        remove_dir(d)
    return old
