"""OpenTelemetry traces of the prediction service: one span per prediction request, with children.

    POST /v1/models/{model}/predict        (SERVER; the request span)
    ├── cd4ml.parse      decode the body, translate the protocol, validate against the schema
    ├── cd4ml.predict    the model's predict (and predict_proba)
    └── cd4ml.log        hand the rows to the prediction log's queue

Every span carries `cd4ml.model` and `cd4ml.model_version` (once the serving slot is known); the
request span also `cd4ml.protocol`, `cd4ml.rows`, `cd4ml.request_id` (the id feedback labels are
sent back with) and `http.response.status_code`. A `traceparent` header sent by the client makes
the request span its child; the response carries `traceresponse` (W3C Trace Context level 2) so a
client can look its request up.

Configured by the standard OTEL_* variables (`cd4ml.core.telemetry.trace_export`), exported over
OTLP (HTTP/protobuf by default, or gRPC) through a BatchSpanProcessor, flushed at shutdown. Off when
no endpoint is set: then no tracer provider exists, this module does not import the SDK, and each request
pays for a few calls on `NO_TRACE`, whose methods do nothing.

Spans are started with an explicit parent instead of being made "current" (no context attach and
detach per span): nothing inside a request reads the current span, and the request path is
measured in hundreds of microseconds (benchmarks/bench_tracing.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

# The API only (light, and what Airflow and MLflow load anyway); the SDK is imported when tracing is on.
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from cd4ml.core.telemetry import DEFAULT_SERVICE_NAME, GRPC, TraceExport, trace_export

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

MODEL, VERSION, PROTOCOL, ROWS, REQUEST_ID = (
    "cd4ml.model", "cd4ml.model_version", "cd4ml.protocol", "cd4ml.rows", "cd4ml.request_id",
)  # fmt: skip
PARSE, PREDICT, LOG = "cd4ml.parse", "cd4ml.predict", "cd4ml.log"


class NoTrace:
    """A request that is not traced: every method does nothing (tracing off, the common case)."""

    __slots__ = ()

    def begin(self, name: str, rows: int | None = None) -> None:
        return None

    def end(self) -> None:
        return None

    def set(self, key: str, value: str | int) -> None:
        return None

    def serving(self, model: str, version: str) -> None:
        return None

    def finish(self, status: int) -> dict[str, str]:
        return {}

    def fail(self, err: BaseException) -> None:
        return None


NO_TRACE = NoTrace()


class RequestTrace:
    """The spans of one traced request: the request span, and one step (child span) open at a time.

    Steps are begun and ended by calls rather than `with` blocks so that the request path keeps its
    early returns: a step still open when the response is finished is where the request was refused,
    and ends with status ERROR and the response's status code.
    """

    __slots__ = ("_attributes", "_ctx", "_span", "_step", "_tracer")

    def __init__(self, tracer: Tracer, span: Span) -> None:
        self._tracer, self._span = tracer, span
        self._ctx = trace.set_span_in_context(span)
        self._attributes: dict[str, str | int] = {}  # model and version, copied onto every step
        self._step: Span | None = None

    def begin(self, name: str, rows: int | None = None) -> None:
        """End the open step, if any, and begin `name`."""
        self.end()
        attributes = self._attributes if rows is None else {**self._attributes, ROWS: rows}
        self._step = self._tracer.start_span(name, context=self._ctx, attributes=attributes)

    def end(self) -> None:
        if self._step is not None:
            self._step.end()
            self._step = None

    def set(self, key: str, value: str | int) -> None:
        self._span.set_attribute(key, value)

    def serving(self, model: str, version: str) -> None:
        """The slot that answers: its model and version go on the request span and every step."""
        self._attributes = {MODEL: model, VERSION: version}
        self._span.set_attributes(self._attributes)

    def finish(self, status: int) -> dict[str, str]:
        """End the spans with the response's status; returns the `traceresponse` header."""
        if self._step is not None and status >= 400:  # refused in this step
            self._step.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        self.end()
        self._span.set_attribute("http.response.status_code", status)
        if status >= 500:  # a 4xx is the client's error, not the server's (HTTP semantic conventions)
            self._span.set_status(Status(StatusCode.ERROR))
            self._span.set_attribute("error.type", str(status))
        ctx = self._span.get_span_context()
        self._span.end()
        return {"traceresponse": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"}

    def fail(self, err: BaseException) -> None:
        """The request raised (the service answers 500): record it on the open step and the request."""
        for span in (self._step, self._span):
            if span is not None:
                span.record_exception(err)
                span.set_status(Status(StatusCode.ERROR, f"{type(err).__name__}: {err}"))
        self.end()
        self._span.set_attribute("error.type", type(err).__qualname__)
        self._span.end()


class ServiceTracing:
    """The service's tracer, or nothing: `start` gives NO_TRACE when tracing is off."""

    def __init__(self, provider: TracerProvider | None = None, export: TraceExport | None = None) -> None:
        self.provider = provider
        self.export = export
        self._tracer = provider.get_tracer("cd4ml.serving") if provider is not None else None
        # The headers the configured propagators read (OTEL_PROPAGATORS; default traceparent,
        # tracestate, baggage): most requests carry none, and then extracting is skipped.
        self._fields = tuple(propagate.get_global_textmap().fields)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ServiceTracing:
        """Tracing as the OTEL_* variables in `environ` ask; off (no provider) when they ask nothing."""
        export = trace_export(environ)
        if export is None:
            return cls()
        provider = _provider(export)
        log.info(
            "tracing on: %s spans to %s%s",
            export.protocol if export.otlp else "console",
            export.endpoint or "stdout",
            " (and the console)" if export.otlp and export.console else "",
        )
        return cls(provider, export)

    def start(
        self, method: str, route: str, path: str, headers: Mapping[str, str], model: str, protocol: str
    ) -> RequestTrace | NoTrace:
        """The request span of a prediction request (NO_TRACE when tracing is off)."""
        if self._tracer is None:
            return NO_TRACE
        span = self._tracer.start_span(
            f"{method} {route}",
            # The client's span as parent, when it sent a traceparent.
            context=propagate.extract(headers) if any(f in headers for f in self._fields) else None,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route, "url.path": path,
                        MODEL: model, PROTOCOL: protocol},
        )  # fmt: skip
        return RequestTrace(self._tracer, span)

    def shutdown(self) -> None:
        """Export what is still queued, then stop (the service's lifespan calls this on exit)."""
        if self.provider is not None:
            self.provider.shutdown()


def _provider(export: TraceExport) -> TracerProvider:
    from importlib.metadata import PackageNotFoundError, version

    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # OTEL_SERVICE_NAME, else a service.name in OTEL_RESOURCE_ATTRIBUTES (the SDK's detector reads
    # those from the process environment), else a name that says what this is, not "unknown_service".
    resource = Resource.create({SERVICE_NAME: export.service_name} if export.service_name else {})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    with contextlib.suppress(PackageNotFoundError):
        resource = Resource({SERVICE_VERSION: version("cd4ml")}).merge(resource)
    # The sampler comes from OTEL_TRACES_SAMPLER / _ARG (default: parent-based, always on).
    provider = TracerProvider(resource=resource)
    if export.otlp:
        if export.protocol == GRPC:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

            otlp: Any = Grpc(endpoint=export.endpoint)
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

            otlp = Http(endpoint=export.endpoint)
        # Headers, timeout, compression and certificates: the OTEL_EXPORTER_OTLP_* variables, read by
        # the exporter; queue size, batch size and delay: OTEL_BSP_*, read by the processor.
        provider.add_span_processor(BatchSpanProcessor(otlp))
    if export.console:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider
