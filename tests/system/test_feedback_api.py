"""Ground truth over real HTTP: `POST /v1/models/<model>/feedback` on the real service process
(`cd4ml serve`), a champion trained by the pipeline and registered in a real MLflow server, labels
checked against the prediction log the service writes, and joined by `labelled_predictions`.

The module runs its own service instance (its own data root), so a test can stop and restart it
and find old request ids on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cd4ml.core.paths import ModelPaths
from cd4ml.core.settings import get_settings
from cd4ml.core.spec import load_spec
from cd4ml.data.feedback import labelled_predictions, latest_labels
from cd4ml.ml.training import features
from cd4ml.steps.pipeline import run_training
from cd4ml_dev.datagen import generate_churn, write_batch
from tests.conftest import free_port, start_service
from tests.helpers import LOGREG, wait_for, write_spec

pytestmark = pytest.mark.system
MODEL = "fb"
MAX_ROWS = 25
MAX_BODY = 40_000


class Service:
    """The service process for this module; `restart` stops it cleanly and starts another one on
    the same data root and port."""

    def __init__(self, env: dict[str, str], home: Path) -> None:
        self.env, self.home, self.port = env, home, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        self.proc = start_service(self.env, self.port, self.home / f"service-{self.port}.log")
        return self.proc

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
        wait_for(lambda: httpx.get(f"{self.url}/v1/models/{MODEL}").status_code == 200, timeout=120)


@pytest.fixture(scope="module")
def service(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("feedback")
    specs = home / "specs"
    specs.mkdir()
    write_spec(specs, MODEL, estimator=LOGREG)
    env = {**os.environ, "CD4ML_HOME": str(home / "service"), "CD4ML_SPECS_DIR": str(specs),
           "MLFLOW_TRACKING_URI": mlflow_server, "CD4ML_SERVICE_POLL_SECONDS": "0.5",
           "CD4ML_SERVICE_MAX_ROWS": str(MAX_ROWS),
           "CD4ML_SERVICE_MAX_BODY_BYTES": str(MAX_BODY)}  # fmt: skip
    svc = Service(env, home)
    # As test_protocols: the service starts while the model trains, and picks up the champion itself.
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(svc.start)
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("CD4ML_SPECS_DIR", str(specs))
                mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
                settings = get_settings()
                spec = load_spec(specs / f"{MODEL}.yaml")
                write_batch(generate_churn(1500, seed=51), settings.model_dir(MODEL) / "landing", "w0.csv")
                result = run_training(
                    spec, settings, run_id="fb_1", run_time="2026-01-01T00:00:00+00:00", deploy=False
                )
        finally:
            starting.result()
    try:
        assert result["promoted"], result
        meta = wait_for(
            lambda: (r := httpx.get(f"{svc.url}/v1/models/{MODEL}")).status_code == 200 and r.json()
        )
        rows = features(spec, generate_churn(40, seed=52, batch=3)).reset_index(drop=True)
        paths = ModelPaths.in_data_dir(home / "service" / "data", MODEL)
        yield {"svc": svc, "rows": json.loads(rows.to_json(orient="records")), "version": meta["version"],
               "paths": paths}  # fmt: skip
    finally:
        svc.stop()


def url(service: dict[str, Any], model: str = MODEL) -> str:
    return f"{service['svc'].url}/v1/models/{model}/feedback"


def predict(service: dict[str, Any], rows: list[dict[str, Any]], request_id: str | None = None) -> str:
    headers = {"x-request-id": request_id} if request_id else {}
    r = httpx.post(f"{service['svc'].url}/v1/models/{MODEL}/predict", json=rows, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def counter(service: dict[str, Any], outcome: str) -> float:
    text = httpx.get(f"{service['svc'].url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cd4ml_feedback_labels_total" and sample.labels == {
                "model": MODEL,
                "outcome": outcome,
            }:
                return float(sample.value)
    return 0.0


def joined(service: dict[str, Any], request_id: str, count: int) -> Any:
    """The labelled rows of one request once the prediction log has flushed it."""

    def ready() -> Any:
        out = labelled_predictions(service["paths"])
        out = out[out["request_id"] == request_id]
        return [out] if len(out) == count else None  # a list: wait_for tests truthiness

    return wait_for(ready, timeout=30)[0].sort_values("row")


def test_one_label_for_a_served_prediction_joins_it(service: dict[str, Any]) -> None:
    rid = predict(service, service["rows"][:1])
    before = counter(service, "accepted")
    r = httpx.post(url(service), timeout=60, json={"request_id": rid, "outcome": 1})
    assert r.status_code == 200, r.text
    assert r.json() == {"model": MODEL, "labels": 1, "accepted": 1, "duplicates": 0}
    out = joined(service, rid, 1)
    assert out["outcome"].tolist() == [1] and out["model_version"].tolist() == [service["version"]]
    assert out["tenure_months"].tolist() == [service["rows"][0]["tenure_months"]]
    assert counter(service, "accepted") == before + 1


def test_a_batch_names_rows_inside_a_multi_row_request(service: dict[str, Any]) -> None:
    rows = service["rows"][1:6]
    rid = predict(service, rows)
    labels = [{"request_id": rid, "row": i, "outcome": i % 2} for i in range(5)]
    r = httpx.post(url(service), timeout=60, json={"feedback": labels[:3]})
    assert r.status_code == 200 and r.json()["accepted"] == 3
    r = httpx.post(url(service), timeout=60, json=labels[3:])  # a plain list works as well
    assert r.status_code == 200 and r.json()["accepted"] == 2
    out = joined(service, rid, 5)
    assert out["row"].tolist() == [0, 1, 2, 3, 4] and out["outcome"].tolist() == [0, 1, 0, 1, 0]
    assert out["tenure_months"].tolist() == [row["tenure_months"] for row in rows]


def test_sending_the_same_label_twice_is_harmless(service: dict[str, Any]) -> None:
    rid = predict(service, service["rows"][6:8])
    body = [{"request_id": rid, "outcome": "yes"}, {"request_id": rid, "row": 1, "outcome": "no"}]
    dup_before = counter(service, "duplicate")
    assert httpx.post(url(service), timeout=60, json=body).json()["accepted"] == 2
    again = httpx.post(url(service), timeout=60, json=body)
    assert again.status_code == 200 and again.json() == {
        "model": MODEL,
        "labels": 2,
        "accepted": 0,
        "duplicates": 2,
    }
    assert counter(service, "duplicate") == dup_before + 2
    # A corrected outcome replaces the earlier one.
    assert (
        httpx.post(url(service), timeout=60, json={"request_id": rid, "outcome": "no"}).json()["accepted"]
        == 1
    )
    assert joined(service, rid, 2)["outcome"].tolist() == ["no", "no"]


def test_unknown_request_ids_are_named_and_the_batch_is_not_stored(service: dict[str, Any]) -> None:
    rid = predict(service, service["rows"][8:9])
    stored = len(latest_labels(service["paths"]))
    unknown_before = counter(service, "unknown")
    body = [{"request_id": "never-1", "outcome": 1}, {"request_id": rid, "outcome": 1},
            {"request_id": "never-2", "outcome": 0}]  # fmt: skip
    r = httpx.post(url(service), timeout=60, json=body)
    assert r.status_code == 422
    assert r.json()["unknown_request_ids"] == ["never-1", "never-2"]
    assert {(p["field"], p["row"]) for p in r.json()["problems"]} == {("request_id", 0), ("request_id", 2)}
    assert "never-1" in r.text and "never-2" in r.text
    assert len(latest_labels(service["paths"])) == stored  # not even the known one
    assert counter(service, "unknown") == unknown_before + 2


@pytest.mark.parametrize(
    ("body", "field", "status"),
    [
        ({"request_id": "r", "outcome": 1, "outcom": 2}, "outcom", 422),
        ({"request_id": "r"}, "outcome", 422),
        ({"outcome": 1}, "request_id", 422),
        ({"request_id": 17, "outcome": 1}, "request_id", 422),
        ({"request_id": "", "outcome": 1}, "request_id", 422),
        ({"request_id": "r", "outcome": None}, "outcome", 422),
        ({"request_id": "r", "outcome": {"a": 1}}, "outcome", 422),
        ({"request_id": "r", "outcome": 1, "row": -1}, "row", 422),
        ({"request_id": "r", "outcome": 1, "row": "2"}, "row", 422),
        ({"request_id": "r", "outcome": 1, "row": True}, "row", 422),
        ({"feedback": {"request_id": "r"}}, "feedback", 422),
        ({"feedback": []}, "feedback", 422),
        ("just text", "body", 422),
        ([1, 2], "feedback", 422),
    ],
)
def test_bad_fields_get_a_4xx_naming_the_field(
    service: dict[str, Any], body: Any, field: str, status: int
) -> None:
    r = httpx.post(url(service), timeout=60, json=body)
    assert r.status_code == status, r.text
    assert field in {p["field"] for p in r.json()["problems"]}, r.json()


def test_not_json_and_a_row_beyond_the_request_are_named(service: dict[str, Any]) -> None:
    r = httpx.post(url(service), content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["problems"][0]["field"] == "body"
    rid = predict(service, service["rows"][9:11])
    r = httpx.post(url(service), timeout=60, json={"request_id": rid, "row": 2, "outcome": 1})
    assert r.status_code == 422
    assert r.json()["problems"] == [
        {"field": "row", "problem": f"request '{rid}' had 2 row(s); row must be below that", "row": 0}
    ]


def test_size_limits_work_as_on_predict(service: dict[str, Any]) -> None:
    rid = predict(service, service["rows"][11:12])
    too_many = [{"request_id": rid, "outcome": 1}] * (MAX_ROWS + 1)
    r = httpx.post(url(service), timeout=60, json=too_many)
    assert r.status_code == 413 and r.json()["problems"][0]["field"] == "feedback"
    assert "CD4ML_SERVICE_MAX_ROWS" in r.json()["problems"][0]["problem"]
    huge = {"request_id": rid, "outcome": "x" * (MAX_BODY + 10)}
    r = httpx.post(url(service), timeout=60, json=huge)
    assert r.status_code == 413 and r.json()["problems"] == [{"field": "body", "problem": "too large"}]

    def chunks() -> Iterator[bytes]:  # no content-length: the limit applies while reading
        yield b'{"request_id": "' + rid.encode() + b'", "outcome": "'
        yield b"y" * (MAX_BODY + 10)
        yield b'"}'

    r = httpx.post(url(service), content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_unknown_model_is_404_as_on_predict(service: dict[str, Any]) -> None:
    r = httpx.post(url(service, "no_such_model"), json={"request_id": "r", "outcome": 1})
    predicted = httpx.post(f"{service['svc'].url}/v1/models/no_such_model/predict", json=service["rows"][:1])
    assert r.status_code == predicted.status_code == 404
    assert (
        r.json()["problems"]
        == predicted.json()["problems"]
        == [{"field": "model", "problem": "'no_such_model' is not served here"}]
    )


def test_ids_served_before_a_restart_are_found_on_disk(service: dict[str, Any]) -> None:
    old = predict(service, service["rows"][12:15], request_id="before-restart")
    service["svc"].restart()  # a clean stop flushes the prediction log; the new process has no memory of it
    r = httpx.post(url(service), timeout=60, json={"request_id": old, "row": 2, "outcome": 0})
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    r = httpx.post(url(service), timeout=60, json={"request_id": old, "row": 3, "outcome": 0})
    assert r.status_code == 422 and r.json()["problems"][0]["field"] == "row"
    assert httpx.post(url(service), timeout=60, json={"request_id": "never", "outcome": 0}).status_code == 422
    out = joined(service, old, 1)
    assert out[["row", "outcome"]].values.tolist() == [[2, 0]]
    assert out["tenure_months"].tolist() == [service["rows"][14]["tenure_months"]]
