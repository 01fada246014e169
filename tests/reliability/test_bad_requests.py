"""Bad requests to the prediction service get a 4xx that names the problem, never a 5xx.

Against the session's real service (uvicorn subprocess) serving a real champion: a schemathesis
run over every operation of its OpenAPI document (positive and negative data), then the specific
abuses a public endpoint sees: huge bodies, absurd batches, broken JSON, wrong types.
"""

from __future__ import annotations

import collections
import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from tests.conftest import SERVICE_MAX_ROWS
from tests.helpers import SOAK
from tests.reliability.serving import serve_champion

MODEL = "fuzzed"
# Per operation (fewer where inputs run out); `make soak` (CD4ML_SOAK=1) runs the schemathesis fuzz
# with twice as many (it covers every operation, ~2.5 min on 2 cores at full size).
FUZZ_EXAMPLES = {
    "positive": 100 if SOAK else 50,
    "negative": 60 if SOAK else 30,
    "records": 150,
}
NUMERICAL = ["tenure_months", "monthly_charges", "support_calls", "age"]
CATEGORICAL = ["contract", "plan", "region"]
GOOD = {"tenure_months": 3, "monthly_charges": 70.5, "support_calls": 2, "age": 41,
        "contract": "month-to-month", "plan": "basic", "region": "north"}  # fmt: skip


@pytest.fixture(scope="module")
def service(prediction_service: dict[str, str], mlflow_server: str, shared_specs: Path) -> dict[str, str]:
    serve_champion(
        MODEL, specs_dir=shared_specs, tracking_uri=mlflow_server, service_url=prediction_service["url"]
    )
    return prediction_service


@pytest.fixture
def client(service: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service["url"], timeout=60) as c:
        yield c


def _openapi_with_the_model_schema(raw: dict[str, Any]) -> dict[str, Any]:
    """The service's own document, plus the served model's record shape as one more alternative,
    so generated bodies also reach the per-field checks and the model rather than only the
    shape checks."""
    doc = copy.deepcopy(raw)
    record = {
        "type": "object",
        "properties": {
            **{c: {"type": "number"} for c in NUMERICAL},
            **{c: {"type": "string"} for c in CATEGORICAL},
        },
        "required": NUMERICAL + CATEGORICAL,
    }
    body = doc["paths"]["/v1/models/{model}/predict"]["post"]["requestBody"]["content"]["application/json"]
    body["schema"]["anyOf"].insert(
        0,
        {"type": "object", "properties": {"dataframe_records": {"type": "array", "items": record,
                                                                "maxItems": 5}},
         "required": ["dataframe_records"]}
    )  # fmt: skip
    return doc


def test_schemathesis_finds_no_server_error_on_any_operation(service: dict[str, str]) -> None:
    import schemathesis
    from schemathesis import GenerationMode

    raw = httpx.get(f"{service['url']}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(_openapi_with_the_model_schema(raw))
    statuses: collections.Counter[str] = collections.Counter()
    server_errors: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /v1/models/{model}/predict", "GET /v1/models/{model}", "POST /admin/reload",
    }  # fmt: skip
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(op, mode, service["url"], statuses, server_errors)
    total = sum(statuses.values())
    _record_figures({"schemathesis_requests": total, "schemathesis_statuses": dict(statuses)})
    print(f"schemathesis: {total} requests over {len(operations)} operations: {dict(statuses)}")
    assert not server_errors, "\n".join(server_errors[:10])
    assert total >= 150
    assert statuses["200"] > 0 and statuses["422"] > 0  # both served predictions and rejections


def _fuzz(op: Any, mode: Any, url: str, statuses: collections.Counter[str], errors: list[str]) -> None:
    path_params = {"model": MODEL} if "{model}" in op.path else None
    strategy = op.as_strategy(generation_mode=mode, path_parameters=path_params)

    @settings(
        max_examples=FUZZ_EXAMPLES[mode.value],
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        response = case.call(base_url=url, timeout=60)
        statuses[str(response.status_code)] += 1
        # The one documented 5xx: readiness is 503 while any spec'd model still waits for a champion
        # (in the full suite, another test's model without a champion).
        not_ready = (
            op.path == "/health/ready" and response.status_code == 503 and not response.json()["ready"]
        )
        if response.status_code >= 500 and not not_ready:
            errors.append(
                f"{op.label} {mode.value}: {response.status_code} for {case.body!r:.300}: "
                f"{response.text[:300]}"
            )

    try:
        fuzz()
    except Unsatisfiable:
        # Nothing to make invalid: no body, and the only parameter (if any) is the pinned model name.
        assert mode.value == "negative" and not op.body.items and not op.query.items, op.label


def _record_figures(figures: dict[str, Any]) -> None:
    """Figures for RELIABILITY.md, when asked for (CD4ML_RELIABILITY_FIGURES=<file>)."""
    target = os.environ.get("CD4ML_RELIABILITY_FIGURES")
    if target:
        path = Path(target)
        current = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**current, **figures}, indent=2))


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),  # JSON has neither (1e400 is tested below)
    st.text(max_size=20),
    st.sampled_from(["north", "basic", "one-year", "", "NaN"]),
)
TYPED = {
    **{c: st.one_of(st.integers(-(10**6), 10**6), st.floats(-1e12, 1e12)) for c in NUMERICAL},
    **{c: st.text(max_size=12) for c in CATEGORICAL},
}


def _mostly(typed: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The column's own type nine times in ten, any JSON scalar otherwise."""
    return st.integers(0, 9).flatmap(lambda k: SCALARS if k == 0 else typed)


@settings(max_examples=FUZZ_EXAMPLES["records"], deadline=None, database=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(
    rows=st.lists(
        st.fixed_dictionaries({c: _mostly(TYPED[c]) for c in NUMERICAL + CATEGORICAL}),
        min_size=1,
        max_size=5,
    )
)
def test_records_with_any_values_are_predicted_or_refused_per_field(
    client: httpx.Client, rows: list[dict[str, Any]]
) -> None:
    """Every feature present, each value any JSON scalar: 200 iff every value has its column's type;
    otherwise 422 naming exactly the offending fields and rows."""
    resp = client.post(f"/v1/models/{MODEL}/predict", json={"dataframe_records": rows})
    _record_figures({"typed_record_requests": _count("typed_record_requests")})
    bad = {
        (c, i)
        for i, row in enumerate(rows)
        for c, v in row.items()
        if (c in NUMERICAL and (isinstance(v, bool) or not isinstance(v, int | float)) and v is not None)
        or (c in CATEGORICAL and not isinstance(v, str | int | float) and v is not None)
        or (c in NUMERICAL and isinstance(v, int) and not isinstance(v, bool) and abs(v) > 1.7e308)
    }
    # A number for a categorical may be read as its category ("5" for 5 or 5.0) or refused as a type
    # error: either answer is allowed, but only for that cell.
    coded = {
        (c, i)
        for i, row in enumerate(rows)
        for c, v in row.items()
        if c in CATEGORICAL and isinstance(v, int | float) and not isinstance(v, str)
    }
    if not bad and coded and resp.status_code == 422:
        assert {(p["field"], p["row"]) for p in _problems(resp)} <= coded, resp.text
    elif not bad:
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["predictions"]) == len(rows)
    else:
        assert resp.status_code == 422, resp.text
        assert {(p["field"], p["row"]) for p in _problems(resp)} <= bad | coded
        assert _problems(resp)


_COUNTS: collections.Counter[str] = collections.Counter()


def _count(what: str) -> int:
    _COUNTS[what] += 1
    return _COUNTS[what]


def _problems(resp: httpx.Response) -> list[dict[str, Any]]:
    return resp.json().get("problems", [])


def test_a_body_over_the_limit_is_refused_with_413(client: httpx.Client) -> None:
    big = json.dumps({"dataframe_records": [GOOD]}).encode() + b" " * (21 * 1024 * 1024)
    resp = client.post(f"/v1/models/{MODEL}/predict", content=big)
    assert resp.status_code == 413
    assert "at most 20971520" in resp.json()["error"]


def test_a_chunked_body_over_the_limit_is_refused_without_buffering_it_all(client: httpx.Client) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"dataframe_records": ['
        for _ in range(64):  # up to 64 MiB, three times the limit
            sent += 1 << 20
            yield b" " * (1 << 20)

    resp = client.post(f"/v1/models/{MODEL}/predict", content=chunks())
    assert resp.status_code == 413
    assert "body larger than 20971520 bytes" in resp.json()["error"]


@pytest.mark.parametrize("rows", [SERVICE_MAX_ROWS + 1, 100_000])
def test_absurd_batch_sizes_are_refused_with_413(client: httpx.Client, rows: int) -> None:
    body = {"dataframe_split": {"columns": list(GOOD), "data": [list(GOOD.values())] * rows}}
    resp = client.post(f"/v1/models/{MODEL}/predict", json=body)
    assert resp.status_code == 413
    assert _problems(resp) == [
        {"field": "data", "problem": f"{rows} rows; at most {SERVICE_MAX_ROWS} per request"}
    ]


def test_the_largest_allowed_batch_is_served(client: httpx.Client) -> None:
    resp = client.post(f"/v1/models/{MODEL}/predict", json=[GOOD] * SERVICE_MAX_ROWS)
    assert resp.status_code == 200
    assert len(resp.json()["predictions"]) == SERVICE_MAX_ROWS


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "invalid JSON: Expecting value: line 1 column 1"),
        (b'{"dataframe_records": [', "invalid JSON: Expecting value: line 1 column 24"),
        (b"{'single': 'quotes'}", "invalid JSON: Expecting property name enclosed in double quotes"),
        (b'{"a": 1,}', "invalid JSON: Expecting property name enclosed in double quotes: line 1 column 9"),
        (b"\xff\xfe{}", "invalid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
    ],
    ids=["empty", "truncated", "single-quotes", "trailing-comma", "not-utf8", "deeply-nested"],
)
def test_malformed_json_is_a_400_naming_the_problem(
    client: httpx.Client, content: bytes, expected: str
) -> None:
    resp = client.post(f"/v1/models/{MODEL}/predict", content=content)
    assert resp.status_code == 400
    assert any(p["field"] == "body" and expected in p["problem"] for p in _problems(resp)), resp.text


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        ({"age": "41"}, "age", "expected a number, got str '41'"),
        ({"age": True}, "age", "expected a number, got bool True"),
        ({"age": [41]}, "age", "expected a number, got list [41]"),
        ({"age": 10**400}, "age", "expected a finite number (too large for a float)"),
        # Whether a number is a category (an integer code) is the payload module's call; a dict never is.
        ({"region": {"name": "north"}}, "region", "expected a"),
    ],
)
def test_wrong_types_are_a_422_naming_the_field_and_row(
    client: httpx.Client, record: dict[str, Any], field: str, problem: str
) -> None:
    resp = client.post(f"/v1/models/{MODEL}/predict", json=[GOOD, {**GOOD, **record}])
    assert resp.status_code == 422, resp.text
    (found,) = _problems(resp)
    assert found["field"] == field and found["row"] == 1 and found["problem"].startswith(problem)
    if field == "region":
        assert "category" in found["problem"] and "got dict" in found["problem"], found
    assert f"invalid request for model '{MODEL}'" in resp.json()["error"]


def test_overflowing_numbers_in_json_are_refused_not_crashed(client: httpx.Client) -> None:
    raw = json.dumps([GOOD]).replace('"age": 41', '"age": 1e400').encode()
    resp = client.post(f"/v1/models/{MODEL}/predict", content=raw)
    assert resp.status_code == 422
    assert _problems(resp) == [{"field": "age", "problem": "expected a finite number", "row": 0}]


def test_missing_and_unknown_models_are_4xx(client: httpx.Client) -> None:
    resp = client.post(f"/v1/models/{MODEL}/predict", json=[{k: v for k, v in GOOD.items() if k != "plan"}])
    assert resp.status_code == 422 and _problems(resp) == [{"field": "plan", "problem": "missing column"}]
    resp = client.post("/v1/models/no_such_model/predict", json=[GOOD])
    assert resp.status_code == 404 and "unknown model 'no_such_model'" in resp.json()["error"]
