"""Stage 0: a pretrained backbone body from a balanced synthetic classification task, the CPU stand-in for the
ImageNet weights the papers start their detectors from (nothing is ever downloaded).

``pretrain_backbone(spec, out_path)`` renders the balanced crop set of ``spec.preset``
(``lt_models.data.synthetic.crops``: the same number of one-object crops for every leaf class), trains the detector's
``TinyBody`` with a global-average-pool + linear head on it (SGD with momentum, a linear warm-up then a cosine LR,
plain cross-entropy, random horizontal flips), measures the accuracy on the training crops and on crops held out of
every class, and writes only the body's state dict (the keys of ``TinyBody().state_dict()``) atomically to
``out_path``: a file ``model.weights`` / ``TrainSpec.weights`` / ``build_detector(weights=...)`` loads. On CPU the
file is the same for the same spec and thread count. Pure torch/numpy; ``pipelines.storage.stage0_cache`` keeps the
result content-addressed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lt_models.atomic import atomic_path
from lt_models.data.synthetic.crops import CropSet, build_crops
from lt_models.data.synthetic.layout import PRESETS, build_layout
from lt_models.engine.build import progress_enabled
from lt_models.errors import ConfigError
from lt_models.modeling.backbones import TinyBody

STAGE0_BACKBONES = ("tiny",)  # the backbones stage 0 can pretrain
# the input normalisation of the detector (torchvision FasterRCNN's GeneralizedRCNNTransform defaults), so the
# pretrained filters see the pixel statistics they will see in the detector
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
MAX_CROP_BYTES = 2 << 30  # the pre-rendered crop set is held in memory: refuse specs beyond 2 GiB


@dataclasses.dataclass
class Stage0Spec:
    """Everything that determines a stage-0 backbone (``to_dict`` / ``from_dict`` round-trip through JSON).

    ``images_per_class`` crops of ``image_size`` px per leaf class of ``preset``, of which the last
    ``holdout_per_class`` are held out (for the held-out accuracy, never trained on). ``lr`` is the peak LR for a
    batch of ``batch_size``, reached after ``warmup_epochs`` and followed by a cosine decay to 0 at ``epochs``.
    ``num_threads``: CPU threads for torch (None keeps torch's default); it changes the speed, not the recipe.
    """

    preset: str = "demo"
    backbone: str = "tiny"
    image_size: int = 64
    images_per_class: int = 48
    holdout_per_class: int = 8
    epochs: int = 12
    batch_size: int = 128
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    hflip: bool = True
    seed: int = 0
    num_threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stage0Spec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"Stage0Spec: unknown field(s) {unknown}; known fields are {sorted(names)}")
        return cls(**d)

    def identity(self) -> dict[str, Any]:
        """The fields that determine the weights: all but ``num_threads`` (how fast, not what)."""
        d = self.to_dict()
        d.pop("num_threads")
        return d

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field and the fix."""
        if self.preset not in PRESETS:
            raise ConfigError(f"preset = {self.preset!r}: unknown synthetic preset; choose one of {sorted(PRESETS)}")
        if self.backbone not in STAGE0_BACKBONES:
            raise ConfigError(
                f"backbone = {self.backbone!r}: stage 0 pretrains only {', '.join(STAGE0_BACKBONES)} for now; "
                "give a local state dict of other backbones as model.weights instead"
            )
        for name in ("images_per_class", "epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} = {v!r}: must be a positive integer")
        if not isinstance(self.image_size, int) or self.image_size < 32:
            raise ConfigError(f"image_size = {self.image_size!r}: must be an integer >= 32 (the body's stride)")
        if not isinstance(self.holdout_per_class, int) or not 1 <= self.holdout_per_class < self.images_per_class:
            raise ConfigError(
                f"holdout_per_class = {self.holdout_per_class!r}: must be at least 1 and below images_per_class "
                f"= {self.images_per_class} (some crops of every class train, some are held out)"
            )
        for name, lo_open, hi in (("lr", True, math.inf), ("weight_decay", False, 1.0), ("momentum", False, 1.0)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 if lo_open else v >= 0) and v < hi
            if not ok:
                raise ConfigError(f"{name} = {v!r}: must be a finite number " + ("> 0" if lo_open else "in [0, 1)"))
        if not (isinstance(self.warmup_epochs, (int, float)) and 0 <= self.warmup_epochs <= self.epochs):
            raise ConfigError(f"warmup_epochs = {self.warmup_epochs!r}: must be in [0, epochs = {self.epochs}]")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads = {self.num_threads!r}: must be >= 1 (or null for torch's default)")
        crop_bytes = len(build_layout(self.preset).leaves) * self.images_per_class * self.image_size**2 * 3
        if crop_bytes > MAX_CROP_BYTES:
            raise ConfigError(
                f"images_per_class = {self.images_per_class} x image_size = {self.image_size}: the crop set of "
                f"preset {self.preset!r} would need {crop_bytes / 2**30:.1f} GiB of memory (at most "
                f"{MAX_CROP_BYTES / 2**30:.0f}); lower images_per_class or image_size"
            )


class _Classifier(nn.Module):
    """The body, a global average pool and a linear layer over the leaf classes."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = TinyBody()
        self.head = nn.Linear(self.body.channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def _batches(images: torch.Tensor, idx: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(indices, normalised float [B, 3, S, S] batch) of ``images`` (uint8 [N, S, S, 3]) in the order of ``idx``."""
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    for start in range(0, len(idx), batch_size):
        b = idx[start : start + batch_size]
        x = images[torch.from_numpy(b)].permute(0, 3, 1, 2).float().div_(255)  # NHWC memory: channels_last
        yield b, ((x - mean) / std).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, idx: np.ndarray, batch: int) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on the crops ``idx``."""
    was_training = model.training
    model.eval()
    correct = 0
    for b, x in _batches(images, idx, batch):
        correct += int((model(x).argmax(1) == labels[torch.from_numpy(b)]).sum())
    model.train(was_training)
    return correct / max(len(idx), 1)


def _lr_lambda(warmup_iters: int, total_iters: int):
    """Per-iteration LR factor: linear warm-up from 0.1 over ``warmup_iters``, then a cosine decay to 0."""

    def factor(it: int) -> float:
        if it < warmup_iters:
            return 0.1 + 0.9 * it / warmup_iters
        t = (it - warmup_iters) / max(total_iters - warmup_iters, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return factor


def _train_epochs(
    spec: Stage0Spec, model: nn.Module, crops: CropSet, train_idx: np.ndarray, held_idx: np.ndarray, show: bool
) -> list[dict[str, float]]:
    """The training epochs; returns one {epoch, loss, train_running_accuracy, heldout_accuracy} row per epoch."""
    images, labels = torch.from_numpy(crops.images), torch.from_numpy(crops.labels)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    per_epoch = math.ceil(len(train_idx) / spec.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(round(spec.warmup_epochs * per_epoch), spec.epochs * per_epoch)
    )
    order_rng = np.random.default_rng([spec.seed, 0])  # the epochs' orders and flips, apart from the weights' init
    history: list[dict[str, float]] = []
    bar = tqdm(total=spec.epochs * per_epoch, desc="stage 0: pretraining", unit="it", disable=not show)
    with bar:
        for epoch in range(1, spec.epochs + 1):
            total_loss, correct, seen = 0.0, 0, 0
            for b, x in _batches(images, order_rng.permutation(train_idx), spec.batch_size):
                if spec.hflip:
                    flip = torch.from_numpy(order_rng.random(len(b)) < 0.5)
                    x[flip] = x[flip].flip(-1)
                y = labels[torch.from_numpy(b)]
                logits = model(x)
                loss = nn.functional.cross_entropy(logits, y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"stage 0: non-finite loss at epoch {epoch} (lr {sched.get_last_lr()[0]:.4g}); lower lr"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.item() * len(b)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(b)
                bar.update(1)
            row = {
                "epoch": epoch,
                "loss": total_loss / seen,
                "train_running_accuracy": correct / seen,
                "heldout_accuracy": accuracy(model, images, labels, held_idx, 2 * spec.batch_size),
            }
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", heldout=f"{row['heldout_accuracy']:.3f}")
    return history


def pretrain_backbone(spec: Stage0Spec, out_path: str | Path, progress: bool | None = None) -> dict[str, Any]:
    """Train stage 0 as ``spec`` says and write the body's state dict to ``out_path`` (atomically); return the
    metrics: ``train_accuracy`` and ``heldout_accuracy`` (eval mode, at the end), ``chance_accuracy``, the per-epoch
    ``history``, ``seconds`` (all of it), ``render_seconds``, ``train_seconds`` and ``images_per_second`` (training
    images per second of training). ``progress``: tqdm bars (None: only on a terminal)."""
    spec.validate()
    show = progress_enabled(progress)
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    if spec.num_threads is not None:
        torch.set_num_threads(spec.num_threads)
    try:
        crops = build_crops(spec.preset, spec.images_per_class, spec.seed, spec.image_size, progress=show)
        train_idx, held_idx = crops.split(spec.holdout_per_class)
        t_render = time.perf_counter() - t0
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left as it was
            torch.manual_seed(spec.seed)
            model = _Classifier(crops.num_classes).to(memory_format=torch.channels_last)  # as the NHWC crops
            history = _train_epochs(spec, model, crops, train_idx, held_idx, show)
        t_train = time.perf_counter() - t0 - t_render
        images, labels = torch.from_numpy(crops.images), torch.from_numpy(crops.labels)
        train_acc = accuracy(model, images, labels, train_idx, 2 * spec.batch_size)
        with atomic_path(out_path) as tmp:
            torch.save({k: v.contiguous() for k, v in model.body.state_dict().items()}, tmp)
    finally:
        torch.set_num_threads(threads_before)
    return {
        "train_accuracy": train_acc,
        "heldout_accuracy": history[-1]["heldout_accuracy"],
        "chance_accuracy": 1.0 / crops.num_classes,
        "num_classes": crops.num_classes,
        "train_images": len(train_idx),
        "heldout_images": len(held_idx),
        "final_loss": history[-1]["loss"],
        "history": history,
        "render_seconds": round(t_render, 2),
        "train_seconds": round(t_train, 2),
        "seconds": round(time.perf_counter() - t0, 2),
        "images_per_second": round(spec.epochs * len(train_idx) / max(t_train, 1e-9), 1),
        "num_threads": torch.get_num_threads() if spec.num_threads is None else spec.num_threads,
    }
