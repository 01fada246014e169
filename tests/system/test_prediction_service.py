"""The prediction service over real HTTP, against a real MLflow server and registry.

The model is trained and registered by the same pipeline steps the DAG runs; the service is the
real uvicorn process (`cd4ml serve`) polling MLflow for `champion`.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
from mlflow import MlflowClient

from cd4ml import registry
from cd4ml.core.settings import get_settings
from cd4ml.core.spec import load_spec
from cd4ml.ml.training import features
from cd4ml.steps.pipeline import run_training
from cd4ml_dev.datagen import generate_churn, write_batch
from tests.conftest import SERVICE_MAX_ROWS, free_port, start_service
from tests.helpers import LOGREG, make_champion, wait_for, write_spec

pytestmark = pytest.mark.system
MODEL = "svc"


@pytest.fixture(scope="module")
def served_model(
    prediction_service: dict[str, str], mlflow_server: str, shared_specs: Path
) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CD4ML_SPECS_DIR", str(shared_specs))
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.setenv("CD4ML_SERVICE_URL", prediction_service["url"])
        mp.setenv("CD4ML_SERVICE_ADMIN_TOKEN", prediction_service["token"])
        write_spec(shared_specs, MODEL, estimator=LOGREG)
        settings = get_settings()
        spec = load_spec(shared_specs / f"{MODEL}.yaml")
        write_batch(generate_churn(1500, seed=31), settings.model_dir(MODEL) / "landing", "w0.csv")
        result = run_training(spec, settings, run_id="svc_1", run_time="2026-01-01T00:00:00+00:00")
        assert result["promoted"] and result["deployment"]["deployed"], result
        url = prediction_service["url"]
        wait_for(lambda: httpx.get(f"{url}/v1/models/{MODEL}").status_code == 200)
        holdout = features(spec, generate_churn(100, seed=32, batch=3))
        return {"url": url, "token": prediction_service["token"], "spec": spec, "settings": settings,
                "rows": holdout, "mlflow": mlflow_server}  # fmt: skip


def offline(ctx: dict[str, Any], version: str) -> list[Any]:
    model = registry.load_model(ctx["mlflow"], f"models:/{MODEL}/{version}")
    return model.predict(ctx["rows"]).tolist()


def test_predictions_equal_the_registered_models_offline_predictions(served_model: dict[str, Any]) -> None:
    rows = served_model["rows"]
    expected = offline(served_model, "1")
    split = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}
    records = json.loads(rows.to_json(orient="records"))
    for body in (split, {"dataframe_records": records}, records):
        resp = httpx.post(f"{served_model['url']}/v1/models/{MODEL}/predict", json=body)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert out["predictions"] == expected
        assert out["version"] == "1" and resp.headers["x-model-version"] == "1"
        assert out["classes"] == [0, 1] and len(out["probabilities"]) == len(rows)


def test_metadata_health_and_metrics(served_model: dict[str, Any]) -> None:
    url = served_model["url"]
    meta = httpx.get(f"{url}/v1/models/{MODEL}").json()
    mv = MlflowClient(served_model["mlflow"]).get_model_version(MODEL, "1")
    assert meta["version"] == "1" and meta["run_id"] == mv.run_id
    assert meta["data_fingerprint"] == mv.tags["cd4ml.data_fingerprint"]
    assert meta["champion_since"] == "2026-01-01T00:00:00+00:00"
    assert set(meta["inputs"]["categorical"]) == {"contract", "plan", "region"}
    assert httpx.get(f"{url}/health/live").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/health/ready").json()
    assert ready["serving"][MODEL] == "1"
    text = httpx.get(f"{url}/metrics").text
    assert f'cd4ml_serving_version{{model="{MODEL}"}}' in text
    assert "cd4ml_request_seconds_bucket" in text and "cd4ml_model_reloads_total" in text


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"dataframe_records": [{"age": 1}]}, 422, "tenure_months"),
        ([{"tenure_months": "3", "monthly_charges": 1.0, "support_calls": 0, "age": 30,
           "contract": "one-year", "plan": "basic", "region": "north"}], 422, "tenure_months"),
        ([{"tenure_months": 3, "monthly_charges": 1.0, "support_calls": 0, "age": 30,
           "contract": ["one-year"], "plan": "basic", "region": "north"}], 422, "contract"),
        ({"dataframe_split": {"columns": ["age"], "data": [[1, 2]]}}, 422, "dataframe_split.data"),
        ({"inputs": [[1.0]]}, 422, "inputs"),
        ([], 422, "data"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_4xx_naming_the_field(
    served_model: dict[str, Any], body, status: int, field: str
) -> None:
    resp = httpx.post(f"{served_model['url']}/v1/models/{MODEL}/predict", json=body)
    assert resp.status_code == status, resp.text
    assert field in {p["field"] for p in resp.json()["problems"]}


def test_unknown_model_invalid_json_and_oversized_requests(served_model: dict[str, Any]) -> None:
    url = served_model["url"]
    resp = httpx.post(f"{url}/v1/models/nope/predict", json=[{}])
    assert resp.status_code == 404 and resp.json()["problems"][0]["field"] == "model"
    resp = httpx.post(
        f"{url}/v1/models/{MODEL}/predict", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400 and resp.json()["problems"][0]["field"] == "body"
    rows = json.loads(served_model["rows"].head(1).to_json(orient="records")) * (SERVICE_MAX_ROWS + 1)
    resp = httpx.post(f"{url}/v1/models/{MODEL}/predict", json=rows)
    assert resp.status_code == 413 and resp.json()["problems"][0]["field"] == "data"
    huge = b"[" + b" " * (21 * 1024 * 1024) + b"]"
    resp = httpx.post(f"{url}/v1/models/{MODEL}/predict", content=huge, timeout=30)
    assert resp.status_code == 413 and resp.json()["problems"][0]["field"] == "body"


def test_admin_reload_requires_the_token(served_model: dict[str, Any]) -> None:
    url = served_model["url"]
    assert httpx.post(f"{url}/admin/reload").status_code == 401
    assert httpx.post(f"{url}/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = httpx.post(
        f"{url}/admin/reload", headers={"Authorization": f"Bearer {served_model['token']}"}, timeout=60
    )
    assert ok.status_code == 200 and ok.json()["serving"][MODEL] == "1"


def _register_unsafe_version(tracking_uri: str) -> str:
    """A version serialized with cloudpickle: loading it could run arbitrary code, so it is refused."""
    from sklearn.linear_model import LogisticRegression

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(MODEL)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            LogisticRegression().fit([[0.0], [1.0]], [0, 1]), name="model", serialization_format="cloudpickle"
        )
    return str(mlflow.register_model(info.model_uri, MODEL).version)


def test_champion_swap_under_load_loses_no_request_and_broken_versions_are_refused(
    served_model: dict[str, Any],
) -> None:
    url, spec, settings = served_model["url"], served_model["spec"], served_model["settings"]
    client = MlflowClient(served_model["mlflow"])
    # A second, different version: trained on more data (forced, so the gate's verdict does not matter).
    write_batch(generate_churn(1500, seed=33, batch=1), settings.model_dir(MODEL) / "landing", "w1.csv")
    run_training(
        spec, settings, run_id="svc_2", run_time="2026-01-02T00:00:00+00:00", force=True, deploy=False
    )
    v2 = max(int(v.version) for v in client.search_model_versions(f"name = '{MODEL}'"))
    make_champion(client, MODEL, "1")  # whatever the gate said: start from v1
    # The reload waits for any load already in flight, so nothing stale can swap in after this.
    httpx.post(
        f"{url}/admin/reload", headers={"Authorization": f"Bearer {served_model['token']}"}, timeout=60
    )
    wait_for(lambda: httpx.get(f"{url}/v1/models/{MODEL}").json()["version"] == "1", timeout=30)
    body = json.loads(served_model["rows"].head(5).to_json(orient="records"))

    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                r = http.post(f"{url}/v1/models/{MODEL}/predict", json=body)
                results.append((r.status_code, r.headers.get("x-model-version", "")))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    make_champion(client, MODEL, v2)
    wait_for(lambda: httpx.get(f"{url}/v1/models/{MODEL}").json()["version"] == str(v2), timeout=30)
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    codes = {c for c, _ in results}
    versions = [v for _, v in results]
    assert codes == {200}, f"{len([c for c, _ in results if c != 200])} failed of {len(results)}"
    assert len(results) > 50
    assert versions[0] == "1" and versions[-1] == str(v2)
    first_new = versions.index(str(v2))
    assert set(versions[first_new:]) == {str(v2)} or versions[first_new:].count("1") <= 4  # in-flight only
    metrics = httpx.get(f"{url}/metrics").text
    assert f'cd4ml_serving_version{{model="{MODEL}"}} {float(v2)}' in metrics
    assert f'cd4ml_model_reloads_total{{model="{MODEL}",outcome="loaded",version="{v2}"}}' in metrics

    # A version that must not be loaded is refused; the current one keeps serving.
    bad = _register_unsafe_version(served_model["mlflow"])
    make_champion(client, MODEL, bad)
    httpx.post(
        f"{url}/admin/reload", headers={"Authorization": f"Bearer {served_model['token']}"}, timeout=60
    )
    meta = httpx.get(f"{url}/v1/models/{MODEL}").json()
    assert meta["version"] == str(v2)
    assert "only 'skops' is loaded" in meta["refused_versions"][bad]
    resp = httpx.post(f"{url}/v1/models/{MODEL}/predict", json=body)
    assert resp.status_code == 200 and resp.json()["version"] == str(v2)
    assert f'outcome="refused",version="{bad}"' in httpx.get(f"{url}/metrics").text
    make_champion(client, MODEL, v2)


def test_prediction_log_keeps_every_request_through_a_clean_shutdown(
    served_model: dict[str, Any], mlflow_server: str, shared_specs: Path, tmp_path: Path
) -> None:
    """A private service instance so it can be stopped: every row predicted is on disk afterwards."""
    port = free_port()
    env = {**os.environ, "CD4ML_HOME": str(tmp_path), "CD4ML_SPECS_DIR": str(shared_specs),
           "MLFLOW_TRACKING_URI": mlflow_server}  # fmt: skip
    proc = start_service(env, port, tmp_path / "service.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/v1/models/{MODEL}").status_code == 200)
        body = json.loads(served_model["rows"].head(7).to_json(orient="records"))
        ids = []
        for i in range(40):
            r = httpx.post(
                f"{url}/v1/models/{MODEL}/predict", json=body, headers={"x-request-id": f"req-{i}"}
            )
            assert r.status_code == 200
            ids.append(r.json()["request_id"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    from cd4ml.serving.predlog import read_predictions

    logged = read_predictions(tmp_path / "data", MODEL)
    assert len(logged) == 40 * 7
    assert sorted(set(logged["request_id"])) == sorted(ids)
    assert {"tenure_months", "contract", "prediction", "model_version", "ts"} <= set(logged.columns)
    assert logged["ts"].dt.tz is not None
