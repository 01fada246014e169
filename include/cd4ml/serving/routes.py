"""The prediction service's routes, one router per protocol; each is a thin call into `Service` or
`scoring.score` (the paths are listed in `cd4ml.serving.app`'s docstring)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from cd4ml.serving.payload import PayloadError, Problem
from cd4ml.serving.protocols import MLFLOW, MODEL_HEADER, NATIVE, OIP, choose_model, oip_metadata
from cd4ml.serving.scoring import score
from cd4ml.serving.service import Service, failure

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
_NATIVE_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"anyOf": [
    *_MLFLOW_BODIES[:3],
    {"type": "array", "items": {"type": "object"}},
    {"type": "object", "description": "one record",
     "additionalProperties": {"type": ["number", "string", "null"]}},
]}}}}}  # fmt: skip
_INVOCATIONS_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"anyOf": _MLFLOW_BODIES}}}}}  # fmt: skip
_INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": _OIP_BODY}}}}


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _mlflow_version() -> str:
    found = _package_version("mlflow")
    return found if found != "unknown" else _package_version("mlflow-skinny")


def native_routes(svc: Service) -> APIRouter:
    """cd4ml's own API: health, what is served, the canary, predictions, Prometheus metrics."""
    router = APIRouter()

    @router.get("/health/live")
    def live() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/health/ready")
    def ready() -> JSONResponse:
        body = svc.readiness()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @router.get("/v1/models")
    def models() -> dict[str, Any]:
        slots = svc.store.slots
        return {"models": [slots[m].metadata() for m in sorted(slots)], "known": svc.store.known_models}

    @router.get("/v1/models/{model}")
    def model_metadata(model: str) -> JSONResponse:
        store = svc.store
        slot = store.slots.get(model)
        if slot is None:
            return failure(NATIVE, *svc.unknown_or_waiting(model))
        body = slot.metadata()
        body["refused_versions"] = svc.refused_versions(model)
        staged = store.candidates.staged.get(model)
        body["staged_version"] = staged.version if staged else None
        shadow = store.candidates.shadows.get(model)
        body["shadow_version"] = shadow.version if shadow else None
        if svc.fleet is not None:
            body = svc.fleet.model(body, model)
        body |= svc.canary.status(model)
        body["canary_version"] = body["canary"]["version"] if body["canary"] else None
        return JSONResponse(body)

    @router.get("/v1/models/{model}/canary")
    def canary_status(model: str) -> JSONResponse:
        """The model's canary: version, share, sticky key, both sides' requests, errors, p50/p99."""
        if model not in svc.store.known_models:
            return JSONResponse({"error": f"model '{model}' is not served here"}, status_code=404)
        return JSONResponse({"model": model, **svc.canary.status(model)})

    @router.post("/v1/models/{model}/predict", openapi_extra=_NATIVE_BODY)
    async def predict(model: str, request: Request) -> Response:
        return await score(svc, request, model, NATIVE)

    @router.get("/metrics")
    def prometheus() -> Response:
        return Response(svc.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    return router


def mlflow_routes(svc: Service) -> APIRouter:
    """MLflow's scoring protocol, as `mlflow models serve` answers it (the model by header or path)."""
    router = APIRouter()

    async def invocations(request: Request, path_model: str | None) -> Response:
        try:
            model = choose_model(path_model, request.headers.get(MODEL_HEADER), svc.served_names())
        except PayloadError as err:
            svc.metrics.errors.labels("_unknown", "unknown_model").inc()
            return failure(MLFLOW, err.status, str(err), err.problems, {"models": svc.served_names()})
        mime, _, params = (request.headers.get("content-type") or "application/json").partition(";")
        charset = params.strip().removeprefix("charset=").strip().lower() if params.strip() else "utf-8"
        if mime.strip().lower() != "application/json" or charset != "utf-8":
            svc.metrics.errors.labels(model, "bad_request").inc()
            return failure(
                MLFLOW,
                415,
                f"content type '{request.headers.get('content-type')}' is not "
                "served; send application/json (MLflow's JSON formats)",
                [Problem("content-type", "must be application/json (utf-8)")],
            )
        return await score(svc, request, model, MLFLOW)

    @router.post("/invocations", openapi_extra=_INVOCATIONS_BODY)
    async def mlflow_invocations(request: Request) -> Response:
        """MLflow's scoring endpoint: the only model, or the one named in the x-cd4ml-model header."""
        return await invocations(request, None)

    @router.post("/v1/models/{model}/invocations", openapi_extra=_INVOCATIONS_BODY)
    async def mlflow_model_invocations(model: str, request: Request) -> Response:
        return await invocations(request, model)

    @router.get("/ping")
    def ping() -> Response:
        """As MLflow's server: 200 once every model is loaded, else 404 (with what is missing)."""
        now = svc.readiness()
        waiting = "a champion" if now["waiting_for_champion"] or not svc.store.known_models else None
        if not now["ready"]:
            return failure(
                MLFLOW,
                404,
                f"not ready: waiting for {waiting or 'every service process'}",
                [Problem("model", "no champion loaded yet")],
                {"waiting_for_champion": now["waiting_for_champion"], **({"processes": now["processes"]}
                                                                       if "processes" in now else {})},
            )  # fmt: skip
        return Response("\n", media_type="application/json")

    @router.get("/version")
    def mlflow_version() -> Response:
        """As MLflow's server: the MLflow version, as plain text."""
        return Response(_mlflow_version(), media_type="application/json")

    return router


def oip_routes(svc: Service) -> APIRouter:
    """Open Inference Protocol v2 REST (KServe, Triton, MLServer clients)."""
    router = APIRouter()

    @router.get("/v2")
    def oip_server() -> dict[str, Any]:
        return {"name": "cd4ml", "version": _package_version("cd4ml"), "extensions": []}

    @router.get("/v2/health/live")
    def oip_live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/v2/health/ready")
    def oip_ready() -> JSONResponse:
        """OIP: 200 when ready, a 4xx when not (every spec'd model needs its champion loaded)."""
        ok = bool(svc.readiness()["ready"])
        return JSONResponse({"ready": ok}, status_code=200 if ok else 400)

    def oip_model(model: str, version: str | None) -> JSONResponse:
        slot = svc.find_slot(model, version, OIP)
        return slot if isinstance(slot, JSONResponse) else JSONResponse(oip_metadata(slot))

    def oip_model_ready(model: str, version: str | None) -> JSONResponse:
        failed = svc.find_slot(model, version, OIP)
        if isinstance(failed, JSONResponse):
            return JSONResponse(
                {"name": model, "ready": False, **json.loads(bytes(failed.body))},
                status_code=failed.status_code if failed.status_code < 500 else 400,
            )
        return JSONResponse({"name": model, "ready": True})

    @router.get("/v2/models/{model}")
    def oip_metadata_route(model: str) -> JSONResponse:
        return oip_model(model, None)

    @router.get("/v2/models/{model}/versions/{version}")
    def oip_version_metadata(model: str, version: str) -> JSONResponse:
        return oip_model(model, version)

    @router.get("/v2/models/{model}/ready")
    def oip_ready_route(model: str) -> JSONResponse:
        return oip_model_ready(model, None)

    @router.get("/v2/models/{model}/versions/{version}/ready")
    def oip_version_ready(model: str, version: str) -> JSONResponse:
        return oip_model_ready(model, version)

    @router.post("/v2/models/{model}/infer", openapi_extra=_INFER_BODY)
    async def oip_infer(model: str, request: Request) -> Response:
        return await score(svc, request, model, OIP)

    @router.post("/v2/models/{model}/versions/{version}/infer", openapi_extra=_INFER_BODY)
    async def oip_version_infer(model: str, version: str, request: Request) -> Response:
        return await score(svc, request, model, OIP, version)

    return router
