"""`ltsweep stage0 [--preset P] [--storage-path DIR] [--epochs N] [--images-per-class N] [--seed S] [--force]`: the
pretrained backbone of stage 0 (``lt_models.engine.stage0``), built once and cached in
``<storage_path>/stage0/<sha256>/`` (``pipelines.storage.stage0_cache``), then its weights path, its accuracy and
how to use it as ``model.weights``.

Exit codes: 0 ok; 2 bad input (a ConfigError, printed by ``pipelines.cli``); 1 a damaged cache entry (named, with
the fix) or any other failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lt_models.engine.stage0 import Stage0Spec
from pipelines.storage import location as storage
from pipelines.storage.stage0_cache import Stage0CacheError, Stage0Weights, ensure_stage0


def stage0_spec(
    preset: str, epochs: int | None = None, images_per_class: int | None = None, seed: int = 0
) -> Stage0Spec:
    """The default ``Stage0Spec`` of ``preset`` with the command line's overrides (None keeps the default)."""
    spec = Stage0Spec(preset=preset, seed=seed)
    if epochs is not None:
        spec.epochs = epochs
    if images_per_class is not None:
        spec.images_per_class = images_per_class
    spec.validate()
    return spec


def summary(result: Stage0Weights) -> dict[str, Any]:
    """The command's result as one JSON-able dict (the metrics without the per-epoch history)."""
    return {
        "sha256": result.sha256,
        "weights": str(result.weights),
        "trained": result.trained,
        "spec": result.spec,
        "metrics": {k: v for k, v in result.metrics.items() if k != "history"},
    }


def format_stage0(result: Stage0Weights) -> str:
    """What ``ltsweep stage0`` prints: the weights, the accuracy, the time and how to use the weights."""
    m, s = result.metrics, result.spec
    how = "trained now" if result.trained else "reused from the cache"
    return "\n".join(
        [
            f"stage 0 {result.sha256[:12]} ({how}; training took {m.get('seconds', float('nan')):.0f} s, "
            f"{m.get('images_per_second', float('nan')):.0f} images/s)",
            f"weights: {result.weights}",
            f"task: preset {s.get('preset')}, {m.get('num_classes')} classes, "
            f"{s.get('images_per_class', 0) - s.get('holdout_per_class', 0)} training + "
            f"{s.get('holdout_per_class')} held-out crops of {s.get('image_size')} px per class, "
            f"{s.get('epochs')} epochs, seed {s.get('seed')}",
            f"accuracy: held-out {m.get('heldout_accuracy', float('nan')):.3f}, "
            f"train {m.get('train_accuracy', float('nan')):.3f} (chance {m.get('chance_accuracy', float('nan')):.4f})",
            "use it: in the experiment YAML",
            "  model:",
            f"    weights: {result.weights}",
            f"or on the command line: --set model.weights={result.weights}",
        ]
    )


def run_stage0(
    preset: str = "demo",
    storage_path: storage.Location = Path("results"),
    *,
    epochs: int | None = None,
    images_per_class: int | None = None,
    seed: int = 0,
    force: bool = False,
    as_json: bool = False,
    progress: bool | None = None,
) -> int:
    """Build (or find) the cached stage 0 and print it (``as_json``: one JSON document); return the exit code.
    A ConfigError propagates (the CLI prints it, exit code 2)."""
    spec = stage0_spec(preset, epochs, images_per_class, seed)
    try:
        result = ensure_stage0(spec, storage_path, force=force, progress=progress)
    except Stage0CacheError as exc:
        print(f"ltsweep: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary(result), indent=2) if as_json else format_stage0(result))
    return 0
