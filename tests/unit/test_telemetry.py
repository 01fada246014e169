"""OTEL_* variables -> what the service and Airflow do; the service's spans on a real OTLP receiver.

The receivers (tests/support/otlp.py) are real servers decoding the OTLP wire format, over HTTP and
over gRPC; the exporters are the SDK's own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

import psutil
import pytest

from cd4ml.core.settings import SettingsError
from cd4ml.core.telemetry import TraceExport, airflow_trace_env, trace_export
from cd4ml.serving import span_export
from cd4ml.serving.tracing import LOG, NO_TRACE, PARSE, PREDICT, ServiceTracing, encode_spans
from tests.support.otlp import OtlpGrpcReceiver, OtlpHttpReceiver, by_name, children, decode

BASE = "http://collector:4318"


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_SERVICE_NAME": "svc", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},  # no endpoint: off
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "  "},  # empty counts as unset
        {"OTEL_EXPORTER_OTLP_ENDPOINT": BASE, "OTEL_SDK_DISABLED": "TRUE"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": BASE, "OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_tracing_is_off_unless_an_endpoint_is_set(environ: dict[str, str]) -> None:
    assert trace_export(environ) is None
    assert airflow_trace_env(environ) == {}
    assert not ServiceTracing.from_env(environ).enabled
    assert ServiceTracing.from_env(environ).start("POST", "/r", "/r", {}, "m", "native") is NO_TRACE


@pytest.mark.parametrize(
    ("environ", "protocol", "endpoint"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": BASE}, "http/protobuf", f"{BASE}/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": f"{BASE}/"}, "http/protobuf", f"{BASE}/v1/traces"),
        # the signal-specific endpoint is used as it is, and wins over the base
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": BASE, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t:1/x"},
         "http/protobuf", "https://t:1/x"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
         "grpc", "http://c:4317"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": BASE, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
          "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, "http/protobuf", f"{BASE}/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317", "OTEL_TRACES_EXPORTER": "otlp_proto_grpc"},
         "grpc", "c:4317"),
    ],
)  # fmt: skip
def test_endpoint_and_protocol_resolve_as_the_sdk_exporters_do(
    environ: dict[str, str], protocol: str, endpoint: str
) -> None:
    export = trace_export(environ)
    assert export == TraceExport(
        otlp=True, console=False, protocol=protocol, endpoint=endpoint, service_name=None
    )


def test_the_console_exporter_needs_no_endpoint() -> None:
    export = trace_export({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "x"})
    assert export is not None and export.console and not export.otlp and export.service_name == "x"
    both = trace_export({"OTEL_TRACES_EXPORTER": "otlp,console", "OTEL_EXPORTER_OTLP_ENDPOINT": BASE})
    assert both is not None and both.otlp and both.console


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": BASE, "OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": BASE, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
         "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": BASE, "OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": BASE, "OTEL_TRACES_SAMPLER": "traceidratio",
          "OTEL_TRACES_SAMPLER_ARG": "10%"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "collector:4318/v1/traces"},
         "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
    ],
)  # fmt: skip
def test_unusable_values_name_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=f"^{variable}={environ[variable]!r}"):  # the value as given
        trace_export(environ)
    with pytest.raises(SettingsError, match=variable):
        ServiceTracing.from_env(environ)  # the service refuses to start with it, saying why


def _airflow_exporter(name: str) -> type:
    """The class Airflow 3.3 builds for OTEL_TRACES_EXPORTER=name (its _load_exporter_from_env)."""
    found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
    assert found, f"no exporter entry point {name!r}: Airflow would fail to start"
    cls: type = found[0].load()
    return cls


def test_airflow_gets_the_switch_the_exporter_of_the_protocol_and_the_otel_variables() -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": BASE, "OTEL_SERVICE_NAME": "cd4ml",
               "OTEL_EXPORTER_OTLP_HEADERS": "x-token=1", "OTEL_EMPTY": "", "PATH": "/bin"}  # fmt: skip
    env = airflow_trace_env(environ)
    assert env == {
        "AIRFLOW__TRACES__OTEL_ON": "True",
        "OTEL_TRACES_EXPORTER": "otlp_proto_http",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{BASE}/v1/traces",
        "OTEL_EXPORTER_OTLP_ENDPOINT": BASE,
        "OTEL_SERVICE_NAME": "cd4ml",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-token=1",
    }
    # Airflow's default `otlp` entry point is the gRPC exporter: http/protobuf needs the explicit name.
    assert _airflow_exporter(env["OTEL_TRACES_EXPORTER"]).__module__.endswith("proto.http.trace_exporter")
    assert _airflow_exporter("otlp").__module__.endswith("proto.grpc.trace_exporter")
    grpc = airflow_trace_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    )
    assert _airflow_exporter(grpc["OTEL_TRACES_EXPORTER"]).__module__.endswith("proto.grpc.trace_exporter")
    assert grpc["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://c:4317"
    # docker-compose passes `${OTEL_EXPORTER_OTLP_TRACES_ENDPOINT:-}`: empty, which the SDK's exporter
    # would take as its endpoint; the resolved one replaces it.
    compose = airflow_trace_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": BASE, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}
    )
    assert compose["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == f"{BASE}/v1/traces"
    # Airflow loads one exporter only: OTLP wins over the console.
    both = airflow_trace_env({"OTEL_EXPORTER_OTLP_ENDPOINT": BASE, "OTEL_TRACES_EXPORTER": "otlp,console"})
    assert both["OTEL_TRACES_EXPORTER"] == "otlp_proto_http"
    assert airflow_trace_env({"OTEL_TRACES_EXPORTER": "console"})["OTEL_TRACES_EXPORTER"] == "console"


def _one_request(tracing: ServiceTracing, headers: dict[str, str], status: int = 200) -> dict[str, str]:
    rt = tracing.start("POST", "/v1/models/{model}/predict", "/v1/models/m/predict", headers, "m", "native")
    rt.serving("m", "7")
    rt.begin(PARSE)
    if status == 200:
        rt.set("cd4ml.rows", 3)
        rt.begin(PREDICT, rows=3)
        rt.begin(LOG, rows=3)
        rt.end()
    return rt.finish(status)


@pytest.mark.parametrize("receiver", [OtlpHttpReceiver, OtlpGrpcReceiver])
def test_request_spans_reach_a_real_receiver_over_both_protocols(receiver: type) -> None:
    with receiver() as rec:
        protocol = "grpc" if receiver is OtlpGrpcReceiver else "http/protobuf"
        tracing = ServiceTracing.from_env(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": rec.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}
        )
        client_trace = "0af7651916cd43dd8448eb211c80319c"
        header = _one_request(tracing, {"traceparent": f"00-{client_trace}-b7ad6b7169203331-01"})
        refused = _one_request(tracing, {}, status=422)
        tracing.shutdown()  # flushes the batch: no waiting for its 5 s schedule
        spans = rec.wait_for(lambda s: len(s) >= 6)
    assert len(spans) == 6, [s.name for s in spans]
    requests = by_name(spans)["POST /v1/models/{model}/predict"]
    ok = next(s for s in requests if s.attributes["http.response.status_code"] == 200)
    assert ok.trace_id == client_trace and ok.parent_span_id == "b7ad6b7169203331"  # the client's span
    assert ok.kind == 2  # SERVER
    assert header == {"traceresponse": f"00-{client_trace}-{ok.span_id}-01"}
    assert ok.resource["service.name"] == "cd4ml-prediction-service"
    steps = {s.name: s for s in children(spans, ok)}
    assert list(steps) == [PARSE, PREDICT, LOG]
    for step in steps.values():
        assert step.attributes["cd4ml.model"] == "m" and step.attributes["cd4ml.model_version"] == "7"
        assert step.status_code == 0
    assert steps[PREDICT].attributes["cd4ml.rows"] == 3
    # A refused request: the step it was refused in ends with ERROR; the request span (a 4xx) does not.
    bad = next(s for s in requests if s.attributes["http.response.status_code"] == 422)
    assert bad.trace_id == refused["traceresponse"].split("-")[1] and bad.status_code == 0
    assert [(s.name, s.status_code) for s in children(spans, bad)] == [(PARSE, 2)]


def test_a_failing_request_records_the_exception() -> None:
    with OtlpHttpReceiver() as rec:
        tracing = ServiceTracing.from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{rec.endpoint}/v1/traces",
                                           "OTEL_SERVICE_NAME": "mine"})  # fmt: skip
        rt = tracing.start("POST", "/invocations", "/invocations", {}, "m", "mlflow")
        rt.begin(PREDICT, rows=1)
        rt.fail(ValueError("model exploded"))
        tracing.shutdown()
        spans = rec.wait_for(lambda s: len(s) >= 2)
    request = by_name(spans)["POST /invocations"][0]
    predict = by_name(spans)[PREDICT][0]
    assert predict.parent_span_id == request.span_id
    assert request.status_code == predict.status_code == 2 and "exception" in predict.events
    assert request.attributes["error.type"] == "ValueError" and request.resource["service.name"] == "mine"


def test_the_service_with_tracing_off_builds_nothing() -> None:
    """Off costs nothing: the app holds no span processor, and nothing of the SDK is imported for it."""
    code = (
        "import sys\n"
        "from cd4ml.serving.app import create_app\n"
        "app = create_app()\n"
        "assert app.state.tracing.sink is None and not app.state.tracing.enabled\n"
        "assert 'opentelemetry.sdk.trace' not in sys.modules, 'the SDK was imported'\n"
    )
    env = {"PATH": "/usr/bin:/bin", "OTEL_SERVICE_NAME": "x", "CD4ML_HOME": "/tmp/cd4ml-otel-off"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_sampler_decides_once_per_request() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": BASE}
    off = ServiceTracing.from_env({**endpoint, "OTEL_TRACES_SAMPLER": "always_off"})
    assert off.enabled and off.start("POST", "/r", "/r", {}, "m", "native") is NO_TRACE
    # A ratio sampler keeps about that share of requests.
    tenth = ServiceTracing.from_env(
        {**endpoint, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    )
    kept = sum(tenth.start("POST", "/r", "/r", {}, "m", "native") is not NO_TRACE for _ in range(2000))
    assert 100 < kept < 300, kept
    # The default (parent-based, always on) follows a client that did not sample its trace.
    default = ServiceTracing.from_env(endpoint)
    unsampled = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
    assert default.start("POST", "/r", "/r", unsampled, "m", "native") is NO_TRACE
    assert default.start("POST", "/r", "/r", {}, "m", "native") is not NO_TRACE
    for tracing in (default, off, tenth):
        tracing.shutdown()


def test_the_fast_encoder_writes_what_the_sdk_encoder_writes() -> None:
    """Same spans, both encoders, both decoded by the generated classes: the same spans come out."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    resources = [Resource({"service.name": "a", "n": 3}), Resource({"service.name": "b", "ok": True})]
    scope = InstrumentationScope("cd4ml.serving", "1.0")
    remote = SpanContext(7, 8, is_remote=True, trace_flags=TraceFlags(1))
    spans = []
    for i, resource in enumerate(resources * 2):
        ctx = SpanContext(7, 100 + i, is_remote=False, trace_flags=TraceFlags(1))
        spans.append(ReadableSpan(
            name=f"span {i}", context=ctx, parent=remote if i % 2 else None, resource=resource,
            attributes={"s": "x", "i": 2**40, "b": False, "f": 0.25, "list": ["p", "q"], "ints": [1, 2]},
            events=(Event("exception", {"exception.type": "ValueError"}, timestamp=5),),
            kind=SpanKind.SERVER if i else SpanKind.INTERNAL,
            status=Status(StatusCode.ERROR, "HTTP 500") if i == 2 else Status(StatusCode.UNSET),
            start_time=1_000 + i, end_time=2_000 + i, instrumentation_scope=scope,
        ))  # fmt: skip
    ours = decode(encode_spans(spans).SerializeToString())
    theirs = decode(sdk_encode_spans(spans).SerializeToString())
    key = lambda s: s.span_id  # noqa: E731
    assert sorted(ours, key=key) == sorted(theirs, key=key)
    assert len(ours) == 4 and {s.status_code for s in ours} == {0, 2}


def _wait(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_spans_are_exported_by_a_child_process_that_is_restarted_when_it_dies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The service's process only records; a child exports. Killed, the child comes back (rate-
    limited) and later requests arrive; the batch that was in flight is counted as dropped."""
    monkeypatch.setattr(span_export, "RESPAWN_S", 0.0)
    with OtlpHttpReceiver() as rec:
        tracing = ServiceTracing.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": rec.endpoint,
                                           "OTEL_BSP_SCHEDULE_DELAY": "100"})  # fmt: skip
        sink = tracing.sink
        assert isinstance(sink, span_export.ExporterProcess)
        _one_request(tracing, {})
        _wait(lambda: sink.pid is not None)
        first = sink.pid
        assert first is not None and first != os.getpid()
        rec.wait_for(lambda s: len(s) >= 4)
        os.kill(first, signal.SIGKILL)
        _wait(lambda: not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE)
        for _ in range(3):  # the first send after the kill may hit the dead pipe; later ones respawn
            _one_request(tracing, {})
            time.sleep(0.7)
        rec.wait_for(lambda s: len(s) >= 8)
        second = sink.pid
        tracing.shutdown()  # the new child exports everything it was sent, then exits
        spans = rec.snapshot()
    assert second is not None and second != first
    assert 8 <= len(spans) <= 16 and sink.sent + sink.dropped == 4
    assert sink.sent * 4 == len(spans)


def test_the_exporter_process_does_not_outlive_a_killed_service() -> None:
    """SIGKILL the service: its end of the pipe closes, and the exporter flushes and exits."""
    code = (
        "import sys, time\n"
        "from cd4ml.serving.tracing import ServiceTracing\n"
        "t = ServiceTracing.from_env({'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://127.0.0.1:9',\n"
        "                             'OTEL_EXPORTER_OTLP_TIMEOUT': '2'})\n"
        "rt = t.start('POST', '/r', '/r', {}, 'm', 'native'); rt.finish(200)\n"
        "while t.sink.pid is None: time.sleep(0.05)\n"
        "print(t.sink.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    service = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert service.stdout is not None
    exporter = psutil.Process(int(service.stdout.readline()))
    service.kill()
    service.wait(30)
    # It exits once its export to a port where nothing listens gives up (OTEL_EXPORTER_OTLP_TIMEOUT).
    exporter.wait(60)


def test_a_full_queue_drops_and_counts_instead_of_blocking_the_request() -> None:
    sink = span_export.ExporterProcess({"OTEL_EXPORTER_OTLP_ENDPOINT": BASE}, max_pending=3)
    sink._closing = True  # the sender stops: nothing leaves the queue
    sink._wake.set()
    sink._thread.join(5)
    started = time.monotonic()
    for i in range(10):
        sink.add((i,))
    assert time.monotonic() - started < 1
    assert len(sink._pending) == 3 and sink.dropped == 7
    # ... and the counts are on /metrics as counters.
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(span_export.ExporterMetrics(sink))
    text = generate_latest(registry).decode()
    assert "cd4ml_tracing_requests_dropped_total 7.0" in text
    assert "cd4ml_tracing_requests_sent_total 0.0" in text


def test_records_encode_as_their_spans_do() -> None:
    """The exporter process's direct path (records -> OTLP, no span objects) writes what the span
    path writes: a client-parented 200 with its steps, a refused 422, and a request that raised."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from cd4ml.serving.tracing import SCOPE, _sampler, encode_records, record, spans_of

    records: list[tuple[object, ...]] = []

    class Keep:
        def add(self, r: tuple[object, ...]) -> None:
            records.append(r)

        def shutdown(self) -> None:
            return None

    export = trace_export({"OTEL_EXPORTER_OTLP_ENDPOINT": BASE})
    assert export is not None
    tracing = ServiceTracing(Keep(), _sampler(export))
    _one_request(tracing, {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                           "tracestate": "vendor=x"})  # fmt: skip
    _one_request(tracing, {}, status=422)
    rt = tracing.start("POST", "/invocations", "/invocations", {}, "m", "mlflow")
    rt.begin(PREDICT, rows=1)
    rt.fail(ValueError("boom"))
    assert len(records) == 3 and record  # one record per finished request
    resource, scope = Resource({"service.name": "s", "n": 1}), InstrumentationScope(SCOPE)
    # Span ids of steps are drawn when encoding: compare everything else, and the tree's shape.
    direct = decode(encode_records(records, resource, scope).SerializeToString())
    spans = decode(
        encode_spans([s for r in records for s in spans_of(r, resource, scope)]).SerializeToString()
    )

    def shape(received: list[Any]) -> list[tuple[Any, ...]]:
        ids = {s.span_id: s.name for s in received}
        return sorted(
            (s.name, s.trace_id, ids.get(s.parent_span_id, s.parent_span_id), s.kind, s.status_code,
             sorted(s.attributes.items(), key=str), sorted(s.resource.items()), s.scope, s.events)
            for s in received
        )  # fmt: skip

    assert len(direct) == len(spans) == 3 + 1 + 1 + 2 + 1 and shape(direct) == shape(spans)
    raw = encode_records(records[:1], resource, scope).resource_spans[0].scope_spans[0].spans
    via = encode_spans(spans_of(records[0], resource, scope)).resource_spans[0].scope_spans[0].spans
    assert [(s.flags, s.trace_state, s.start_time_unix_nano) for s in raw] == [
        (s.flags, s.trace_state, s.start_time_unix_nano) for s in via
    ]


def test_a_record_that_cannot_be_sent_costs_its_batch_not_the_sender() -> None:
    """A value marshal cannot carry (a bug in an attribute) drops that batch, counted; the sender
    thread lives on and the next requests are exported."""
    with OtlpHttpReceiver() as rec:
        tracing = ServiceTracing.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": rec.endpoint,
                                           "OTEL_BSP_SCHEDULE_DELAY": "50"})  # fmt: skip
        sink = tracing.sink
        assert isinstance(sink, span_export.ExporterProcess)
        rt = tracing.start("POST", "/r", "/r", {}, "m", "native")
        rt.set("cd4ml.rows", object())  # type: ignore[arg-type]
        rt.finish(200)
        _wait(lambda: sink.dropped == 1)
        _one_request(tracing, {})
        spans = rec.wait_for(lambda s: len(s) >= 4)
        tracing.shutdown()
    assert len(spans) == 4 and sink.sent == 1 and sink.dropped == 1
