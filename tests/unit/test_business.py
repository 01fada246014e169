"""The business value of predictions (`cd4ml.ml.business`): a cost/benefit matrix for classification,
a cost per unit of error for regression, labels compared as the spec writes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from cd4ml.core.errors import DataError, SpecError
from cd4ml.core.spec import ModelSpec, label_text, parse_spec
from cd4ml.data.tables import category_text
from cd4ml.ml.business import business_value, row_values
from tests.helpers import spec_dict

# Churn: a caught churner takes a retention offer (+40), a missed one is lost (-200), an offer
# to a loyal customer is wasted (-10), a loyal customer left alone costs nothing.
CHURN = {1: {1: 40, 0: -200}, 0: {1: -10, 0: 0}}


def spec_with(business: dict[str, Any] | None, **overrides: Any) -> ModelSpec:
    raw = spec_dict(**overrides)
    if business is not None:
        raw["business"] = business
    return parse_spec(yaml.safe_dump(raw), Path("specs/m.yaml"))


def regression(**business: Any) -> ModelSpec:
    return spec_with(
        business,
        task="regression",
        target="monthly_charges",
        features__numerical=["age", "tenure_months"],
        metric={"name": "mae"},
    )


def test_no_business_section_means_no_value() -> None:
    assert business_value(spec_with(None), [1, 0], [1, 0]) is None


def test_the_value_is_the_mean_of_the_matrix_over_the_outcomes() -> None:
    spec = spec_with({"matrix": CHURN, "unit": "EUR"})
    y_true = np.array([1, 1, 0, 0, 1])
    y_pred = np.array([1, 0, 1, 0, 1])
    assert business_value(spec, y_true, y_pred) == pytest.approx((40 - 200 - 10 + 0 + 40) / 5)
    assert list(row_values(spec.business, spec.task, y_true, y_pred)) == [40, -200, -10, 0, 40]
    assert business_value(spec, [], []) is None  # nothing to value


@pytest.mark.parametrize(
    ("y_true", "y_pred"),
    [
        (["1", "0", "1"], [1, 1, 0]),  # outcomes posted as JSON strings, predictions as the model's ints
        ([1.0, 0.0, 1.0], np.array([1, 1, 0], dtype=np.int64)),  # a target read as floats
        (np.array([1, 0, 1], dtype=np.int8), np.array(["1", "1", "0"], dtype=object)),
    ],
)
def test_labels_compare_as_text_whatever_type_they_arrive_in(y_true: Any, y_pred: Any) -> None:
    spec = spec_with({"matrix": CHURN})
    assert business_value(spec, y_true, y_pred) == pytest.approx((40 - 10 - 200) / 3)


def test_matrix_keys_written_as_text_or_numbers_name_the_same_class() -> None:
    quoted = spec_with({"matrix": {"1": {"1": 40, "0": -200}, "0": {"1": -10, "0": 0}}})
    assert quoted.business == spec_with({"matrix": CHURN}).business
    assert quoted.spec_hash() == spec_with({"matrix": CHURN}).spec_hash()


def test_text_classes_and_a_default_for_the_pairs_left_out() -> None:
    spec = spec_with(
        {"matrix": {"fraud": {"fraud": 100, "ok": -500}, "ok": {"fraud": -5}, "review": {}}, "default": 0},
        target="label",
    )
    value = business_value(
        spec, ["fraud", "ok", "ok", "review", "fraud"], ["fraud", "ok", "fraud", "ok", "review"]
    )
    assert value == pytest.approx((100 + 0 - 5 + 0 + 0) / 5)


def test_a_class_the_matrix_does_not_name_is_an_error_naming_it_even_with_a_default() -> None:
    spec = spec_with({"matrix": CHURN, "default": 0})
    with pytest.raises(SpecError) as err:
        business_value(spec, [1, 2, 0], [1, 1, 0])
    assert "business.matrix: actual class(es) ['2'] are not in the matrix, which names ['0', '1']" in str(
        err.value
    )
    with pytest.raises(SpecError, match=r"predicted class\(es\) \['churn'\]"):
        business_value(spec, [1, 0], ["churn", 0])


def test_yes_and_no_written_unquoted_are_booleans_to_yaml_and_the_error_says_so() -> None:
    text = (
        yaml.safe_dump(spec_dict(target="answer"))
        + "business:\n  matrix:\n    yes: {yes: 1, no: -1}\n    no: {yes: -1, no: 0}\n"
    )
    spec = parse_spec(text, Path("specs/m.yaml"))
    assert spec.business is not None and spec.business.classes == ["True", "False"]
    with pytest.raises(SpecError, match="quote such keys"):
        business_value(spec, ["yes", "no"], ["yes", "yes"])
    assert business_value(spec, [True, False], [True, True]) == pytest.approx(0.0)


def test_missing_labels_and_mismatched_lengths_are_refused() -> None:
    spec = spec_with({"matrix": CHURN})
    with pytest.raises(DataError, match="1 actual labels are missing"):
        business_value(spec, [1, None, 0], [1, 0, 0])
    with pytest.raises(ValueError, match="3 actual values for 2 predictions"):
        business_value(spec, [1, 0, 0], [1, 0])
    with pytest.raises(ValueError, match="one value per row"):
        business_value(spec, [[1, 0]], [[1, 0]])


def test_regression_costs_each_unit_of_error_symmetric_or_not() -> None:
    y_true = np.array([10.0, 10.0, 10.0])
    y_pred = np.array([12.0, 7.0, 10.0])  # 2 over, 3 under, exact
    assert business_value(regression(cost_per_unit=2.0), y_true, y_pred) == pytest.approx(
        -(2 * 2 + 3 * 2) / 3
    )
    uneven = regression(cost_per_unit_under=5.0, cost_per_unit_over=1.0, unit="EUR")
    assert business_value(uneven, y_true, y_pred) == pytest.approx(-(2 * 1 + 3 * 5) / 3)
    # One side set, the other from cost_per_unit.
    partly = regression(cost_per_unit=2.0, cost_per_unit_under=5.0)
    assert business_value(partly, y_true, y_pred) == pytest.approx(-(2 * 2 + 3 * 5) / 3)
    # Outcomes as text from a label file are numbers too.
    assert business_value(regression(cost_per_unit=1.0), ["10", "10.5"], [10, 10]) == pytest.approx(-0.25)


def test_regression_refuses_what_is_not_a_number() -> None:
    with pytest.raises(DataError, match=r"1 actual values are not finite numbers \(e.g. \['n/a'\]\)"):
        business_value(regression(cost_per_unit=1.0), ["10", "n/a"], [10, 10])
    with pytest.raises(DataError, match="1 predictions are not finite"):
        business_value(regression(cost_per_unit=1.0), [10, 10], [10, np.nan])


def test_a_million_rows_are_valued_without_a_python_loop_per_row() -> None:
    """Vectorised: the label conversion runs per distinct label, not per row (no timing asserted)."""
    spec = spec_with({"matrix": CHURN})
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, 1_000_000)
    y_pred = rng.integers(0, 2, 1_000_000)
    table = {(1, 1): 40, (1, 0): -200, (0, 1): -10, (0, 0): 0}
    counts = {pair: int(((y_true == pair[0]) & (y_pred == pair[1])).sum()) for pair in table}
    expected = sum(table[p] * counts[p] for p in table) / 1_000_000
    assert business_value(spec, y_true, y_pred) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["yes", 1, 0, 7, 1.0, 2.5, -3, True, False, "1.0", 2**60])
def test_spec_keys_and_data_labels_are_the_same_text(value: Any) -> None:
    """The spec (which imports no pandas) copies `category_text` for the scalars YAML writes."""
    assert label_text(value) == category_text(value)
