"""runs/ does not grow with history: a training run removes its own train/holdout copies at its end
once its evidence is in MLflow (or when the gate trains nothing), and prunes what older runs left,
against a real MLflow server and `run_training`, the steps the DAG runs."""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cd4ml import registry
from cd4ml.core.errors import DataError
from cd4ml.core.settings import get_settings
from cd4ml.core.spec import ModelSpec, load_spec
from cd4ml.data import landing
from cd4ml.steps import pipeline
from cd4ml.steps.contracts import RunContext
from cd4ml.steps.pipeline import run_training
from cd4ml_dev.datagen import generate_churn, write_batch
from tests.helpers import LOGREG, write_spec

ROWS = 300


@pytest.fixture
def spec(workspace: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> ModelSpec:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("CD4ML_SNAPSHOT_MAX_ROWS", raising=False)
    monkeypatch.delenv("CD4ML_RUNS_RETENTION_DAYS", raising=False)
    name = f"store_{uuid.uuid4().hex[:8]}"
    return load_spec(write_spec(workspace / "specs", name, estimator=LOGREG))


def runs_dir(spec: ModelSpec) -> Path:
    return pipeline.zone_for(spec, get_settings()).runs


def copies(spec: ModelSpec) -> list[str]:
    return sorted(p.relative_to(runs_dir(spec)).as_posix() for p in runs_dir(spec).glob("*/*.parquet"))


def land(spec: ModelSpec, batch: int) -> None:
    frame = generate_churn(ROWS, seed=batch, batch=batch)
    write_batch(frame, pipeline.zone_for(spec, get_settings()).landing, f"week{batch}.csv")


def train(spec: ModelSpec, run: str) -> dict[str, Any]:
    return run_training(spec, get_settings(), run_id=run, run_time="2026-03-01T00:00:00+00:00", deploy=False)


def split_now(spec: ModelSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training set and holdout a run on the accepted data trains on (the split is deterministic)."""
    made = pipeline.prepare_datasets(spec, get_settings(), run_id="expected")
    frames = pd.read_parquet(made.train_path), pd.read_parquet(made.holdout_path)
    Path(made.train_path).unlink()
    Path(made.holdout_path).unlink()
    return frames


def age(path: Path, days: float) -> None:
    at = time.time() - days * 86400
    os.utime(path, (at, at))


def test_runs_keep_no_copies_mlflow_holds_and_the_champion_reads_back_what_it_trained_on(
    spec: ModelSpec, caplog: pytest.LogCaptureFixture
) -> None:
    client = registry.client(get_settings().mlflow_tracking_uri)
    trained_on: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
    for batch in range(3):
        land(spec, batch)
        if batch == 2:
            # Something retention cannot read (a dangling link): pruning fails, the run must not.
            (runs_dir(spec) / "broken").mkdir()
            (runs_dir(spec) / "broken" / "train.parquet").symlink_to(runs_dir(spec) / "gone.parquet")
        with caplog.at_level(logging.WARNING, logger="cd4ml.steps.pipeline"):
            out = train(spec, f"r{batch}")
        assert out["version"] == str(batch + 1), out
        trained_on[out["version"]] = split_now(spec)
        # MLflow holds both snapshots whole: no copy left, whatever the decision was.
        assert [c for c in copies(spec) if not c.startswith("broken/")] == [], copies(spec)
        assert (runs_dir(spec) / f"r{batch}" / "outcome.json").is_file()
    assert any(
        "CD4ML_RUNS_RETENTION_DAYS" in r.getMessage() and "training is unaffected" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]

    # The same data again: the gate trains nothing, and its copies go too; outcome.json stays.
    again = train(spec, "r3")
    assert again["trained"] is False, again
    assert copies(spec) == ["broken/train.parquet"] and (runs_dir(spec) / "r3" / "outcome.json").is_file()

    champion = registry.version_by_alias(client, spec.name, registry.CHAMPION)
    assert champion is not None
    train_frame, holdout = trained_on[str(champion.version)]
    pd.testing.assert_frame_equal(registry.reference_frame(client, spec.name, champion, "train"), train_frame)
    pd.testing.assert_frame_equal(registry.reference_frame(client, spec.name, champion, "holdout"), holdout)
    assert "cd4ml.train_snapshot" not in champion.tags and "cd4ml.holdout_snapshot" not in champion.tags


def test_a_retried_step_after_the_copies_went_reads_mlflow_or_rebuilds_them(spec: ModelSpec) -> None:
    land(spec, 0)
    land(spec, 1)
    run = RunContext(run_id="r1", run_time="2026-03-01T00:00:00+00:00", trigger="t", who="t")
    results = pipeline.run_steps(spec, get_settings(), run, pipeline.TRAINING_STEPS[:7])
    assert copies(spec) == []
    # evaluate cleared by hand after the run: the same copies are rebuilt from the accepted data.
    evaluate = pipeline.STEPS_BY_NAME["evaluate_against_champion"]
    assert evaluate.run(spec, get_settings(), run, results) == results["evaluate_against_champion"]
    assert copies(spec) == ["r1/holdout.parquet", "r1/train.parquet"]
    register = pipeline.STEPS_BY_NAME["register_challenger"]
    assert register.run(spec, get_settings(), run, results) == results["register_challenger"]
    assert copies(spec) == []

    # The accepted data changes (a file retracted): the copies cannot be rebuilt as they were ...
    zone = pipeline.zone_for(spec, get_settings())
    landing.retract(zone, "week1.csv", reason="test", who="t", when="2026-03-02T00:00:00+00:00")
    with pytest.raises(DataError, match=r"removed at the end of the run, and the accepted data changed"):
        evaluate.run(spec, get_settings(), run, results)
    # ... yet a retried registration needs none: its evidence is in MLflow already.
    assert register.run(spec, get_settings(), run, results) == results["register_challenger"]
    assert copies(spec) == []


def test_a_version_keeps_no_row_copies_and_the_run_end_prunes_what_older_runs_left(
    spec: ModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Even with a snapshot cap below the table's size, nothing is sampled any more: the version lists
    # the accepted files (each stored once in MLflow) and its split is rebuilt from them.
    monkeypatch.setenv("CD4ML_SNAPSHOT_MAX_ROWS", "100")
    land(spec, 0)
    assert train(spec, "r1")["version"] == "1"
    client = registry.client(get_settings().mlflow_tracking_uri)
    info = registry.read_evidence(client, spec.name, "1")
    train_info = info.snapshots["train"]
    assert train_info["kind"] == "rebuilt-from-batches" and not train_info["sampled"]
    assert len(registry.reference_frame(client, spec.name, "1")) == train_info["rows"] == 240
    assert copies(spec) == []

    # A crashed run's left-overs, last written 10 days ago: the next run's end prunes them with the
    # default 7 days' retention, whether or not MLflow holds them.
    pipeline.prepare_datasets(spec, get_settings(), run_id="crashed")
    for path in runs_dir(spec).glob("crashed/*.parquet"):
        age(path, 10)
    assert train(spec, "r2")["trained"] is False  # same data: the gate ends the run
    assert copies(spec) == []
    assert (runs_dir(spec) / "r1" / "outcome.json").is_file()

    # Younger than the retention: kept.
    monkeypatch.setenv("CD4ML_RUNS_RETENTION_DAYS", "30")
    pipeline.prepare_datasets(spec, get_settings(), run_id="crashed")
    for path in runs_dir(spec).glob("crashed/*.parquet"):
        age(path, 10)
    assert train(spec, "r3")["trained"] is False
    assert copies(spec) == ["crashed/holdout.parquet", "crashed/train.parquet"]
