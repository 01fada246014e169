"""The prediction service's parts, wired once: what every route and protocol shares.

`Service` owns the model store, the canary router, the prediction log, the shadow runner, the
metrics, tracing and (with several processes) the fleet; the routes (`cd4ml.serving.routes`) and the
scoring path (`cd4ml.serving.scoring`) read them from it. `cd4ml.serving.app.create_app` builds one
per process and starts and stops it with the app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool

from cd4ml.core.settings import Settings
from cd4ml.serving.admin_api import Admin
from cd4ml.serving.canary import CanaryRouting, forget_series
from cd4ml.serving.models import ModelStore, Slot
from cd4ml.serving.payload import Problem
from cd4ml.serving.predlog import PredictionLog
from cd4ml.serving.protocols import Protocol
from cd4ml.serving.shadow import ShadowMetrics, ShadowRunner
from cd4ml.serving.span_export import ExporterMetrics, ExporterProcess
from cd4ml.serving.tracing import ServiceTracing
from cd4ml.serving.workers import Board, Fleet

INLINE_ROWS = 16  # small requests predict on the event loop; larger ones in the thread pool


async def predict_rows(slot: Slot, rows: list[list[Any]]) -> dict[str, Any]:
    return slot.predict(rows) if len(rows) <= INLINE_ROWS else await run_in_threadpool(slot.predict, rows)


@dataclass(frozen=True)
class ServiceConfig:
    max_rows: int = 10_000
    max_body_bytes: int = 20 * 1024 * 1024
    poll_seconds: float = 2.0
    admin_token: str | None = None
    log_predictions: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> ServiceConfig:
        return cls(
            max_rows=settings.service_max_rows,
            max_body_bytes=settings.service_max_body_bytes,
            poll_seconds=settings.service_poll_seconds,
            admin_token=settings.service_admin_token,
            log_predictions=settings.service_log_predictions,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cd4ml_requests", "Prediction requests", ["model", "version", "code"], registry=r
        )
        self.latency = Histogram(
            "cd4ml_request_seconds", "Prediction latency (parse, validate, predict)", ["model", "version"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r,
        )  # fmt: skip
        self.rows = Counter("cd4ml_predicted_rows", "Rows predicted", ["model", "version"], registry=r)
        self.errors = Counter(
            "cd4ml_request_errors", "Rejected or failed requests", ["model", "kind"], registry=r
        )
        # With several processes (multiprocess mode): the version the latest swap of any live process
        # set; /v1/models/<m> lists every process's.
        self.serving = Gauge("cd4ml_serving_version", "Model version being served", ["model"], registry=r,
                             multiprocess_mode="livemostrecent")  # fmt: skip
        self.reloads = Counter(
            "cd4ml_model_reloads", "Model load events", ["model", "version", "outcome"], registry=r
        )
        self.unrecorded = Gauge(
            "cd4ml_champion_unrecorded",
            "1 while the champion alias points to a version without cd4ml's signed record (not served)",
            ["model"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        # Summed over processes, a stopped one's last value included (they only grow).
        self.log_dropped = Gauge(
            "cd4ml_prediction_log_dropped_rows", "Rows not logged (queue full)", registry=r,
            multiprocess_mode="sum",
        )  # fmt: skip
        self.log_written = Gauge("cd4ml_prediction_log_written_rows", "Rows written to the log", registry=r,
                                 multiprocess_mode="sum")  # fmt: skip
        # The standard process_* (memory, CPU, open files), python_info and python_gc_* series, as on
        # prometheus_client's default registry; this registry is the service's own, so they are added.
        # (Several processes expose prometheus_client's multiprocess collection instead: not these.)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)


def failure(
    protocol: Protocol,
    status: int,
    message: str,
    problems: list[Problem],
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    """The protocol's own error body for `status`, naming every problem."""
    return JSONResponse(protocol.error(status, message, problems, extra or {}), status_code=status)


class Service:
    """One process's service: built before the app, started and stopped by its lifespan."""

    def __init__(self, settings: Settings, config: ServiceConfig, tracing: ServiceTracing) -> None:
        self.settings, self.config, self.tracing = settings, config, tracing
        self.metrics = Metrics()
        self.shadow_metrics = ShadowMetrics(self.metrics.registry)
        self.shadows = ShadowRunner(settings.data_dir, self.shadow_metrics)
        self.fleet: Fleet | None = None
        self.store = ModelStore(
            settings, poll_seconds=config.poll_seconds, on_event=self.on_event, signing_key=config.admin_token
        )
        self.canary = CanaryRouting(self.store.candidates.canaries, self.metrics.registry, config.max_rows,
                                    predict_rows)  # fmt: skip
        self.canary.refused = self.store.candidates.refused_canaries
        board = Board.from_settings(settings)  # None: this is the only process
        self.predlog = PredictionLog(settings.data_dir, shared=board is not None)
        if board is not None:
            self.fleet = Fleet.build(board, self.store, self.canary, self.predlog, self.refresh_gauges)
        self.admin = Admin(self.store, config.admin_token, None if self.fleet is None else self.fleet.sync)
        if isinstance(tracing.sink, ExporterProcess):
            self.metrics.registry.register(ExporterMetrics(tracing.sink))

    def on_event(self, model: str, version: str, outcome: str) -> None:
        """A model load event of the store: counted, and the gauges and the canary follow it."""
        self.metrics.reloads.labels(model, version, outcome).inc()
        self.canary.on_event(model, outcome, version)
        if outcome == "shadowing":
            self.shadow_metrics.version.labels(model).set(float(version))
        elif outcome == "unshadowed":
            forget_series(self.shadow_metrics.version, model)
        elif outcome == "loaded":
            self.metrics.serving.labels(model).set(float(version))
            if self.fleet is not None:
                self.fleet.swapped()
        elif outcome == "unloaded":  # the champion alias is gone: nothing is served for this model
            forget_series(self.metrics.serving, model)

    def refresh_gauges(self) -> None:
        for model in self.store.known_models:
            self.metrics.unrecorded.labels(model).set(1.0 if model in self.store.unrecorded else 0.0)
        self.metrics.log_dropped.set(self.predlog.dropped)
        self.metrics.log_written.set(self.predlog.written_rows)

    async def start(self) -> None:
        self.predlog.start()
        self.shadows.start()
        await run_in_threadpool(self.store.refresh)  # serve what already exists before the first request
        self.store.start()
        if self.fleet is not None:
            self.fleet.start()

    async def stop(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()
        self.store.stop()
        self.predlog.close()  # every queued prediction reaches disk on a clean shutdown
        await run_in_threadpool(self.shadows.close)  # and every shadow record
        await run_in_threadpool(self.tracing.shutdown)  # and every finished span reaches the collector

    def readiness(self) -> dict[str, Any]:
        """This process's readiness, and with several processes every one's: ready only when all are."""
        store = self.store
        missing = [m for m in store.known_models if m not in store.slots]
        body: dict[str, Any] = {
            "ready": not missing and bool(store.known_models),
            "serving": {name: slot.version for name, slot in list(store.slots.items())},
            "waiting_for_champion": missing,
            "last_poll_error": store.last_poll_error,
            # Alias moves cd4ml did not make (not served): model -> what the alias points to and why.
            "unrecorded_champions": {m: why for m, (_, why) in list(store.unrecorded.items())},
        }
        return body if self.fleet is None else self.fleet.ready(body)

    def served_names(self) -> list[str]:
        return sorted(set(self.store.known_models) | set(self.store.slots))

    def refused_versions(self, model: str) -> dict[str, str]:
        """Versions of `model` this service will not serve, with its own reason for each (a champion
        without cd4ml's signed record too: a deploy reads this and fails at once, saying why)."""
        refused = {v: why for (m, v), why in list(self.store.refused.items()) if m == model}
        unrecorded = self.store.unrecorded.get(model)
        if unrecorded is not None:
            refused[unrecorded[0]] = unrecorded[1]
        if self.fleet is not None:  # a version any process refused
            refused = self.fleet.refused(model) | refused
        return refused

    def unknown_or_waiting(self, model: str) -> tuple[int, str, list[Problem], dict[str, Any]]:
        if model in self.store.known_models:
            # Why nothing is served yet: a deploy reads the refusal reasons here, so it can say
            # "refused version 3: <reason>" instead of waiting for a version that never comes.
            return (
                503,
                f"model '{model}' has no champion loaded yet",
                [Problem("model", "no champion loaded yet")],
                {"refused_versions": self.refused_versions(model)},
            )
        return 404, f"unknown model '{model}'", [Problem("model", f"'{model}' is not served here")], {}

    def find_slot(self, model: str, version: str | None, protocol: Protocol) -> Slot | JSONResponse:
        """The slot serving `model` (at `version`, if one is named), or the protocol's 4xx/503."""
        slot = self.store.slots.get(model)  # a request finishes on this slot, whatever swaps meanwhile
        if slot is None:
            return failure(protocol, *self.unknown_or_waiting(model))
        pinned = self.canary.pinned(model, version)
        if pinned is not None:
            return pinned
        if version is not None and version != slot.version:
            return failure(
                protocol,
                404,
                f"model '{model}' version '{version}' is not served here; it serves version '{slot.version}'",
                [Problem("version", f"'{version}' is not served; '{slot.version}' is")],
            )
        return slot

    def metrics_text(self) -> bytes:
        """The Prometheus exposition (`CONTENT_TYPE_LATEST`) of this service (of every process,
        when there are several)."""
        self.refresh_gauges()
        if self.fleet is None:
            return generate_latest(self.metrics.registry)
        # The canary's percentiles already cover every process (they read every process's samples).
        return self.fleet.metrics(self.canary.metrics.percentiles)
