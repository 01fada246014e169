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

Configured by the standard OTEL_* variables (`cd4ml.core.telemetry.trace_export`): the sampler
(OTEL_TRACES_SAMPLER), a BatchSpanProcessor (OTEL_BSP_*), the SDK's OTLP exporter over HTTP/protobuf
(the default) or gRPC (OTEL_EXPORTER_OTLP_* headers, timeout, compression, certificates), flushed
at shutdown. Off when no endpoint is set: then nothing of the SDK is built or imported here, and a
request pays for a few calls on `NO_TRACE`, whose methods do nothing.

Where the work runs: the service samples and records; everything after that (the SDK's span
objects, the processors, encoding, export) runs in a child process (`cd4ml.serving.span_export`),
which a finished request reaches as one plain `record` sent down a pipe in batches.

Why spans are not made with `Tracer.start_span`: the SDK's mutable spans cost ~30 µs each to start
and end on this machine, and its OTLP encoder ~35 µs per span, i.e. ~20 % of a 1 ms single-row
prediction for 4 spans. Here a request records plain timestamps and dicts, and in the exporter
process becomes the SDK's own immutable `ReadableSpan`s (`spans_of`), handed to the span
processors; the exporter encodes them with `encode_spans` below (the generated protobuf classes,
filled in place: ~5x faster than the SDK's encoder, same wire format; a unit test compares the
two). The sampler decides once per request, for the request span, and its steps follow (as the
default parent-based sampler does).
See benchmarks/bench_tracing.py.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

# The API only (light, and what Airflow and MLflow load anyway); the SDK is imported when tracing is on.
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from cd4ml.core.telemetry import DEFAULT_SERVICE_NAME, GRPC, TraceExport, trace_export

if TYPE_CHECKING:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

log = logging.getLogger(__name__)

MODEL, VERSION, PROTOCOL, ROWS, REQUEST_ID = (
    "cd4ml.model", "cd4ml.model_version", "cd4ml.protocol", "cd4ml.rows", "cd4ml.request_id",
)  # fmt: skip
PARSE, PREDICT, LOG = "cd4ml.parse", "cd4ml.predict", "cd4ml.log"
SCOPE = "cd4ml.serving"  # the instrumentation scope of every span here
# Plain values, so that a finished request is one `marshal`-able record (see `record`):
# a status is (StatusCode value, description or None); an event is (name, attributes, time).
_UNSET: tuple[int, str | None] = (StatusCode.UNSET.value, None)
StatusT = tuple[int, "str | None"]
EventT = tuple[str, dict[str, Any], int]


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
    """The spans of one traced request, recorded as plain values and emitted when it finishes.

    One step (child span) is open at a time; steps are begun and ended by calls rather than `with`
    blocks so that the request path keeps its early returns: a step still open when the response is
    finished is where the request was refused, and ends with status ERROR and the status code.
    """

    __slots__ = ("_attributes", "_ctx", "_events", "_open", "_parent", "_start", "_status", "_step_attrs",
                 "_steps", "_tracing")  # fmt: skip

    def __init__(
        self,
        tracing: ServiceTracing,
        ctx: SpanContext,
        parent: SpanContext | None,
        attributes: dict[str, Any],
    ) -> None:
        self._tracing, self._ctx, self._parent, self._attributes = tracing, ctx, parent, attributes
        self._start = time.time_ns()
        self._step_attrs: dict[str, Any] = {}  # model and version, copied onto every step
        # (name, start, end, attributes, status, events) of each finished step, and the open one
        self._steps: list[tuple[str, int, int, dict[str, Any], StatusT, tuple[EventT, ...]]] = []
        self._open: tuple[str, int, dict[str, Any]] | None = None
        self._status = _UNSET
        self._events: tuple[EventT, ...] = ()

    def begin(self, name: str, rows: int | None = None) -> None:
        """End the open step, if any, and begin `name`."""
        now = time.time_ns()
        self._close(now)
        self._open = (name, now, self._step_attrs if rows is None else {**self._step_attrs, ROWS: rows})

    def end(self) -> None:
        self._close(time.time_ns())

    def _close(self, now: int, status: StatusT = _UNSET, events: tuple[EventT, ...] = ()) -> None:
        if self._open is not None:
            name, start, attributes = self._open
            self._steps.append((name, start, now, attributes, status, events))
            self._open = None

    def set(self, key: str, value: str | int) -> None:
        self._attributes[key] = value

    def serving(self, model: str, version: str) -> None:
        """The slot that answers: its model and version go on the request span and every step."""
        self._step_attrs = {MODEL: model, VERSION: version}
        self._attributes.update(self._step_attrs)

    def finish(self, status: int) -> dict[str, str]:
        """End the spans with the response's status; returns the `traceresponse` header."""
        now = time.time_ns()
        # A step still open at a 4xx/5xx is the one the request was refused in.
        self._close(now, (StatusCode.ERROR.value, f"HTTP {status}") if status >= 400 else _UNSET)
        self._attributes["http.response.status_code"] = status
        if status >= 500:  # a 4xx is the client's error, not the server's (HTTP semantic conventions)
            self._status = (StatusCode.ERROR.value, None)
            self._attributes["error.type"] = str(status)
        self._tracing._emit(self, now)
        c = self._ctx
        return {"traceresponse": f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"}

    def fail(self, err: BaseException) -> None:
        """The request raised (the service answers 500): record it on the open step and the request."""
        now = time.time_ns()
        event: EventT = ("exception", {
            "exception.type": type(err).__qualname__, "exception.message": str(err),
            "exception.stacktrace": "".join(traceback.format_exception(err)),
        }, now)  # fmt: skip
        status: StatusT = (StatusCode.ERROR.value, f"{type(err).__name__}: {err}")
        self._close(now, status, (event,))
        self._status, self._events = status, (event,)
        self._attributes["error.type"] = type(err).__qualname__
        self._tracing._emit(self, now)


class SpanSink(Protocol):
    """Where finished requests' records go (`cd4ml.serving.span_export.ExporterProcess`)."""

    def add(self, record: tuple[Any, ...]) -> None: ...

    def shutdown(self) -> None: ...


class ServiceTracing:
    """The service's tracing, or nothing: `start` gives NO_TRACE when tracing is off."""

    def __init__(self, sink: SpanSink | None = None, sampler: Sampler | None = None) -> None:
        self.sink = sink
        self._sampler = sampler
        # The headers the configured propagators read (OTEL_PROPAGATORS; default traceparent,
        # tracestate, baggage): most requests carry none, and then extracting is skipped.
        self._fields = tuple(propagate.get_global_textmap().fields)

    @property
    def enabled(self) -> bool:
        return self.sink is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ServiceTracing:
        """Tracing as the OTEL_* variables in `environ` ask; off (nothing built) when they ask nothing.
        The spans are exported by a child process that gets the same OTEL_* variables."""
        from cd4ml.serving.span_export import ExporterProcess

        export = trace_export(environ)
        if export is None:
            return cls()
        tracing = cls(ExporterProcess(environ), _sampler(export))
        log.info(
            "tracing on: %s spans to %s%s, exported by a child process",
            export.protocol if export.otlp else "console",
            export.endpoint or "stdout",
            " (and the console)" if export.otlp and export.console else "",
        )
        return tracing

    def start(
        self, method: str, route: str, path: str, headers: Mapping[str, str], model: str, protocol: str
    ) -> RequestTrace | NoTrace:
        """The request span of a prediction request (NO_TRACE when off, or not sampled)."""
        if self._sampler is None:
            return NO_TRACE
        # The client's span as parent, when it sent a traceparent.
        parent_ctx = propagate.extract(headers) if any(f in headers for f in self._fields) else None
        parent = trace.get_current_span(parent_ctx).get_span_context() if parent_ctx is not None else None
        if parent is not None and not parent.is_valid:
            parent = None
        trace_id = parent.trace_id if parent is not None else random.getrandbits(128) or 1
        name = f"{method} {route}"
        attributes: dict[str, Any] = {"http.request.method": method, "http.route": route, "url.path": path,
                                      MODEL: model, PROTOCOL: protocol}  # fmt: skip
        decision = self._sampler.should_sample(parent_ctx, trace_id, name, SpanKind.SERVER, attributes)
        if not decision.decision.is_sampled():
            return NO_TRACE
        if decision.attributes:
            attributes.update(decision.attributes)
        ctx = SpanContext(trace_id, _span_id(), is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED),
                          trace_state=decision.trace_state)  # fmt: skip
        return RequestTrace(self, ctx, parent, attributes)

    def _emit(self, request: RequestTrace, end: int) -> None:
        assert self.sink is not None
        self.sink.add(record(request, end))

    def shutdown(self) -> None:
        """Export what is still queued, then stop (the service's lifespan calls this on exit)."""
        if self.sink is not None:
            self.sink.shutdown()


def _context(ctx: SpanContext) -> tuple[int, int, bool, int, str]:
    return ctx.trace_id, ctx.span_id, ctx.is_remote, int(ctx.trace_flags), ctx.trace_state.to_header()


def record(request: RequestTrace, end: int) -> tuple[Any, ...]:
    """A finished request as plain values (what `marshal` carries to the exporter process):
    (context, parent context or None, name, start, end, attributes, status, events, steps)."""
    a = request._attributes
    parent = _context(request._parent) if request._parent is not None else None
    return (_context(request._ctx), parent, f"{a['http.request.method']} {a['http.route']}", request._start,
            end, a, request._status, request._events, request._steps)  # fmt: skip


def _span_context(values: tuple[int, int, bool, int, str]) -> SpanContext:
    trace_id, span_id, remote, flags, state = values
    return SpanContext(trace_id, span_id, is_remote=remote, trace_flags=TraceFlags(flags),
                       trace_state=TraceState.from_header([state]) if state else None)  # fmt: skip


def _status(values: StatusT) -> Status:
    code, description = values
    return _UNSET_STATUS if code == 0 else Status(StatusCode(code), description)


def _events(values: Sequence[EventT]) -> tuple[Any, ...]:
    if not values:
        return ()
    from opentelemetry.sdk.trace import Event

    return tuple(Event(name, attributes, timestamp=ts) for name, attributes, ts in values)


_UNSET_STATUS = Status(StatusCode.UNSET)


def spans_of(values: Sequence[Any], resource: Resource, scope: InstrumentationScope) -> list[ReadableSpan]:
    """The SDK's ReadableSpans of one `record`: the request span, then one per step."""
    from opentelemetry.sdk.trace import ReadableSpan

    ctx_values, parent_values, name, start, end, attributes, status, events, steps = values
    ctx = _span_context(ctx_values)
    spans = [ReadableSpan(
        name=name, context=ctx, parent=_span_context(parent_values) if parent_values else None,
        resource=resource, attributes=attributes, events=_events(events), kind=SpanKind.SERVER,
        status=_status(status), start_time=start, end_time=end, instrumentation_scope=scope,
    )]  # fmt: skip
    for step_name, step_start, step_end, step_attributes, step_status, step_events in steps:
        step = SpanContext(ctx.trace_id, _span_id(), is_remote=False, trace_flags=ctx.trace_flags,
                           trace_state=ctx.trace_state)  # fmt: skip
        spans.append(ReadableSpan(
            name=step_name, context=step, parent=ctx, resource=resource, attributes=step_attributes,
            events=_events(step_events), status=_status(step_status), start_time=step_start,
            end_time=step_end, instrumentation_scope=scope,
        ))  # fmt: skip
    return spans


def _span_id() -> int:
    return random.getrandbits(64) or 1  # as the SDK's RandomIdGenerator; 0 is the invalid id


def _sampler(export: TraceExport) -> Sampler:
    from opentelemetry.sdk.trace import sampling

    ratio = export.sampler_ratio
    return {
        "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: sampling.ParentBasedTraceIdRatio(ratio),
        "always_on": lambda: sampling.ALWAYS_ON,
        "always_off": lambda: sampling.ALWAYS_OFF,
        "traceidratio": lambda: sampling.TraceIdRatioBased(ratio),
    }[export.sampler]()


def _resource(export: TraceExport) -> Resource:
    from importlib.metadata import PackageNotFoundError, version

    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource

    # OTEL_SERVICE_NAME, else a service.name in OTEL_RESOURCE_ATTRIBUTES (the SDK's detector reads
    # those from the process environment), else a name that says what this is, not "unknown_service".
    resource = Resource.create({SERVICE_NAME: export.service_name} if export.service_name else {})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    with contextlib.suppress(PackageNotFoundError):
        resource = Resource({SERVICE_VERSION: version("cd4ml")}).merge(resource)
    return resource


def exporters(export: TraceExport) -> list[SpanExporter]:
    """The span exporters `export` asks for: OTLP (headers, timeout, compression and certificates
    from the OTEL_EXPORTER_OTLP_* variables, which the SDK's exporter reads), the console, or both."""
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    out: list[SpanExporter] = []
    if export.otlp:
        out.append(_otlp_exporter(export))
    if export.console:
        out.append(ConsoleSpanExporter())
    return out


def _otlp_exporter(export: TraceExport) -> Any:
    """The SDK's OTLP exporter for the protocol, encoding with `encode_spans` below."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    if export.protocol == GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

        class FastGrpc(Grpc):
            def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
                return encode_spans(data)  # the gRPC exporter's own hook for encoding

        return FastGrpc(endpoint=export.endpoint)

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    class FastHttp(Http):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            # The HTTP exporter has no encoding hook: its transport (`_client`, SDK 1.45) posts the
            # bytes. Should a later SDK not have it, the SDK's own export (and encoder) runs instead.
            if not self.can_post:
                return super().export(spans)
            return self.post(encode_spans(spans))

        @property
        def can_post(self) -> bool:
            return getattr(self, "_client", None) is not None and not getattr(self, "_shutdown", False)

        def post(self, request: ExportTraceServiceRequest) -> SpanExportResult:
            """Post an encoded request (`encode_records`: no span objects at all); needs `can_post`."""
            outcome = self._client.export(request.SerializePartialToString())
            return SpanExportResult.SUCCESS if outcome.success else SpanExportResult.FAILURE

    return FastHttp(endpoint=export.endpoint)


def encode_records(
    records: Sequence[Sequence[Any]], resource: Resource, scope: InstrumentationScope
) -> ExportTraceServiceRequest:
    """The OTLP request of `record`s, without building span objects: what `encode_spans` writes for
    `spans_of` the same records (a unit test compares the two), at about half the CPU time.
    Used by the exporter process when OTLP/HTTP is its only exporter."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    _attributes(rs.resource.attributes, resource.attributes)
    rs.schema_url = resource.schema_url or ""
    ss = rs.scope_spans.add()
    ss.scope.name, ss.scope.version = scope.name, scope.version or ""
    ss.schema_url = scope.schema_url or ""
    add, server, internal = ss.spans.add, SpanKind.SERVER.value + 1, SpanKind.INTERNAL.value + 1
    for ctx, parent, name, start, end, attributes, status, events, steps in records:
        trace_id, span_id, _, flags, state = ctx
        trace_bytes, own_id = trace_id.to_bytes(16, "big"), span_id.to_bytes(8, "big")
        p = add()
        p.trace_id, p.span_id, p.name, p.kind = trace_bytes, own_id, name, server
        if state:
            p.trace_state = state
        p.flags = 0x100 | flags | (0x200 if parent is not None and parent[2] else 0)
        if parent is not None:
            p.parent_span_id = parent[1].to_bytes(8, "big")
        p.start_time_unix_nano, p.end_time_unix_nano = start, end
        _record_body(p, attributes, status, events)
        for step_name, step_start, step_end, step_attributes, step_status, step_events in steps:
            q = add()
            q.trace_id, q.span_id, q.name, q.kind = (
                trace_bytes,
                _span_id().to_bytes(8, "big"),
                step_name,
                internal,
            )
            if state:
                q.trace_state = state
            q.flags, q.parent_span_id = 0x100 | flags, own_id
            q.start_time_unix_nano, q.end_time_unix_nano = step_start, step_end
            _record_body(q, step_attributes, step_status, step_events)
    return request


def _record_body(p: Any, attributes: Mapping[str, Any], status: StatusT, events: Sequence[EventT]) -> None:
    if attributes:
        _attributes(p.attributes, attributes)
    for name, event_attributes, ts in events:
        e = p.events.add()
        e.name, e.time_unix_nano = name, ts
        if event_attributes:
            _attributes(e.attributes, event_attributes)
    code, description = status
    if code:
        p.status.code = code
        if description:
            p.status.message = description


def encode_spans(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """The OTLP ExportTraceServiceRequest of `spans`, as the SDK's encoder builds it (grouped by
    resource and instrumentation scope), filling the generated protobuf messages in place."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    groups: dict[tuple[int, int], Any] = {}
    resources: dict[int, Any] = {}
    for span in spans:
        resource, scope = span.resource, span.instrumentation_scope
        key = (id(resource), id(scope))
        out = groups.get(key)
        if out is None:
            rs = resources.get(id(resource))
            if rs is None:
                rs = resources[id(resource)] = request.resource_spans.add()
                _attributes(rs.resource.attributes, resource.attributes)
                rs.schema_url = resource.schema_url or ""
            ss = rs.scope_spans.add()
            if scope is not None:
                ss.scope.name, ss.scope.version = scope.name, scope.version or ""
                ss.schema_url = scope.schema_url or ""
            out = groups[key] = ss.spans
        p = out.add()
        c = span.context
        assert c is not None
        p.trace_id, p.span_id = c.trace_id.to_bytes(16, "big"), c.span_id.to_bytes(8, "big")
        if c.trace_state:
            p.trace_state = c.trace_state.to_header()
        parent = span.parent
        # Flags: the W3C trace flags, plus "whether the parent is remote is known" and whether it is.
        flags = 0x100 | int(c.trace_flags)
        if parent is not None:
            p.parent_span_id = parent.span_id.to_bytes(8, "big")
            if parent.is_remote:
                flags |= 0x200
        p.flags = flags
        p.name = span.name
        p.kind = span.kind.value + 1  # the proto's enum starts at UNSPECIFIED
        p.start_time_unix_nano, p.end_time_unix_nano = span.start_time or 0, span.end_time or 0
        if span.attributes:
            _attributes(p.attributes, span.attributes)
        for event in span.events:
            e = p.events.add()
            e.name, e.time_unix_nano = event.name, event.timestamp
            if event.attributes:
                _attributes(e.attributes, event.attributes)
        status = span.status
        if status.status_code is not StatusCode.UNSET:
            p.status.code = status.status_code.value
            if status.description:
                p.status.message = status.description
    return request


def _attributes(target: Any, attributes: Mapping[str, Any]) -> None:
    add = target.add
    for key, value in attributes.items():
        kv = add()
        kv.key = key
        kind = type(value)
        if kind is str:
            kv.value.string_value = value
        elif kind is bool:  # before int: a bool is an int
            kv.value.bool_value = value
        elif kind is int:
            kv.value.int_value = value
        elif kind is float:
            kv.value.double_value = value
        elif isinstance(value, (list, tuple)):
            for item in value:
                _attributes_value(kv.value.array_value.values.add(), item)
        else:
            kv.value.string_value = str(value)


def _attributes_value(target: Any, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    else:
        target.string_value = str(value)
