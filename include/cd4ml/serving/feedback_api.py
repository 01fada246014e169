"""Ground truth from production: `POST /v1/models/<model>/feedback`.

The body is one label, a list of labels, or `{"feedback": [labels]}`; a label is
`{"request_id": "<id the predict answer carried>", "outcome": <value>, "row": <int, default 0>}`,
where `row` is the 0-based row inside a multi-row predict request. Outcomes are kept as sent
(number, text or boolean); training casts them to the target's type.

Answers:
- 200 `{"model", "labels", "accepted", "duplicates"}`: every label is stored (durably: the answer
  leaves after the label part is renamed into place). Sending the same label again is harmless:
  it is counted as a duplicate and changes nothing; a different outcome for the same
  (request_id, row) replaces the earlier one.
- 422 naming every request id the model's prediction log does not hold (`unknown_request_ids`),
  and every bad field (with `row` = the label's position in the posted list). A batch with any
  unknown id or bad field is rejected whole and nothing of it is stored: the client gets one
  unambiguous answer and can resend the corrected batch as it is (resending is idempotent),
  instead of working out which half was kept.
- 413 when the body is larger than `CD4ML_SERVICE_MAX_BODY_BYTES` or holds more labels than
  `CD4ML_SERVICE_MAX_ROWS`; 404 for a model this service does not know, as predict answers.

Request ids are checked against `PredictionLog.lookup`: recent ids from memory, older ones from the
log's per-day request index on disk (labels arriving days later, after restarts). Label writes go
through one writer thread that commits whatever requests are waiting as one Parquet part, so
concurrent clients share a file (group commit) instead of making one file each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter
from starlette.concurrency import run_in_threadpool

from cd4ml.core.paths import ModelPaths
from cd4ml.core.settings import Settings
from cd4ml.serving.payload import MAX_PROBLEMS, Problem, read_limited
from cd4ml.serving.predlog import PredictionLog

log = logging.getLogger(__name__)

FIELDS = ("request_id", "outcome", "row")
MAX_REQUEST_ID = 256  # as cd4ml.data.feedback checks files
MAX_ROW = 2**31
_INT64 = 2**63
RECENT_LABELS = 200_000  # labels remembered to answer "duplicate" without reading the store

_LABEL = {"type": "object", "required": ["request_id", "outcome"], "additionalProperties": False,
          "properties": {"request_id": {"type": "string", "minLength": 1},
                         "outcome": {"type": ["number", "string", "boolean"]},
                         "row": {"type": "integer", "minimum": 0}}}  # fmt: skip
BATCH_KEY = "feedback"  # {"feedback": [labels]}
_BODY = {"anyOf": [_LABEL, {"type": "array", "items": _LABEL},
                   {"type": "object", "required": [BATCH_KEY],
                    "properties": {BATCH_KEY: {"type": "array", "items": _LABEL}}}]}  # fmt: skip


@dataclass(frozen=True)
class Label:
    request_id: str
    row: int
    outcome: Any


class BadRequest(Exception):
    def __init__(self, status: int, message: str, problems: list[Problem], **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.problems = problems
        self.extra = extra

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": str(self)}
        if self.problems:
            body["problems"] = [p.as_dict() for p in self.problems]
        body.update(self.extra)
        return JSONResponse(body, status_code=self.status)


def parse_labels(body: Any, max_rows: int) -> list[Label]:
    """A JSON body -> labels, or `BadRequest` naming every bad field (up to MAX_PROBLEMS)."""
    if isinstance(body, dict) and "feedback" in body:
        extra = sorted(k for k in body if k != "feedback")
        if extra:
            raise BadRequest(422, "invalid feedback", [Problem(extra[0], "unknown field next to 'feedback'")])
        items = body["feedback"]
        if not isinstance(items, list):
            raise BadRequest(422, "invalid feedback", [Problem("feedback", "must be a list of labels")])
    elif isinstance(body, dict):
        items = [body]
    elif isinstance(body, list):
        items = body
    else:
        shape = 'a label {request_id, outcome[, row]}, a list of labels, or {"feedback": [labels]}'
        raise BadRequest(422, "invalid feedback", [Problem("body", f"expected {shape}")])
    if not items:
        raise BadRequest(422, "invalid feedback", [Problem("feedback", "no labels")])
    if len(items) > max_rows:
        raise BadRequest(
            413,
            f"{len(items)} labels; at most {max_rows} per request",
            [Problem("feedback", f"{len(items)} labels; at most {max_rows} per request "
                                 "(CD4ML_SERVICE_MAX_ROWS)")],
        )  # fmt: skip
    labels: list[Label] = []
    problems: list[Problem] = []
    for i, item in enumerate(items):
        found = _label_problems(item)
        if found:
            problems.extend(Problem(field, problem, i) for field, problem in found)
            if len(problems) >= MAX_PROBLEMS:
                break
        else:
            labels.append(Label(item["request_id"], item.get("row", 0), item["outcome"]))
    if problems:
        raise BadRequest(422, "invalid feedback", problems[:MAX_PROBLEMS])
    return labels


def _label_problems(item: Any) -> list[tuple[str, str]]:
    if not isinstance(item, dict):
        return [("feedback", "each label must be a JSON object {request_id, outcome[, row]}")]
    out = [(key, f"unknown field; a label has {', '.join(FIELDS)}") for key in item if key not in FIELDS]
    rid = item.get("request_id")
    if "request_id" not in item:
        out.append(("request_id", "missing"))
    elif not isinstance(rid, str) or not rid.strip():
        out.append(
            ("request_id", f"must be the non-empty text id the prediction answer carried, got {rid!r}"[:200])
        )
    elif len(rid) > MAX_REQUEST_ID:
        out.append(("request_id", f"longer than {MAX_REQUEST_ID} characters"))
    elif not _utf8(rid):
        out.append(("request_id", "is not valid Unicode text (a lone surrogate escape)"))
    if "outcome" not in item:
        out.append(("outcome", "missing"))
    else:
        problem = _outcome_problem(item["outcome"])
        if problem:
            out.append(("outcome", problem))
    if "row" in item:
        row = item["row"]
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < MAX_ROW:
            out.append(
                (
                    "row",
                    f"must be the 0-based row index inside the request (an integer >= 0), got {row!r}"[:200],
                )
            )
    return out


def _outcome_problem(value: Any) -> str | None:
    if value is None:
        return "must not be null"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _INT64:
        return "integer too large (64-bit at most)"
    if isinstance(value, str) and not _utf8(value):
        return "is not valid Unicode text (a lone surrogate escape)"
    if not isinstance(value, bool | int | float | str):
        kind = "object" if isinstance(value, dict) else "array"
        return f"must be a number, a text or a boolean, got a JSON {kind}"
    return None


def _utf8(text: str) -> bool:
    # JSON may carry "\\ud800", which Python decodes but no UTF-8 file (Parquet) can store.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class LabelWriter:
    """Stores posted labels with one writer thread: whatever is waiting is written as one part per
    model (group commit), and each request's future resolves once its labels are on disk."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._queue: queue.Queue[tuple[str, list[Label], Future[int]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # (model, request id, row) -> outcome: recently stored labels, to count resent ones as duplicates.
        self._recent: OrderedDict[tuple[str, str, int], Any] = OrderedDict()
        self._recent_lock = threading.Lock()

    def split(self, model: str, labels: list[Label]) -> tuple[list[Label], int]:
        """(labels to store, how many are duplicates of stored ones or of each other)."""
        latest: dict[tuple[str, int], Label] = {}
        for label in labels:  # within one request, the later label for a (request_id, row) wins
            latest[(label.request_id, label.row)] = label
        with self._recent_lock:
            new = [
                lab for (rid, row), lab in latest.items()
                if not _same(self._recent.get((model, rid, row), _MISSING), lab.outcome)
            ]  # fmt: skip
        return new, len(labels) - len(new)

    def submit(self, model: str, labels: list[Label]) -> Future[int]:
        fut: Future[int] = Future()
        self._ensure_started()
        self._queue.put((model, labels, fut))
        return fut

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cd4ml-label-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            by_model: dict[str, list[tuple[list[Label], Future[int]]]] = {}
            for model, labels, fut in batch:
                by_model.setdefault(model, []).append((labels, fut))
            for model, waiting in by_model.items():
                self._write(model, waiting)

    def _write(self, model: str, waiting: list[tuple[list[Label], Future[int]]]) -> None:
        import pandas as pd

        from cd4ml.data.feedback import outcome_array, record_labels

        labels = [lab for labs, _ in waiting for lab in labs]
        # One part per kind of outcome: a client sending 1 and another sending "yes" in the same
        # commit each keep their type (one Parquet column holds one type).
        kinds: dict[type, list[Label]] = {}
        for lab in labels:
            kinds.setdefault(str if isinstance(lab.outcome, str) else bool if isinstance(lab.outcome, bool)
                             else float, []).append(lab)  # fmt: skip
        try:
            received_at = datetime.now(UTC)
            for group in kinds.values():
                frame = pd.DataFrame({
                    "request_id": [lab.request_id for lab in group],
                    "row": pd.array([lab.row for lab in group], dtype="int64"),
                    "outcome": outcome_array([lab.outcome for lab in group]).to_pandas(),
                })  # fmt: skip
                paths = ModelPaths.in_data_dir(self.data_dir, model)
                record_labels(paths, frame, source="http", received_at=received_at)
        # Whatever failed, every waiting request hears about it (a dead writer thread would leave
        # them waiting forever); the error reaches each request, nothing is swallowed.
        except Exception as err:  # noqa: BLE001
            log.error("feedback for %s not stored: %s", model, err)
            for _, fut in waiting:
                fut.set_exception(err)
            return
        with self._recent_lock:
            for lab in labels:
                key = (model, lab.request_id, lab.row)
                self._recent.pop(key, None)
                self._recent[key] = lab.outcome
            while len(self._recent) > RECENT_LABELS:
                self._recent.popitem(last=False)
        for labs, fut in waiting:
            fut.set_result(len(labs))


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    # 1 and True are equal in Python but not the same outcome; nor are 1 and 1.0 once typed apart.
    return a is not _MISSING and type(a) is type(b) and a == b


def _count(body: Any) -> int:
    """How many labels a rejected body held, roughly (for the `rejected` counter)."""
    items = body.get("feedback") if isinstance(body, dict) and "feedback" in body else body
    return len(items) if isinstance(items, list) else 1


def feedback_router(
    settings: Settings,
    *,
    max_body_bytes: int,
    max_rows: int,
    predlog: PredictionLog,
    registry: CollectorRegistry,
) -> APIRouter:
    """The feedback endpoints, mounted by `create_app` next to predict."""
    router = APIRouter()
    counted = Counter(
        "cd4ml_feedback_labels",
        "Labels posted to the feedback endpoint, by what became of them "
        "(accepted, duplicate, unknown = request id not served, rejected = bad request)",
        ["model", "outcome"],
        registry=registry,
    )
    requests = Counter(
        "cd4ml_feedback_requests", "Feedback requests by status code", ["model", "code"], registry=registry
    )
    writer = LabelWriter(settings.data_dir)

    def fail(model: str, err: BadRequest, labels: int = 0, unknown: int = 0) -> JSONResponse:
        requests.labels(model, str(err.status)).inc()
        if unknown:
            counted.labels(model, "unknown").inc(unknown)
        if labels - unknown > 0:
            counted.labels(model, "rejected").inc(labels - unknown)
        return err.response()

    @router.post(
        "/v1/models/{model}/feedback",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _BODY}}}},
    )
    async def feedback(model: str, request: Request) -> JSONResponse:
        """Ground truth for served predictions, by the request id their answer carried."""
        store = request.app.state.store
        if model not in store.known_models and model not in store.slots:
            return fail("_unknown", BadRequest(
                404, f"unknown model '{model}'", [Problem("model", f"'{model}' is not served here")]
            ))  # fmt: skip
        declared = request.headers.get("content-length")
        too_large = BadRequest(
            413,
            f"body larger than {max_body_bytes} bytes (CD4ML_SERVICE_MAX_BODY_BYTES)",
            [Problem("body", "too large")],
        )
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            return fail(model, too_large)
        raw = await read_limited(request, max_body_bytes)
        if raw is None:
            return fail(model, too_large)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return fail(
                model, BadRequest(400, "body is not valid JSON", [Problem("body", f"invalid JSON: {err}")])
            )
        except RecursionError:
            return fail(
                model,
                BadRequest(400, "body is nested too deeply", [Problem("body", "JSON nested too deeply")]),
            )
        try:
            labels = parse_labels(body, max_rows)
        except BadRequest as err:
            return fail(model, err, _count(body))
        ids = {lab.request_id for lab in labels}
        served = await run_in_threadpool(predlog.lookup, model, ids)
        unknown = [i for i, lab in enumerate(labels) if lab.request_id not in served]
        if unknown:
            names = sorted({labels[i].request_id for i in unknown})
            problems = [
                Problem("request_id", f"'{labels[i].request_id}' was not served by '{model}' "
                                      "(not in its prediction log)", i)
                for i in unknown[:MAX_PROBLEMS]
            ]  # fmt: skip
            # Without the log no id is ever known: say so, rather than blame every id.
            hint = "" if settings.service_log_predictions else (
                " (this service does not log predictions: CD4ML_SERVICE_LOG_PREDICTIONS=0)"
            )  # fmt: skip
            refused = BadRequest(
                422,
                f"{len(names)} request id(s) unknown to model '{model}'; nothing of this batch was stored"
                + hint,
                problems,
                unknown_request_ids=names,
            )
            return fail(model, refused, len(labels), len(unknown))
        problems = [
            Problem("row", f"request '{lab.request_id}' had {served[lab.request_id].rows} row(s); "
                           f"row must be below that", i)
            for i, lab in enumerate(labels) if lab.row >= served[lab.request_id].rows
        ]  # fmt: skip
        if problems:
            return fail(model, BadRequest(422, "invalid feedback", problems[:MAX_PROBLEMS]), len(labels))
        new, duplicates = writer.split(model, labels)
        if new:
            try:
                await asyncio.wrap_future(writer.submit(model, new))
            except OSError as err:
                requests.labels(model, "503").inc()
                where = f"{settings.data_dir} (CD4ML_DATA_DIR)"
                return JSONResponse(
                    {"error": f"labels could not be stored under {where}: {err}"}, status_code=503
                )
        counted.labels(model, "accepted").inc(len(new))
        if duplicates:
            counted.labels(model, "duplicate").inc(duplicates)
        requests.labels(model, "200").inc()
        return JSONResponse(
            {"model": model, "labels": len(labels), "accepted": len(new), "duplicates": duplicates}
        )

    return router
