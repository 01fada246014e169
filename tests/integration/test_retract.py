"""`<model>__retract` with dag.test(): a file is taken back, the training DAG is asked to rerun,
and the retrain leaves the file's rows out (real Airflow, GX, sklearn, MLflow and service)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cd4ml import registry
from cd4ml.data import landing
from cd4ml_dev.datagen import generate_churn
from cd4ml_dev.netutil import free_port, wait_http
from tests.conftest import BIN
from tests.helpers import LOGREG, write_spec
from tests.integration.dagtools import land, queued_training_runs, run, run_dag, task_tries, versions

pytestmark = pytest.mark.integration
MODEL = "retracted"


def new_data_events(model: str) -> list[Any]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return list(
            session.scalars(
                select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                .where(AssetModel.name == f"{model}.new_data")
            )
        )  # fmt: skip


def test_retracting_a_file_retrains_without_its_rows_and_is_listed(env: dict[str, Any]) -> None:
    from cd4ml.core.settings import get_settings
    from cd4ml.core.spec import load_spec
    from cd4ml.ui.overview import model_overview

    spec_path = write_spec(env["specs"], MODEL, estimator=LOGREG, promotion__floor=None)
    zone = landing.Zone(env["data"] / MODEL)
    land(env, MODEL, "week0.csv", generate_churn(1200, seed=41))
    assert run(env, MODEL)["__run__"] == "success"
    land(env, MODEL, "week1.csv", generate_churn(800, seed=42, batch=1))
    assert run(env, MODEL)["__run__"] == "success"
    (week0,) = [f for f in landing.list_accepted(zone) if f.name == "week0.csv"]
    (week1,) = [f for f in landing.list_accepted(zone) if f.name == "week1.csv"]
    v2 = versions(env, MODEL)[-1]
    assert v2.tags["cd4ml.data_fingerprint"] == landing.data_fingerprint([week0, week1])
    both_rows = int(v2.tags["cd4ml.rows_train"])

    # A key that names nothing fails at once (no retry), lists the candidates and moves nothing.
    states = run_dag(f"{MODEL}__retract", {"file": "week7.csv", "reason": "typo"})
    assert states["__run__"] == "failed" and states["retract_file"] == "failed", states
    assert states["request_retrain"] == "upstream_failed"
    assert task_tries(states["__run_id__"], f"{MODEL}__retract")["retract_file"] == 1  # not retried
    assert len(landing.list_accepted(zone)) == 2 and new_data_events(MODEL) == []

    states = run_dag(
        f"{MODEL}__retract", {"file": week1.sha256[:10], "reason": "labels of week 1 were shifted"}
    )
    assert states["__run__"] == "success", states
    assert [f.name for f in landing.list_accepted(zone)] == ["week0.csv"]
    (moved,) = [p for p in zone.quarantine.iterdir() if p.name == Path(week1.path).name]
    assert landing.file_sha256(moved) == week1.sha256  # every byte kept
    reason = json.loads(moved.with_name(moved.name + ".reason.json").read_text())
    assert reason["kind"] == "retracted" and reason["reason"] == "labels of week 1 were shifted"
    assert f"{MODEL}__retract run {states['__run_id__']}" in reason["who"]
    # The retrain is asked for the way new data asks for it: a new_data event the DAG listens to.
    (event,) = new_data_events(MODEL)
    assert event.extra["retracted"]["file"] == "week1.csv"
    assert event.extra["retracted"]["sha256"] == week1.sha256
    assert event.extra["retracted"]["reason"] == "labels of week 1 were shifted"
    assert queued_training_runs(MODEL) == 1

    # The retrain (dag.test() has no scheduler to start it) learns from week0 only.
    states = run(env, MODEL)
    assert states["__run__"] == "success" and states["train_challenger"] == "success", states
    v3 = versions(env, MODEL)[-1]
    assert v3.version == "3"
    assert v3.tags["cd4ml.data_fingerprint"] == landing.data_fingerprint([week0])
    params = env["mlflow"].get_run(v3.run_id).data.params
    assert int(params["rows_train"]) + int(params["rows_holdout"]) == 1200  # week0's rows, no more
    assert int(v3.tags["cd4ml.rows_train"]) < both_rows

    # Retracting it again changes nothing and reports the recorded retraction.
    again = run_dag(f"{MODEL}__retract", {"file": "week1.csv", "reason": "again"})
    assert again["__run__"] == "success"
    assert len(landing.list_retractions(zone)) == 1
    # The model's history in MLflow has it once (the second run re-reported it, it did not re-log it).
    (logged,) = [e for e in registry.events(env["mlflow"], MODEL) if e.kind == "retraction"]
    assert (logged.who, logged.when, logged.why) == (reason["who"], reason["when"], reason["reason"])
    assert logged.version is None and logged.details["sha256"] == week1.sha256

    overview = model_overview(load_spec(spec_path), get_settings())
    (listed,) = overview.retractions
    assert (listed["file"], listed["sha256"], listed["reason"]) == (
        "week1.csv", week1.sha256, "labels of week 1 were shifted"
    )  # fmt: skip
    assert listed["who"] == reason["who"] and listed["when"] == reason["when"]
    assert overview.files["accepted"] == 1 and overview.files["retracted"] == 1
    assert overview.as_dict()["retractions"][0]["file"] == "week1.csv"
    assert [e.what for e in overview.events if e.kind == "retraction"] == ["retracted"]


@pytest.fixture
def airflow_api(env: dict[str, Any], tmp_path: Path) -> Iterator[dict[str, str]]:
    """Airflow's real API server on the tests' metadata DB, with a known login."""
    port = free_port()
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"admin": "retract-test-password"}))
    api_env = {
        **os.environ,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": "retract-test-secret-key",
        "AIRFLOW__API_AUTH__JWT_SECRET": "retract-test-jwt-secret-of-some-length",
    }
    log = (tmp_path / "api-server.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "airflow"), "api-server", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=api_env, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/api/v2/monitor/health", 180)
        yield {"url": url, "password": "retract-test-password", "log": str(tmp_path / "api-server.log")}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def test_cli_retraction_starts_training_through_the_airflow_api(
    env: dict[str, Any],
    airflow_api: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    from cd4ml import cli

    model = "cli_retracted"
    write_spec(env["specs"], model, estimator=LOGREG)
    land(env, model, "week0.csv", generate_churn(600, seed=43))
    land(env, model, "week1.csv", generate_churn(600, seed=44, batch=1))
    assert run(env, model)["__run__"] == "success"  # also puts the DAG where the API finds it
    monkeypatch.setenv("CD4ML_AIRFLOW_URL", airflow_api["url"])
    monkeypatch.setenv("CD4ML_AIRFLOW_PASSWORD", airflow_api["password"])

    code = cli.main(["data", "retract", model, "week0.csv", "--reason", "sensor was miscalibrated"])
    out = capsys.readouterr()
    assert code == 0, (out.err, Path(airflow_api["log"]).read_text()[-3000:])
    assert f"started {model}__train run " in out.out, out.out
    run_id = out.out.split(f"started {model}__train run ", 1)[1].split()[0]
    with create_session() as session:
        dag_run = session.query(DagRun).filter_by(dag_id=f"{model}__train", run_id=run_id).one()
        assert dag_run.conf["reason"] == "retraction of week0.csv: sensor was miscalibrated"
    assert [f.name for f in landing.list_accepted(landing.Zone(env["data"] / model))] == ["week1.csv"]
