"""`<model>__score` with dag.test(): files and a folder dropped into score/ are scored by the champion
that `<model>__train` promoted (real Airflow, GX, sklearn, MLflow and prediction service), with the
service's own answers, rejects with reasons, a quarantined file, the Models view and the metrics; and
a run with no champion fails once, with the files left waiting."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from cd4ml import registry
from cd4ml_dev.datagen import generate_churn
from tests.helpers import LOGREG, write_spec
from tests.integration.dagtools import champion, land, run, run_dag, task_tries

pytestmark = pytest.mark.integration
CHUNK = 40


def to_score(n: int, seed: int) -> pd.DataFrame:
    """Rows as a user exports them for scoring: features, an id, no target."""
    df = generate_churn(n, seed=seed).drop(columns=["churned"])
    return df.assign(customer_id=[f"s{seed}-{i:04d}" for i in range(n)])


def service_answers(env: dict[str, Any], model: str, rows: pd.DataFrame) -> dict[str, Any]:
    split = json.loads(rows.to_json(orient="split", index=False))
    resp = httpx.post(
        f"{env['service']}/v1/models/{model}/predict", json={"dataframe_split": split}, timeout=30
    )
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_files_and_folders_are_scored_as_the_service_answers_with_rejects_quarantine_view_and_metrics(
    env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cd4ml.core.settings import get_settings
    from cd4ml.core.spec import load_spec
    from cd4ml.steps.batch_score import list_runs
    from cd4ml.ui.overview import model_overview, prometheus_text

    model = "scored"
    scoring = {"csv": True, "chunk_rows": CHUNK, "keep_columns": ["customer_id"]}
    spec_path = write_spec(env["specs"], model, estimator=LOGREG, promotion__floor=None, scoring=scoring)
    land(env, model, "week0.csv", generate_churn(1500, seed=2))
    assert run(env, model)["__run__"] == "success"
    assert champion(env, model) == "1"

    score_dir = env["data"] / model / "score"
    score_dir.mkdir(parents=True, exist_ok=True)
    nightly = to_score(120, seed=5).astype({"age": object})
    nightly.loc[7, "age"] = "forty"  # no number: rejected with the reason, the rest still scored
    nightly.loc[50, "age"] = "inf"
    nightly.to_csv(score_dir / "nightly.csv", index=False)
    export = score_dir / "export"
    export.mkdir()
    parts = to_score(60, seed=6)
    parts.iloc[:25].to_parquet(export / "part-00000.parquet")
    parts.iloc[25:].to_parquet(export / "part-00001.parquet")
    (export / "_SUCCESS").write_text("")
    to_score(10, seed=7).drop(columns=["age"]).to_csv(score_dir / "no_age.csv", index=False)
    nightly_sha = hashlib.sha256((score_dir / "nightly.csv").read_bytes()).hexdigest()

    states = run_dag(f"{model}__score", {})
    assert states["__run__"] == "success" and states["score_files"] == "success", states
    (record,) = list_runs(_paths(model))
    assert (
        record["outcome"] == "scored"
        and record["version"] == "1"
        and record["run_id"] == states["__run_id__"]
    )
    assert record["rows_scored"] == 178 and record["rows_rejected"] == 2
    by_name = {i["name"]: i for i in record["inputs"]}

    # The CSV: every good row has the service's answer for a request of the same rows.
    csv_result = by_name["nightly.csv"]
    out = pd.read_parquet(csv_result["predictions"])
    assert set(out["model_version"]) == {"1"} and set(out["run_id"]) == {states["__run_id__"]}
    assert set(out["input_sha256"]) == {nightly_sha} and out["customer_id"].tolist() == [
        f"s5-{i:04d}" for i in range(120) if i not in (7, 50)
    ]
    for start in range(0, 120, CHUNK):
        chunk = out[(out["row"] >= start) & (out["row"] < start + CHUNK)]
        rows = nightly.iloc[chunk["row"].to_numpy()][list(spec_features(spec_path))].astype({"age": int})
        answer = service_answers(env, model, rows)
        assert answer["version"] == "1" and chunk["prediction"].tolist() == answer["predictions"]
        assert np.array_equal(
            chunk[["probability_0", "probability_1"]].to_numpy(), np.asarray(answer["probabilities"])
        )
    rejects = pd.read_parquet(csv_result["rejects"])
    assert rejects[["row", "customer_id", "reason"]].to_dict("records") == [
        {"row": 7, "customer_id": "s5-0007", "reason": "age: expected a number, got 'forty'"},
        {"row": 50, "customer_id": "s5-0050", "reason": "age: expected a finite number, got 'inf'"},
    ]
    assert (Path(csv_result["output_dir"]) / "predictions.csv").exists()  # scoring.csv: true

    # The folder: one input, its rows numbered across the parts.
    folder = pd.read_parquet(by_name["export"]["predictions"])
    assert (
        folder["row"].tolist() == list(range(60))
        and folder["customer_id"].tolist() == parts["customer_id"].tolist()
    )
    assert folder["input_file"].tolist() == ["part-00000.parquet"] * 25 + ["part-00001.parquet"] * 35

    # The file it could not score: quarantined with a reason naming file, column and setting.
    (quarantined,) = record["quarantined"]
    assert quarantined["reason"].startswith(
        "no_age.csv could not be scored: missing column(s) 'age' (features.numerical)"
    )
    moved = Path(quarantined["path"])
    assert moved.exists() and moved.with_name(moved.name + ".reason.txt").exists()
    assert not any(score_dir.iterdir())
    assert len(list(_paths(model).scored_inputs.iterdir())) == 2

    # The Models view and the metrics list the run.
    settings = get_settings()
    overview = model_overview(load_spec(spec_path), settings)
    assert (
        overview.batch_runs[0]["run_id"] == states["__run_id__"]
        and overview.batch_runs[0]["rows_scored"] == 178
    )
    metrics = prometheus_text([overview])
    assert f'cd4ml_batch_rows_total{{model="{model}",outcome="scored"}} 178.0' in metrics
    assert f'cd4ml_batch_inputs_total{{model="{model}",outcome="quarantined"}} 1.0' in metrics

    # Nothing waiting: a quiet run that records nothing. A path from the form is scored where it is.
    assert run_dag(f"{model}__score", {})["__run__"] == "success"
    assert len(list_runs(_paths(model))) == 1
    shared = tmp_path / "shared.parquet"
    to_score(15, seed=8).to_parquet(shared)
    states = run_dag(f"{model}__score", {"path": str(shared)})
    assert states["__run__"] == "success" and shared.exists()
    assert list_runs(_paths(model))[0]["rows_scored"] == 15
    # The same step without Airflow: `cd4ml score <model> <path>` (a relative path is resolved).
    from cd4ml.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["score", model, "shared.parquet"]) == 0
    latest = list_runs(_paths(model))[0]
    assert latest["rows_scored"] == 15 and "via cd4ml CLI" in latest["trigger"] and shared.exists()
    assert '"rows_scored": 15' in capsys.readouterr().out  # the run's summary, as JSON

    # A champion moved outside cd4ml (its record broken) is refused, as the service refuses it.
    client = env["mlflow"]
    signed = client.get_model_version(model, "1").tags[registry.SIGNATURE_TAG]
    client.set_model_version_tag(model, "1", registry.SIGNATURE_TAG, signed[:-4] + "0000")
    try:
        to_score(5, seed=9).to_csv(score_dir / "late.csv", index=False)
        states = run_dag(f"{model}__score", {})
        assert states["__run__"] == "failed", states
        assert "which cd4ml did not promote" in list_runs(_paths(model))[0]["error"]
        assert (score_dir / "late.csv").exists()
    finally:
        client.set_model_version_tag(model, "1", registry.SIGNATURE_TAG, signed)


def test_with_no_champion_the_run_fails_once_and_the_files_wait(
    env: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from cd4ml.steps.batch_score import list_runs

    model = "unscored"
    write_spec(env["specs"], model, estimator=LOGREG)
    score_dir = env["data"] / model / "score"
    score_dir.mkdir(parents=True)
    to_score(20, seed=1).to_csv(score_dir / "a.csv", index=False)
    states = run_dag(f"{model}__score", {})
    assert states["__run__"] == "failed" and states["score_files"] == "failed", states
    assert (
        task_tries(states["__run_id__"], f"{model}__score")["score_files"] == 1
    )  # deterministic: not retried
    (record,) = list_runs(_paths(model))
    assert record["outcome"] == "failed" and "no champion yet" in record["error"]
    assert (score_dir / "a.csv").exists()
    # `cd4ml score` says the same, by name, and leaves the file waiting.
    from cd4ml.cli import main

    assert main(["score", model]) == 2
    assert "no champion yet" in capsys.readouterr().err and (score_dir / "a.csv").exists()


def _paths(model: str) -> Any:
    from cd4ml.core.paths import ModelPaths
    from cd4ml.core.settings import get_settings

    return ModelPaths.for_model(get_settings(), model)


def spec_features(spec_path: Path) -> list[str]:
    from cd4ml.core.spec import load_spec

    return load_spec(spec_path).feature_names
