"""Wire protocols of the prediction service, translated to and from what `payload.check` and
`Slot.predict` speak. Pure functions: a request body -> (columns, rows) for the shared validation,
a prediction -> the protocol's response body, a failure -> the protocol's error body.

- native: `POST /v1/models/<model>/predict` (MLflow's JSON formats and plain records).
- MLflow scoring server: `POST /invocations` with exactly one of `dataframe_split`,
  `dataframe_records`, `instances`, `inputs`; answers `{"predictions": [...]}` as MLflow does.
- Open Inference Protocol v2 (KServe, Triton, MLServer): tensors as JSON, either one tensor per
  feature column ("pandas-style named inputs") or one 2-D tensor with the features in schema order.
  Answers with the tensors `predict`, and for classifiers `predict_proba` and `classes`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cd4ml.serving.models import Slot
from cd4ml.serving.payload import FeatureSchema, PayloadError, Problem, records_to_columns, to_columns

MLFLOW_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
MODEL_HEADER = "x-cd4ml-model"  # which model /invocations scores when the service serves several
OIP_PLATFORM = "sklearn"
OIP_NUMERIC = frozenset(
    {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP16", "FP32", "FP64"}
)
OIP_DATATYPES = OIP_NUMERIC | {"BOOL", "BYTES"}
PREDICT, PROBA, CLASSES = "predict", "predict_proba", "classes"


@dataclass(frozen=True)
class Parsed:
    """A request translated: the columns and rows `payload.check` validates, plus what the
    protocol needs to answer (its request id, the outputs it asked for)."""

    columns: list[str]
    data: list[list[Any]]
    request_id: str | None = None
    outputs: tuple[str, ...] | None = None


def json_body(raw: bytes, headers: Mapping[str, str]) -> Any:
    return json.loads(raw)


@dataclass(frozen=True)
class Protocol:
    name: str
    decode: Callable[[bytes, Mapping[str, str]], Any]  # raw body, headers -> the JSON body
    parse: Callable[[Any, Slot], Parsed]
    respond: Callable[[dict[str, Any], Parsed, str], dict[str, Any]]  # prediction, request, request id
    error: Callable[[int, str, list[Problem], dict[str, Any]], dict[str, Any]]  # status, message, ...


# -- native -------------------------------------------------------------------------------------


def native_parse(body: Any, slot: Slot) -> Parsed:
    columns, data = to_columns(body)
    return Parsed(columns, data)


def native_respond(out: dict[str, Any], parsed: Parsed, request_id: str) -> dict[str, Any]:
    out["request_id"] = request_id
    return out


def native_error(status: int, message: str, problems: list[Problem], extra: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"error": message}
    if problems:
        body["problems"] = [p.as_dict() for p in problems]
    body.update(extra)
    return body


# -- MLflow scoring server ----------------------------------------------------------------------


def mlflow_parse(body: Any, slot: Slot) -> Parsed:
    """MLflow's JSON scoring formats -> (columns, rows). As MLflow's server: a JSON object with
    exactly one format key (and optionally `params`, which a scikit-learn model takes none of)."""
    if not isinstance(body, dict):
        raise PayloadError(
            [Problem("body", f"expected a JSON object with one of {list(MLFLOW_FORMATS)}, "
                             f"got a JSON {_json_kind(body)}")]
        )  # fmt: skip
    keys = [k for k in MLFLOW_FORMATS if k in body]
    if len(keys) != 1:
        raise PayloadError(
            [Problem("body", f"needs exactly one of {list(MLFLOW_FORMATS)}; got keys {sorted(body)[:10]}")]
        )
    key = keys[0]
    if key in ("dataframe_split", "dataframe_records"):
        columns, data = to_columns({key: body[key]})
    else:
        columns, data = _tf_serving(body[key], key, slot.schema)
    return Parsed(columns, data)


def _tf_serving(value: Any, field: str, schema: FeatureSchema) -> tuple[list[str], list[list[Any]]]:
    """`instances`/`inputs` (TF serving style): records, columns ({name: [values]}) or rows of
    values in the schema's column order."""
    if isinstance(value, dict):
        return _columnar(value, field)
    if not isinstance(value, list):
        raise PayloadError([Problem(field, "must be a list of records or rows, or an object of columns")])
    if not value or all(isinstance(v, dict) for v in value):
        return records_to_columns(value, field)
    if all(isinstance(v, list) for v in value):
        return _positional(value, field, schema)
    if len(schema.columns) == 1 and not any(isinstance(v, dict | list) for v in value):
        return list(schema.columns), [[v] for v in value]
    raise PayloadError(
        [Problem(field, f"must hold records (objects) or rows (lists of {len(schema.columns)} values in "
                        f"this order: {list(schema.columns)}), not a mix or single values"[:400])]
    )  # fmt: skip


def _columnar(columns: dict[str, Any], field: str) -> tuple[list[str], list[list[Any]]]:
    names = list(columns)
    values = list(columns.values())
    if values and not any(isinstance(v, list) for v in values):  # one record, as MLflow reads it
        return names, [values]
    lengths = {len(v) if isinstance(v, list) else -1 for v in values}
    if len(lengths) > 1 or -1 in lengths:
        sizes = {n: len(v) if isinstance(v, list) else "a single value" for n, v in columns.items()}
        raise PayloadError([Problem(field, f"columns must be lists of one length; got {sizes}"[:300])])
    return names, [list(row) for row in zip(*values, strict=True)]


def _positional(
    rows: list[list[Any]], field: str, schema: FeatureSchema
) -> tuple[list[str], list[list[Any]]]:
    width = len(schema.columns)
    for i, row in enumerate(rows):
        if len(row) != width:
            raise PayloadError(
                [Problem(field, f"row has {len(row)} values, expected {width} in this order: "
                                f"{list(schema.columns)}", i)]
            )  # fmt: skip
    return list(schema.columns), rows


def mlflow_respond(out: dict[str, Any], parsed: Parsed, request_id: str) -> dict[str, Any]:
    return {"predictions": out["predictions"]}


_MLFLOW_ERROR_CODES = {
    404: "RESOURCE_DOES_NOT_EXIST",
    413: "RESOURCE_LIMIT_EXCEEDED",
    503: "TEMPORARILY_UNAVAILABLE",
}


def mlflow_error(status: int, message: str, problems: list[Problem], extra: dict[str, Any]) -> dict[str, Any]:
    """MLflow's error body (`MlflowException.serialize_as_json`), with the per-field problems."""
    body: dict[str, Any] = {"error_code": _MLFLOW_ERROR_CODES.get(status, "BAD_REQUEST"), "message": message}
    if problems:
        body["problems"] = [p.as_dict() for p in problems]
    body.update(extra)
    return body


def choose_model(path_model: str | None, header_model: str | None, served: list[str]) -> str:
    """Which model an MLflow request scores: the path's, else the header's, else the only one."""
    if path_model and header_model and path_model != header_model:
        raise PayloadError(
            [Problem(MODEL_HEADER, f"names '{header_model}' but the path names '{path_model}'")], status=400
        )
    chosen = path_model or header_model
    if chosen:
        return chosen
    if len(served) == 1:
        return served[0]
    if not served:
        raise PayloadError(
            [Problem("model", "this service serves no model yet (no spec in CD4ML_SPECS_DIR)")], status=503
        )
    raise PayloadError(
        [Problem(MODEL_HEADER, f"this service serves several models ({', '.join(served)}): name one "
                               f"in the header '{MODEL_HEADER}' or post to /v1/models/<model>/invocations")],
        status=400,
    )  # fmt: skip


# -- Open Inference Protocol v2 -----------------------------------------------------------------


BINARY_HEADER = "inference-header-content-length"  # the binary tensor data extension (Triton, KServe)
_LITTLE_ENDIAN = {
    "BOOL": "?", "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "UINT8": "<u1",
    "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip


def oip_body(raw: bytes, headers: Mapping[str, str]) -> Any:
    """An OIP request's JSON. With the binary tensor data extension (tritonclient's default), the
    JSON is the first `Inference-Header-Content-Length` bytes and each input with a
    `binary_data_size` parameter takes that many of the bytes after it, in order, as its `data`."""
    declared = headers.get(BINARY_HEADER)
    if declared is None:
        return json.loads(raw)
    if not declared.isdigit() or int(declared) > len(raw):
        raise PayloadError(
            [Problem(BINARY_HEADER, f"{declared!r} is not a JSON length within the {len(raw)}-byte body")],
            status=400,
        )
    body = json.loads(raw[: int(declared)])
    offset = int(declared)
    inputs = body.get("inputs") if isinstance(body, dict) else None
    for i, tensor in enumerate(inputs if isinstance(inputs, list) else []):
        params = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(params, dict) or "binary_data_size" not in params:
            continue
        where = f"inputs.{tensor.get('name', i)}"
        size = params.pop("binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(raw):
            raise PayloadError(
                [Problem(f"{where}.parameters.binary_data_size", f"{size!r} bytes are not in the body")]
            )
        tensor["data"] = _binary(raw[offset : offset + size], tensor.get("datatype"), where)
        offset += size
    if offset != len(raw):
        raise PayloadError([Problem("body", f"{len(raw) - offset} bytes after the last binary input")])
    return body


def _binary(chunk: bytes, datatype: Any, where: str) -> list[Any]:
    if datatype == "BYTES":  # each element: a 4-byte little-endian length, then its bytes
        out: list[Any] = []
        k = 0
        while k < len(chunk):
            if k + 4 > len(chunk):
                raise PayloadError([Problem(f"{where}.data", "BYTES element length cut short")])
            n = int.from_bytes(chunk[k : k + 4], "little")
            element = chunk[k + 4 : k + 4 + n]
            if len(element) != n:
                raise PayloadError([Problem(f"{where}.data", f"BYTES element {len(out)} cut short")])
            try:
                out.append(element.decode("utf-8"))
            except UnicodeDecodeError:
                raise PayloadError(
                    [Problem(f"{where}.data", f"BYTES element {len(out)} is not UTF-8")]
                ) from None
            k += 4 + n
        return out
    dtype = _LITTLE_ENDIAN.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise PayloadError(
            [
                Problem(
                    f"{where}.datatype", f"got {datatype!r}; binary data needs one of {sorted(OIP_DATATYPES)}"
                )
            ]
        )
    import numpy as np

    width = np.dtype(dtype).itemsize
    if len(chunk) % width:
        raise PayloadError(
            [Problem(f"{where}.data", f"{len(chunk)} bytes is not a whole number of {datatype}")]
        )
    values: list[Any] = np.frombuffer(chunk, dtype=dtype).tolist()
    return values


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(v, list) for v in data):
        return data
    flat: list[Any] = []
    for v in data:
        flat.extend(_flatten(v))
    return flat


def _element_problem(value: Any, datatype: str) -> str | None:
    if value is None:
        return None
    if datatype == "BYTES":
        return None if isinstance(value, str) else f"datatype BYTES holds strings, got {value!r}"[:200]
    if datatype == "BOOL":
        return None if isinstance(value, bool) else f"datatype BOOL holds true/false, got {value!r}"[:200]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"datatype {datatype} holds numbers, got {value!r}"[:200]
    return None


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


def _tensor(raw: Any, i: int) -> _Tensor:
    where = f"inputs[{i}]"
    if not isinstance(raw, dict):
        raise PayloadError([Problem(where, "must be an object {name, shape, datatype, data}")])
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise PayloadError([Problem(f"{where}.name", "missing: each input tensor needs a name")])
    where = f"inputs.{name}"
    params = raw.get("parameters") or {}
    if isinstance(params, dict) and "binary_data_size" in params:
        raise PayloadError(
            [Problem(where, f"binary_data_size without the {BINARY_HEADER} header that says where "
                            "the JSON ends")], status=400
        )  # fmt: skip
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):  # fmt: skip
        raise PayloadError([Problem(f"{where}.shape", "must be a list of non-negative integers")])
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in OIP_DATATYPES:  # a dict is not even hashable
        raise PayloadError(
            [Problem(f"{where}.datatype", f"got {datatype!r}; one of {sorted(OIP_DATATYPES)}"[:300])]
        )
    if "data" not in raw:
        raise PayloadError([Problem(f"{where}.data", "missing")])
    data = _flatten(raw["data"])
    if len(data) != math.prod(shape):
        raise PayloadError(
            [Problem(f"{where}.data", f"has {len(data)} values; shape {shape} needs {math.prod(shape)}")]
        )
    width = math.prod(shape[1:]) if len(shape) > 1 else 1
    for k, value in enumerate(data):
        msg = _element_problem(value, datatype)
        if msg:
            raise PayloadError([Problem(name, msg, k // width if width else 0)])
    return _Tensor(name, shape, datatype, data)


def oip_parse(body: Any, slot: Slot) -> Parsed:
    """An OIP v2 inference request -> (columns, rows), its id and the outputs it asks for."""
    if not isinstance(body, dict):
        raise PayloadError(
            [Problem("body", f"expected a JSON object with 'inputs', got a JSON {_json_kind(body)}")]
        )
    raw_inputs = body.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise PayloadError(
            [Problem("inputs", "must be a non-empty list of tensors {name, shape, datatype, data}")]
        )
    tensors = [_tensor(raw, i) for i, raw in enumerate(raw_inputs)]
    schema = slot.schema
    names = [t.name for t in tensors]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise PayloadError([Problem(f"inputs.{n}", "sent more than once") for n in duplicated])
    only = tensors[0]
    if len(tensors) == 1 and only.name not in schema.columns and len(only.shape) == 2:
        columns, data = _matrix(only, schema)
    else:
        columns, data = _named(tensors)
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise PayloadError([Problem("id", "must be a string")])
    return Parsed(columns, data, request_id or None, _requested_outputs(body.get("outputs"), slot))


def _matrix(tensor: _Tensor, schema: FeatureSchema) -> tuple[list[str], list[list[Any]]]:
    """One [rows, features] tensor, the features in the schema's order."""
    rows, width = tensor.shape
    if width != len(schema.columns):
        raise PayloadError(
            [Problem(f"inputs.{tensor.name}.shape",
                     f"{tensor.shape}: a single 2-D input needs {len(schema.columns)} columns, the model's "
                     f"features in this order: {list(schema.columns)}; or send one input per feature"[:400])]
        )  # fmt: skip
    return list(schema.columns), [tensor.data[r * width : (r + 1) * width] for r in range(rows)]


def _named(tensors: list[_Tensor]) -> tuple[list[str], list[list[Any]]]:
    """One tensor per feature column, each of shape [rows] or [rows, 1]."""
    rows: int | None = None
    for t in tensors:
        if not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)):
            raise PayloadError(
                [Problem(f"inputs.{t.name}.shape", f"{t.shape}: a feature column is [rows] or [rows, 1]")]
            )
        if rows is None:
            rows = t.shape[0]
        elif t.shape[0] != rows:
            raise PayloadError(
                [Problem(f"inputs.{t.name}.shape", f"{t.shape[0]} rows, but '{tensors[0].name}' has {rows}")]
            )
    return [t.name for t in tensors], [list(row) for row in zip(*(t.data for t in tensors), strict=True)]


def oip_outputs(slot: Slot) -> list[str]:
    return [PREDICT, PROBA, CLASSES] if slot.classes is not None else [PREDICT]


def _requested_outputs(raw: Any, slot: Slot) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in raw
    ):
        raise PayloadError([Problem("outputs", "must be a list of {name}")])
    names = tuple(o["name"] for o in raw)
    available = oip_outputs(slot)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise PayloadError(
            [Problem(f"outputs.{n}", f"no such output; this model has {available}") for n in unknown]
        )
    return names


def _datatype(values: list[Any]) -> str:
    if all(isinstance(v, bool) for v in values):
        return "BOOL"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "INT64"
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return "FP64"
    return "BYTES"


def _output(name: str, values: list[Any], shape: list[int], datatype: str | None = None) -> dict[str, Any]:
    datatype = datatype or _datatype(values)
    data = [v if isinstance(v, str) else str(v) for v in values] if datatype == "BYTES" else values
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def oip_respond(out: dict[str, Any], parsed: Parsed, request_id: str) -> dict[str, Any]:
    preds = out["predictions"]
    tensors = {PREDICT: _output(PREDICT, preds, [len(preds)])}
    if "probabilities" in out:
        classes = out["classes"]
        proba = out["probabilities"]
        tensors[PROBA] = _output(PROBA, [p for row in proba for p in row], [len(proba), len(classes)], "FP64")
        tensors[CLASSES] = _output(CLASSES, classes, [len(classes)])
    wanted = parsed.outputs or tuple(tensors)
    return {
        "model_name": out["model"],
        "model_version": out["version"],
        "id": request_id,
        "outputs": [tensors[n] for n in wanted],
    }


def oip_error(status: int, message: str, problems: list[Problem], extra: dict[str, Any]) -> dict[str, Any]:
    """OIP's `{"error": "..."}`; the per-field problems ride along as in the native protocol."""
    return native_error(status, message, problems, extra)


def oip_metadata(slot: Slot) -> dict[str, Any]:
    """OIP model metadata: one input tensor per feature (numbers FP64, categories BYTES)."""
    schema = slot.schema
    inputs = [{"name": c, "datatype": "FP64", "shape": [-1]} for c in schema.numerical]
    inputs += [{"name": c, "datatype": "BYTES", "shape": [-1]} for c in schema.categorical]
    classes = getattr(slot.model, "classes_", None)
    label_type = (
        _datatype([c.item() if hasattr(c, "item") else c for c in classes])
        if slot.classifier and classes is not None
        else "FP64"
    )
    outputs = [{"name": PREDICT, "datatype": label_type, "shape": [-1]}]
    if slot.classes is not None:
        outputs.append({"name": PROBA, "datatype": "FP64", "shape": [-1, len(slot.classes)]})
        outputs.append({"name": CLASSES, "datatype": _datatype(slot.classes), "shape": [len(slot.classes)]})
    return {
        "name": slot.name,
        "versions": [slot.version],
        "platform": OIP_PLATFORM,
        "inputs": inputs,
        "outputs": outputs,
    }


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


NATIVE = Protocol("native", json_body, native_parse, native_respond, native_error)
MLFLOW = Protocol("mlflow", json_body, mlflow_parse, mlflow_respond, mlflow_error)
OIP = Protocol("oip", oip_body, oip_parse, oip_respond, oip_error)
