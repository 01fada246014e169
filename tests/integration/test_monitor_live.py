"""`<model>__monitor` with dag.test() closing the loop with ground truth: served traffic, a late label
file saying the world turned against the model, and the monitor taking the file in, measuring the
live metric and retraining on its significant drop, with the evidence in the event, MLflow, the
Models view and the metrics; and the wiring of label intake and feedback-as-training-data.

Apart from tests/integration/test_monitor_dag.py so that pytest-xdist (`--dist loadfile`) runs the
two slow dag.test() stories on two workers at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cd4ml_dev.datagen import generate_churn
from tests.helpers import LOGREG, soak_only, write_spec
from tests.integration.dagtools import land, queued_training_runs, run, run_dag, served, versions
from tests.integration.test_monitor_dag import _specs_dir, drift_events, send_traffic

# make test covers the loop with the steps against real servers (tests/system/test_feedback_loop.py) and
# late label files in tests/unit; this is the same story through dag.test(), ~95 s: make soak.
pytestmark = [pytest.mark.integration, soak_only]


def test_a_significant_live_drop_on_late_labels_retrains_with_the_evidence(env: dict[str, Any]) -> None:
    from cd4ml.core.paths import ModelPaths
    from cd4ml.core.settings import get_settings
    from cd4ml.core.spec import load_spec
    from cd4ml.steps.monitor import history
    from cd4ml.ui.overview import model_overview, prometheus_text, render_html

    model = "judged"
    write_spec(env["specs"], model, estimator=LOGREG, drift__min_rows=200, drift__threshold=0.3,
               drift__performance_drop=0.05, drift__cooldown_hours=6, feedback__to_training=True)  # fmt: skip
    land(env, model, "week0.csv", generate_churn(2000, seed=60))
    assert run(env, model)["__run__"] == "success" and served(env, model) == "1"

    # Stable traffic (no feature drift), and no labels yet: nothing to judge, nothing triggered.
    traffic = generate_churn(400, seed=61, batch=1)
    send_traffic(env, traffic, model, request_prefix="judged")
    states, check = run_monitor(model)
    assert states["ingest_labels"] == "success" and states["emit_drift_detected"] == "skipped"
    assert states["land_feedback_batch"] == "success" and not landed_batches(env, model)
    assert check["live"]["value"] is None and check["live"]["served_rows"] == 400
    assert check["live"]["coverage"] == 0.0 and "no labels yet" in check["live"]["reason"]

    # The outcomes come back in a label file (ids as sent, outcomes as text): the opposite of what
    # the model learnt. The next check takes the file in and retrains on the drop.
    settings = get_settings()
    zone = ModelPaths.for_model(settings, model)
    zone.feedback_landing.mkdir(parents=True, exist_ok=True)
    labels = pd.DataFrame({
        "request_id": [f"judged-{i - i % 100}" for i in range(400)],
        "row": [i % 100 for i in range(400)],
        "outcome": [str(1 - v) for v in traffic["churned"]],
    })  # fmt: skip
    labels.to_csv(zone.feedback_landing / "outcomes-week1.csv", index=False)
    states, check = run_monitor(model)
    assert states["ingest_labels"] == "success" and states["emit_drift_detected"] == "success", check
    live = check["live"]
    assert live["labelled_rows"] == 400 and live["coverage"] == 1.0 and live["version"] == "1"
    assert live["significant"] and live["high"] < live["baseline"] - 0.05
    assert check["share"] < 0.3 and check["decision"]["trigger"]  # the drop alone triggered
    assert "live roc_auc" in check["decision"]["reason"]
    assert (zone.feedback_landing / "outcomes-week1.csv").exists() is False
    # feedback.to_training: the labelled traffic is landed as training data, once.
    (batch,) = landed_batches(env, model)
    assert len(pd.read_parquet(batch)) == 400

    (event,) = drift_events(model)
    evidence = event.extra["live_performance"]
    assert evidence["value"] == live["value"] and evidence["baseline"] == live["baseline"]
    assert (evidence["low"], evidence["high"]) == (live["low"], live["high"])
    assert evidence["labelled_rows"] == 400 and evidence["coverage"] == 1.0 and evidence["significant"]
    assert queued_training_runs(model) == 1

    # The monitoring run in MLflow carries the live figures.
    experiment = env["mlflow"].get_experiment_by_name(f"{model}-monitoring")
    (latest,) = env["mlflow"].search_runs([experiment.experiment_id], order_by=["start_time DESC"],
                                          max_results=1)  # fmt: skip
    metrics = latest.data.metrics
    assert metrics["live_metric"] == pytest.approx(live["value"])
    assert (metrics["live_metric_low"], metrics["live_metric_high"]) == pytest.approx(
        (live["low"], live["high"])
    )
    assert metrics["label_coverage"] == 1.0 and metrics["labelled_rows"] == 400
    assert latest.data.tags["cd4ml.live_metric"] == "roc_auc"

    # The Models view charts it; /cd4ml/metrics exports it.
    assert [bool((c.get("live") or {}).get("significant")) for c in history(settings, model)] == [False, True]
    overview = model_overview(load_spec(Path(_specs_dir()) / f"{model}.yaml"), settings)
    page = render_html([overview], settings, "http://mlflow.example", [])
    assert "aria-label='live roc_auc over time'" in page and "(significant)" in page
    text = prometheus_text([overview])
    assert f'cd4ml_live_metric_drop_significant{{model="{model}"}} 1.0' in text
    assert f'cd4ml_live_label_coverage{{model="{model}"}} 1.0' in text
    assert f'cd4ml_live_metric{{metric="roc_auc",model="{model}"}}' in text

    # The retrain the drop asked for trains on the feedback batch like on any landed file.
    states = run(env, model)
    assert states["validate_batches"] == "success" and states["train_challenger"] == "success", states
    assert not landed_batches(env, model) and versions(env, model)[-1].version == "2"


def landed_batches(env: dict[str, Any], model: str) -> list[Path]:
    return sorted((env["data"] / model / "landing").glob("feedback__*"))


def test_the_monitor_takes_labels_in_first_and_lands_feedback_only_when_the_spec_opts_in(
    env: dict[str, Any],
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    write_spec(env["specs"], "optin", estimator=LOGREG, feedback__to_training=True)
    write_spec(env["specs"], "optout", estimator=LOGREG)
    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags"))
    wiring = {
        name: {t.task_id: sorted(t.downstream_task_ids) for t in bag.dags[f"{name}__monitor"].tasks}
        for name in ("optin", "optout")
    }
    assert wiring["optout"] == {
        "ingest_labels": ["check_drift"],
        "check_drift": ["emit_drift_detected", "should_retrain"],
        "should_retrain": ["emit_drift_detected"],
        "emit_drift_detected": [],
    }
    assert wiring["optin"] == {**wiring["optout"], "ingest_labels": ["check_drift", "land_feedback_batch"],
                               "land_feedback_batch": []}  # fmt: skip
    assert "turns labelled traffic into a training batch" in bag.dags["optin__monitor"].doc_md


def run_monitor(model: str) -> tuple[dict[str, str], dict[str, Any]]:
    from cd4ml.core.settings import get_settings
    from cd4ml.steps.monitor import history

    states = run_dag(f"{model}__monitor", {"window_hours": None})
    assert states["__run__"] == "success", states
    return states, history(get_settings(), model)[-1]
