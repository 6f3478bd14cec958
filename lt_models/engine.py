"""Training engine: plain functions in the manner of torchvision's ``references/detection``.

``train(spec, out_dir)`` is the whole training of one run (stage 1, stage 2 or one stage): it builds the dataset,
sampler, detector and loss, runs ``train_one_epoch`` per epoch, evaluates with ``evaluate_lvis`` every
``eval_every`` epochs, writes an atomic checkpoint directory and then calls ``on_eval(metrics, checkpoint_dir)``
(the Tune trainable reports from there).

Hybrid training schedule (concurrent-softmax paper §4.2 / §5.5; ACSL paper §4.2):
  stage 1  non-balance sampler (every image once per epoch, in a seeded random order) + softmax CE, all layers;
  stage 2  restore the stage-1 weights (model only: a fresh optimizer, LR schedule and warm-up), then train with
           the soft-balance sampler (λ) and the chosen loss (concurrent softmax, ACSL, ...), optionally decoupled
           (only the classifier trains, as in the official ACSL code).
``stage1_spec(spec)`` derives the canonical stage-1 spec from a trial spec, so every trial of a sweep shares one
stage-1 checkpoint.

Optimisation: SGD (momentum 0.9, weight decay 1e-4) over the trainable parameters, a per-iteration LR schedule
(linear warm-up from ``warmup_factor`` over ``warmup`` iterations, then x``lr_gamma`` at each epoch in
``lr_steps``), gradient-norm clipping, AMP (float16 autocast + GradScaler) on CUDA. A non-finite loss raises
``NonFiniteLossError`` before ``backward`` (nothing from that step reaches the weights or a checkpoint).

Checkpoints hold model, optimizer, scheduler, GradScaler, epoch, iteration, and the torch / CUDA / numpy / python
RNG states; samplers draw each epoch from (seed, epoch). Resuming from the checkpoint written after epoch e
continues exactly as the uninterrupted run would have (bit-identical on CPU).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from bisect import bisect_right
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from lt_models.atomic import atomic_dir, atomic_path
from lt_models.detector import BACKBONES, DECOUPLED_MODES, build_detector, set_decoupled
from lt_models.errors import AnnotationError, ConfigError

__all__ = [
    "NonFiniteLossError",
    "TrainSpec",
    "STAGES",
    "stage1_spec",
    "pick_device",
    "build_optimizer",
    "build_lr_scheduler",
    "train_one_epoch",
    "predict",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "write_checkpoint_dir",
    "RandomHorizontalFlip",
    "evaluate",
    "train",
]

STAGES = ("stage1", "stage2", "one_stage")
CHECKPOINT_FILE = "checkpoint.pt"
_FORMAT = "ltsweep-checkpoint-v1"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf. Raised before backward/step, so no weights were touched by that step."""

    def __init__(self, iteration: int, epoch: int, losses: dict[str, float], lr: float):
        self.iteration, self.epoch, self.losses, self.lr = iteration, epoch, losses, lr
        parts = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        super().__init__(f"non-finite training loss at iteration {iteration} (epoch {epoch}, lr {lr:.4g}): {parts}. "
                         "No optimizer step or checkpoint was made from it; lower lr, lengthen warmup or set "
                         "grad_clip")


# ----------------------------------------------------------------------------------------------------------------
# The run specification
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainSpec:
    """Everything one training run needs, as plain python (JSON/YAML-able; ``dataclasses.asdict`` round-trips).

    Units: ``epochs``, ``lr_steps`` and ``eval_every`` are epochs; ``warmup`` is iterations. ``lr`` is the
    base learning rate for the whole batch (the papers use 0.00125 x batch size, 0.02 at batch 16).
    ``decoupled``: false | "cls" | "box_head" (stage 2 only). ``device``: "auto" | "cpu" | "cuda[:i]".
    ``num_threads``: CPU threads for torch (None keeps torch's default). ``progress``: None = only on a tty.
    ``hflip``: random horizontal flips of training images (the papers' only augmentation).
    """

    train_ann: str
    val_ann: str
    train_image_dir: str | None = None
    val_image_dir: str | None = None
    hierarchy_file: str | None = None
    expand_parents: bool = False
    hierarchy_rate: float = 1.0
    stage: str = "one_stage"
    backbone: str = "tiny"
    image_size: int | None = None
    weights: str | None = None
    loss: str = "softmax"
    loss_kwargs: dict = dataclasses.field(default_factory=dict)
    box_reg_labels: str = "primary"
    sampler: str = "nonbalance"
    lam: float | None = None
    sampler_kwargs: dict = dataclasses.field(default_factory=dict)
    epochs: int = 12
    batch_size: int = 8
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: int = 100
    warmup_factor: float = 0.001
    lr_steps: tuple[int, ...] = (8, 11)
    lr_gamma: float = 0.1
    grad_clip: float | None = 10.0
    decoupled: str | bool = False
    eval_every: int = 1
    seed: int = 0
    num_threads: int | None = None
    device: str = "auto"
    workers: int = 0
    amp: bool = True
    hflip: bool = True
    progress: bool | None = None
    keep_checkpoints: int = 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_steps"] = list(d["lr_steps"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"TrainSpec: unknown field(s) {unknown}; known fields are {sorted(names)}")
        d = dict(d)
        if "lr_steps" in d and d["lr_steps"] is not None:
            d["lr_steps"] = tuple(d["lr_steps"])
        return cls(**d)

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field and the fix for an inconsistent spec."""
        if self.stage not in STAGES:
            raise ConfigError(f"stage = {self.stage!r}: choose one of {', '.join(STAGES)}")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone = {self.backbone!r}: choose one of {', '.join(BACKBONES)}")
        if self.decoupled is True:
            self.decoupled = "cls"
        if self.decoupled not in DECOUPLED_MODES:
            raise ConfigError(f"decoupled = {self.decoupled!r}: choose false, 'cls' or 'box_head'")
        if self.stage == "stage1" and (self.sampler, self.loss, self.decoupled) != ("nonbalance", "softmax", False):
            raise ConfigError(f"stage1 of the hybrid schedule is non-balance sampling + softmax CE on all layers; got "
                              f"sampler = {self.sampler!r}, loss = {self.loss!r}, decoupled = {self.decoupled!r}. "
                              "Use stage1_spec(spec) for stage 1, or stage = 'one_stage'")
        if self.decoupled and self.stage != "stage2":
            raise ConfigError(f"decoupled = {self.decoupled!r} needs stage = 'stage2' (it freezes a trained "
                              f"representation), got stage = {self.stage!r}")
        for name in ("epochs", "batch_size", "eval_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} = {v!r}: must be a positive integer")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr = {self.lr!r}: must be a positive number")
        if self.warmup < 0 or not 0 < self.warmup_factor <= 1:
            raise ConfigError(f"warmup = {self.warmup!r} / warmup_factor = {self.warmup_factor!r}: need "
                              "warmup >= 0 iterations and 0 < warmup_factor <= 1")
        if any(not isinstance(s, int) or s < 1 for s in self.lr_steps) or list(self.lr_steps) != sorted(self.lr_steps):
            raise ConfigError(f"lr_steps = {list(self.lr_steps)!r}: need increasing epoch numbers >= 1")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip = {self.grad_clip!r}: a positive max gradient norm, or null to disable")
        if self.workers < 0:
            raise ConfigError(f"workers = {self.workers!r}: must be >= 0")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads = {self.num_threads!r}: must be >= 1 (or null for torch's default)")


def stage1_spec(spec: TrainSpec, **overrides) -> TrainSpec:
    """The canonical stage-1 spec of the hybrid schedule for a trial spec: non-balance sampling, softmax CE, all
    layers trained; options that only matter in stage 2 (λ, loss kwargs, decoupling) are reset so that every
    trial of a sweep maps to the same stage-1 spec. ``overrides`` (e.g. epochs, lr_steps) are applied last."""
    s = dataclasses.replace(spec, stage="stage1", sampler="nonbalance", lam=None, sampler_kwargs={},
                            loss="softmax", loss_kwargs={}, decoupled=False)
    return dataclasses.replace(s, **overrides) if overrides else s


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {device!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return dev


# ----------------------------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------------------------
def build_optimizer(model: torch.nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4):
    """SGD over the parameters that require grad (all, or only the classifier in decoupled mode)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (check `decoupled`)")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _lr_factor(it: int, warmup: int, warmup_factor: float, milestones: list[int], gamma: float) -> float:
    f = gamma ** bisect_right(milestones, it)
    if it < warmup:
        alpha = it / warmup
        f *= warmup_factor * (1 - alpha) + alpha
    return f


def build_lr_scheduler(optimizer, warmup: int, warmup_factor: float, milestones: list[int], gamma: float = 0.1):
    """Per-iteration schedule: linear warm-up over ``warmup`` iterations, then x``gamma`` at each milestone
    (iterations). Stepped after every optimizer step, so its state (``last_epoch`` = iterations) resumes exactly."""
    ms = sorted(int(m) for m in milestones)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: _lr_factor(it, warmup, warmup_factor, ms, gamma))


def _to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def _progress_enabled(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else bool(progress)


def train_one_epoch(model, optimizer, data_loader, device, epoch: int, *, scheduler=None, scaler=None,
                    grad_clip: float | None = None, iteration: int = 0, progress: bool | None = None,
                    max_iters: int | None = None) -> dict:
    """One pass over ``data_loader`` (batches of ``(images, targets)``).

    The optimised loss is the sum of the detector's losses that carry a gradient (in decoupled mode the frozen
    RPN / box-regression losses are still computed and reported but not optimised). ``iteration`` is the global
    iteration count at the start (for messages). Returns mean losses and timing:
    ``{"loss", <each loss>, "iterations", "images", "time", "data_time", "loader_wait_fraction", "img_per_s"}``.
    """
    model.train()
    use_amp = scaler is not None and device.type == "cuda"
    sums: dict[str, float] = {}
    n_iter = n_img = 0
    data_time = 0.0
    t_start = t_last = time.perf_counter()
    bar = tqdm(data_loader, desc=f"epoch {epoch}", disable=not _progress_enabled(progress), leave=False,
               dynamic_ncols=True, mininterval=1.0)
    for images, targets in bar:
        data_time += time.perf_counter() - t_last
        images, targets = _to_device(images, targets, device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            loss_dict = model(images, targets)
        loss = sum(v.float() for v in loss_dict.values() if v.requires_grad)
        if not torch.is_tensor(loss):
            raise ConfigError("no loss carries a gradient: nothing to train (check `decoupled`)")
        values = {k: float(v.detach()) for k, v in loss_dict.items()}
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(iteration + n_iter, epoch, {"loss": loss_value, **values},
                                     optimizer.param_groups[0]["lr"])
        optimizer.zero_grad(set_to_none=True)
        if use_amp:
            scaler.scale(loss).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], grad_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        sums["loss"] = sums.get("loss", 0.0) + loss_value
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        n_iter += 1
        n_img += len(images)
        if n_iter % 10 == 0:
            bar.set_postfix(loss=f"{sums['loss'] / n_iter:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2g}")
        t_last = time.perf_counter()
        if max_iters is not None and n_iter >= max_iters:
            break
    bar.close()
    elapsed = time.perf_counter() - t_start
    out = {k: v / max(n_iter, 1) for k, v in sums.items()}
    out.update(iterations=n_iter, images=n_img, time=elapsed, data_time=data_time,
               loader_wait_fraction=data_time / elapsed if elapsed > 0 else 0.0,
               img_per_s=n_img / elapsed if elapsed > 0 else 0.0)
    return out


@torch.inference_mode()
def predict(model, data_loader, device, label_to_cat_id, *, progress: bool | None = None) -> list[dict]:
    """Run the detector over ``data_loader`` and return COCO-format results
    ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in the loader's image coordinates
    (the detector's transform maps boxes back to each input image's size). ``label_to_cat_id[l]`` maps the
    contiguous label ``l`` (1..C) to the dataset's category id."""
    model.eval()
    results: list[dict] = []
    for images, targets in tqdm(data_loader, desc="predict", disable=not _progress_enabled(progress), leave=False):
        images = [img.to(device, non_blocking=True) for img in images]
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            outputs = model(images)
        for out, t in zip(outputs, targets):
            image_id = int(t["image_id"])
            boxes = out["boxes"].float().cpu()
            if boxes.numel() == 0:
                continue
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            for box, label, score in zip(xywh, out["labels"].tolist(), out["scores"].float().cpu().tolist()):
                results.append({"image_id": image_id, "category_id": int(label_to_cat_id[label]),
                                "bbox": [round(c, 2) for c in box], "score": round(score, 5)})
    return results


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """torch / CUDA / numpy / python RNG states, as tensors and plain python (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("roi_heads.cls_loss.")}


def save_checkpoint(path: str | Path, model, optimizer=None, scheduler=None, scaler=None, *, epoch: int,
                    iteration: int, extra: dict | None = None) -> Path:
    """Write a training checkpoint atomically (temp file in the same directory, then ``os.replace``).

    ``epoch`` = epochs completed, ``iteration`` = optimizer steps done. The loss module's buffers (e.g. the
    concurrent-rate matrix, rebuilt from the data) are not stored. ``extra`` must be plain python/tensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "format": _FORMAT,
        "model": _model_state(model),
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
        raise ConfigError(f"checkpoint {str(path)!r} does not exist: give a checkpoint directory (holding "
                          f"{CHECKPOINT_FILE}) or file written by ltsweep")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise ConfigError(f"checkpoint {str(path)!r} is not an ltsweep checkpoint (format {_FORMAT}); "
                          "pass one written by lt_models.engine.save_checkpoint")
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
        raise ConfigError(f"checkpoint {str(path)!r} does not fit this detector (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}, shape mismatch {bad[:3]}); stage 1 and stage 2 must use the "
                          "same backbone, image size and class list")
    model.load_state_dict(state, strict=False)
    return ckpt["extra"]


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None, scaler=None, *,
                    restore_rng: bool = True) -> dict:
    """Restore a checkpoint written by ``save_checkpoint`` (``torch.load(weights_only=True)``) into the given
    objects and (by default) the global RNGs. Returns ``{"epoch", "iteration", "extra"}``."""
    ckpt = _read_checkpoint(path)
    load_model_weights(path, model)
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
    if torch.is_tensor(obj):  # e.g. a concurrent-rate matrix passed in loss_kwargs: record its shape only
        return f"<tensor {list(obj.shape)}>"
    return str(obj)


def write_checkpoint_dir(out_dir: str | Path, name: str, model, optimizer=None, scheduler=None, scaler=None, *,
                         epoch: int, iteration: int, metrics: dict | None = None, spec: dict | None = None,
                         extra: dict | None = None) -> Path:
    """Write ``out_dir/name/`` = {checkpoint.pt, metrics.json, spec.json} atomically: everything goes into a temp
    directory beside it that is renamed into place, so a reader never sees a half-written checkpoint."""
    final = Path(out_dir) / name
    with atomic_dir(final) as tmp:  # a re-run of the same epoch replaces the old directory
        save_checkpoint(tmp / CHECKPOINT_FILE, model, optimizer, scheduler, scaler, epoch=epoch,
                        iteration=iteration, extra=extra)
        for fname, obj in (("metrics.json", metrics), ("spec.json", spec)):
            if obj is not None:
                (tmp / fname).write_text(json.dumps(obj, indent=1, sort_keys=True, default=_json_default))
    return final


# ----------------------------------------------------------------------------------------------------------------
# One training run
# ----------------------------------------------------------------------------------------------------------------
def _loss_kwargs(spec: TrainSpec, train_ds) -> dict:
    kwargs = dict(spec.loss_kwargs)
    if spec.loss == "concurrent_softmax" and "concurrent_rate" not in kwargs:
        from lt_models.concurrency import concurrent_rate_matrix
        hierarchy = None
        if spec.hierarchy_file is not None:
            hierarchy = getattr(train_ds, "hierarchy", None) or spec.hierarchy_file
        kwargs["concurrent_rate"] = concurrent_rate_matrix(spec.train_ann, hierarchy=hierarchy,
                                                           hierarchy_rate=spec.hierarchy_rate)
    if spec.loss == "acsl" and "frequency" not in kwargs:
        kwargs["frequency"] = list(train_ds.frequency)
    if spec.loss == "eql" and "class_freq" not in kwargs:
        kwargs["class_freq"] = (train_ds.image_counts() / max(len(train_ds), 1)).tolist()
    return kwargs


class RandomHorizontalFlip:
    """Flip an (image, target) pair left-right with probability ``p`` (draws from torch's global RNG, so a
    restored RNG state replays the same flips)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict):
        if torch.rand(1).item() < self.p:
            image = image.flip(-1)
            w = image.shape[-1]
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            target = dict(target, boxes=boxes)
        return image, target


def _loader(dataset, batch_size, sampler, workers, device):
    from lt_models.datasets import collate_detection
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       collate_fn=collate_detection, pin_memory=device.type == "cuda",
                                       persistent_workers=False)


def evaluate(model, val_loader, val_ds, val_ann, device, progress=None) -> dict:
    """Predict on the validation loader and score with ``lt_models.evaluation.evaluate_lvis``."""
    from lt_models.evaluation import evaluate_lvis
    dets = predict(model, val_loader, device, val_ds.label_to_cat_id, progress=progress)
    return evaluate_lvis(val_ann, dets)


def train(spec: TrainSpec, out_dir: str | Path, *, init_checkpoint: str | Path | None = None,
          resume_checkpoint: str | Path | None = None,
          on_eval: Callable[[dict, Path], None] | None = None) -> dict:
    """Train one run per ``spec``; write checkpoints under ``out_dir``; return the last evaluation's metrics.

    init_checkpoint: model weights to start from (hybrid stage 2 starts from the stage-1 checkpoint; only the
        model is restored — optimizer, schedule and warm-up start fresh).
    resume_checkpoint: a checkpoint written by a previous call with the same spec: restores everything
        (model, optimizer, scheduler, RNGs, epoch/iteration) and continues exactly.
    on_eval(metrics, checkpoint_dir): called after each evaluation once ``checkpoint_dir`` is complete on disk.
        metrics: AP, AP50, APr, APc, APf (floats, -1 where a bucket has no class), loss (mean optimised training
        loss of the last epoch), epoch (epochs completed), iteration (optimizer steps so far), per_class
        ({category_id: AP}), plus the rest of ``evaluate_lvis``'s keys.

    Checkpoint directories are ``out_dir/checkpoint_epoch{e:04d}`` (checkpoint.pt, metrics.json, spec.json); only
    the newest ``spec.keep_checkpoints`` are kept (older ones are removed after ``on_eval`` returns).
    """
    spec.validate()
    if spec.stage == "stage2" and init_checkpoint is None and resume_checkpoint is None:
        raise ConfigError("stage2 starts from the stage-1 checkpoint: pass init_checkpoint (or resume_checkpoint)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(spec.device)
    threads_before = torch.get_num_threads()
    if spec.num_threads is not None:
        torch.set_num_threads(spec.num_threads)
    try:
        return _train(spec, out_dir, device, init_checkpoint, resume_checkpoint, on_eval)
    finally:
        torch.set_num_threads(threads_before)


def _train(spec, out_dir, device, init_checkpoint, resume_checkpoint, on_eval) -> dict:
    from lt_models.datasets import LVISDetection
    from lt_models.samplers import build_sampler

    random.seed(spec.seed)
    np.random.seed(spec.seed)
    torch.manual_seed(spec.seed)

    train_ds = LVISDetection(spec.train_ann, spec.train_image_dir, hierarchy_file=spec.hierarchy_file,
                             expand_parents=spec.expand_parents, train=True,
                             transforms=RandomHorizontalFlip() if spec.hflip else None)
    val_ds = LVISDetection(spec.val_ann, spec.val_image_dir, hierarchy_file=spec.hierarchy_file,
                           expand_parents=spec.expand_parents, train=False)
    if list(val_ds.cat_ids) != list(train_ds.cat_ids):
        raise AnnotationError(f"{spec.val_ann}: its categories differ from {spec.train_ann}'s "
                              f"({len(val_ds.cat_ids)} vs {len(train_ds.cat_ids)} ids); both files must list the same "
                              "categories")
    num_classes = train_ds.num_classes

    model = build_detector(num_classes, spec.backbone, spec.loss, _loss_kwargs(spec, train_ds),
                           image_size=spec.image_size, weights=spec.weights, box_reg_labels=spec.box_reg_labels)
    if init_checkpoint is not None and resume_checkpoint is None:
        load_model_weights(init_checkpoint, model)
    set_decoupled(model, spec.decoupled)
    model.to(device)

    indptr, labels = train_ds.label_csr()
    skw = dict(spec.sampler_kwargs)
    if spec.lam is not None:
        skw.setdefault("lam", spec.lam)
    sampler = build_sampler(spec.sampler, indptr, labels, num_classes, seed=spec.seed, **skw)
    train_loader = _loader(train_ds, spec.batch_size, sampler, spec.workers, device)
    val_loader = _loader(val_ds, spec.batch_size, torch.utils.data.SequentialSampler(val_ds), spec.workers, device)
    iters_per_epoch = len(train_loader)
    if iters_per_epoch == 0:
        raise ConfigError(f"{spec.train_ann}: no training images to sample")

    optimizer = build_optimizer(model, spec.lr, spec.momentum, spec.weight_decay)
    scheduler = build_lr_scheduler(optimizer, spec.warmup, spec.warmup_factor,
                                   [s * iters_per_epoch for s in spec.lr_steps], spec.lr_gamma)
    scaler = torch.amp.GradScaler("cuda") if (spec.amp and device.type == "cuda") else None

    start_epoch, iteration = 0, 0
    if resume_checkpoint is not None:
        state = load_checkpoint(resume_checkpoint, model, optimizer, scheduler, scaler)
        start_epoch, iteration = state["epoch"], state["iteration"]
        if start_epoch >= spec.epochs:  # nothing left to train: hand back the checkpoint's own evaluation
            ckpt_dir = Path(resume_checkpoint)
            ckpt_dir = ckpt_dir if ckpt_dir.is_dir() else ckpt_dir.parent
            saved = ckpt_dir / "metrics.json"
            metrics = json.loads(saved.read_text()) if saved.is_file() else {"epoch": start_epoch,
                                                                              "iteration": iteration}
            return dict(metrics, checkpoint_dir=str(ckpt_dir))

    spec_dict = spec.to_dict()
    extra = {"num_classes": num_classes, "cat_ids": [int(c) for c in train_ds.cat_ids], "backbone": spec.backbone,
             "stage": spec.stage}
    metrics: dict = {}
    last_loss = float("nan")
    for epoch in range(start_epoch, spec.epochs):
        sampler.set_epoch(epoch)
        stats = train_one_epoch(model, optimizer, train_loader, device, epoch, scheduler=scheduler, scaler=scaler,
                                grad_clip=spec.grad_clip, iteration=iteration, progress=spec.progress)
        iteration += stats["iterations"]
        last_loss = stats["loss"]
        done = epoch + 1
        if done % spec.eval_every != 0 and done != spec.epochs:
            continue
        res = evaluate(model, val_loader, val_ds, spec.val_ann, device, progress=spec.progress)
        metrics = {k: v for k, v in res.items()}
        metrics.update(loss=last_loss, epoch=done, iteration=iteration,
                       train_img_per_s=stats["img_per_s"], loader_wait_fraction=stats["loader_wait_fraction"])
        ckpt_dir = write_checkpoint_dir(out_dir, f"checkpoint_epoch{done:04d}", model, optimizer, scheduler, scaler,
                                        epoch=done, iteration=iteration, metrics=metrics, spec=spec_dict,
                                        extra=extra)
        if on_eval is not None:
            on_eval(metrics, ckpt_dir)
        old = sorted(p for p in out_dir.glob("checkpoint_epoch*") if p.is_dir())[:-spec.keep_checkpoints]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        metrics = dict(metrics, checkpoint_dir=str(ckpt_dir))
    return metrics
