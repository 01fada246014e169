"""`<model>__monitor` with dag.test(): real traffic through the real prediction service, a real
MLflow store, Evidently reports, and asset events in Airflow's metadata DB.

One model goes through the scenarios in order: stable traffic -> no event; drifted traffic -> one
drift_detected event queuing one training run; drifted again inside the cooldown -> a report but no
second event; a window too small to judge -> "not enough data"; then the queued retrain runs through
the normal validation and champion/challenger gate.

The ground-truth stories (late labels, a live drop, feedback as training data) are in
test_monitor_live.py, so that xdist runs them beside these.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cd4ml import registry
from cd4ml.ml.training import features
from cd4ml_dev.datagen import generate_churn
from tests.helpers import LOGREG, write_spec
from tests.integration.dagtools import land, queued_training_runs, run, run_dag, served, versions

pytestmark = pytest.mark.integration
MODEL = "drifty"


def send_traffic(env: dict[str, Any], frame, model: str = MODEL, request_prefix: str | None = None) -> int:
    rows = json.loads(features_frame(frame, model).to_json(orient="records"))
    for i in range(0, len(rows), 100):
        headers = {"x-request-id": f"{request_prefix}-{i}"} if request_prefix else {}
        resp = httpx.post(f"{env['service']}/v1/models/{model}/predict", json=rows[i : i + 100],
                          headers=headers, timeout=30)  # fmt: skip
        assert resp.status_code == 200, resp.text
    time.sleep(2.5)  # the prediction log flushes every second
    return len(rows)


def features_frame(frame, model: str = MODEL):
    from cd4ml.core.spec import load_spec

    spec = load_spec(Path(_specs_dir()) / f"{model}.yaml")
    return features(spec, frame)


def _specs_dir() -> str:
    import os

    return os.environ["CD4ML_SPECS_DIR"]


def drift_events(model: str = MODEL) -> list[Any]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return list(
            session.scalars(
                select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                .where(AssetModel.name == f"{model}.drift_detected")
            )
        )  # fmt: skip


def monitor() -> tuple[dict[str, str], dict[str, Any]]:
    states = run_dag(f"{MODEL}__monitor", {"window_hours": None})
    from cd4ml.core.settings import get_settings
    from cd4ml.steps.monitor import history

    return states, history(get_settings(), MODEL)[-1]


def test_drift_monitor_closes_the_loop_with_guards(env: dict[str, Any]) -> None:
    write_spec(env["specs"], MODEL, estimator=LOGREG, drift__min_rows=200, drift__threshold=0.3,
               drift__cooldown_hours=6)  # fmt: skip
    land(env, MODEL, "week0.csv", generate_churn(2000, seed=50))
    assert run(env, MODEL)["__run__"] == "success"
    assert served(env, MODEL) == "1"

    # 1. Stable traffic: report saved, no event, nothing queued.
    send_traffic(env, generate_churn(400, seed=51, batch=1))
    states, check = monitor()
    assert states["__run__"] == "success" and states["emit_drift_detected"] == "skipped"
    assert check["decision"]["drift"] is False and check["window"]["rows"] == 400
    assert check["window"]["source"] == "prediction log"
    assert "<html" in Path(check["report_uri"].removeprefix("file://")).read_text()
    assert drift_events() == [] and queued_training_runs(MODEL) == 0

    # 2. Drifted traffic: exactly one drift_detected event, with why, queuing one training run.
    send_traffic(env, generate_churn(400, seed=52, batch=2, drift=1.0))
    states, check = monitor()
    drift_run_id = states["__run_id__"]
    assert states["emit_drift_detected"] == "success", check
    assert check["decision"]["trigger"] is True and check["share"] >= 0.3
    (event,) = drift_events()
    assert event.extra["share"] == check["share"] and event.extra["drifted_columns"]
    assert event.extra["report_uri"].endswith("report.html") and "threshold" in event.extra["reason"]
    assert queued_training_runs(MODEL) == 1
    report_dir = Path(check["report_uri"].removeprefix("file://")).parent
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["sample"]["rows"] <= 400 and summary["window"]["rows"] == 400
    assert (report_dir / "report.json").exists()

    # 3. Drifted again inside the cooldown: a report, but no second event.
    send_traffic(env, generate_churn(400, seed=53, batch=3, drift=1.0))
    states, check = monitor()
    assert states["emit_drift_detected"] == "skipped"
    assert check["decision"]["drift"] is True and "cooldown" in check["decision"]["reason"]
    assert len(drift_events()) == 1 and queued_training_runs(MODEL) == 1

    # 4. Too few rows to judge.
    send_traffic(env, generate_churn(50, seed=54, batch=4, drift=1.0))
    states, check = monitor()
    assert states["emit_drift_detected"] == "skipped"
    assert check["decision"]["reason"].startswith("not enough data: 50 rows")
    assert len(drift_events()) == 1

    # 5. The queued retrain goes through the normal gate once labelled data for the new world lands.
    land(env, MODEL, "week2-labelled.csv", generate_churn(2000, seed=55, batch=2, drift=1.0))
    states = run(env, MODEL)
    assert states["validate_batches"] == "success" and states["evaluate_against_champion"] == "success"
    v2 = versions(env, MODEL)[-1]
    assert v2.version == "2" and v2.tags["cd4ml.decision"] in {"promote", "reject"}
    assert registry.read_evidence(env["mlflow"], MODEL, v2).decision["champion_version"] == "1"

    # 6. What the plugin shows: the Evidently link of a check, the Models view, the metrics.
    assert_models_view_and_metrics(env, drift_run_id, v2)


def assert_models_view_and_metrics(env: dict[str, Any], drift_run_id: str, v2: Any) -> None:
    from airflow import plugins_manager
    from airflow.models.taskinstancekey import TaskInstanceKey

    from cd4ml.core.settings import get_settings
    from cd4ml.core.spec import load_spec
    from cd4ml.steps.monitor import history
    from cd4ml.ui.overview import _number, model_overview, prometheus_text, render_html

    links = {link.name: link for link in plugins_manager.get_global_operator_extra_links()}
    key = TaskInstanceKey(
        dag_id=f"{MODEL}__monitor", task_id="check_drift", run_id=drift_run_id, try_number=1
    )
    href = links["Evidently report"].get_link(None, ti_key=key)
    assert href.startswith(f"/cd4ml/files/{MODEL}/reports/drift/") and href.endswith("/report.html"), href
    assert (env["data"] / MODEL / href.removeprefix(f"/cd4ml/files/{MODEL}/")).is_file()

    settings = get_settings()
    overview = model_overview(load_spec(Path(_specs_dir()) / f"{MODEL}.yaml"), settings)
    champion = "2" if v2.tags["cd4ml.decision"] == "promote" else "1"
    assert overview.champion is not None and overview.champion.version == champion
    assert [v.version for v in overview.versions] == ["2", "1"]
    assert overview.versions[0].evidence["champion_version"] == "1"
    assert [round(c["share"], 6) for c in overview.drift] == [
        round(c["share"], 6) for c in history(settings, MODEL)
    ]
    assert sum(bool(c["decision"]["trigger"]) for c in overview.drift) == 1
    assert {"promoted", "deployed"} <= {e.what for e in overview.events}
    # The deployment is an event of the model's append-only history, with who and when.
    logged = registry.events(env["mlflow"], MODEL)
    deployed = [e for e in logged if e.kind == "deployment" and e.outcome == "deployed"]
    assert deployed and all(e.who and e.when for e in deployed)
    assert overview.files["accepted"] == 2 and overview.files["waiting"] == 0

    page = render_html([overview], settings, "http://mlflow.example", [])
    assert f"version {champion}</b>" in page and "aria-label='drift share over time'" in page
    assert page.count("<circle") == len(overview.drift)
    assert f"href='files/{MODEL}/reports/drift/" in page

    text = prometheus_text([overview])
    assert f'cd4ml_champion_version{{model="{MODEL}"}} {champion}' in text
    assert f'cd4ml_drift_checks_total{{model="{MODEL}",retrain="true"}} 1' in text
    assert f'cd4ml_files{{model="{MODEL}",state="accepted"}} 2' in text
    last_share = overview.drift[-1]["share"]
    assert f'cd4ml_drift_share{{model="{MODEL}"}} {_number(last_share)}' in text


def test_a_model_without_a_champion_is_not_an_error(env: dict[str, Any]) -> None:
    write_spec(env["specs"], "newborn", estimator=LOGREG)
    states = run_dag("newborn__monitor", {"window_hours": None})
    assert states["__run__"] == "success"
    assert states["check_drift"] == "success" and states["emit_drift_detected"] == "skipped"
