"""The prediction service: FastAPI on uvicorn, serving the `champion` of every model spec.

POST /v1/models/{model}/predict   dataframe_split | dataframe_records | instances | plain records
GET  /v1/models, /v1/models/{model}   what is served: version, run id, champion since, fingerprint
GET  /health/live, /health/ready  (ready = every spec'd model has a champion loaded)
GET  /metrics                     Prometheus (the service's counters, plus process, platform and GC)
POST /admin/reload                check MLflow now (Bearer token: CD4ML_SERVICE_ADMIN_TOKEN)

MLflow scoring protocol (what `mlflow models serve` answers; the model by header or path prefix):
POST /invocations, /v1/models/{model}/invocations   GET /ping, /version
Open Inference Protocol v2 REST (KServe, Triton, MLServer clients):
GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/{model}[/versions/{version}][/ready]
POST /v2/models/{model}[/versions/{version}]/infer

Every protocol goes through `score`: the same validation, prediction log rows and metrics, and
the same OpenTelemetry spans when the OTEL_* variables name an endpoint (`cd4ml.serving.tracing`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
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

from cd4ml.core.settings import Settings, get_settings
from cd4ml.serving.admin_api import Admin
from cd4ml.serving.canary import CHAMPION, CanaryRouting, forget_series
from cd4ml.serving.feedback_api import feedback_router
from cd4ml.serving.models import ModelStore, Slot
from cd4ml.serving.payload import PayloadError, Problem, check, read_limited
from cd4ml.serving.predlog import Entry, PredictionLog
from cd4ml.serving.protocols import MLFLOW, MODEL_HEADER, NATIVE, OIP, Protocol, choose_model, oip_metadata
from cd4ml.serving.shadow import ShadowJob, ShadowMetrics, ShadowRunner
from cd4ml.serving.span_export import ExporterMetrics, ExporterProcess
from cd4ml.serving.tracing import (
    LOG,
    NO_TRACE,
    PARSE,
    PREDICT,
    REQUEST_ID,
    ROWS,
    NoTrace,
    RequestTrace,
    ServiceTracing,
)
from cd4ml.serving.workers import Board, Fleet

log = logging.getLogger(__name__)
INLINE_ROWS = 16  # small requests predict on the event loop; larger ones in the thread pool


async def _predict(slot: Slot, rows: list[list[Any]]) -> dict[str, Any]:
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

    @classmethod
    def from_env(cls) -> ServiceConfig:
        return cls.from_settings(get_settings())


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


# Request bodies as the OpenAPI document shows them (and schemathesis fuzzes them).
# anyOf with required keys: with oneOf and no `required`, every object matched several
# alternatives at once, so no object body was valid against the document.
_MLFLOW_BODIES: list[dict[str, Any]] = [
    {"type": "object", "required": ["dataframe_split"], "properties": {"dataframe_split": {
        "type": "object", "required": ["columns", "data"], "properties": {
            "columns": {"type": "array", "items": {"type": "string"}},
            "data": {"type": "array", "items": {"type": "array"}}}}}},
    {"type": "object", "required": ["dataframe_records"],
     "properties": {"dataframe_records": {"type": "array", "items": {"type": "object"}}}},
    {"type": "object", "required": ["instances"],
     "properties": {"instances": {"type": "array", "items": {"type": "object"}}}},
    {"type": "object", "required": ["inputs"], "properties": {"inputs": {
        "anyOf": [{"type": "object", "additionalProperties": {"type": "array"}},
                  {"type": "array", "items": {"type": "object"}}]}}},
]  # fmt: skip
_OIP_BODY: dict[str, Any] = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"},
    "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype", "data"],
        "properties": {"name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                       "datatype": {"type": "string"}, "data": {"type": "array"}}}},
    "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                           "properties": {"name": {"type": "string"}}}},
}}  # fmt: skip


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _mlflow_version() -> str:
    found = _package_version("mlflow")
    return found if found != "unknown" else _package_version("mlflow-skinny")


def create_app(
    settings: Settings | None = None,
    config: ServiceConfig | None = None,
    tracing: ServiceTracing | None = None,
) -> FastAPI:
    settings = settings or get_settings()
    config = config or ServiceConfig.from_settings(settings)
    # Off (no tracer provider) unless an OTLP endpoint is set; a bad OTEL_* value fails here, at start.
    tracing = tracing or ServiceTracing.from_env(os.environ)
    metrics = Metrics()

    shadow_metrics = ShadowMetrics(metrics.registry)
    shadows = ShadowRunner(settings.data_dir, shadow_metrics)

    def on_event(model: str, version: str, outcome: str) -> None:
        metrics.reloads.labels(model, version, outcome).inc()
        canary.on_event(model, outcome, version)
        if outcome == "shadowing":
            shadow_metrics.version.labels(model).set(float(version))
        elif outcome == "unshadowed":
            forget_series(shadow_metrics.version, model)
        elif outcome == "loaded":
            metrics.serving.labels(model).set(float(version))
            if fleet is not None:
                fleet.swapped()
        elif outcome == "unloaded":  # the champion alias is gone: nothing is served for this model
            forget_series(metrics.serving, model)

    store = ModelStore(
        settings, poll_seconds=config.poll_seconds, on_event=on_event, signing_key=config.admin_token
    )
    canary = CanaryRouting(store.candidates.canaries, metrics.registry, config.max_rows, _predict)
    canary.refused = store.candidates.refused_canaries
    board = Board.from_settings(settings)  # None: this is the only process
    predlog = PredictionLog(settings.data_dir, shared=board is not None)

    def refresh_gauges() -> None:
        for model in store.known_models:
            metrics.unrecorded.labels(model).set(1.0 if model in store.unrecorded else 0.0)
        metrics.log_dropped.set(predlog.dropped)
        metrics.log_written.set(predlog.written_rows)

    fleet = None if board is None else Fleet.build(board, store, canary, predlog, refresh_gauges)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from threadpoolctl import threadpool_limits

        # One request is tiny: OpenMP/BLAS thread pools only add spin-up and contention here.
        limits = threadpool_limits(limits=1)
        predlog.start()
        shadows.start()
        await run_in_threadpool(store.refresh)  # serve what already exists before the first request
        store.start()
        if fleet is not None:
            fleet.start()
        yield
        if fleet is not None:
            fleet.stop()
        store.stop()
        predlog.close()  # every queued prediction reaches disk on a clean shutdown
        await run_in_threadpool(shadows.close)  # and every shadow record
        await run_in_threadpool(tracing.shutdown)  # and every finished span reaches the collector
        limits.restore_original_limits()

    app = FastAPI(title="cd4ml prediction service", version="1", lifespan=lifespan)
    app.state.store = store
    app.state.predlog = predlog
    app.state.metrics = metrics
    if isinstance(tracing.sink, ExporterProcess):
        metrics.registry.register(ExporterMetrics(tracing.sink))
    app.state.tracing = tracing
    admin = Admin(store, config.admin_token, None if fleet is None else fleet.sync)
    app.include_router(admin.router())
    app.include_router(
        feedback_router(settings, max_body_bytes=config.max_body_bytes, max_rows=config.max_rows,
                        predlog=predlog, registry=metrics.registry)
    )  # fmt: skip

    @app.get("/health/live")
    def live() -> dict[str, str]:
        return {"status": "ok"}

    def readiness_now() -> dict[str, Any]:
        """This process's readiness, and with several processes every one's: ready only when all are."""
        missing = [m for m in store.known_models if m not in store.slots]
        body: dict[str, Any] = {
            "ready": not missing and bool(store.known_models),
            "serving": {name: slot.version for name, slot in list(store.slots.items())},
            "waiting_for_champion": missing,
            "last_poll_error": store.last_poll_error,
            # Alias moves cd4ml did not make (not served): model -> what the alias points to and why.
            "unrecorded_champions": {m: why for m, (_, why) in list(store.unrecorded.items())},
        }
        return body if fleet is None else fleet.ready(body)

    @app.get("/health/ready")
    def ready() -> JSONResponse:
        body = readiness_now()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "models": [store.slots[m].metadata() for m in sorted(store.slots)],
            "known": store.known_models,
        }

    def refused_versions(model: str) -> dict[str, str]:
        """Versions of `model` this service will not serve, with its own reason for each (a champion
        without cd4ml's signed record too: a deploy reads this and fails at once, saying why)."""
        refused = {v: why for (m, v), why in list(store.refused.items()) if m == model}
        unrecorded = store.unrecorded.get(model)
        if unrecorded is not None:
            refused[unrecorded[0]] = unrecorded[1]
        if fleet is not None:  # a version any process refused
            refused = fleet.refused(model) | refused
        return refused

    @app.get("/v1/models/{model}")
    def model_metadata(model: str) -> JSONResponse:
        slot = store.slots.get(model)
        if slot is None:
            return _failure(NATIVE, *_unknown_or_waiting(model))
        body = slot.metadata()
        body["refused_versions"] = refused_versions(model)
        staged = store.candidates.staged.get(model)
        body["staged_version"] = staged.version if staged else None
        shadow = store.candidates.shadows.get(model)
        body["shadow_version"] = shadow.version if shadow else None
        if fleet is not None:
            body = fleet.model(body, model)
        body |= canary.status(model)
        body["canary_version"] = body["canary"]["version"] if body["canary"] else None
        return JSONResponse(body)

    def _unknown_or_waiting(model: str) -> tuple[int, str, list[Problem], dict[str, Any]]:
        if model in store.known_models:
            # Why nothing is served yet: a deploy reads the refusal reasons here, so it can say
            # "refused version 3: <reason>" instead of waiting for a version that never comes.
            return (
                503,
                f"model '{model}' has no champion loaded yet",
                [Problem("model", "no champion loaded yet")],
                {"refused_versions": refused_versions(model)},
            )
        return 404, f"unknown model '{model}'", [Problem("model", f"'{model}' is not served here")], {}

    def _failure(
        protocol: Protocol,
        status: int,
        message: str,
        problems: list[Problem],
        extra: dict[str, Any] | None = None,
    ) -> JSONResponse:
        return JSONResponse(protocol.error(status, message, problems, extra or {}), status_code=status)

    def find_slot(model: str, version: str | None, protocol: Protocol) -> Slot | JSONResponse:
        """The slot serving `model` (at `version`, if one is named), or the protocol's 4xx/503."""
        slot = store.slots.get(model)  # a request finishes on this slot, whatever swaps meanwhile
        if slot is None:
            return _failure(protocol, *_unknown_or_waiting(model))
        pinned = canary.pinned(model, version)
        if pinned is not None:
            return pinned
        if version is not None and version != slot.version:
            return _failure(
                protocol,
                404,
                f"model '{model}' version '{version}' is not served here; it serves version '{slot.version}'",
                [Problem("version", f"'{version}' is not served; '{slot.version}' is")],
            )
        return slot

    async def score(request: Request, model: str, protocol: Protocol, version: str | None = None) -> Response:
        """Every protocol's prediction: read, parse (protocol), validate, predict, log, count, answer."""
        if not tracing.enabled:
            return await _score(request, model, protocol, version, NO_TRACE)
        path: str = request.scope["path"]
        route: str = getattr(request.scope.get("route"), "path", path)  # the template: /v1/models/{model}/...
        rt = tracing.start(request.method, route, path, request.headers, model, protocol.name)
        try:
            response = await _score(request, model, protocol, version, rt)
        except BaseException as err:  # recorded on the spans, then raised on: FastAPI answers 500
            rt.fail(err)
            raise
        response.headers.update(rt.finish(response.status_code))
        return response

    async def _score(
        request: Request, model: str, protocol: Protocol, version: str | None, rt: RequestTrace | NoTrace
    ) -> Response:
        started = time.perf_counter()
        staging = request.headers.get("x-cd4ml-slot")
        slot = (
            find_slot(model, version, protocol)
            if staging is None
            else admin.staged_slot(request, model, staging)
        )
        if isinstance(slot, JSONResponse) and staging is not None:
            metrics.errors.labels(model if model in store.known_models else "_unknown", "staging").inc()
            return slot
        if isinstance(slot, JSONResponse):
            if model in store.slots:
                metrics.errors.labels(model, "unknown_version").inc()
            else:
                metrics.errors.labels(
                    "_unknown" if model not in store.known_models else model, "unknown_model"
                ).inc()
            return slot
        rt.serving(model, slot.version)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            metrics.errors.labels(model, "too_large").inc()
            return _failure(
                protocol,
                413,
                f"body of {declared} bytes; at most {config.max_body_bytes}",
                [Problem("body", "too large")],
            )
        raw = await read_limited(request, config.max_body_bytes)
        if raw is None:  # a chunked body has no length up front: stop reading once it is too big
            metrics.errors.labels(model, "too_large").inc()
            return _failure(
                protocol,
                413,
                f"body larger than {config.max_body_bytes} bytes",
                [Problem("body", "too large")],
            )
        rt.begin(PARSE)
        try:
            body = protocol.decode(raw, request.headers)
        except PayloadError as err:
            metrics.errors.labels(model, "bad_request").inc()
            return _failure(protocol, err.status, f"invalid request for model '{model}': {err}", err.problems)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            metrics.errors.labels(model, "bad_request").inc()
            return _failure(
                protocol, 400, "body is not valid JSON", [Problem("body", f"invalid JSON: {err}")]
            )
        except RecursionError:
            metrics.errors.labels(model, "bad_request").inc()
            return _failure(
                protocol, 400, "body is nested too deeply", [Problem("body", "JSON nested too deeply")]
            )
        try:
            parsed = protocol.parse(body, slot)
            rows = check(slot.schema, parsed.columns, parsed.data, config.max_rows)
        except PayloadError as err:
            metrics.errors.labels(model, "too_large" if err.status == 413 else "bad_request").inc()
            metrics.requests.labels(model, slot.version, str(err.status)).inc()
            return _failure(protocol, err.status, f"invalid request for model '{model}': {err}", err.problems)
        except RecursionError:
            metrics.errors.labels(model, "bad_request").inc()
            metrics.requests.labels(model, slot.version, "400").inc()
            return _failure(
                protocol, 400, "body is nested too deeply", [Problem("body", "nested too deeply")]
            )
        rt.set(ROWS, len(rows))
        rt.begin(PREDICT, rows=len(rows))
        live = request.headers.get("x-cd4ml-purpose") != "smoke-test"
        routed, to_canary = (
            canary.chosen(model, request.headers, parsed.columns, parsed.data)
            if staging is None and version is None and live
            else (None, False)
        )
        out: dict[str, Any] | None = None
        if routed is not None and to_canary:
            answered = await canary.answer(routed, slot.schema, parsed.columns, parsed.data, rows)
            if answered is not None:
                (out, rows), slot = answered, routed.slot
            routed = None  # the canary's own outcome is counted; a champion answering for it is not
        try:
            if out is None:
                began = time.perf_counter()
                out = await _predict(slot, rows)
                if routed is not None:
                    canary.count(routed, CHAMPION, time.perf_counter() - began)
        except Exception as err:  # any model failure is the service's 500, counted
            # Counted like every other answer, so the 5xx-rate alert sees a model that throws.
            log.exception("%s v%s: prediction failed", model, slot.version)
            if routed is not None:
                canary.count(routed, CHAMPION, 0.0, error=True)
            metrics.errors.labels(model, "predict_failed").inc()
            metrics.requests.labels(model, slot.version, "500").inc()
            return _failure(
                protocol, 500, f"model '{model}' version {slot.version} failed to predict: "
                f"{type(err).__name__}: {err}", [Problem("model", "prediction failed")],
            )  # fmt: skip
        request_id = parsed.request_id or request.headers.get("x-request-id") or uuid.uuid4().hex
        rt.set(REQUEST_ID, request_id)
        if staging is not None:  # a smoke test of a staged version: not live traffic, not logged
            rt.end()
            answer = json.dumps(protocol.respond(out, parsed, request_id))
            return Response(answer, media_type="application/json",
                            headers={"x-model-version": slot.version, "x-cd4ml-slot": "staging"})  # fmt: skip
        if config.log_predictions and live:
            rt.begin(LOG, rows=len(rows))
            predlog.put(Entry(model, slot.version, time.time(), request_id, slot.schema.columns, rows,
                              out["predictions"]))  # fmt: skip
        shadow = store.candidates.shadows.get(model)
        if shadow is not None and live:  # a copy for the shadow, answered off the request path
            spec = store.specs.get(model)
            shadows.offer(ShadowJob(shadow, slot.version, request_id, rows, out["predictions"]),
                          spec.deployment.shadow_fraction if spec else 1.0)  # fmt: skip
        rt.end()
        metrics.requests.labels(model, slot.version, "200").inc()
        metrics.rows.labels(model, slot.version).inc(len(rows))
        metrics.latency.labels(model, slot.version).observe(time.perf_counter() - started)
        return Response(
            json.dumps(protocol.respond(out, parsed, request_id)),
            media_type="application/json",
            headers={"x-model-version": slot.version, "x-request-id": request_id},
        )

    @app.get("/v1/models/{model}/canary")
    def canary_status(model: str) -> JSONResponse:
        """The model's canary: version, share, sticky key, both sides' requests, errors, p50/p99."""
        if model not in store.known_models:
            return JSONResponse({"error": f"model '{model}' is not served here"}, status_code=404)
        return JSONResponse({"model": model, **canary.status(model)})

    @app.post("/v1/models/{model}/predict", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"anyOf": [*_MLFLOW_BODIES[:3],
            {"type": "array", "items": {"type": "object"}},
            {"type": "object", "description": "one record",
             "additionalProperties": {"type": ["number", "string", "null"]}},
        ]}}}}})  # fmt: skip
    async def predict(model: str, request: Request) -> Response:
        return await score(request, model, NATIVE)

    # -- MLflow scoring protocol ----------------------------------------------------------------

    def served_names() -> list[str]:
        return sorted(set(store.known_models) | set(store.slots))

    async def invocations(request: Request, path_model: str | None) -> Response:
        try:
            model = choose_model(path_model, request.headers.get(MODEL_HEADER), served_names())
        except PayloadError as err:
            metrics.errors.labels("_unknown", "unknown_model").inc()
            return _failure(MLFLOW, err.status, str(err), err.problems, {"models": served_names()})
        mime, _, params = (request.headers.get("content-type") or "application/json").partition(";")
        charset = params.strip().removeprefix("charset=").strip().lower() if params.strip() else "utf-8"
        if mime.strip().lower() != "application/json" or charset != "utf-8":
            metrics.errors.labels(model, "bad_request").inc()
            return _failure(
                MLFLOW,
                415,
                f"content type '{request.headers.get('content-type')}' is not "
                "served; send application/json (MLflow's JSON formats)",
                [Problem("content-type", "must be application/json (utf-8)")],
            )
        return await score(request, model, MLFLOW)

    invocations_body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"anyOf": _MLFLOW_BODIES}}}}}  # fmt: skip

    @app.post("/invocations", openapi_extra=invocations_body)
    async def mlflow_invocations(request: Request) -> Response:
        """MLflow's scoring endpoint: the only model, or the one named in the x-cd4ml-model header."""
        return await invocations(request, None)

    @app.post("/v1/models/{model}/invocations", openapi_extra=invocations_body)
    async def mlflow_model_invocations(model: str, request: Request) -> Response:
        return await invocations(request, model)

    @app.get("/ping")
    def ping() -> Response:
        """As MLflow's server: 200 once every model is loaded, else 404 (with what is missing)."""
        now = readiness_now()
        if not now["ready"]:
            return _failure(
                MLFLOW,
                404,
                "not ready: waiting for a champion" if now["waiting_for_champion"] or not store.known_models
                else "not ready: waiting for every service process",
                [Problem("model", "no champion loaded yet")],
                {"waiting_for_champion": now["waiting_for_champion"], **({"processes": now["processes"]}
                                                                       if "processes" in now else {})},
            )  # fmt: skip
        return Response("\n", media_type="application/json")

    @app.get("/version")
    def mlflow_version() -> Response:
        """As MLflow's server: the MLflow version, as plain text."""
        return Response(_mlflow_version(), media_type="application/json")

    # -- Open Inference Protocol v2 -------------------------------------------------------------

    @app.get("/v2")
    def oip_server() -> dict[str, Any]:
        return {"name": "cd4ml", "version": _package_version("cd4ml"), "extensions": []}

    @app.get("/v2/health/live")
    def oip_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    def oip_ready() -> JSONResponse:
        """OIP: 200 when ready, a 4xx when not (every spec'd model needs its champion loaded)."""
        ok = bool(readiness_now()["ready"])
        return JSONResponse({"ready": ok}, status_code=200 if ok else 400)

    def oip_model(model: str, version: str | None) -> JSONResponse:
        slot = find_slot(model, version, OIP)
        return slot if isinstance(slot, JSONResponse) else JSONResponse(oip_metadata(slot))

    def oip_model_ready(model: str, version: str | None) -> JSONResponse:
        failed = find_slot(model, version, OIP)
        if isinstance(failed, JSONResponse):
            return JSONResponse(
                {"name": model, "ready": False, **json.loads(bytes(failed.body))},
                status_code=failed.status_code if failed.status_code < 500 else 400,
            )
        return JSONResponse({"name": model, "ready": True})

    @app.get("/v2/models/{model}")
    def oip_metadata_route(model: str) -> JSONResponse:
        return oip_model(model, None)

    @app.get("/v2/models/{model}/versions/{version}")
    def oip_version_metadata(model: str, version: str) -> JSONResponse:
        return oip_model(model, version)

    @app.get("/v2/models/{model}/ready")
    def oip_ready_route(model: str) -> JSONResponse:
        return oip_model_ready(model, None)

    @app.get("/v2/models/{model}/versions/{version}/ready")
    def oip_version_ready(model: str, version: str) -> JSONResponse:
        return oip_model_ready(model, version)

    infer_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": _OIP_BODY}}}}

    @app.post("/v2/models/{model}/infer", openapi_extra=infer_body)
    async def oip_infer(model: str, request: Request) -> Response:
        return await score(request, model, OIP)

    @app.post("/v2/models/{model}/versions/{version}/infer", openapi_extra=infer_body)
    async def oip_version_infer(model: str, version: str, request: Request) -> Response:
        return await score(request, model, OIP, version)

    @app.get("/metrics")
    def prometheus() -> Response:
        refresh_gauges()
        if fleet is None:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
        # The canary's percentiles already cover every process (they read every process's samples).
        return Response(fleet.metrics(canary.metrics.percentiles), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(host: str, port: int, workers: int | None = None) -> int:
    """Run the service: one process, or `workers` (default `CD4ML_SERVICE_WORKERS`) processes on one
    port (`cd4ml.serving.processes`) sharing a state folder (`cd4ml.serving.workers`). Returns the
    exit status."""
    import shutil
    import tempfile

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    workers = workers or settings.service_workers
    options: dict[str, Any] = {"host": host, "port": port, "log_level": "warning", "access_log": False,
                               "timeout_graceful_shutdown": 20}  # fmt: skip
    if workers == 1:  # whatever CD4ML_SERVICE_WORKERS says: this process is the whole service
        uvicorn.run(create_app(settings.model_copy(update={"service_workers": 1})), workers=1, **options)
        return 0
    from cd4ml.serving.processes import check_free, supervise

    check_free(host, port)  # before anything is reset: a second `cd4ml serve` must not touch the first
    given = settings.service_state_dir
    state_dir = given or Path(tempfile.mkdtemp(prefix="cd4ml-service-"))
    board = Board(state_dir, workers)
    board.reset()  # a previous run's states and metric files must not count as this run's
    # The workers are spawned: they read these (prometheus_client when it is first imported).
    os.environ["CD4ML_SERVICE_STATE_DIR"] = str(state_dir)
    os.environ["CD4ML_SERVICE_WORKERS"] = str(workers)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(board.prometheus_dir)
    try:
        return supervise(workers, options, board.workers_dir)  # each process on its own socket
    finally:
        if given is None:
            shutil.rmtree(state_dir, ignore_errors=True)
