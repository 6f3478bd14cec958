"""The artifacts of an MLflow run: the per-class ones of a trial or stage-1 run (`per_class_ap.csv`,
`per_class_ap.json` and `ap_by_frequency.png`, written to a temp folder and logged), a trial's reliability diagram
(`calibration.json`) and its image-bootstrap replicates (`replicates.npz`)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lt_models.evaluation.bootstrap import REPLICATES_FILE
from pipelines.analysis import replicates
from pipelines.analysis.plots import plot_ap_by_rank
from pipelines.mlflow_io.client import log_bytes_artifact
from pipelines.names import (
    AP_BY_FREQUENCY_PNG,
    CALIBRATION_JSON,
    CALIBRATION_METRICS,
    PER_CLASS_CSV,
    PER_CLASS_JSON,
)


def write_per_class_artifacts(
    per_class: Mapping[int, float], res: Mapping[str, Any], val_annotations: str | None, out_dir: Path, label: str
) -> list[Path]:
    """Write per_class_ap.json, per_class_ap.csv and ap_by_frequency.png into ``out_dir``.

    With the validation annotations, the CSV and the plot come from ``lt_models.evaluation`` (category names,
    frequency buckets, image counts; categories ranked by frequency). Without them: a plain ``category_id,AP`` CSV
    and per-class AP in category-id order. The JSON ({category_id: AP}) is what the sweep report reads back.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    p_json, p_csv, p_png = out_dir / PER_CLASS_JSON, out_dir / PER_CLASS_CSV, out_dir / AP_BY_FREQUENCY_PNG
    p_json.write_text(json.dumps({str(k): v for k, v in sorted(per_class.items())}))
    result = {**res, "per_class": dict(per_class)}
    if val_annotations:
        from lt_models.evaluation import plot_ap_by_frequency, write_per_class_csv

        write_per_class_csv(result, val_annotations, p_csv)
        plot_ap_by_frequency({label: result}, val_annotations, p_png)
    else:
        import csv

        with open(p_csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["category_id", "AP"])
            w.writerows(sorted(per_class.items()))
        plot_ap_by_rank({label: per_class}, p_png, title=f"per-class AP ({label})")
    return [p_json, p_csv, p_png]


def log_per_class_artifacts(
    client, run_id: str, per_class: Mapping[int, float], res: Mapping[str, Any], val_annotations: str | None, label: str
) -> None:
    with tempfile.TemporaryDirectory(prefix="ltsweep-mlflow-") as tmp:
        for p in write_per_class_artifacts(per_class, res, val_annotations, Path(tmp), label=label):
            client.log_artifact(run_id, str(p))


def log_calibration(client, run_id: str, res: Mapping[str, Any]) -> None:
    """Log ``calibration.json``: the reliability diagram per bucket and the ECEs of a trial's last evaluation."""
    payload = {"reliability": res["reliability"], **{k: res[k] for k in CALIBRATION_METRICS if k in res}}
    log_bytes_artifact(client, run_id, CALIBRATION_JSON, json.dumps(payload).encode())


def log_replicates(client, run_id: str, checkpoint) -> dict[str, Any] | None:
    """Log the image-bootstrap replicates beside a trial's last Tune checkpoint as the artifact ``replicates.npz``;
    returns them (None when the checkpoint has none)."""
    data = replicates.file_of(checkpoint)
    if data is None:
        return None
    log_bytes_artifact(client, run_id, REPLICATES_FILE, data)
    return replicates.from_bytes(data)
