"""The GX suite built from the spec, run by real Great Expectations on small frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cd4ml.datagen import generate_churn
from cd4ml.spec import load_spec
from cd4ml.validation import expectation_configs, learn_reference, normalise, validate_frame
from tests.helpers import DEMO_SPEC

SPEC = load_spec(DEMO_SPEC)
ACCEPTED = normalise(SPEC, generate_churn(1500, seed=1))
REFERENCE = learn_reference(SPEC, ACCEPTED)


def batch(n: int = 400, **kw: object) -> pd.DataFrame:
    return normalise(SPEC, generate_churn(n, seed=2, batch=1, **kw))


def run(frame: pd.DataFrame, tmp: Path | None = None):
    return validate_frame(SPEC, frame, REFERENCE, batch_name="t", context_root=tmp)


def test_reference_learns_ranges_domains_and_classes() -> None:
    lo, hi = REFERENCE.ranges["monthly_charges"]
    assert lo < ACCEPTED["monthly_charges"].min() and hi > ACCEPTED["monthly_charges"].max()
    assert REFERENCE.categories["region"] == ["east", "north", "south", "west"]
    assert REFERENCE.categories["churned"] == [0, 1]


def test_suite_is_built_from_the_spec() -> None:
    kinds = [k for k, _ in expectation_configs(SPEC, REFERENCE, SPEC.columns)]
    assert kinds.count("ExpectColumnValuesToBeInTypeList") == len(SPEC.numerical)
    assert "ExpectTableColumnsToMatchSet" in kinds and "ExpectCompoundColumnsToBeUnique" in kinds
    tenure = [kw for k, kw in expectation_configs(SPEC, REFERENCE, SPEC.columns)
              if k == "ExpectColumnValuesToBeBetween" and kw["column"] == "tenure_months"]  # fmt: skip
    assert tenure == [{"column": "tenure_months", "min_value": 0, "max_value": 120}]  # the spec's bounds win


def test_clean_batch_passes(tmp_path: Path) -> None:
    outcome = run(batch(), tmp_path)
    assert outcome.success, outcome.problems
    assert outcome.evaluated >= 25
    assert outcome.docs_url and Path(outcome.docs_url.removeprefix("file://")).exists()


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (lambda f: f.drop(columns=["plan"]), "missing columns ['plan']"),
        (lambda f: f.assign(extra=1), "unexpected columns ['extra']"),
        (lambda f: f.rename(columns={"age": "Age"}), "missing columns ['age']"),
        (lambda f: f.assign(age=f["age"].astype(str) + "y"), "column 'age': has type"),
        (
            lambda f: f.assign(tenure_months=np.where(f.index < 10, -3, f["tenure_months"])),
            "column 'tenure_months': 10 of 400 rows outside [0, 120]",
        ),
        (lambda f: f.assign(monthly_charges=f["monthly_charges"] * 100), "column 'monthly_charges'"),
        (
            lambda f: f.assign(age=np.where(f.index < 40, np.nan, f["age"])),
            "column 'age': 40 of 400 rows are null",
        ),
        (lambda f: f.assign(region=np.where(f.index < 5, "mars", f["region"])), "(found 'mars')"),
        (lambda f: f.assign(churned=0), "column 'churned': has 1 distinct value"),
        (
            lambda f: f.assign(churned=np.where(f.index < 3, 7, f["churned"])),
            "column 'churned': 3 of 400 rows not in",
        ),
        (lambda f: f.assign(event_time="yesterday-ish"), "column 'event_time'"),
        (lambda f: pd.concat([f, f.iloc[:50]], ignore_index=True), "duplicated rows"),
        (lambda f: f.iloc[:5], "table: has 5 rows; at least 50 required"),
    ],
)
def test_corrupted_batch_fails_with_a_reason(corrupt, expected: str) -> None:
    outcome = run(corrupt(batch()))
    assert not outcome.success
    assert any(expected in p for p in outcome.problems), outcome.problems


def test_spec_extra_expectations_are_applied() -> None:
    import yaml

    from cd4ml.spec import parse_spec
    from tests.helpers import spec_dict

    mean_check = {"column": "age", "min_value": 80, "max_value": 90}
    raw = spec_dict(
        validation__expectations=[{"expectation": "ExpectColumnMeanToBeBetween", "kwargs": mean_check}]
    )
    spec = parse_spec(yaml.safe_dump(raw), Path("churn.yaml"))
    outcome = validate_frame(spec, batch(), REFERENCE, batch_name="x")
    assert not outcome.success
    assert any("ExpectColumnMeanToBeBetween" in p for p in outcome.problems)


def test_first_batch_without_reference_uses_declared_bounds_only() -> None:
    outcome = validate_frame(SPEC, batch(), learn_reference(SPEC, ACCEPTED.iloc[0:0]), batch_name="first")
    assert outcome.success, outcome.problems


def test_learned_ranges_let_a_drifting_world_step_a_little_outside_but_not_far() -> None:
    _, hi = REFERENCE.ranges["support_calls"]  # support_calls has no max in the spec: learned
    frame = batch(1000)
    few = frame.assign(support_calls=np.where(frame.index < 5, hi + 3, frame["support_calls"]))
    assert validate_frame(SPEC, few, REFERENCE, batch_name="few").success  # 0.5% <= 1% allowed
    many = frame.assign(support_calls=np.where(frame.index < 30, hi + 3, frame["support_calls"]))
    outcome = validate_frame(SPEC, many, REFERENCE, batch_name="many")
    assert not outcome.success
    assert any(
        p.startswith("column 'support_calls': 30 of 1000 rows outside [-inf, ")
        and "at most 1.0% allowed outside the range learned" in p
        for p in outcome.problems
    ), outcome.problems
    # The spec's own bounds allow no row outside.
    one = frame.assign(tenure_months=np.where(frame.index < 1, -1, frame["tenure_months"]))
    assert not validate_frame(SPEC, one, REFERENCE, batch_name="one").success
