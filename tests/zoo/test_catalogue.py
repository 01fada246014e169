"""The zoo keeps covering what it is for, with specs a user could have written, and its loader
refuses a broken zoo file naming the file and the field. Fast: no pipeline runs here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cd4ml.core.spec import ModelSpec, Validation, parse_spec
from tests.zoo.loader import PROVIDERS, ZooCase, ZooError, all_cases, load_case, load_table, split_batches

CASES = all_cases()


def _spec(case: ZooCase) -> ModelSpec:
    return parse_spec(case.spec_yaml(), Path(f"{case.name}.yaml"))


@pytest.fixture(scope="module")
def tables() -> dict[str, tuple[pd.DataFrame, dict[str, int]]]:
    return {case.name: load_table(case, full=True) for case in CASES}


def test_every_spec_parses_and_keeps_default_validation() -> None:
    assert len(CASES) >= 15
    for case in CASES:
        spec = _spec(case)
        # The zoo exists to prove that defaults work on real data: no spec may loosen them.
        assert "validation" not in case.spec, f"{case.path}: remove 'validation:'; the zoo uses defaults"
        assert spec.validation == Validation(), case.path
        assert set(case.spec) <= {"description", "task", "target", "timestamp", "features", "estimator",
                                  "metric"}, case.path  # fmt: skip


def test_the_zoo_covers_every_shape_of_table_the_issue_names(
    tables: dict[str, tuple[pd.DataFrame, dict[str, int]]],
) -> None:
    found: dict[str, list[str]] = {}

    def mark(what: str, name: str) -> None:
        found.setdefault(what, []).append(name)

    for case in CASES:
        spec = _spec(case)
        frame, stats = tables[case.name]
        y = frame[spec.target]
        if spec.task == "regression":
            mark("regression", case.name)
            if abs(float(y.skew())) > 1.0:
                mark("skewed target", case.name)
        elif y.nunique() == 2:
            mark("binary", case.name)
            if y.value_counts(normalize=True).min() < 0.1:
                mark("skewed target", case.name)
        elif 3 <= y.nunique() <= 10 and y.map(type).eq(str).all():
            mark("multiclass with string labels", case.name)
        if not spec.categorical:
            mark("numeric-only", case.name)
        if not spec.numerical:
            mark("categorical-only", case.name)
        cols = spec.feature_names
        if any(pd.api.types.is_bool_dtype(frame[c]) for c in cols):
            mark("boolean-coded", case.name)
        if any(pd.api.types.is_integer_dtype(frame[c]) for c in cols):
            mark("integer-coded", case.name)
        if any(frame[c].nunique() >= 30 for c in spec.categorical):
            mark("high-cardinality categorical", case.name)
        if frame[cols].isna().any().any():
            mark("missing values", case.name)
        if frame.duplicated().mean() >= 0.05:
            mark("legitimately repeated rows", case.name)
        if case.order_by:
            batches = split_batches(frame, case.batches)
            first = {c: set(batches[0][c].dropna()) for c in spec.categorical}
            if any(set(b[c].dropna()) - first[c] for b in batches[1:] for c in spec.categorical):
                mark("time-ordered, categories evolve", case.name)
        if stats["rows"] <= 200:
            mark("tiny", case.name)
        if stats["rows"] >= 50_000:
            mark("large", case.name)
    required = [
        "binary", "multiclass with string labels", "regression", "numeric-only", "categorical-only",
        "integer-coded", "boolean-coded", "high-cardinality categorical", "missing values",
        "legitimately repeated rows", "time-ordered, categories evolve", "skewed target", "tiny", "large",
    ]  # fmt: skip
    assert [r for r in required if r not in found] == [], found


def test_every_provider_serves_at_least_one_dataset() -> None:
    assert {c.source["provider"] for c in CASES} == set(PROVIDERS)


def test_metrics_vary_across_tasks() -> None:
    metrics = {_spec(c).metric.name for c in CASES}
    assert {"f1", "roc_auc", "log_loss", "balanced_accuracy", "rmse", "mae", "r2"} <= metrics


def test_a_row_cap_keeps_order_and_span_and_batches_cover_every_row() -> None:
    case = next(c for c in CASES if c.rows is not None and c.order_by)
    assert case.rows is not None
    capped, stats = load_table(case, full=False)
    whole, _ = load_table(case, full=True)
    assert stats["rows"] == len(capped) <= case.rows < len(whole)
    key = case.order_by[0]
    assert capped[key].is_monotonic_increasing
    assert capped[key].iloc[0] == whole[key].iloc[0] and capped[key].iloc[-1] == whole[key].iloc[-1]
    batches = split_batches(capped, case.batches)
    assert len(batches) == case.batches and sum(map(len, batches)) == len(capped)
    assert capped[case.spec["target"]].notna().all()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"source": {"provider": "nowhere", "name": "x"}, "spec": {}}, "source"),
        ({"source": {"provider": "sklearn", "name": "iris"}}, "spec"),
        ({"source": {"provider": "sklearn", "name": "iris"}, "spec": {}, "batches": 1}, "batches"),
        ({"source": {"provider": "sklearn", "name": "iris"}, "spec": {}, "format": "xlsx"}, "format"),
        ({"source": {"provider": "sklearn", "name": "iris"}, "spec": {}, "validation": {}}, "unknown keys"),
    ],
)
def test_a_broken_zoo_file_is_refused_naming_file_and_field(
    tmp_path: Path, raw: dict[str, Any], field: str
) -> None:
    import yaml

    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ZooError) as err:
        load_case(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_a_missing_column_names_the_table_and_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(
        "source: {provider: sklearn, name: iris, target_labels: names}\n"
        "spec: {task: classification, target: target, features: {numerical: [petal size]},\n"
        "       estimator: {class: sklearn.dummy.DummyClassifier}, metric: {name: accuracy}}\n"
    )
    with pytest.raises(ZooError, match=r"columns \['petal size'\] are not in sklearn/iris"):
        load_table(load_case(path))
