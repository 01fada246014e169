"""Every protocol's prediction, in one path: read, parse (protocol), validate, predict, log, count,
answer. The routes of `cd4ml.serving.routes` call `score` with their protocol; the same validation,
prediction log rows, metrics and OpenTelemetry spans follow whichever protocol a request used."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from cd4ml.serving.canary import CHAMPION
from cd4ml.serving.models import Slot
from cd4ml.serving.payload import PayloadError, Problem, check, read_limited
from cd4ml.serving.predlog import Entry
from cd4ml.serving.protocols import Parsed, Protocol
from cd4ml.serving.service import Service, failure, predict_rows
from cd4ml.serving.shadow import ShadowJob
from cd4ml.serving.tracing import LOG, NO_TRACE, PARSE, PREDICT, REQUEST_ID, ROWS, NoTrace, RequestTrace

log = logging.getLogger(__name__)


async def score(
    svc: Service, request: Request, model: str, protocol: Protocol, version: str | None = None
) -> Response:
    """One prediction request of any protocol, traced when tracing is on."""
    if not svc.tracing.enabled:
        return await _score(svc, request, model, protocol, version, NO_TRACE)
    path: str = request.scope["path"]
    route: str = getattr(request.scope.get("route"), "path", path)  # the template: /v1/models/{model}/...
    rt = svc.tracing.start(request.method, route, path, request.headers, model, protocol.name)
    try:
        response = await _score(svc, request, model, protocol, version, rt)
    except BaseException as err:  # recorded on the spans, then raised on: FastAPI answers 500
        rt.fail(err)
        raise
    response.headers.update(rt.finish(response.status_code))
    return response


def _slot(
    svc: Service, request: Request, model: str, protocol: Protocol, version: str | None, staging: str | None
) -> Slot | Response:
    """The slot that answers: the staged one for a smoke test (`staging`: the `x-cd4ml-slot`
    header), else the served one."""
    if staging is not None:
        slot = svc.admin.staged_slot(request, model, staging)
        if isinstance(slot, JSONResponse):
            svc.metrics.errors.labels(
                model if model in svc.store.known_models else "_unknown", "staging"
            ).inc()
        return slot
    slot = svc.find_slot(model, version, protocol)
    if isinstance(slot, JSONResponse):
        if model in svc.store.slots:
            svc.metrics.errors.labels(model, "unknown_version").inc()
        else:
            svc.metrics.errors.labels("_unknown" if model not in svc.store.known_models else model,
                                      "unknown_model").inc()  # fmt: skip
    return slot


async def _body(svc: Service, request: Request, model: str, protocol: Protocol) -> bytes | Response:
    """The request body, or a 413 once it is larger than the service takes."""
    limit = svc.config.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        svc.metrics.errors.labels(model, "too_large").inc()
        return failure(
            protocol, 413, f"body of {declared} bytes; at most {limit}", [Problem("body", "too large")]
        )
    raw = await read_limited(request, limit)
    if raw is None:  # a chunked body has no length up front: stop reading once it is too big
        svc.metrics.errors.labels(model, "too_large").inc()
        return failure(protocol, 413, f"body larger than {limit} bytes", [Problem("body", "too large")])
    return raw


def _parse(
    svc: Service, request: Request, raw: bytes, model: str, protocol: Protocol, slot: Slot
) -> tuple[Parsed, list[list[Any]]] | Response:
    """The protocol's body as rows checked against the version's schema, or a 4xx naming the field."""
    errors = svc.metrics.errors
    try:
        body = protocol.decode(raw, request.headers)
    except PayloadError as err:
        errors.labels(model, "bad_request").inc()
        return failure(protocol, err.status, f"invalid request for model '{model}': {err}", err.problems)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        errors.labels(model, "bad_request").inc()
        return failure(protocol, 400, "body is not valid JSON", [Problem("body", f"invalid JSON: {err}")])
    except RecursionError:
        errors.labels(model, "bad_request").inc()
        return failure(
            protocol, 400, "body is nested too deeply", [Problem("body", "JSON nested too deeply")]
        )
    try:
        parsed = protocol.parse(body, slot)
        return parsed, check(slot.schema, parsed.columns, parsed.data, svc.config.max_rows)
    except PayloadError as err:
        errors.labels(model, "too_large" if err.status == 413 else "bad_request").inc()
        svc.metrics.requests.labels(model, slot.version, str(err.status)).inc()
        return failure(protocol, err.status, f"invalid request for model '{model}': {err}", err.problems)
    except RecursionError:
        errors.labels(model, "bad_request").inc()
        svc.metrics.requests.labels(model, slot.version, "400").inc()
        return failure(protocol, 400, "body is nested too deeply", [Problem("body", "nested too deeply")])


async def _score(
    svc: Service,
    request: Request,
    model: str,
    protocol: Protocol,
    version: str | None,
    rt: RequestTrace | NoTrace,
) -> Response:
    started = time.perf_counter()
    staging = request.headers.get("x-cd4ml-slot")
    slot = _slot(svc, request, model, protocol, version, staging)
    if not isinstance(slot, Slot):
        return slot
    rt.serving(model, slot.version)
    raw = await _body(svc, request, model, protocol)
    if not isinstance(raw, bytes):
        return raw
    rt.begin(PARSE)
    read = _parse(svc, request, raw, model, protocol, slot)
    if not isinstance(read, tuple):
        return read
    parsed, rows = read
    rt.set(ROWS, len(rows))
    rt.begin(PREDICT, rows=len(rows))
    live = request.headers.get("x-cd4ml-purpose") != "smoke-test"
    canary, metrics = svc.canary, svc.metrics
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
            out = await predict_rows(slot, rows)
            if routed is not None:
                canary.count(routed, CHAMPION, time.perf_counter() - began)
    except Exception as err:  # any model failure is the service's 500, counted
        # Counted like every other answer, so the 5xx-rate alert sees a model that throws.
        log.exception("%s v%s: prediction failed", model, slot.version)
        if routed is not None:
            canary.count(routed, CHAMPION, 0.0, error=True)
        metrics.errors.labels(model, "predict_failed").inc()
        metrics.requests.labels(model, slot.version, "500").inc()
        return failure(
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
    if svc.config.log_predictions and live:
        rt.begin(LOG, rows=len(rows))
        svc.predlog.put(Entry(model, slot.version, time.time(), request_id, slot.schema.columns, rows,
                              out["predictions"]))  # fmt: skip
    shadow = svc.store.candidates.shadows.get(model)
    if shadow is not None and live:  # a copy for the shadow, answered off the request path
        spec = svc.store.specs.get(model)
        svc.shadows.offer(ShadowJob(shadow, slot.version, request_id, rows, out["predictions"]),
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
