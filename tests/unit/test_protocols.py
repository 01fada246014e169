"""Protocol translation (MLflow scoring, Open Inference Protocol v2) to and from the service's
columns and rows: every accepted shape lands on the same validated rows, every malformed one is a
PayloadError naming the field."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from sklearn.linear_model import LogisticRegression

from cd4ml.serving.models import Slot
from cd4ml.serving.payload import FeatureSchema, PayloadError, check
from cd4ml.serving.protocols import (
    BINARY_HEADER,
    MODEL_HEADER,
    Parsed,
    choose_model,
    mlflow_error,
    mlflow_parse,
    mlflow_respond,
    oip_body,
    oip_metadata,
    oip_parse,
    oip_respond,
)

SCHEMA = FeatureSchema(("age", "tenure"), ("plan",))
RECORDS = [{"age": 30, "tenure": 2.5, "plan": "basic"}, {"age": 41, "tenure": None, "plan": 3}]
ROWS = [[30, 2.5, "basic"], [41, None, "3"]]  # validated, schema order; the integer code is a category


def slot(classes: tuple[Any, ...] | None = (0, 1), classifier: bool = True) -> Slot:
    model = LogisticRegression().fit([[0.0], [1.0]], [0, 1]) if classifier else None
    return Slot(name="churn", version="3", run_id="r", champion_since="", data_fingerprint="", loaded_at=0.0,
                model=model, schema=SCHEMA, classes=list(classes) if classes else None,
                classifier=classifier)  # fmt: skip


def validated(parsed: Parsed) -> list[list[Any]]:
    return check(SCHEMA, parsed.columns, parsed.data, max_rows=100)


def problem_of(err: pytest.ExceptionInfo[PayloadError]) -> tuple[str, str, int | None]:
    p = err.value.problems[0]
    return p.field, p.problem, p.row


# -- MLflow ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_split": {"columns": ["plan", "age", "tenure"], "index": [0, 1],
                             "data": [["basic", 30, 2.5], [3, 41, None]]}},
        {"dataframe_records": RECORDS},
        {"instances": RECORDS},
        {"inputs": RECORDS},
        {"inputs": {"age": [30, 41], "tenure": [2.5, None], "plan": ["basic", 3]}},
        {"instances": {"age": [30, 41], "tenure": [2.5, None], "plan": ["basic", 3]}},
        {"inputs": [[30, 2.5, "basic"], [41, None, 3]]},  # rows in the schema's column order
        {"instances": [[30, 2.5, "basic"], [41, None, 3]], "params": {}},
    ],
)  # fmt: skip
def test_every_mlflow_format_lands_on_the_same_rows(body: dict[str, Any]) -> None:
    assert validated(mlflow_parse(body, slot())) == ROWS


def test_mlflow_one_record_as_an_object_of_values() -> None:
    parsed = mlflow_parse({"inputs": {"age": 30, "tenure": 2.5, "plan": "basic"}}, slot())
    assert validated(parsed) == [ROWS[0]]


@pytest.mark.parametrize(
    ("body", "field", "words", "row"),
    [
        (RECORDS, "body", "got a JSON array", None),
        ({"dataframe_records": RECORDS, "inputs": RECORDS}, "body", "exactly one of", None),
        ({"records": RECORDS}, "body", "exactly one of", None),
        ({"inputs": [[30, 2.5]]}, "inputs", "expected 3 in this order: ['age', 'tenure', 'plan']", 0),
        ({"instances": [RECORDS[0], [30, 2.5, "basic"]]}, "instances", "must hold records", None),
        ({"inputs": {"age": [30, 41], "tenure": [2.5], "plan": ["a", "b"]}}, "inputs", "one length", None),
        ({"inputs": {"age": [30], "tenure": 2.5, "plan": ["a"]}}, "inputs", "one length", None),
        ({"inputs": "age=30"}, "inputs", "must be a list of records or rows", None),
        ({"dataframe_split": {"columns": ["age"], "data": [[1, 2]]}}, "dataframe_split.data", "2 values", 0),
    ],
)  # fmt: skip
def test_malformed_mlflow_bodies_name_the_field(body: Any, field: str, words: str, row: int | None) -> None:
    with pytest.raises(PayloadError) as err:
        mlflow_parse(body, slot())
    got_field, problem, got_row = problem_of(err)
    assert (got_field, got_row) == (field, row) and words in problem, problem


def test_mlflow_validation_problems_come_from_the_shared_check() -> None:
    parsed = mlflow_parse({"inputs": {"age": ["30"], "plan": ["basic"]}}, slot())
    with pytest.raises(PayloadError) as err:
        validated(parsed)
    assert {(p.field, p.problem) for p in err.value.problems} == {("tenure", "missing column")}


def test_mlflow_response_and_error_shapes() -> None:
    out = {"model": "churn", "version": "3", "predictions": [0, 1], "classes": [0, 1],
           "probabilities": [[0.9, 0.1], [0.2, 0.8]]}  # fmt: skip
    assert mlflow_respond(out, Parsed([], []), "id") == {"predictions": [0, 1]}  # as MLflow's server
    with pytest.raises(PayloadError) as err:
        mlflow_parse([], slot())
    body = mlflow_error(422, "bad", err.value.problems, {})
    assert body["error_code"] == "BAD_REQUEST" and body["message"] == "bad"
    assert body["problems"][0]["field"] == "body"
    assert mlflow_error(404, "gone", [], {})["error_code"] == "RESOURCE_DOES_NOT_EXIST"


def test_choose_model_by_path_header_or_the_only_one() -> None:
    assert choose_model(None, None, ["churn"]) == "churn"
    assert choose_model("a", None, ["a", "b"]) == "a"
    assert choose_model(None, "b", ["a", "b"]) == "b"
    assert choose_model("a", "a", ["a", "b"]) == "a"
    with pytest.raises(PayloadError) as err:
        choose_model(None, None, ["a", "b"])
    assert err.value.status == 400
    field, problem, _ = problem_of(err)
    assert field == MODEL_HEADER and "(a, b)" in problem and MODEL_HEADER in problem
    assert "/v1/models/<model>/invocations" in problem
    with pytest.raises(PayloadError) as err:
        choose_model("a", "b", ["a", "b"])
    assert err.value.status == 400 and "'b'" in problem_of(err)[1] and "'a'" in problem_of(err)[1]
    with pytest.raises(PayloadError) as err:
        choose_model(None, None, [])
    assert err.value.status == 503 and "CD4ML_SPECS_DIR" in problem_of(err)[1]


# -- Open Inference Protocol v2 -------------------------------------------------------------------


def tensor(name: str, data: list[Any], datatype: str, shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


NAMED = [
    tensor("plan", ["basic", None], "BYTES"),
    tensor("age", [30, 41], "INT64"),
    tensor("tenure", [[2.5], [None]], "FP64", [2, 1]),  # [rows, 1], nested data
]


def test_oip_named_inputs_one_tensor_per_feature() -> None:
    parsed = oip_parse({"id": "req-1", "inputs": NAMED}, slot())
    assert validated(parsed) == [[30, 2.5, "basic"], [41, None, None]]
    assert parsed.request_id == "req-1" and parsed.outputs is None


def test_oip_a_single_2d_tensor_in_schema_order() -> None:
    body = {"inputs": [tensor("input-0", [30, 2.5, "basic", 41, None, 3], "BYTES", [2, 3])]}
    # One datatype for the whole tensor: numbers in a BYTES tensor are refused, naming the input
    with pytest.raises(PayloadError) as err:
        oip_parse(body, slot())
    assert problem_of(err)[0] == "input-0"
    numeric = FeatureSchema(("age", "tenure"), ())
    only_numbers = replace(slot(), schema=numeric)
    parsed = oip_parse({"inputs": [tensor("x", [[30, 2.5], [41, 1.0]], "FP64", [2, 2])]}, only_numbers)
    assert check(numeric, parsed.columns, parsed.data, 10) == [[30, 2.5], [41, 1.0]]
    with pytest.raises(PayloadError) as err:
        oip_parse({"inputs": [tensor("x", [1, 2, 3], "FP64", [1, 3])]}, only_numbers)
    field, problem, _ = problem_of(err)
    assert field == "inputs.x.shape" and "needs 2 columns" in problem and "['age', 'tenure']" in problem


@pytest.mark.parametrize(
    ("inputs", "field", "words", "row"),
    [
        ([], "inputs", "non-empty list", None),
        ([tensor("age", [1], "FLOAT")], "inputs.age.datatype", "got 'FLOAT'", None),
        ([{"name": "age", "datatype": "FP64", "shape": [2], "data": [1.0]}], "inputs.age.data",
         "has 1 values; shape [2] needs 2", None),
        ([{"name": "age", "datatype": "FP64", "shape": [1]}], "inputs.age.data", "missing", None),
        ([{"name": "age", "datatype": "FP64", "shape": [-1], "data": []}], "inputs.age.shape",
         "non-negative", None),
        ([{"datatype": "FP64", "shape": [1], "data": [1]}], "inputs[0].name", "needs a name", None),
        ([tensor("plan", ["a", 7], "BYTES")], "plan", "BYTES holds strings, got 7", 1),
        ([tensor("age", [1, "2"], "FP64")], "age", "FP64 holds numbers, got '2'", 1),
        ([tensor("age", [1, 2], "FP64"), tensor("plan", ["a"], "BYTES")], "inputs.plan.shape",
         "1 rows, but 'age' has 2", None),
        ([tensor("age", [1], "FP64"), tensor("age", [2], "FP64")], "inputs.age", "more than once", None),
        ([tensor("age", [1, 2, 3, 4], "FP64", [2, 2]), tensor("plan", ["a", "b"], "BYTES")],
         "inputs.age.shape", "[rows] or [rows, 1]", None),
    ],
)  # fmt: skip
def test_malformed_oip_requests_name_the_input(
    inputs: list[Any], field: str, words: str, row: int | None
) -> None:
    with pytest.raises(PayloadError) as err:
        oip_parse({"inputs": inputs}, slot())
    got_field, problem, got_row = problem_of(err)
    assert (got_field, got_row) == (field, row) and words in problem, problem


def test_oip_binary_data_id_and_unknown_outputs_are_refused() -> None:
    binary = {**tensor("age", [1], "FP64"), "parameters": {"binary_data_size": 8}}
    with pytest.raises(PayloadError) as err:  # binary data, but no header saying where the JSON ends
        oip_parse({"inputs": [binary]}, slot())
    assert err.value.status == 400 and BINARY_HEADER in problem_of(err)[1]
    with pytest.raises(PayloadError) as err:
        oip_parse({"id": 7, "inputs": NAMED}, slot())
    assert problem_of(err)[0] == "id"
    with pytest.raises(PayloadError) as err:
        oip_parse({"inputs": NAMED, "outputs": [{"name": "predict"}, {"name": "score"}]}, slot())
    assert problem_of(err)[0] == "outputs.score" and "'predict_proba'" in problem_of(err)[1]
    with pytest.raises(PayloadError) as err:  # a regressor has no probabilities to ask for
        oip_parse({"inputs": NAMED, "outputs": [{"name": "predict_proba"}]}, slot(None, classifier=False))
    assert problem_of(err)[0] == "outputs.predict_proba"
    with pytest.raises(PayloadError) as err:
        oip_parse([NAMED], slot())
    assert problem_of(err)[0] == "body"


@pytest.mark.parametrize("datatype", [{"shape": None}, ["FP64"], 64, None])
def test_oip_a_datatype_that_is_not_a_name_is_named_not_a_500(datatype: Any) -> None:
    # Found by schemathesis: a dict datatype is unhashable, so the membership test itself raised.
    with pytest.raises(PayloadError) as err:
        oip_parse({"inputs": [{**tensor("age", [30], "FP64"), "datatype": datatype}]}, slot())
    assert problem_of(err)[0] == "inputs.age.datatype"


def test_oip_response_tensors_and_requested_outputs() -> None:
    out = {"model": "churn", "version": "3", "predictions": [0, 1], "classes": [0, 1],
           "probabilities": [[0.9, 0.1], [0.2, 0.8]]}  # fmt: skip
    body = oip_respond(dict(out), Parsed([], []), "req-1")
    assert (body["model_name"], body["model_version"], body["id"]) == ("churn", "3", "req-1")
    tensors = {t["name"]: t for t in body["outputs"]}
    assert tensors["predict"] == {"name": "predict", "datatype": "INT64", "shape": [2], "data": [0, 1]}
    assert tensors["predict_proba"] == {"name": "predict_proba", "datatype": "FP64", "shape": [2, 2],
                                        "data": [0.9, 0.1, 0.2, 0.8]}  # fmt: skip
    assert tensors["classes"]["data"] == [0, 1]
    only = oip_respond(dict(out), Parsed([], [], outputs=("predict_proba",)), "r")
    assert [t["name"] for t in only["outputs"]] == ["predict_proba"]
    labels = oip_respond({"model": "m", "version": "1", "predictions": ["yes", "no"]}, Parsed([], []), "r")
    assert labels["outputs"] == [
        {"name": "predict", "datatype": "BYTES", "shape": [2], "data": ["yes", "no"]}
    ]
    reg = oip_respond({"model": "m", "version": "1", "predictions": [1, 2.5]}, Parsed([], []), "r")
    assert reg["outputs"][0]["datatype"] == "FP64"


def test_oip_metadata_lists_each_feature_with_its_datatype() -> None:
    meta = oip_metadata(slot())
    assert meta["name"] == "churn" and meta["versions"] == ["3"] and meta["platform"] == "sklearn"
    assert meta["inputs"] == [
        {"name": "age", "datatype": "FP64", "shape": [-1]},
        {"name": "tenure", "datatype": "FP64", "shape": [-1]},
        {"name": "plan", "datatype": "BYTES", "shape": [-1]},
    ]
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [
        ("predict", "INT64"), ("predict_proba", "FP64"), ("classes", "INT64")
    ]  # fmt: skip
    regressor = oip_metadata(slot(None, classifier=False))
    assert regressor["outputs"] == [{"name": "predict", "datatype": "FP64", "shape": [-1]}]


def binary_request(tensors: list[tuple[str, str, Any]]) -> tuple[bytes, dict[str, str]]:
    """A request in the binary tensor data extension, the bytes made by tritonclient's own encoder."""
    import numpy as np
    from tritonclient.utils import serialize_byte_tensor

    header: dict[str, Any] = {"inputs": []}
    blobs = []
    for name, datatype, values in tensors:
        if datatype == "BYTES":
            blob = serialize_byte_tensor(np.array(values, dtype=object)).item()
        else:
            blob = np.array(values, dtype={"FP64": "<f8", "INT32": "<i4"}[datatype]).tobytes()
        header["inputs"].append({"name": name, "datatype": datatype, "shape": [len(values)],
                                 "parameters": {"binary_data_size": len(blob)}})  # fmt: skip
        blobs.append(blob)
    text = json.dumps(header).encode()
    return text + b"".join(blobs), {BINARY_HEADER: str(len(text))}


def test_oip_binary_tensor_data_extension() -> None:
    raw, headers = binary_request(
        [
            ("age", "INT32", [30, 41]),
            ("tenure", "FP64", [2.5, float("nan")]),
            ("plan", "BYTES", ["basic", "é"]),
        ]
    )
    parsed = oip_parse(oip_body(raw, headers), slot())
    rows = validated(parsed)
    assert rows[0] == [30, 2.5, "basic"] and rows[1][0] == 41 and rows[1][2] == "é"
    assert rows[1][1] != rows[1][1]  # NaN: missing, imputed as training did
    assert oip_body(b'{"inputs": []}', {}) == {"inputs": []}  # no header: plain JSON


@pytest.mark.parametrize(
    ("cut", "header", "field"),
    [
        (0, "999999", BINARY_HEADER),
        (0, "x", BINARY_HEADER),
        (3, None, "inputs.plan.data"),  # the last BYTES element cut short
        (-2, None, "body"),  # bytes left over after the last input
    ],
)
def test_malformed_binary_requests_name_the_part(cut: int, header: str | None, field: str) -> None:
    raw, headers = binary_request([("age", "FP64", [30.0]), ("plan", "BYTES", ["basic"])])
    if cut > 0:
        raw = raw[:-cut]
        body = json.loads(raw[: int(headers[BINARY_HEADER])])
        body["inputs"][1]["parameters"]["binary_data_size"] -= cut
        text = json.dumps(body).encode()
        raw, headers = text + raw[int(headers[BINARY_HEADER]) :], {BINARY_HEADER: str(len(text))}
    elif cut < 0:
        raw += b"\0" * -cut
    if header is not None:
        headers = {BINARY_HEADER: header}
    with pytest.raises(PayloadError) as err:
        oip_body(raw, headers)
    assert problem_of(err)[0] == field
