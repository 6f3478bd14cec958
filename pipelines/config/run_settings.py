"""``run:`` of an experiment YAML: where a sweep writes (``storage_path``: a directory or an object-store URI, see
:mod:`pipelines.storage.location`), its MLflow store, retries and checkpoints kept. Its own module so that
``pipelines.config.experiment`` stays within its size; re-exported there."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

from pipelines.storage.location import as_location

#: a local directory (Path) or a URI such as s3://bucket/prefix (str; Path would fold "s3://" into "s3:/")
StoragePath = Annotated[Path | str, PlainValidator(as_location)]


class RunSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)  # as pipelines.config.experiment's sections

    storage_path: StoragePath = Field(
        default=Path("results"),
        description="Tune results, checkpoints, stage-1 cache, "
        "mlflow.db: a directory, or s3://bucket/prefix[?endpoint_override=HOST:PORT"
        "&scheme=http] (then run.tracking_uri is required)",
    )
    tracking_uri: str | None = Field(default=None, description="MLflow URI; default sqlite:///<storage_path>/mlflow.db")
    max_failures: int = Field(default=2, ge=0, description="retries of a failed trial (from its last checkpoint)")
    checkpoints_to_keep: int = Field(
        default=2, ge=1, description="per trial: the best by scheduler.metric and the latest (pbt / pb2: every one)"
    )
    ray_num_cpus: int | None = Field(default=None, ge=1, description="CPUs of a local Ray instance (default: all)")
