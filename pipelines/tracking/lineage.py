"""Lineage on the MLflow runs of a sweep: the datasets each run used, the code it ran, and the links between the
shared stage-1 (pretrain) run and the sweep and trial runs that start from it.

- Datasets: every sweep, trial and pretrain run logs its training and validation annotation files as MLflow
  dataset inputs (``client.log_inputs``; contexts ``training`` / ``validation``), with the file as source and a
  digest: the dataset fingerprint (annotation bytes + image list) for the training set, the file's sha256 for the
  validation set. MLflow shows them in the runs table's Dataset column.
- Code: ``mlflow.source.name`` = ``ltsweep`` and, in a git checkout, ``mlflow.source.git.commit``.
- Stage 1: the sweep run's tag ``ltsweep.pretrain_runs`` maps each training seed to its pretrain run; a trial run's
  ``ltsweep.pretrain_run_id`` names the pretrain run it restored; a pretrain run's ``ltsweep.sweep_runs`` lists the
  sweep runs that used it (their trial runs are nested under them).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.mlflow_io.client import git_commit
from pipelines.names import PRETRAIN_SHA_TAG, ROLE_PRETRAIN, ROLE_TAG

PRETRAIN_RUNS_TAG = "ltsweep.pretrain_runs"  # sweep run: {seed: pretrain run id}
PRETRAIN_RUN_TAG = "ltsweep.pretrain_run_id"  # trial run: the pretrain run whose checkpoint it restored
SWEEP_RUNS_TAG = "ltsweep.sweep_runs"  # pretrain run: the sweep runs that started from it
DIGEST_LEN = 16  # MLflow's dataset digest column is short


def source_tags() -> dict[str, str]:
    """MLflow's own source tags: the program, and the git commit of the code that ran (in a git checkout)."""
    commit = git_commit()
    return {
        "mlflow.source.name": "ltsweep",
        "mlflow.source.type": "LOCAL",
        **({"mlflow.source.git.commit": commit} if commit else {}),
    }


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a local file's bytes (cached per path, size and mtime); '' for a file that is not local."""
    p = Path(path)
    if not p.is_file():
        return ""
    st = p.stat()
    return _file_sha256(str(p.resolve()), st.st_size, st.st_mtime)


def dataset_inputs(train: str | None, val: str | None, train_digest: str | None = None) -> list:
    """The MLflow DatasetInput entities of a run's training and validation annotation files."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    out = []
    for context, path, digest in (("training", train, train_digest), ("validation", val, None)):
        if not path:
            continue
        digest = (digest or file_digest(path) or hashlib.sha256(str(path).encode()).hexdigest())[:DIGEST_LEN]
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": MLflow picks the local file
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(path))
        # mlflow.data.Dataset marks `profile` abstract, but MetaDataset (documented as instantiable) omits it
        ds = MetaDataset(source, name=f"{context}:{Path(str(path)).name}", digest=digest)  # type: ignore[abstract]
        out.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return out


def log_datasets(client, run_id: str, train: str | None, val: str | None, train_digest: str | None = None) -> None:
    """Log the run's dataset inputs once (a resumed run already has them)."""
    run = client.get_run(run_id)
    if run.inputs is not None and run.inputs.dataset_inputs:
        return
    inputs = dataset_inputs(train, val, train_digest)
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def pretrain_runs(client, experiment_id: str, shas: Mapping[str, str]) -> dict[str, str]:
    """{seed: pretrain run id} for the stage-1 sha256 of each seed ({seed: sha256}) that has a run here."""
    from pipelines.mlflow_io.reads import search_tagged

    out = {}
    for seed, sha in (shas or {}).items():
        runs = search_tagged(client, experiment_id, {ROLE_TAG: ROLE_PRETRAIN, PRETRAIN_SHA_TAG: sha})
        if runs:
            out[str(seed)] = runs[-1].info.run_id
    return out


def link_stage1(client, sweep_run_id: str, runs: Mapping[str, str]) -> None:
    """Tag the sweep run with its pretrain runs, and each pretrain run with the sweep run."""
    if not runs:
        return
    client.set_tag(sweep_run_id, PRETRAIN_RUNS_TAG, json.dumps(dict(runs), sort_keys=True))
    for run_id in set(runs.values()):
        have: list[Any] = json.loads(client.get_run(run_id).data.tags.get(SWEEP_RUNS_TAG) or "[]")
        if sweep_run_id not in have:
            client.set_tag(run_id, SWEEP_RUNS_TAG, json.dumps(have + [sweep_run_id]))
