"""Request payload parsing and checking: every accepted shape, every refusal names its field."""

from __future__ import annotations

import pytest

from cd4ml.serving.payload import FeatureSchema, PayloadError, check, to_columns

SCHEMA = FeatureSchema(numerical=("age", "charges"), categorical=("plan",))
ROW = {"age": 40, "charges": 55.5, "plan": "basic"}


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_split": {"columns": ["age", "charges", "plan"], "data": [[40, 55.5, "basic"]]}},
        {"dataframe_records": [ROW]},
        {"instances": [ROW]},
        {"records": [ROW]},
        [ROW],
        ROW,
        {
            "dataframe_split": {
                "columns": ["plan", "extra", "charges", "age"],
                "data": [["basic", 1, 55.5, 40]],
            }
        },
    ],
)
def test_every_accepted_shape_gives_schema_ordered_rows(body) -> None:
    columns, data = to_columns(body)
    assert check(SCHEMA, columns, data, max_rows=10) == [[40, 55.5, "basic"]]


def test_nulls_are_allowed_and_left_to_the_model_imputer() -> None:
    assert check(SCHEMA, *to_columns([{"age": None, "charges": 1, "plan": None}]), max_rows=10) == [
        [None, 1, None]
    ]


def problems(body, max_rows: int = 10) -> tuple[int, list[dict]]:
    with pytest.raises(PayloadError) as err:
        check(SCHEMA, *to_columns(body), max_rows=max_rows)
    return err.value.status, [p.as_dict() for p in err.value.problems]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ([{"age": 1, "plan": "basic"}], "charges", "missing column"),
        ([{"age": "40", "charges": 1.0, "plan": "basic"}], "age", "expected a number, got str '40'"),
        ([{"age": True, "charges": 1.0, "plan": "basic"}], "age", "expected a number, got bool"),
        (
            [{"age": 1, "charges": 1.0, "plan": {"a": 3}}],
            "plan",
            "expected a category (text or an integer code), got dict",
        ),
        ([{"age": 1, "charges": 1.0, "plan": float("nan")}], "plan", "expected a category"),
        ([{"age": 1, "charges": [1], "plan": "x"}], "charges", "expected a number, got list"),
        ([], "data", "no rows"),
        ([ROW, {"age": 1}], "charges", "missing in this record"),
        ([ROW, 5], "records", "must be a JSON object"),
        ({"dataframe_split": {"columns": ["age"], "data": [[1, 2]]}}, "dataframe_split.data", "has 2 values"),
        (
            {"dataframe_split": {"columns": "age", "data": []}},
            "dataframe_split.columns",
            "list of column names",
        ),
        ({"dataframe_split": []}, "dataframe_split", "must be an object"),
        ({"dataframe_records": {"a": 1}}, "dataframe_records", "must be a list"),
        ({"inputs": [[1, 2]]}, "inputs", "not supported"),
        ("text", "body", "expected a JSON object"),
    ],
)
def test_bad_payloads_name_the_field(body, field: str, words: str) -> None:
    status, found = problems(body)
    assert status == 422
    assert any(p["field"] == field and words in p["problem"] for p in found), found


def test_row_index_is_reported_and_problems_are_capped() -> None:
    body = [{"age": "x", "charges": "y", "plan": 1}] * 50
    _, found = problems(body, max_rows=100)
    assert len(found) == 20
    assert found[0] == {"field": "age", "problem": "expected a number, got str 'x'", "row": 0}


def test_too_many_rows_is_413() -> None:
    status, found = problems([ROW] * 11)
    assert status == 413 and found[0]["field"] == "data" and "at most 10" in found[0]["problem"]


def test_infinity_is_refused() -> None:
    _, found = problems([{"age": float("inf"), "charges": 1, "plan": "a"}])
    assert found[0]["problem"] == "expected a finite number"


@pytest.mark.parametrize(
    ("sent", "category"), [(5, "5"), (5.0, "5"), ("5", "5"), (5.5, "5.5"), (True, "True")]
)
def test_numbers_for_a_categorical_are_the_category_training_knew(sent: object, category: str) -> None:
    # Training renders an integer-coded column read as floats (a null in a CSV batch) as "5", not "5.0".
    (row,) = check(SCHEMA, *to_columns([{"age": 1, "charges": 1.0, "plan": sent}]), max_rows=10)
    assert row[SCHEMA.columns.index("plan")] == category
