"""OpenTelemetry over the wire: the real prediction service and a real Airflow run export spans to
a real OTLP/HTTP receiver started here (tests/support/otlp.py decodes the protobuf wire format).

- The service (`cd4ml serve`, uvicorn subprocess, a model trained and registered by the pipeline's
  own steps on the session's MLflow server) with OTEL_* pointing at the receiver: request spans
  with `cd4ml.parse` / `cd4ml.predict` / `cd4ml.log` children carrying model and version, for the
  native, MLflow and OIP protocols; the batch is flushed when the service stops (its lifespan).
- The same service with no endpoint set exports nothing and answers without `traceresponse`.
- Airflow tasks, configured only by `cd4ml.core.telemetry.airflow_trace_env`, under `dag.test()`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cd4ml.core.settings import get_settings
from cd4ml.core.spec import load_spec
from cd4ml.core.telemetry import airflow_trace_env
from cd4ml.ml.training import features
from cd4ml.steps.pipeline import run_training
from cd4ml_dev.datagen import generate_churn, write_batch
from cd4ml_dev.netutil import wait_http
from tests.conftest import free_port, start_service
from tests.helpers import LOGREG, write_spec
from tests.support.otlp import OtlpHttpReceiver, ReceivedSpan, by_name, children

pytestmark = pytest.mark.system
MODEL = "traced"
STEPS = ["cd4ml.parse", "cd4ml.predict", "cd4ml.log"]
SERVER = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
ERROR = 2  # Status.STATUS_CODE_ERROR


@pytest.fixture(scope="module")
def champion(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A champion of MODEL in the session's MLflow, in a specs dir of its own (no other model)."""
    specs = tmp_path_factory.mktemp("traced-specs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CD4ML_SPECS_DIR", str(specs))
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        write_spec(specs, MODEL, estimator=LOGREG)
        settings = get_settings()
        spec = load_spec(specs / f"{MODEL}.yaml")
        write_batch(generate_churn(800, seed=71), settings.model_dir(MODEL) / "landing", "w0.csv")
        result = run_training(
            spec, settings, run_id="traced_1", run_time="2026-01-01T00:00:00+00:00", deploy=False
        )
        assert result["promoted"], result
        rows = features(spec, generate_churn(5, seed=72, batch=2))
    # Whatever OTEL_* the developer's shell has, the services here get only what each test gives.
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    base.update({"CD4ML_SPECS_DIR": str(specs), "MLFLOW_TRACKING_URI": mlflow_server,
                 "CD4ML_SERVICE_POLL_SECONDS": "0.5"})  # fmt: skip
    return {"env": base, "rows": rows}


class Service:
    """A `cd4ml serve` subprocess, stopped with SIGTERM as supervisord and docker stop do."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_service(env, self.port, log)
        self.log = log
        wait_http(f"{self.url}/health/ready", 120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Service] = []

    def make(env: dict[str, str]) -> Service:
        started.append(Service(env, tmp_path / f"service-{len(started)}.log"))
        return started[-1]

    yield make
    for s in started:
        s.stop()


def _traffic(url: str, rows: Any) -> dict[str, httpx.Response]:
    split = {"dataframe_split": json.loads(rows.head(2).to_json(orient="split", index=False))}
    meta = httpx.get(f"{url}/v2/models/{MODEL}").json()
    oip = {"inputs": [{"name": i["name"], "datatype": i["datatype"], "shape": [1, 1],
                       "data": [rows[i["name"]].tolist()[:1]]} for i in meta["inputs"]]}  # fmt: skip
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    return {
        "native": httpx.post(f"{url}/v1/models/{MODEL}/predict", json=split, headers={"traceparent": parent}),
        "mlflow": httpx.post(f"{url}/invocations", json=split, headers={"x-cd4ml-model": MODEL}),
        "oip": httpx.post(f"{url}/v2/models/{MODEL}/infer", json=oip),
        "bad": httpx.post(f"{url}/v1/models/{MODEL}/predict", json={"dataframe_records": [{"age": 1}]}),
    }


def _request_span(spans: list[ReceivedSpan], resp: httpx.Response) -> ReceivedSpan:
    """The request span the `traceresponse` header of `resp` names."""
    _, trace_id, span_id, _ = resp.headers["traceresponse"].split("-")
    found = [s for s in spans if s.trace_id == trace_id and s.span_id == span_id]
    assert len(found) == 1, (resp.headers["traceresponse"], [(s.name, s.trace_id) for s in spans])
    return found[0]


def test_the_service_exports_request_spans_with_model_and_version(
    champion: dict[str, Any], service_factory: Any
) -> None:
    with OtlpHttpReceiver() as receiver:
        env = {**champion["env"], "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
               "OTEL_SERVICE_NAME": "cd4ml-traced-test",
               # Nothing is sent before shutdown (the service sends at 512 waiting requests or after the
               # delay, 10 min): every span below arrives because the service's lifespan flushes it.
               "OTEL_BSP_SCHEDULE_DELAY": "600000"}  # fmt: skip
        service = service_factory(env)
        # The standard process and GC series sit beside the service's own.
        metrics = httpx.get(f"{service.url}/metrics").text
        for name in ("process_resident_memory_bytes", "python_gc_objects_collected_total", "python_info"):
            assert f"\n{name}" in metrics, name
        answers = _traffic(service.url, champion["rows"])
        assert [r.status_code for r in answers.values()] == [200, 200, 200, 422], [
            r.text for r in answers.values()
        ]
        assert receiver.snapshot() == []  # still batched
        # Nothing dropped, and nothing sent to the exporter process yet (its delay is 10 min).
        metrics = httpx.get(f"{service.url}/metrics").text
        assert "\ncd4ml_tracing_requests_dropped_total 0.0" in metrics
        assert "\ncd4ml_tracing_requests_sent_total 0.0" in metrics
        service.stop()
        spans = receiver.wait_for(lambda s: len(s) >= 14, timeout=30)  # 3 x (1 + 3 steps) + (1 + 1)
    assert len(spans) == 14, sorted(s.name for s in spans)
    assert {s.resource["service.name"] for s in spans} == {"cd4ml-traced-test"}
    routes = {
        "native": "POST /v1/models/{model}/predict",
        "mlflow": "POST /invocations",
        "oip": "POST /v2/models/{model}/infer",
    }
    for protocol, name in routes.items():
        resp = answers[protocol]
        request = _request_span(spans, resp)
        assert request.name == name and request.kind == SERVER and request.status_code == 0
        a = request.attributes
        assert (a["cd4ml.model"], a["cd4ml.model_version"], a["cd4ml.protocol"]) == (MODEL, "1", protocol)
        assert a["http.response.status_code"] == 200 and a["cd4ml.request_id"] == resp.headers["x-request-id"]
        assert a["cd4ml.rows"] == (2 if protocol != "oip" else 1)
        steps = list(children(spans, request))
        assert [s.name for s in steps] == STEPS
        for step in steps:
            assert (step.attributes["cd4ml.model"], step.attributes["cd4ml.model_version"]) == (MODEL, "1")
            assert step.status_code == 0
    # The client's traceparent: the native request's span is a child of the caller's span.
    native = _request_span(spans, answers["native"])
    assert (native.trace_id, native.parent_span_id) == (
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
    )
    # A request refused at validation: the parse step says so; no prediction, no log row.
    bad = _request_span(spans, answers["bad"])
    assert bad.attributes["http.response.status_code"] == 422 and "cd4ml.rows" not in bad.attributes
    assert [(s.name, s.status_code) for s in children(spans, bad)] == [("cd4ml.parse", ERROR)]


def test_without_an_endpoint_the_service_exports_nothing(
    champion: dict[str, Any], service_factory: Any
) -> None:
    # Listen where the SDK's default endpoint would send (localhost:4318), when that port is free:
    # a service that traced by default would post there.
    try:
        receiver = OtlpHttpReceiver(port=4318)
    except OSError:
        receiver = OtlpHttpReceiver()
    with receiver:
        env = {
            **champion["env"],
            "OTEL_SERVICE_NAME": "cd4ml-untraced",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
        service = service_factory(env)
        answers = _traffic(service.url, champion["rows"])
        assert [r.status_code for r in answers.values()] == [200, 200, 200, 422]
        assert not any("traceresponse" in r.headers for r in answers.values())
        service.stop()  # a provider, had there been one, would flush here
        assert receiver.snapshot() == [] and receiver.requests == 0


PROBE_DAG = """
from datetime import datetime
from airflow.sdk import dag, task


@dag(dag_id="cd4ml_trace_probe", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def probe():
    @task
    def first() -> int:
        return 1

    @task
    def second(x: int) -> int:
        return x + 1

    second(first())


probe()
"""

RUN_PROBE = """
import sys
from airflow.dag_processing.dagbag import DagBag

bag = DagBag(dag_folder=sys.argv[1])
run = bag.dags["cd4ml_trace_probe"].test()
assert str(run.state) in ("success", "DagRunState.SUCCESS"), run.state
"""


def test_airflow_task_spans_reach_the_receiver_with_the_mapped_settings(
    airflow_db: Path, tmp_path: Path
) -> None:
    """Airflow traces with nothing but what `airflow_trace_env` gives it (Airflow flushes at exit).

    Under dag.test() Airflow 3.3 emits `dag_run.<dag_id>` and one `task_run.<task_id>` per task (from
    the execution API it runs in-process); the `worker.<task_id>` span exists only on the executor
    path (task_runner.main), which dag.test() does not take.
    """
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "probe.py").write_text(textwrap.dedent(PROBE_DAG))
    with OtlpHttpReceiver() as receiver:
        traces = airflow_trace_env({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                    "OTEL_SERVICE_NAME": "cd4ml-airflow-test"})  # fmt: skip
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **traces,
               # dag.test() serializes DAGs of the dags-folder bundle only: the probe's folder is it.
               "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path / "dags")}  # fmt: skip
        done = subprocess.run([sys.executable, "-c", RUN_PROBE, str(tmp_path / "dags")], env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        spans = receiver.wait_for(lambda s: len(s) >= 3, timeout=30)
    named = by_name(spans)
    assert set(named) >= {"dag_run.cd4ml_trace_probe", "task_run.first", "task_run.second"}, set(named)
    run = named["dag_run.cd4ml_trace_probe"][0]
    assert run.parent_span_id == "" and run.resource["service.name"] == "cd4ml-airflow-test"
    for task_id in ("first", "second"):
        span = named[f"task_run.{task_id}"][0]
        assert (span.trace_id, span.parent_span_id) == (run.trace_id, run.span_id)
        assert span.attributes["airflow.dag_id"] == "cd4ml_trace_probe"
        assert span.attributes["airflow.task_id"] == task_id
        assert span.attributes["airflow.task_instance.state"] == "success"
