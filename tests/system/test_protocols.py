"""The prediction service's other protocols, spoken by real clients from their own packages:
MLflow's `ScoringServerClient` on `/invocations` and Triton's `tritonclient.http` on the Open
Inference Protocol v2, against the real service process and a champion trained by the pipeline.

The module runs its own service instance on its own specs dir, so it serves exactly one model
(what `/invocations` without a model name needs) until a test adds a second spec; one model is
trained for the whole module.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from mlflow.deployments import PredictionsResponse
from mlflow.pyfunc.scoring_server.client import ScoringServerClient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient import http as tritonhttp
from tritonclient.utils import InferenceServerException

from cd4ml import registry
from cd4ml.core.settings import get_settings
from cd4ml.core.spec import load_spec
from cd4ml.ml.training import features
from cd4ml.serving.predlog import read_predictions
from cd4ml.steps.pipeline import run_training
from cd4ml_dev.datagen import generate_churn, write_batch
from tests.conftest import SERVICE_TOKEN, free_port, start_service
from tests.helpers import LOGREG, wait_for, write_spec

pytestmark = pytest.mark.system
MODEL = "proto"
OTHER = "proto_other"  # a second spec (never trained): makes the service one of several models


@pytest.fixture(scope="module")
def service(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("protocols")
    specs = home / "specs"
    specs.mkdir()
    write_spec(specs, MODEL, estimator=LOGREG)
    port = free_port()
    env = {**os.environ, "CD4ML_HOME": str(home / "service"), "CD4ML_SPECS_DIR": str(specs),
           "MLFLOW_TRACKING_URI": mlflow_server, "CD4ML_SERVICE_ADMIN_TOKEN": SERVICE_TOKEN,
           "CD4ML_SERVICE_POLL_SECONDS": "0.5"}  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    # The service starts while the model trains (promoted to champion, not rolled out: the service
    # picks the champion up by itself), which saves the ~8 s the service takes to start.
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(start_service, env, port, home / "service.log")
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("CD4ML_SPECS_DIR", str(specs))
                mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
                mp.setenv("CD4ML_SERVICE_ADMIN_TOKEN", SERVICE_TOKEN)  # signs the champion record
                settings = get_settings()
                spec = load_spec(specs / f"{MODEL}.yaml")
                write_batch(generate_churn(1500, seed=41), settings.model_dir(MODEL) / "landing", "w0.csv")
                result = run_training(
                    spec, settings, run_id="proto_1", run_time="2026-01-01T00:00:00+00:00", deploy=False
                )
        finally:
            proc = starting.result()
    try:
        assert result["promoted"], result
        meta = wait_for(lambda: (r := httpx.get(f"{url}/v1/models/{MODEL}")).status_code == 200 and r.json())
        rows = features(spec, generate_churn(30, seed=42, batch=3)).reset_index(drop=True)
        expected = registry.load_model(mlflow_server, f"models:/{MODEL}/{meta['version']}").predict(rows)
        yield {"url": url, "port": port, "specs": specs, "data": home / "service" / "data", "rows": rows,
               "expected": expected.tolist(), "version": meta["version"], "meta": meta}  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def records(rows: Any) -> list[dict[str, Any]]:
    return json.loads(rows.to_json(orient="records"))


# -- MLflow scoring protocol ----------------------------------------------------------------------


def test_mlflow_scoring_client_in_every_format(service: dict[str, Any]) -> None:
    import mlflow

    client = ScoringServerClient("127.0.0.1", service["port"])
    client.wait_server_ready(timeout=30)
    assert client.get_version() == mlflow.__version__
    rows, expected = service["rows"], service["expected"]
    columns = json.loads(rows.to_json(orient="split", index=False))
    bodies = {
        "DataFrame (dataframe_split)": rows,
        "dataframe_records": json.dumps({"dataframe_records": records(rows)}),
        "instances": json.dumps({"instances": records(rows)}),
        "inputs (columns)": json.dumps({"inputs": {c: rows[c].tolist() for c in rows.columns}}),
        "inputs (records)": records(rows),  # a list: the client wraps it as {"inputs": [...]}
        "dataframe_split with params": json.dumps({"dataframe_split": columns, "params": {}}),
    }
    for label, data in bodies.items():
        response = client.invoke(data)
        assert isinstance(response, PredictionsResponse), label
        assert response == {"predictions": expected}, label  # exactly MLflow's response shape
        assert response.get_predictions(predictions_format="ndarray").tolist() == expected, label


def test_mlflow_scoring_errors_name_the_field(service: dict[str, Any]) -> None:
    client = ScoringServerClient("127.0.0.1", service["port"])
    bad = records(service["rows"].head(2))
    bad[1]["tenure_months"] = "3"
    with pytest.raises(Exception, match="error code 422") as err:
        client.invoke(json.dumps({"dataframe_records": bad}))
    body = json.loads(str(err.value).split("response: ", 1)[1].rstrip(")"))
    assert body["error_code"] == "BAD_REQUEST"
    assert {"field": "tenure_months", "problem": "expected a number, got str '3'", "row": 1} in body[
        "problems"
    ]
    resp = httpx.post(f"{service['url']}/invocations", json={"records": bad})
    assert resp.status_code == 422 and resp.json()["problems"][0]["field"] == "body"
    assert "dataframe_split" in resp.json()["message"]
    csv = {"content-type": "text/csv"}
    resp = httpx.post(f"{service['url']}/invocations", content="a,b\n1,2", headers=csv)
    assert resp.status_code == 415 and resp.json()["problems"][0]["field"] == "content-type"


def test_mlflow_model_choice_when_the_service_serves_several(service: dict[str, Any]) -> None:
    url, body = service["url"], {"dataframe_records": records(service["rows"])}
    other = write_spec(service["specs"], OTHER, estimator=LOGREG)
    try:
        resp = wait_for(lambda: (r := httpx.post(f"{url}/invocations", json=body)).status_code == 400 and r)
        error = resp.json()
        assert error["models"] == [MODEL, OTHER] and error["problems"][0]["field"] == "x-cd4ml-model"
        assert "x-cd4ml-model" in error["message"] and f"{MODEL}, {OTHER}" in error["message"]
        by_header = httpx.post(f"{url}/invocations", json=body, headers={"x-cd4ml-model": MODEL})
        assert by_header.status_code == 200 and by_header.json() == {"predictions": service["expected"]}
        # The path prefix, through MLflow's own client: it posts to <prefix>/invocations.
        client = ScoringServerClient("127.0.0.1", service["port"])
        client.url_prefix = f"{url}/v1/models/{MODEL}"
        assert client.invoke(service["rows"])["predictions"] == service["expected"]
        unknown = httpx.post(f"{url}/invocations", json=body, headers={"x-cd4ml-model": "nope"})
        assert unknown.status_code == 404 and "'nope'" in unknown.json()["message"]
        waiting = httpx.post(f"{url}/v1/models/{OTHER}/invocations", json=body)
        assert waiting.status_code == 503 and waiting.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
        assert httpx.get(f"{url}/ping").status_code == 404  # not every model has its champion
    finally:
        other.unlink()
    wait_for(lambda: httpx.post(f"{url}/invocations", json=body).status_code == 200)
    assert httpx.get(f"{url}/ping").status_code == 200


# -- Open Inference Protocol v2 -------------------------------------------------------------------


def oip_inputs(rows: Any, metadata: dict[str, Any], binary: bool = False) -> list[Any]:
    """One tensor per feature, typed as the service's model metadata says."""
    inputs = []
    for spec in metadata["inputs"]:
        column = rows[spec["name"]]
        values = column.astype(object) if spec["datatype"] == "BYTES" else column.astype(float)
        tensor = tritonhttp.InferInput(spec["name"], [len(rows)], spec["datatype"])
        tensor.set_data_from_numpy(values.to_numpy(), binary_data=binary)
        inputs.append(tensor)
    return inputs


def test_triton_client_health_metadata_and_inference(service: dict[str, Any]) -> None:
    client = tritonhttp.InferenceServerClient(f"127.0.0.1:{service['port']}")
    version, rows = service["version"], service["rows"]
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, version)
    assert not client.is_model_ready(MODEL, "999") and not client.is_model_ready("nope")
    assert client.get_server_metadata()["name"] == "cd4ml"
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == [version] and meta["platform"] == "sklearn"
    kinds = {i["name"]: i["datatype"] for i in meta["inputs"]}
    assert kinds == {**{c: "FP64" for c in service["meta"]["inputs"]["numerical"]},
                     **{c: "BYTES" for c in service["meta"]["inputs"]["categorical"]}}  # fmt: skip
    assert client.get_model_metadata(MODEL, version) == meta
    with pytest.raises(InferenceServerException, match="version '999' is not served"):
        client.get_model_metadata(MODEL, "999")

    outputs = [tritonhttp.InferRequestedOutput(n, binary_data=False) for n in ("predict", "predict_proba")]
    result = client.infer(MODEL, oip_inputs(rows, meta), outputs=outputs, request_id="oip-1")
    assert result.as_numpy("predict").tolist() == service["expected"]
    proba = result.as_numpy("predict_proba")
    assert proba.shape == (len(rows), 2) and np.allclose(proba.sum(axis=1), 1.0)
    response = result.get_response()
    assert (response["id"], response["model_name"], response["model_version"]) == ("oip-1", MODEL, version)
    # Versioned, and with every output (the client then asks for binary outputs: JSON still parses).
    result = client.infer(MODEL, oip_inputs(rows, meta), model_version=version)
    assert result.as_numpy("predict").tolist() == service["expected"]
    assert result.as_numpy("classes").tolist() == [0, 1]
    # tritonclient's default: the binary tensor data extension (raw little-endian bytes after the JSON).
    result = client.infer(MODEL, oip_inputs(rows, meta, binary=True), request_id="oip-binary")
    assert result.as_numpy("predict").tolist() == service["expected"]


def test_triton_client_errors_name_the_input(service: dict[str, Any]) -> None:
    client = tritonhttp.InferenceServerClient(f"127.0.0.1:{service['port']}")
    rows, meta = service["rows"].head(3), client.get_model_metadata(MODEL)
    with pytest.raises(InferenceServerException, match="version '999' is not served"):
        client.infer(MODEL, oip_inputs(rows, meta), model_version="999")
    wrong = [i for i in oip_inputs(rows, meta) if i.name() != "age"]
    age = tritonhttp.InferInput("age", [3], "BYTES")
    age.set_data_from_numpy(np.array(["30", "41", "x"], dtype=object), binary_data=False)
    with pytest.raises(InferenceServerException, match="age: expected a number, got str '30'") as err:
        client.infer(MODEL, [*wrong, age])
    assert err.value.status() == "422"
    missing = [i for i in oip_inputs(rows, meta) if i.name() != "plan"]
    with pytest.raises(InferenceServerException, match="plan: missing column"):
        client.infer(MODEL, missing)
    resp = httpx.post(f"{service['url']}/v2/models/{MODEL}/infer", json={"inputs": [{"name": "age"}]})
    assert resp.status_code == 422 and resp.json()["problems"][0]["field"] == "inputs.age.shape"
    assert "error" in resp.json()  # OIP's error shape


def test_oip_pandas_style_and_2d_tensors_over_plain_http(service: dict[str, Any]) -> None:
    """The JSON format itself: nested [rows, 1] columns, and one 2-D tensor in the schema's order
    (mixed numbers and text are plain JSON, which a typed client cannot produce)."""
    url, rows = service["url"], service["rows"].head(4)
    meta = httpx.get(f"{url}/v2/models/{MODEL}").json()
    named = [{"name": i["name"], "datatype": i["datatype"], "shape": [len(rows), 1],
              "data": [[v] for v in rows[i["name"]].tolist()]} for i in meta["inputs"]]  # fmt: skip
    resp = httpx.post(f"{url}/v2/models/{MODEL}/infer", json={"inputs": named})
    assert resp.status_code == 200, resp.text
    assert resp.json()["outputs"][0]["data"] == service["expected"][:4]
    order = [i["name"] for i in meta["inputs"]]
    matrix = {"name": "input-0", "datatype": "FP64", "shape": [len(rows), len(order)],
              "data": rows[order].astype(object).values.tolist()}  # fmt: skip
    resp = httpx.post(f"{url}/v2/models/{MODEL}/infer", json={"inputs": [matrix]})
    assert resp.status_code == 422 and resp.json()["problems"][0]["field"] == "input-0"
    assert "FP64 holds numbers" in resp.json()["error"]  # the categories are text: no single datatype fits
    narrow = {**matrix, "shape": [len(rows), 2], "data": [[1.0, 2.0]] * len(rows)}
    resp = httpx.post(f"{url}/v2/models/{MODEL}/infer", json={"inputs": [narrow]})
    assert resp.status_code == 422 and resp.json()["problems"][0]["field"] == "inputs.input-0.shape"
    assert str(order) in resp.json()["error"]  # names the columns, in the order a 2-D tensor needs


# -- the same log and metrics on every protocol ----------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_every_protocol_writes_log_rows_and_counts_metrics(service: dict[str, Any]) -> None:
    url, version, rows = service["url"], service["version"], service["rows"].head(5)
    before = httpx.get(f"{url}/metrics").text
    ok = {"model": MODEL, "version": version, "code": "200"}
    bad = {"model": MODEL, "kind": "bad_request"}
    recs = records(rows)
    native = httpx.post(f"{url}/v1/models/{MODEL}/predict", json=recs, headers={"x-request-id": "log-native"})
    mlflow = httpx.post(
        f"{url}/invocations", json={"instances": recs}, headers={"x-request-id": "log-mlflow"}
    )
    assert native.status_code == mlflow.status_code == 200
    meta = httpx.get(f"{url}/v2/models/{MODEL}").json()
    tensors = [{"name": i["name"], "datatype": i["datatype"], "shape": [len(rows)],
                "data": rows[i["name"]].tolist()} for i in meta["inputs"]]  # fmt: skip
    oip = {"id": "log-oip", "inputs": tensors}
    resp = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=oip)
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "log-oip"
    assert httpx.post(f"{url}/invocations", json={"inputs": [[1]]}).status_code == 422
    assert httpx.post(f"{url}/v2/models/{MODEL}/infer", json={"inputs": []}).status_code == 422
    after = httpx.get(f"{url}/metrics").text

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("cd4ml_requests_total", **ok) == 3
    assert grew("cd4ml_request_errors_total", **bad) == 2
    assert grew("cd4ml_predicted_rows_total", model=MODEL) == 15

    ids = {"log-native", "log-mlflow", "log-oip"}

    def logged() -> Any:
        frame = read_predictions(service["data"], MODEL)
        return [frame] if not frame.empty and ids <= set(frame["request_id"]) else None

    [frame] = wait_for(logged, timeout=20)
    for request_id in ids:
        mine = frame[frame["request_id"] == request_id]
        assert len(mine) == 5, request_id
        assert mine["prediction"].tolist() == service["expected"][:5], request_id
        assert set(mine["model_version"]) == {version}
        assert mine["contract"].tolist() == rows["contract"].tolist()
