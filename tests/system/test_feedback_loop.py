"""The production loop closed, on real parts: served traffic -> labels posted for it -> the champion's
live metric drops -> the alert fires in a real Prometheus -> a retrain runs on the feedback data ->
the new champion is served.

Real: the session's `cd4ml serve` process and MLflow server (tests/conftest.py), Debian's Prometheus
running the shipped rules (every `for:` set to 0 s, scraping every second), the plugin's
`/cd4ml/metrics` app (tests/system/test_alerts.py's fixture), the monitor's and the pipeline's own
step functions -- the ones `<model>__monitor` and `<model>__train` call (`check_drift`,
`land_feedback_batch`, `run_training`). What Airflow adds on top (the schedule, the
`drift_detected` asset starting the training DAG) is covered by tests/integration/test_monitor_dag.py
and the embedded-stack tests; here the test calls the steps in the order those DAGs do.

The world changes under the champion: after it is trained, customers churn by another rule
(`generate_churn(concept_drift=True)`) while the features keep their distribution, so feature drift
sees nothing and only ground truth can tell.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from cd4ml.core.paths import ModelPaths
from cd4ml.data import landing
from cd4ml.steps import monitor
from cd4ml.steps.feedback_batch import land_feedback_batch
from cd4ml.steps.pipeline import run_training
from cd4ml_dev.datagen import generate_churn
from tests.helpers import wait_for
from tests.system.test_alerts import pipeline_metrics as pipeline_metrics
from tests.system.test_alerts import query, running_prometheus, served_champion

pytestmark = pytest.mark.system
MODEL = "looped"
SERVED = 1600  # rows served and labelled in the changed world; the champion saw 500 of the old one


@pytest.fixture(scope="module")
def champion(
    prediction_service: dict[str, str], mlflow_server: str, shared_specs: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    with served_champion(
        MODEL, rows=500, seed=91, service=prediction_service, mlflow_server=mlflow_server,
        shared_specs=shared_specs, factory=tmp_path_factory,
        drift__min_rows=100, drift__performance_drop=0.05, feedback={"to_training": True, "min_rows": 500},
    ) as served:  # fmt: skip
        yield served


@pytest.fixture(scope="module")
def prometheus(
    champion: dict[str, Any], pipeline_metrics: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    with running_prometheus(tmp_path_factory.mktemp("prometheus-loop"), champion["url"], pipeline_metrics,
                            alertmanager=None) as url:  # fmt: skip
        yield url


def serve(url: str, frame: Any) -> list[dict[str, Any]]:
    """Send the rows in requests of 100; return (request_id, row, outcome) for each served row."""
    spec_rows = json.loads(frame.drop(columns=["churned"]).to_json(orient="records"))
    outcomes = frame["churned"].tolist()
    labels = []
    for start_at in range(0, len(spec_rows), 100):
        resp = httpx.post(
            f"{url}/v1/models/{MODEL}/predict", json=spec_rows[start_at : start_at + 100], timeout=30
        )
        assert resp.status_code == 200, resp.text
        request_id = resp.json()["request_id"]
        labels += [{"request_id": request_id, "row": i, "outcome": outcomes[start_at + i]}
                   for i in range(len(spec_rows[start_at : start_at + 100]))]  # fmt: skip
    return labels


def alerts(prom: str, name: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{prom}/api/v1/alerts", timeout=10)
    resp.raise_for_status()
    return [a for a in resp.json()["data"]["alerts"]
            if a["labels"]["alertname"] == name and a["labels"].get("model") == MODEL]  # fmt: skip


def written(url: str) -> float:
    line = next(x for x in httpx.get(f"{url}/metrics").text.splitlines()
                if x.startswith("cd4ml_prediction_log_written_rows "))  # fmt: skip
    return float(line.split()[1])


def test_labels_for_served_traffic_drop_the_live_metric_fire_the_alert_and_retrain_a_new_champion(
    champion: dict[str, Any], prometheus: str
) -> None:
    spec, settings, url = champion["spec"], champion["settings"], champion["url"]
    wait_for(lambda: query(prometheus, f'cd4ml_champion_version{{model="{MODEL}"}} > 0'), "champion scraped")
    assert alerts(prometheus, "Cd4mlLiveMetricDrop") == []

    # 1. Served traffic from a world that has changed under the champion (features as before).
    world = generate_churn(SERVED, seed=92, batch=3, concept_drift=True)
    before = written(url)
    labels = serve(url, world[[*spec.feature_names, "churned"]])
    wait_for(lambda: written(url) >= before + SERVED, "prediction log flushed")

    # 2. Ground truth sent back by request id, in posts of up to CD4ML_SERVICE_MAX_ROWS (200 here);
    # the first part twice, which is harmless.
    for part in [labels[:200]] + [labels[i : i + 200] for i in range(0, len(labels), 200)]:
        resp = httpx.post(f"{url}/v1/models/{MODEL}/feedback", json=part, timeout=60)
        assert resp.status_code == 200, resp.text
    unknown = httpx.post(
        f"{url}/v1/models/{MODEL}/feedback", json={"request_id": "never-served", "outcome": 1}
    )
    assert unknown.status_code in (404, 422) and "never-served" in unknown.text, unknown.text

    # 3. The monitor's check: no feature drift, but the live metric dropped beyond the spec's limit.
    check = monitor.check_drift(spec, settings, run_id="loop_check", window_end=datetime.now(UTC).isoformat())
    live = check["live"]
    assert live["labelled_rows"] == live["served_rows"] == SERVED and live["coverage"] == pytest.approx(
        1.0
    ), live
    assert live["significant"] and live["drop"] > 0.05, live
    assert check["decision"]["trigger"] is True, check["decision"]

    # 4. The alert fires in the real Prometheus, from /cd4ml/metrics.
    def firing_now() -> list[dict[str, Any]]:
        return [a for a in alerts(prometheus, "Cd4mlLiveMetricDrop") if a["state"] == "firing"]

    firing = wait_for(firing_now, "live metric drop alert firing")
    assert firing[0]["labels"]["severity"] == "critical"

    # 5. The labelled traffic becomes a batch in landing/, and the retrain runs on it.
    landed = land_feedback_batch(spec, settings, now=datetime.now(UTC))
    assert landed["landed"] and landed["rows"] == SERVED, landed
    result = run_training(spec, settings, run_id="loop_2", run_time=datetime.now(UTC).isoformat(),
                          trigger=check["decision"]["reason"])  # fmt: skip
    accepted = [f.name for f in landing.list_accepted(ModelPaths.for_model(settings, MODEL))]
    assert Path(landed["file"]).name in accepted, (landed, accepted)
    assert result["promoted"] and result["deployment"]["deployed"], result

    # 6. The new champion is what the service answers with.
    new = str(result["version"])
    assert new != str(champion["version"])
    wait_for(
        lambda: httpx.get(f"{url}/v1/models/{MODEL}").json().get("version") == new, "new champion served"
    )
    row = json.loads(world[spec.feature_names].head(1).to_json(orient="records"))
    resp = httpx.post(f"{url}/v1/models/{MODEL}/predict", json=row, timeout=30)
    assert resp.status_code == 200 and resp.headers["x-model-version"] == new, resp.text
