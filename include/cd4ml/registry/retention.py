"""Retention of `runs/`: a training run's snapshots may go once MLflow holds them.

`runs/<run key>/` keeps each run's train.parquet and holdout.parquet. Once a version's snapshots
are artifacts of its run (`registry.record_evidence`), the local copies are only a cache: nothing
reads them again. A run removes its own copies at its end (`cd4ml.steps.pipeline.finish_run_storage`:
after registering, those MLflow holds whole; when the gate trains nothing, both), then calls
`prune_runs` for what earlier runs left behind. `prune_runs` deletes those older than
`CD4ML_RUNS_RETENTION_DAYS` days (default 7), and only files whose bytes MLflow holds whole (same
sha256, not a sample). It keeps everything else: a run's outcome.json (the Models view and the
metrics count runs from it), snapshots of runs that registered no version (nothing holds them),
snapshots stored as a sample, and the local paths that versions registered before snapshots were
artifacts still depend on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cd4ml.data.landing import file_sha256
from cd4ml.registry.evidence import held_sources

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


def retention_days() -> float | None:
    """CD4ML_RUNS_RETENTION_DAYS (default 7; None, only settable in code, prunes nothing)."""
    from cd4ml.core.settings import get_settings

    return get_settings().runs_retention_days


@dataclass(frozen=True)
class Pruned:
    deleted: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    kept_not_held: int = 0  # old snapshots MLflow does not hold whole: kept


def prune_runs(
    mlflow_client: MlflowClient, name: str, runs_dir: Path, *, older_than_days: float, now: datetime
) -> Pruned:
    """Delete the snapshots under `runs_dir` last written before `now - older_than_days` whose
    content MLflow holds as an artifact of a version of model `name`."""
    if not runs_dir.is_dir():
        return Pruned()
    cutoff = (now - timedelta(days=older_than_days)).timestamp()
    old = [p for p in sorted(runs_dir.glob("*/*.parquet")) if p.stat().st_mtime < cutoff]
    if not old:
        return Pruned()
    held = {str(Path(path).resolve()): sha for path, sha in held_sources(mlflow_client, name).items()}
    deleted: list[str] = []
    freed = kept = 0
    for path in old:
        sha = held.get(str(path.resolve()))
        if sha is None or file_sha256(path) != sha:
            kept += 1
            continue
        size = path.stat().st_size
        path.unlink()
        deleted.append(str(path))
        freed += size
    log.info("%s: pruned %d snapshot(s) MLflow holds (%d bytes); kept %d it does not hold whole",
             name, len(deleted), freed, kept)  # fmt: skip
    return Pruned(deleted, freed, kept)
