"""Shadow traffic: a candidate version answers a copy of live requests, off the request path.

A request answered by the champion hands its rows and the champion's predictions to
`ShadowRunner.offer` (a bounded queue; never blocks, a full queue drops and counts). One daemon
thread predicts with the shadow slot, compares, counts (agreement, latency, errors, on the
service's /metrics) and appends a record to `<data root>/<model>/shadow/date=YYYY-MM-DD/*.parquet`:
time, request id, both versions, both predictions (JSON text), rows that agree, the sum of absolute
differences (regression) and the shadow's time. Clients only ever get the champion's answer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cd4ml.data.shadow_log import SHADOW_DIR
from cd4ml.serving.models import Slot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShadowJob:
    shadow: Slot
    champion_version: str
    request_id: str
    rows: list[list[Any]]
    predictions: list[Any]


def agreement(champion: list[Any], shadow: list[Any], classifier: bool) -> tuple[int, float]:
    """Rows on which both answer the same (labels equal; numbers within 1e-9 relative), and the
    sum of absolute differences (0 for labels)."""
    agreed, diff = 0, 0.0
    for a, b in zip(champion, shadow, strict=True):
        if classifier or isinstance(a, str) or isinstance(b, str):
            agreed += int(a == b)
            continue
        d = abs(float(a) - float(b))
        diff += d
        agreed += int(math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12))
    return agreed, diff


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        by_version = ["model", "version"]
        self.requests = Counter(
            "cd4ml_shadow_requests",
            "Live requests copied to a shadow version, by outcome (ok, error, dropped: queue full)",
            [*by_version, "outcome"], registry=registry,
        )  # fmt: skip
        self.rows = Counter(
            "cd4ml_shadow_rows", "Rows the shadow answered, by agreement with the champion",
            [*by_version, "agreement"], registry=registry,
        )  # fmt: skip
        self.abs_difference = Counter(
            "cd4ml_shadow_abs_difference", "Sum of |shadow - champion| over rows (regression)", by_version,
            registry=registry,
        )  # fmt: skip
        self.latency = Histogram(
            "cd4ml_shadow_seconds", "Shadow prediction time per request", by_version, registry=registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )  # fmt: skip
        self.version = Gauge(
            "cd4ml_shadow_version",
            "Version answering a copy of live traffic",
            ["model"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )


class ShadowRunner:
    def __init__(
        self,
        data_dir: Path,
        metrics: ShadowMetrics,
        *,
        max_queue: int = 1_000,
        flush_seconds: float = 1.0,
    ) -> None:
        self.data_dir, self.metrics, self.flush_seconds = data_dir, metrics, flush_seconds
        self._queue: queue.Queue[ShadowJob | None] = queue.Queue(maxsize=max_queue)
        self._pending: dict[str, list[dict[str, Any]]] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cd4ml-shadow", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Finish what is queued and write it (a clean shutdown keeps every shadow record)."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout=60)
        self._thread = None

    def offer(self, job: ShadowJob, fraction: float) -> None:
        """Called on the request path: O(1), never blocks, never raises."""
        if fraction < 1.0 and random.random() >= fraction:  # sampling, not security
            return
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.metrics.requests.labels(job.shadow.name, job.shadow.version, "dropped").inc()

    def _run(self) -> None:
        last_flush, stopping = time.monotonic(), False
        while not stopping:
            try:
                job = self._queue.get(timeout=self.flush_seconds)
            except queue.Empty:
                pass  # nothing came: only the flush below is due
            else:
                if job is None:  # close(): write what is pending and stop
                    stopping = True
                else:
                    self._handle(job)
            if stopping or time.monotonic() - last_flush >= self.flush_seconds:
                self._flush()
                last_flush = time.monotonic()

    def _handle(self, job: ShadowJob) -> None:
        shadow = job.shadow
        started = time.perf_counter()
        error, predictions, agreed, diff = "", [], 0, 0.0
        try:
            predictions = shadow.predict(job.rows)["predictions"]
            # In the try: a shadow answering a different number of rows is its error, and an
            # exception here would end the runner's thread (and with it every later copy).
            agreed, diff = agreement(job.predictions, predictions, shadow.classifier)
        except Exception as err:  # noqa: BLE001 - a failing shadow is counted and logged, never raised
            error = f"{type(err).__name__}: {err}"[:500]
        seconds = time.perf_counter() - started
        m = self.metrics
        if error:
            m.requests.labels(shadow.name, shadow.version, "error").inc()
        else:
            m.requests.labels(shadow.name, shadow.version, "ok").inc()
            m.rows.labels(shadow.name, shadow.version, "agree").inc(agreed)
            m.rows.labels(shadow.name, shadow.version, "disagree").inc(len(job.rows) - agreed)
            m.abs_difference.labels(shadow.name, shadow.version).inc(diff)
            m.latency.labels(shadow.name, shadow.version).observe(seconds)
        self._pending.setdefault(shadow.name, []).append({
            "at": time.time(), "request_id": job.request_id, "champion_version": job.champion_version,
            "shadow_version": shadow.version, "rows": len(job.rows), "agreed": agreed, "abs_difference": diff,
            "shadow_seconds": seconds, "error": error,
            "champion_predictions": json.dumps(job.predictions),
            "shadow_predictions": json.dumps(predictions),
        })  # fmt: skip

    def _flush(self) -> None:
        import pandas as pd

        pending, self._pending = self._pending, {}
        for model, records in pending.items():
            day = datetime.now(UTC).strftime("%Y-%m-%d")
            folder = self.data_dir / model / SHADOW_DIR / f"date={day}"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                name = f"part-{time.time_ns()}-{os.getpid()}.parquet"
                tmp = folder / f".{name}.tmp"
                pd.DataFrame.from_records(records).to_parquet(tmp, index=False)
                tmp.rename(folder / name)
            except OSError as err:  # the disk: counted in the log, the service keeps serving
                log.error("%s: could not write %d shadow records: %s", model, len(records), err)
