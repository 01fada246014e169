"""Request payloads: MLflow scoring formats and plain JSON records, checked against the model's
feature schema. Pure functions; every problem names the field (and the row) so a client can fix it.
Nothing is cast silently: "12" is not a number. A number sent for a categorical feature is the
category training knew it as (`tables.category_text`: 5 and 5.0 are the category "5"), because an
integer-coded column (a month, a grade) is text to the model but a number to most clients.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cd4ml.data.tables import category_text

if TYPE_CHECKING:
    from fastapi.responses import JSONResponse
    from starlette.requests import Request

MAX_PROBLEMS = 20
_FLOAT_MAX = sys.float_info.max


@dataclass(frozen=True)
class FeatureSchema:
    numerical: tuple[str, ...]
    categorical: tuple[str, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return self.numerical + self.categorical


@dataclass(frozen=True)
class Problem:
    field: str
    problem: str
    row: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field": self.field, "problem": self.problem}
        if self.row is not None:
            out["row"] = self.row
        return out


def error_response(status: int, message: str, problems: list[Problem] | None = None) -> JSONResponse:
    """The service's JSON error body: the message, and each problem naming its field."""
    from fastapi.responses import JSONResponse

    body: dict[str, Any] = {"error": message}
    if problems:
        body["problems"] = [p.as_dict() for p in problems]
    return JSONResponse(body, status_code=status)


class PayloadError(Exception):
    def __init__(self, problems: list[Problem], status: int = 422) -> None:
        super().__init__("; ".join(f"{p.field}: {p.problem}" for p in problems))
        self.problems = problems
        self.status = status


def to_columns(body: Any) -> tuple[list[str], list[list[Any]]]:
    """Any accepted payload shape -> (columns, row-major data)."""
    if isinstance(body, dict) and "dataframe_split" in body:
        split = body["dataframe_split"]
        if not isinstance(split, dict):
            raise PayloadError([Problem("dataframe_split", "must be an object with 'columns' and 'data'")])
        columns, data = split.get("columns"), split.get("data")
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise PayloadError([Problem("dataframe_split.columns", "must be a list of column names")])
        if not isinstance(data, list) or not all(isinstance(r, list) for r in data):
            raise PayloadError([Problem("dataframe_split.data", "must be a list of rows (lists)")])
        for i, row in enumerate(data):
            if len(row) != len(columns):
                raise PayloadError(
                    [Problem("dataframe_split.data", f"has {len(row)} values, expected {len(columns)}", i)]
                )
        return list(columns), data
    if isinstance(body, dict):
        for key in ("dataframe_records", "instances", "records"):
            if key in body:
                return records_to_columns(body[key], key)
        if "inputs" in body:
            raise PayloadError(
                [Problem("inputs", "tensor inputs are not supported; send dataframe_split or records")]
            )
        return records_to_columns([body], "record")
    if isinstance(body, list):
        return records_to_columns(body, "records")
    raise PayloadError([Problem("body", "expected a JSON object or a list of records")])


def records_to_columns(records: Any, field: str) -> tuple[list[str], list[list[Any]]]:
    if not isinstance(records, list):
        raise PayloadError([Problem(field, "must be a list of records (objects)")])
    columns: list[str] = []
    seen: set[str] = set()
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise PayloadError([Problem(field, "each record must be a JSON object", i)])
        for key in rec:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    missing = object()
    data = [[rec.get(c, missing) for c in columns] for rec in records]
    for i, row in enumerate(data):
        for c, value in zip(columns, row, strict=True):
            if value is missing:
                raise PayloadError([Problem(c, "missing in this record", i)])
    return columns, data


def _type_problem(value: Any, numeric: bool) -> str | None:
    if value is None:
        return None
    if numeric:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected a number, got {type(value).__name__} {value!r}"[:200]
        if isinstance(value, float) and math.isinf(value):
            return "expected a finite number"
        if isinstance(value, int) and abs(value) > _FLOAT_MAX:  # would overflow the float conversion
            return "expected a finite number (too large for a float)"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a category (text or an integer code), got {value!r}"
    if not isinstance(value, str | int | float):
        return f"expected a category (text or an integer code), got {type(value).__name__} {value!r}"[:200]
    return None


def check(schema: FeatureSchema, columns: list[str], data: list[list[Any]], max_rows: int) -> list[list[Any]]:
    """Validate and return rows with exactly the schema's columns, in the schema's order."""
    if not data:
        raise PayloadError([Problem("data", "no rows to predict")])
    if len(data) > max_rows:
        raise PayloadError([Problem("data", f"{len(data)} rows; at most {max_rows} per request")], status=413)
    index = {c: i for i, c in enumerate(columns)}
    problems = [Problem(c, "missing column") for c in schema.columns if c not in index]
    if problems:
        raise PayloadError(problems)
    positions = [index[c] for c in schema.columns]
    numeric = [True] * len(schema.numerical) + [False] * len(schema.categorical)
    out: list[list[Any]] = []
    for r, row in enumerate(data):
        picked = [row[p] for p in positions]
        for j, (c, value, is_num) in enumerate(zip(schema.columns, picked, numeric, strict=True)):
            msg = _type_problem(value, is_num)
            if msg:
                problems.append(Problem(c, msg, r))
                if len(problems) >= MAX_PROBLEMS:
                    raise PayloadError(problems)
            elif not is_num and value is not None:
                picked[j] = category_text(value)
        out.append(picked)
    if problems:
        raise PayloadError(problems)
    return out


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as it exceeds `limit` bytes (never buffering more): a chunked
    body has no length up front, so predict and feedback stop reading once it is too big."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
