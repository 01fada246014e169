"""The prediction service: FastAPI on uvicorn, serving the `champion` of every model spec.

POST /v1/models/{model}/predict   dataframe_split | dataframe_records | instances | plain records
GET  /v1/models, /v1/models/{model}   what is served: version, run id, champion since, fingerprint
GET  /health/live, /health/ready  (ready = every spec'd model has a champion loaded)
GET  /metrics                     Prometheus
POST /admin/reload                check MLflow now (Bearer token: CD4ML_SERVICE_ADMIN_TOKEN)
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool

from cd4ml.core.settings import Settings, get_settings
from cd4ml.serving.models import ModelStore
from cd4ml.serving.payload import PayloadError, Problem, check, to_columns
from cd4ml.serving.predlog import Entry, PredictionLog

log = logging.getLogger(__name__)
INLINE_ROWS = 16  # small requests predict on the event loop; larger ones in the thread pool


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
        self.serving = Gauge("cd4ml_serving_version", "Model version being served", ["model"], registry=r)
        self.reloads = Counter(
            "cd4ml_model_reloads", "Model load events", ["model", "version", "outcome"], registry=r
        )
        self.log_dropped = Gauge(
            "cd4ml_prediction_log_dropped_rows", "Rows not logged (queue full)", registry=r
        )
        self.log_written = Gauge("cd4ml_prediction_log_written_rows", "Rows written to the log", registry=r)


def _error(status: int, message: str, problems: list[Problem] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if problems:
        body["problems"] = [p.as_dict() for p in problems]
    return JSONResponse(body, status_code=status)


def create_app(settings: Settings | None = None, config: ServiceConfig | None = None) -> FastAPI:
    settings = settings or get_settings()
    config = config or ServiceConfig.from_settings(settings)
    metrics = Metrics()

    def on_event(model: str, version: str, outcome: str) -> None:
        metrics.reloads.labels(model, version, outcome).inc()
        if outcome == "loaded":
            metrics.serving.labels(model).set(float(version))

    store = ModelStore(settings, poll_seconds=config.poll_seconds, on_event=on_event)
    predlog = PredictionLog(settings.data_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from threadpoolctl import threadpool_limits

        # One request is tiny: OpenMP/BLAS thread pools only add spin-up and contention here.
        limits = threadpool_limits(limits=1)
        predlog.start()
        await run_in_threadpool(store.refresh)  # serve what already exists before the first request
        store.start()
        yield
        store.stop()
        predlog.close()  # every queued prediction reaches disk on a clean shutdown
        limits.restore_original_limits()

    app = FastAPI(title="cd4ml prediction service", version="1", lifespan=lifespan)
    app.state.store = store
    app.state.predlog = predlog
    app.state.metrics = metrics

    @app.get("/health/live")
    def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready")
    def ready() -> JSONResponse:
        missing = [m for m in store.known_models if m not in store.slots]
        body = {
            "ready": not missing and bool(store.known_models),
            "serving": {name: slot.version for name, slot in store.slots.items()},
            "waiting_for_champion": missing,
            "last_poll_error": store.last_poll_error,
        }
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "models": [store.slots[m].metadata() for m in sorted(store.slots)],
            "known": store.known_models,
        }

    def refused_versions(model: str) -> dict[str, str]:
        """Versions of `model` this service will not serve, with its own reason for each."""
        return {v: why for (m, v), why in list(store.refused.items()) if m == model}

    @app.get("/v1/models/{model}")
    def model_metadata(model: str) -> JSONResponse:
        slot = store.slots.get(model)
        if slot is None:
            return _unknown_or_waiting(model)
        body = slot.metadata()
        body["refused_versions"] = refused_versions(model)
        return JSONResponse(body)

    def _unknown_or_waiting(model: str) -> JSONResponse:
        if model in store.known_models:
            # Why nothing is served yet: a deploy reads the refusal reasons here, so it can say
            # "refused version 3: <reason>" instead of waiting for a version that never comes.
            body = {
                "error": f"model '{model}' has no champion loaded yet",
                "problems": [Problem("model", "no champion loaded yet").as_dict()],
                "refused_versions": refused_versions(model),
            }
            return JSONResponse(body, status_code=503)
        return _error(404, f"unknown model '{model}'", [Problem("model", f"'{model}' is not served here")])

    @app.post(
        "/v1/models/{model}/predict",
        openapi_extra={
            "requestBody": {
                "required": True,
                # anyOf with required keys: with oneOf and no `required`, every object matched three
                # alternatives at once, so no object body was valid against the document.
                "content": {"application/json": {"schema": {"anyOf": [
                    {"type": "object", "required": ["dataframe_split"], "properties": {"dataframe_split": {
                        "type": "object", "required": ["columns", "data"], "properties": {
                            "columns": {"type": "array", "items": {"type": "string"}},
                            "data": {"type": "array", "items": {"type": "array"}}}}}},
                    {"type": "object", "required": ["dataframe_records"],
                     "properties": {"dataframe_records": {"type": "array", "items": {"type": "object"}}}},
                    {"type": "object", "required": ["instances"],
                     "properties": {"instances": {"type": "array", "items": {"type": "object"}}}},
                    {"type": "array", "items": {"type": "object"}},
                    {"type": "object", "description": "one record",
                     "additionalProperties": {"type": ["number", "string", "null"]}},
                ]}}},
            }
        },
    )  # fmt: skip
    async def predict(model: str, request: Request) -> Response:
        started = time.perf_counter()
        slot = store.slots.get(model)  # this request finishes on this slot, whatever swaps meanwhile
        if slot is None:
            metrics.errors.labels(
                "_unknown" if model not in store.known_models else model, "unknown_model"
            ).inc()
            return _unknown_or_waiting(model)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            metrics.errors.labels(model, "too_large").inc()
            return _error(413, f"body of {declared} bytes; at most {config.max_body_bytes}",
                          [Problem("body", "too large")])  # fmt: skip
        raw = await _read_limited(request, config.max_body_bytes)
        if raw is None:  # a chunked body has no length up front: stop reading once it is too big
            metrics.errors.labels(model, "too_large").inc()
            return _error(
                413, f"body larger than {config.max_body_bytes} bytes", [Problem("body", "too large")]
            )
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            metrics.errors.labels(model, "bad_request").inc()
            return _error(400, "body is not valid JSON", [Problem("body", f"invalid JSON: {err}")])
        except RecursionError:
            metrics.errors.labels(model, "bad_request").inc()
            return _error(400, "body is nested too deeply", [Problem("body", "JSON nested too deeply")])
        try:
            columns, data = to_columns(body)
            rows = check(slot.schema, columns, data, config.max_rows)
        except PayloadError as err:
            metrics.errors.labels(model, "too_large" if err.status == 413 else "bad_request").inc()
            metrics.requests.labels(model, slot.version, str(err.status)).inc()
            return _error(err.status, f"invalid request for model '{model}': {err}", err.problems)
        if len(rows) <= INLINE_ROWS:
            out = slot.predict(rows)
        else:
            out = await run_in_threadpool(slot.predict, rows)
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        if config.log_predictions and request.headers.get("x-cd4ml-purpose") != "smoke-test":
            predlog.put(Entry(model, slot.version, time.time(), request_id, slot.schema.columns, rows,
                              out["predictions"]))  # fmt: skip
        metrics.requests.labels(model, slot.version, "200").inc()
        metrics.rows.labels(model, slot.version).inc(len(rows))
        metrics.latency.labels(model, slot.version).observe(time.perf_counter() - started)
        out["request_id"] = request_id
        return Response(
            json.dumps(out), media_type="application/json", headers={"x-model-version": slot.version}
        )

    @app.get("/metrics")
    def prometheus() -> Response:
        metrics.log_dropped.set(predlog.dropped)
        metrics.log_written.set(predlog.written_rows)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    async def reload(request: Request) -> JSONResponse:
        if config.admin_token is None:
            return _error(403, "admin actions are disabled: CD4ML_SERVICE_ADMIN_TOKEN is not set")
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), config.admin_token.encode()):
            return _error(
                401, "admin token missing or wrong", [Problem("authorization", "Bearer token required")]
            )
        serving = await run_in_threadpool(store.reload_now)
        refused = {f"{m}/{v}": why for (m, v), why in store.refused.items()}
        return JSONResponse({"serving": serving, "refused": refused})

    return app


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as it exceeds `limit` bytes (never buffering more)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def serve(host: str, port: int) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(), host=host, port=port, workers=1, log_level="warning", access_log=False,
                timeout_graceful_shutdown=20)  # fmt: skip
