"""runs/ retention against a real MLflow server: old run snapshots are deleted, recent ones and the
local files that legacy versions still name are kept; versions read theirs from MLflow afterwards."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from cd4ml import registry
from cd4ml.core.errors import Cd4mlError
from tests.unit.test_history import _frame, _version

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _age(path: Path, days: float) -> None:
    at = (NOW - timedelta(days=days)).timestamp()
    os.utime(path, (at, at))


def test_prune_deletes_old_snapshots_and_keeps_recent_ones_and_what_legacy_versions_name(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"keep_{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server)
    runs = tmp_path / "runs"
    for key in ("r1", "r2", "r3", "r4", "r5"):
        (runs / key).mkdir(parents=True)
        _frame(60, seed=len(key)).to_parquet(runs / key / "train.parquet")
        (runs / key / "outcome.json").write_text("{}")
    _frame(20).to_parquet(runs / "r1" / "holdout.parquet")
    # r1: held whole by v1. r2: no version holds it. r3: held, but recent. r4: held as a sample only.
    # r5: named by a version registered before snapshots were artifacts (local-path tags only).
    for key, snapshots in (("r1", ["train", "holdout"]), ("r3", ["train"])):
        files = {s: str(runs / key / f"{s}.parquet") for s in snapshots}
        registry.record_evidence(client, name, _version(mlflow_server, name), evidence={},
                                 validation={"status": "passed"}, spec_text="", snapshots=files)  # fmt: skip
    legacy = _version(mlflow_server, name, tags={"cd4ml.train_snapshot": str(runs / "r5" / "train.parquet")})
    monkeypatch.setenv("CD4ML_SNAPSHOT_MAX_ROWS", "10")
    sampled = _version(mlflow_server, name)
    registry.record_evidence(client, name, sampled, evidence={}, validation={}, spec_text="",
                             snapshots={"train": str(runs / "r4" / "train.parquet")})  # fmt: skip
    for path in runs.glob("*/*"):
        _age(path, 1 if path.parent.name == "r3" else 40)

    pruned = registry.prune_runs(client, name, runs, older_than_days=30, now=NOW)

    assert sorted(Path(p).relative_to(runs).as_posix() for p in pruned.deleted) == [
        "r1/holdout.parquet", "r1/train.parquet", "r2/train.parquet", "r4/train.parquet",
    ]  # fmt: skip
    assert pruned.kept_legacy == 1 and pruned.bytes_freed > 0
    left = sorted(p.relative_to(runs).as_posix() for p in runs.glob("*/*"))
    outcomes = [f"{k}/outcome.json" for k in ("r1", "r2", "r3", "r4", "r5")]
    assert left == sorted([*outcomes, "r3/train.parquet", "r5/train.parquet"])
    # Every version still reads its snapshots: from MLflow, or (legacy) from the kept local file.
    pd.testing.assert_frame_equal(registry.reference_frame(client, name, "1", "holdout"), _frame(20))
    pd.testing.assert_frame_equal(registry.reference_frame(client, name, legacy), _frame(60, seed=2))
    # Nothing old left to delete: a second pass deletes nothing.
    assert registry.prune_runs(client, name, runs, older_than_days=30, now=NOW).deleted == []


def test_retention_days_is_a_week_by_default_and_named_when_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CD4ML_RUNS_RETENTION_DAYS", raising=False)
    assert registry.retention_days() == 7
    monkeypatch.setenv("CD4ML_RUNS_RETENTION_DAYS", "")  # empty means unset: the default
    assert registry.retention_days() == 7
    monkeypatch.setenv("CD4ML_RUNS_RETENTION_DAYS", "14")
    assert registry.retention_days() == 14
    monkeypatch.setenv("CD4ML_RUNS_RETENTION_DAYS", "two weeks")
    with pytest.raises(Cd4mlError, match=r"CD4ML_RUNS_RETENTION_DAYS='two weeks': .*number"):
        registry.retention_days()
