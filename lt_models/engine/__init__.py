"""The training engine: one run of a ``TrainSpec`` (``loop.train``), its parts (``build``), prediction and
scoring (``evaluate``), checkpoints (``checkpoint``), data parallelism (``distributed``) and a trained detector
back for inference (``inference``)."""

from lt_models.engine.build import (
    build_lr_scheduler,
    build_optimizer,
    pick_device,
    shared_loss_inputs,
)
from lt_models.engine.loop import NonFiniteLossError, train, train_one_epoch
from lt_models.engine.spec import TrainSpec
from lt_models.engine.validation import evaluate, predict

__all__ = [
    "NonFiniteLossError",
    "TrainSpec",
    "build_lr_scheduler",
    "build_optimizer",
    "evaluate",
    "pick_device",
    "predict",
    "shared_loss_inputs",
    "train",
    "train_one_epoch",
]
