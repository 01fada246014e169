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


def shapes(case: ZooCase, frame: pd.DataFrame, stats: dict[str, int]) -> set[str]:
    """The shapes of table one zoo dataset brings (what the zoo is for)."""
    found: set[str] = set()
    mark = found.add
    spec = _spec(case)
    y = frame[spec.target]
    if spec.task == "regression":
        mark("regression")
        if abs(float(y.skew())) > 1.0:
            mark("skewed target")
    elif y.nunique() == 2:
        mark("binary")
        if y.value_counts(normalize=True).min() < 0.1:
            mark("skewed target")
    elif 3 <= y.nunique() <= 10 and y.map(type).eq(str).all():
        mark("multiclass with string labels")
    if not spec.categorical:
        mark("numeric-only")
    if not spec.numerical:
        mark("categorical-only")
    cols = spec.feature_names
    if any(pd.api.types.is_bool_dtype(frame[c]) for c in cols):
        mark("boolean-coded")
    if any(pd.api.types.is_integer_dtype(frame[c]) for c in cols):
        mark("integer-coded")
    if any(frame[c].nunique() >= 30 for c in spec.categorical):
        mark("high-cardinality categorical")
    if frame[cols].isna().any().any():
        mark("missing values")
    if frame.duplicated().mean() >= 0.05:
        mark("legitimately repeated rows")
    if case.order_by:
        batches = split_batches(frame, case.batches)
        first = {c: set(batches[0][c].dropna()) for c in spec.categorical}
        if any(set(b[c].dropna()) - first[c] for b in batches[1:] for c in spec.categorical):
            mark("time-ordered, categories evolve")
    if stats["rows"] <= 200:
        mark("tiny")
    if stats["rows"] >= 50_000:
        mark("large")
    mark(f"format {case.format}")
    return found


def test_the_zoo_covers_every_shape_of_table_the_issue_names(
    tables: dict[str, tuple[pd.DataFrame, dict[str, int]]],
) -> None:
    found: dict[str, list[str]] = {}
    for case in CASES:
        for shape in shapes(case, *tables[case.name]):
            found.setdefault(shape, []).append(case.name)
    required = [
        "binary", "multiclass with string labels", "regression", "numeric-only", "categorical-only",
        "integer-coded", "boolean-coded", "high-cardinality categorical", "missing values",
        "legitimately repeated rows", "time-ordered, categories evolve", "skewed target", "tiny", "large",
    ]  # fmt: skip
    assert [r for r in required if r not in found] == [], found


def test_the_quick_datasets_in_make_test_still_span_tasks_formats_and_shapes(
    tables: dict[str, tuple[pd.DataFrame, dict[str, int]]],
) -> None:
    """`make test` trains only the zoo files marked `quick: true`; they must still cover each task,
    both file formats and the shapes that broke cd4ml before (missing values, evolving categories,
    one-kind-only feature sets). The rest run in `make test-zoo` and `make soak`."""
    quick = [case for case in CASES if case.quick]
    assert 3 <= len(quick) < len(CASES)
    covered = set().union(*(shapes(case, *tables[case.name]) for case in quick))
    required = {
        "binary", "multiclass with string labels", "regression", "numeric-only", "categorical-only",
        "missing values", "time-ordered, categories evolve", "format csv", "format parquet",
    }  # fmt: skip
    assert required - covered == set(), sorted(covered)


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
