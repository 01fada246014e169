"""A real OTLP trace receiver for tests and benchmarks: it decodes the wire format, nothing else.

`OtlpHttpReceiver` answers `POST /v1/traces` with `application/x-protobuf` bodies (gzip or not) as
the OTLP/HTTP specification says, decoding each `ExportTraceServiceRequest` with the generated
protobuf classes of `opentelemetry-proto`. `OtlpGrpcReceiver` is the same for OTLP/gRPC
(`TraceService/Export`). Both listen on 127.0.0.1, on a free port, in a thread, and keep every span
as a `ReceivedSpan` (ids in hex, attributes as plain Python values).
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    status_code: int  # 0 unset, 1 ok, 2 error
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    events: tuple[str, ...] = field(default=())


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one serialized ExportTraceServiceRequest."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for rs in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(ReceivedSpan(
                    name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(), kind=s.kind, status_code=s.status.code,
                    attributes={kv.key: _value(kv.value) for kv in s.attributes},
                    resource=resource, scope=ss.scope.name, events=tuple(e.name for e in s.events),
                ))  # fmt: skip
    return spans


class _Receiver:
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.errors: list[str] = []  # what this receiver refused, and why
        self.counted = 0  # spans counted without decoding (count_only)
        self._lock = threading.Lock()

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self.requests += 1
            self.spans.extend(spans)

    def _count(self, body: bytes) -> None:
        """Parse and count only (benchmarks): a collector's cost, not the Python decoding's."""
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self._lock:
            self.requests += 1
            self.counted += n

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()
            self.requests = 0

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 30.0
    ) -> list[ReceivedSpan]:
        """The spans received once `predicate(spans)` holds; TimeoutError with what did arrive."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.snapshot()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({s.name for s in spans})
                raise TimeoutError(
                    f"spans not received within {timeout}s; got {len(spans)}: {names}; refused: {self.errors}"
                )
            time.sleep(0.05)


class OtlpHttpReceiver(_Receiver):
    """OTLP/HTTP: `POST /v1/traces`, binary protobuf. `endpoint` is the base URL (no path)."""

    def __init__(self, port: int = 0, count_only: bool = False) -> None:
        super().__init__()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's requests.Session expects

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path != "/v1/traces":
                    return self._answer(404, f"no such path {self.path}")
                if self.headers.get("content-type") != PROTOBUF:
                    return self._answer(415, f"content-type {self.headers.get('content-type')}")
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if count_only:
                    receiver._count(body)
                else:
                    receiver._add(decode(body))
                self._answer(200, None)

            def _answer(self, status: int, error: str | None) -> None:
                if error is not None:
                    receiver.errors.append(error)
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(status)
                self.send_header("content-type", PROTOBUF)
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                return None  # quiet: a test's output is its assertions

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)  # port 0: a free one
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpHttpReceiver:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()


class OtlpGrpcReceiver(_Receiver):
    """OTLP/gRPC: the `opentelemetry.proto.collector.trace.v1.TraceService/Export` method."""

    def __init__(self) -> None:
        super().__init__()
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(
                self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
            ) -> trace_service_pb2.ExportTraceServiceResponse:
                receiver._add(decode(request.SerializeToString()))
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OtlpGrpcReceiver:
        self._server.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.stop(grace=None)


def by_name(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    out: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> Iterator[ReceivedSpan]:
    return (s for s in spans if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id)


def main() -> None:
    """`python -m tests.support.otlp`: an OTLP/HTTP receiver in a process of its own (benchmarks).

    Prints its port, then serves until SIGTERM or SIGINT, and prints `{"spans": n, "requests": m}`.
    It parses every request and counts its spans (no Python objects per span): on a 2-core machine
    the full decoding would take CPU from the service it measures, which a collector elsewhere doesn't.
    """
    import json
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with OtlpHttpReceiver(count_only=True) as receiver:
        print(receiver.port, flush=True)
        stop.wait()
    print(json.dumps({"spans": receiver.counted, "requests": receiver.requests}), flush=True)


if __name__ == "__main__":
    main()
