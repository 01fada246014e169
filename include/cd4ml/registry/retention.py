"""Retention of `runs/`: a training run's local snapshots are scratch, not a record.

`runs/<run key>/` holds a run's outcome.json (the Models view and the metrics count runs from it) and,
while the run needs them, its train.parquet and holdout.parquet. The run removes those at its end
(`cd4ml.steps.pipeline.finish_run_storage`: after the version's evidence is in MLflow, or when the gate
trains nothing); a step re-run by hand rebuilds them from `accepted/`. What a crashed or failed run
left behind is deleted by `prune_runs` once older than `CD4ML_RUNS_RETENTION_DAYS` (default 7),
except the local files that versions registered before snapshots were MLflow artifacts still name in
their tags (`registry.reference_frame` reads those). outcome.json is never deleted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cd4ml.registry.evidence import legacy_snapshot_paths

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
    kept_legacy: int = 0  # old snapshots a version registered before snapshots were artifacts names


def prune_runs(
    mlflow_client: MlflowClient, name: str, runs_dir: Path, *, older_than_days: float, now: datetime
) -> Pruned:
    """Delete the snapshots under `runs_dir` last written before `now - older_than_days`, except
    those a legacy version of model `name` names in its tags (counted in `kept_legacy`)."""
    if not runs_dir.is_dir():
        return Pruned()
    cutoff = (now - timedelta(days=older_than_days)).timestamp()
    old = [p for p in sorted(runs_dir.glob("*/*.parquet")) if p.stat().st_mtime < cutoff]
    if not old:
        return Pruned()
    legacy = legacy_snapshot_paths(mlflow_client, name)
    deleted: list[str] = []
    freed = kept = 0
    for path in old:
        if str(path.resolve()) in legacy:
            kept += 1
            continue
        size = path.stat().st_size
        path.unlink()
        deleted.append(str(path))
        freed += size
    log.info("%s: pruned %d old run snapshot(s) (%d bytes); kept %d that legacy versions name",
             name, len(deleted), freed, kept)  # fmt: skip
    return Pruned(deleted, freed, kept)
