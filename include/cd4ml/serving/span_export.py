"""The prediction service's spans leave its process: encoding and exporting run in a child process.

Why: a 1-row prediction costs ~1.5-2 ms of the service's one Python thread, and exporting in that
process (the SDK's span objects, the OTLP encoding, the HTTP posts, and a batch thread taking the
GIL from request handling) cost 70-130 µs per request, 4-23 % of 1-row throughput depending on the
run (BENCHMARKS.md, "Tracing cost"). Here a traced request leaves one plain record (ints, strings,
dicts: `cd4ml.serving.tracing.record`) in a deque; a thread of the service sends the records in
batches, `marshal`led, down a pipe to `python -m cd4ml.serving.span_export`, which turns them into
the SDK's `ReadableSpan`s and exports them with the exporters the OTEL_* variables configure (OTLP
over HTTP or gRPC with OTEL_EXPORTER_OTLP_*, or the console).

The batch span processor's settings keep their meaning, in the one queue there is:
- OTEL_BSP_SCHEDULE_DELAY (ms, default 5000): a finished request waits at most this long to be
  sent (sooner once `SEND_AT` requests wait);
- OTEL_BSP_MAX_QUEUE_SIZE (default 2048): requests waiting in the service; beyond it new ones are
  dropped and counted (never blocking a request), as the SDK drops spans from a full queue;
- OTEL_BSP_MAX_EXPORT_BATCH_SIZE: spans per export call in the child (`DEFAULT_BATCH`, 2048, when
  unset: 4x the SDK's default, as each POST has a fixed cost).
The child exports one batch before it reads the next, so a slow collector fills the pipe, then the
queue, and then drops: back-pressure ends in the service's bounded queue, not in lost memory.

The child runs at nice `NICE`: on a busy machine predictions come first. It exits when the pipe
closes: at the service's shutdown after a flush, and also when the service dies (its end of the
pipe closes with it), so no exporter outlives its service. A child that dies is started again, at
most once per `RESPAWN_S`; the batch in flight is lost and counted, and the service keeps serving.
Both counts are on the service's `/metrics` (`ExporterMetrics`): cd4ml_tracing_requests_sent_total and
cd4ml_tracing_requests_dropped_total.
"""

from __future__ import annotations

import collections
import logging
import marshal
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

FRAME = struct.Struct("!I")  # the length of each marshalled batch
SEND_AT = 512  # requests waiting: send then, without waiting for OTEL_BSP_SCHEDULE_DELAY
SPANS_PER_RECORD = 4  # a prediction request: the request span and its 3 steps
# Spans per export call when OTEL_BSP_MAX_EXPORT_BATCH_SIZE is not set: 4x the SDK's 512, since each
# POST costs the exporter ~2 ms whatever its size (~0.5 MB of OTLP at 2048 spans).
DEFAULT_BATCH = 2048
RESPAWN_S = 30.0
# The exporter runs at a lower CPU priority than the service: on a busy machine, requests come first
# and exporting takes what is left (it needs ~5 % of a core at 700 traced requests/s); if that is
# not enough, the bounded queue drops and counts rather than slowing predictions down.
NICE = 10


class ExporterProcess:
    """The service side: records in, batches down the pipe to the exporter child (started lazily)."""

    def __init__(self, environ: Mapping[str, str], max_pending: int | None = None) -> None:
        # The child sees the service's environment with the OTEL_* variables of `environ`.
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        self._env.update({k: v for k, v in environ.items() if k.startswith("OTEL_")})
        self._max = max_pending or int(environ.get("OTEL_BSP_MAX_QUEUE_SIZE") or 2048)
        self._delay_s = int(environ.get("OTEL_BSP_SCHEDULE_DELAY") or 5000) / 1000
        self._pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake = threading.Event()
        self._closing = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self.sent = self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="cd4ml-span-sender", daemon=True)
        self._thread.start()

    def add(self, record: tuple[Any, ...]) -> None:
        """A finished request's record (the request path: an append, nothing else)."""
        pending = self._pending
        if len(pending) >= self._max:
            self.dropped += 1
            return
        pending.append(record)
        if len(pending) >= SEND_AT:
            self._wake.set()

    def _run(self) -> None:
        while not self._closing:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self._send()
        self._send()

    def _send(self) -> None:
        pending = self._pending
        n = len(pending)
        if not n:
            return
        batch = [pending.popleft() for _ in range(n)]  # popleft is atomic: add() may run meanwhile
        try:
            data = marshal.dumps(batch)
        except ValueError as err:  # an attribute value of a type marshal cannot carry: a bug here
            self.dropped += n
            log.error("%d traced requests not exported: a span attribute cannot be sent (%s)", n, err)
            return
        proc = self._child()
        if proc is None or proc.stdin is None:
            self.dropped += n
            return
        try:
            proc.stdin.write(FRAME.pack(len(data)) + data)
            proc.stdin.flush()
            self.sent += n
        except (BrokenPipeError, OSError, ValueError) as err:
            self.dropped += n
            log.warning("the span exporter process (pid %s) is gone (%s): %d traced requests lost; it is "
                        "started again", proc.pid, err, n)  # fmt: skip
            self._proc = None

    def _child(self) -> subprocess.Popen[bytes] | None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            return proc
        if proc is not None:
            log.warning("the span exporter process exited with %s; starting it again", proc.returncode)
            self._proc = None
        now = time.monotonic()
        if self._started_at and now - self._started_at < RESPAWN_S:
            return None  # started recently and died again: drop, try later
        self._started_at = now
        try:
            self._proc = subprocess.Popen(  # stdout/stderr: the service's own (console exporter, errors)
                [sys.executable, "-m", "cd4ml.serving.span_export"], stdin=subprocess.PIPE, env=self._env
            )
        except OSError as err:
            log.error("the span exporter process could not start (%s); spans are dropped until it can", err)
            return None
        return self._proc

    def shutdown(self, timeout: float = 60.0) -> None:
        """Send what is left, close the pipe and wait for the child to export it and exit."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            log.warning("the span exporter process did not finish within %.0f s; stopped", timeout)
            proc.kill()
            proc.wait()
        if self.dropped:
            log.warning("tracing dropped %d requests' spans (queue full or exporter restarted)", self.dropped)

    @property
    def pid(self) -> int | None:
        """The exporter child's pid, once one runs (benchmarks count its CPU time)."""
        return self._proc.pid if self._proc is not None else None


class ExporterMetrics:
    """`/metrics` counters of an ExporterProcess (a prometheus_client collector): requests handed to
    the exporter and requests whose spans were dropped (queue full, or the exporter restarting)."""

    def __init__(self, exporter: ExporterProcess) -> None:
        self._exporter = exporter

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("cd4ml_tracing_requests_sent", "Traced requests handed to the span "
                                  "exporter process", value=self._exporter.sent)  # fmt: skip
        yield CounterMetricFamily("cd4ml_tracing_requests_dropped", "Traced requests whose spans were "
                                  "dropped (queue full, or the exporter process restarting)",
                                  value=self._exporter.dropped)  # fmt: skip


def _read_exact(stream: Any, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def main() -> int:
    """The child: records from stdin, exported batch by batch, until the pipe closes."""
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from cd4ml.core.telemetry import trace_export
    from cd4ml.serving.tracing import SCOPE, _resource, encode_records, exporters, spans_of

    logging.basicConfig(level=logging.INFO, format="%(asctime)s span-exporter %(levelname)s %(message)s")
    os.nice(NICE)
    export = trace_export(os.environ)
    if export is None:
        return 0
    targets = exporters(export)
    size = max(1, int(os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") or DEFAULT_BATCH))
    resource, scope = _resource(export), InstrumentationScope(SCOPE)
    # OTLP/HTTP alone (the usual case): records are encoded straight into the request, no span objects.
    direct: Any = targets[0] if len(targets) == 1 and getattr(targets[0], "can_post", False) else None
    per_batch = max(1, size // SPANS_PER_RECORD)
    stdin = sys.stdin.buffer
    try:
        while (head := _read_exact(stdin, FRAME.size)) is not None:
            body = _read_exact(stdin, FRAME.unpack(head)[0])
            if body is None:
                break
            records = marshal.loads(body)
            if direct is not None:
                for i in range(0, len(records), per_batch):
                    direct.post(encode_records(records[i : i + per_batch], resource, scope))
                continue
            spans = [span for record in records for span in spans_of(record, resource, scope)]
            for i in range(0, len(spans), size):
                for target in targets:  # each exporter logs its own failures (and retries transient ones)
                    target.export(spans[i : i + size])
    finally:
        for target in targets:
            target.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
