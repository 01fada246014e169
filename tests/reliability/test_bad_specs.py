"""A bad spec is a clear error naming the file and the field, and breaks no other model's DAGs.

The cases are generated from the pydantic models in cd4ml.core.spec: every required field removed in
turn, and every field given a value of the wrong type (and, where the field is constrained or has
a validator, a value of the right type that breaks the rule). A field added to the spec later is
covered without touching this file.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
import pytest
import yaml
from pydantic import BaseModel

from cd4ml.core.errors import SpecError
from cd4ml.core.spec import ModelSpec, load_spec
from tests.helpers import REPO, spec_dict

BASE = spec_dict(
    validation__expectations=[
        {"expectation": "ExpectColumnMeanToBeBetween", "kwargs": {"column": "age", "min_value": 1}}
    ],
    notifications__email=["owner@example.com"],
    # Optional sections are in the base so that each of their fields is broken in turn too.
    business={"name": "margin", "unit": "EUR", "matrix": {1: {1: 40, 0: -200}, 0: {1: -10, 0: 0}}},
    feedback={"to_training": True, "min_rows": 100, "max_rows": 1000},
    deployment={"strategy": "shadow", "shadow_fraction": 0.5,
                "canary": {"fraction": 0.2, "sticky_key": "customer_id"}},
    scoring={"schedule": "0 4 * * *", "csv": True, "chunk_rows": 5000, "keep_columns": ["customer_id"]},
    promotion__approval="required",
)  # fmt: skip
# Where a list of models is walked, its first element stands for all of them.
FIRST = 0


@dataclass(frozen=True)
class Case:
    id: str
    path: tuple[str | int, ...]  # keys into the spec dict
    value: Any  # the replacement; MISSING removes the key
    field: str  # the dotted field the error must name


MISSING = object()


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007
    return annotation, False


def _wrong_type(annotation: Any) -> list[Any]:
    """Values no coercion turns into `annotation`."""
    annotation, _ = _strip_optional(annotation)
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return []
    if origin is typing.Literal:
        return ["not-one-of-the-choices"]
    if origin is list:
        return ["not-a-list"]
    if origin is dict:
        return ["not-a-mapping"]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return ["not-a-mapping"]
    if annotation is bool:
        return ["maybe"]
    if annotation is int:
        return ["many", 1.5]
    if annotation is float:
        return ["lots"]
    if annotation is str:
        return [["a", "list"]]
    raise AssertionError(f"no wrong value known for {annotation!r}: teach this test the new type")


def _breaking_the_constraints(info: Any) -> list[Any]:
    out = []
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Ge):
            out.append(meta.ge - 1)
        elif isinstance(meta, annotated_types.Gt):
            out.append(meta.gt)
        elif isinstance(meta, annotated_types.Le):
            out.append(meta.le + 1)
        elif isinstance(meta, annotated_types.Lt):
            out.append(meta.lt)
    return out


def _validated_fields(model: type[BaseModel]) -> set[str]:
    decorators = model.__pydantic_decorators__.field_validators.values()
    return {f for d in decorators for f in d.info.fields if d.info.mode != "before"}


def _node(raw: dict[str, Any], path: tuple[str | int, ...]) -> Any:
    for key in path:
        raw = raw[key]  # type: ignore[index]
    return raw


def generate_cases(model: type[BaseModel] = ModelSpec, prefix: tuple[str | int, ...] = ()) -> list[Case]:
    cases: list[Case] = []
    validated = _validated_fields(model)
    for name, info in model.model_fields.items():
        key = info.alias or name
        path = (*prefix, key)
        dotted = ".".join(str(p) for p in path)
        if info.is_required() and path != ("name",):  # `name` defaults to the file name
            cases.append(Case(f"{dotted}-missing", path, MISSING, dotted))
        for i, value in enumerate(_wrong_type(info.annotation)):
            cases.append(Case(f"{dotted}-wrong-type-{i}", path, value, dotted))
        for i, value in enumerate(_breaking_the_constraints(info)):
            cases.append(Case(f"{dotted}-out-of-bounds-{i}", path, value, dotted))
        if name in validated and _strip_optional(info.annotation)[0] is str:
            cases.append(Case(f"{dotted}-invalid", path, "Not A Valid Value!", dotted))
        inner, _ = _strip_optional(info.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            cases += generate_cases(inner, path)
        elif typing.get_origin(inner) is list:
            (item,) = typing.get_args(inner)
            if isinstance(item, type) and issubclass(item, BaseModel):
                assert _node(BASE, path), f"BASE needs one {dotted} entry to cover {item.__name__}"
                cases += generate_cases(item, (*path, FIRST))
    return cases


CASES = generate_cases()


def _apply(case: Case) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    parent = _node(raw, case.path[:-1])
    if case.value is MISSING:
        del parent[case.path[-1]]
    else:
        parent[case.path[-1]] = case.value
    return raw


def test_the_base_spec_is_valid_and_cases_cover_every_field(tmp_path: Path) -> None:
    path = tmp_path / "base_model.yaml"
    path.write_text(yaml.safe_dump(BASE))
    load_spec(path)
    covered = {c.field for c in CASES}
    for section in ("task", "target", "estimator.class", "metric.name", "promotion.confidence",
                    "features.numerical.0.name", "validation.expectations.0.expectation",
                    "drift.threshold", "notifications.email", "schedule.retrain_cron", "business.matrix",
                    "business.gate", "business.cost_per_unit", "feedback.to_training",
                    "feedback.min_rows", "deployment.strategy", "deployment.shadow_fraction"):  # fmt: skip
        assert section in covered, section
    assert sum(c.value is MISSING for c in CASES) >= 6
    assert len(CASES) >= 80


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_each_bad_field_is_an_error_naming_the_file_and_the_field(tmp_path: Path, case: Case) -> None:
    path = tmp_path / "broken_model.yaml"
    path.write_text(yaml.safe_dump(_apply(case)))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert str(path) in message
    assert f"field '{case.field}" in message, message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("task: [unclosed", "not valid YAML"),
        ("- a\n- list\n", "a spec must be a YAML mapping, got list"),
        ("", "a spec must be a YAML mapping, got NoneType"),
        ("name: other_name\n", "field 'name': 'other_name' must match the file name 'broken_model'"),
    ],
)
def test_files_that_are_not_specs_name_the_file(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "broken_model.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value).startswith(str(path)) and words in str(err.value)


def test_undecodable_spec_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken_model.yaml"
    path.write_bytes(b"task: \xff\xfe classification\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: cannot read spec")


PROBE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
print(json.dumps({"errors": bag.import_errors, "dags": sorted(bag.dags)}))
"""


def test_bad_specs_leave_the_good_models_dags_loading(tmp_path: Path) -> None:
    bad = {
        "missing_estimator": _apply(next(c for c in CASES if c.id == "estimator-missing")),
        "wrong_type": _apply(next(c for c in CASES if c.id == "promotion.confidence-wrong-type-0")),
    }
    (tmp_path / "good_model.yaml").write_text(yaml.safe_dump(BASE))
    for name, raw in bad.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "not_yaml.yaml").write_text("task: [unclosed")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO / "dags")],
        capture_output=True, text=True, check=True, timeout=300,
        env={**os.environ, "CD4ML_SPECS_DIR": str(tmp_path)},
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"good_model__train", "good_model__monitor", "good_model__rollback"} <= set(result["dags"])
    assert not any(d.startswith(("missing_estimator", "wrong_type", "not_yaml")) for d in result["dags"])
    ((where, message),) = result["errors"].items()
    assert where.endswith("cd4ml_spec_check.py")
    assert f"{tmp_path}/missing_estimator.yaml: field 'estimator': Field required" in message
    assert f"{tmp_path}/wrong_type.yaml: field 'promotion.confidence'" in message
    assert f"{tmp_path}/not_yaml.yaml: not valid YAML" in message
    assert "good_model" not in message
