"""The business value of predictions: what the spec's `business:` section says they are worth.

Pure and vectorised: arrays in, a number out. The value of a set of predictions is the **mean
value per prediction**, in the spec's `business.unit` (e.g. EUR per prediction), so a holdout of
300 rows and an hour of 30,000 served rows are on one scale, and higher is always better:

- classification: `business.matrix[actual][predicted]` per row (`business.default` for a pair of
  named classes the matrix leaves out);
- regression: minus the cost of the row's absolute error, `business.cost_per_unit_under` per unit
  the prediction falls short of the actual and `business.cost_per_unit_over` per unit it exceeds
  it (each defaulting to `business.cost_per_unit`).

Labels are compared as text, as categorical values are everywhere
(`cd4ml.data.tables.category_text`): the matrix key `1` (written `1:` or `"1":` in YAML) matches the
label 1, 1.0 and "1" alike, so outcomes posted as JSON strings value the same as the model's integer
predictions. A label the matrix does not name is an error that names it (a default covers pairs of
named classes, never a class nobody wrote down: an unknown class usually means a mistyped key).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from cd4ml.core.errors import DataError, SpecError
from cd4ml.core.spec import Business, ModelSpec
from cd4ml.data.tables import category_text

Array = NDArray[Any]
# What YAML 1.1 reads as a boolean when unquoted: a key written `yes:` is the class "True".
_YAML_BOOLEAN_WORDS = {"y", "yes", "n", "no", "on", "off", "true", "false"}


def business_value(spec: ModelSpec, y_true: Any, y_pred: Any) -> float | None:
    """Mean business value per prediction of `y_pred` against the actual `y_true`, in
    `spec.business.unit`; None when the spec has no business section or there are no rows.

    Raises SpecError for a class the matrix does not name (or a pair it leaves out with no
    `business.default`), DataError for missing actuals or predictions, or non-numbers in regression.
    """
    if spec.business is None:
        return None
    values = row_values(spec.business, spec.task, y_true, y_pred)
    if values.size == 0:
        return None
    return float(values.mean())


def row_values(business: Business, task: str, y_true: Any, y_pred: Any) -> Array:
    """The value of each prediction (shape (n,)); `business_value` is their mean. A bootstrap of the
    business value resamples these."""
    truth = _one_dimensional(y_true, "actual values")
    predicted = _one_dimensional(y_pred, "predictions")
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} actual values for {len(predicted)} predictions")
    if task == "regression":
        return _regression_values(business, truth, predicted)
    return _classification_values(business, truth, predicted)


def _one_dimensional(values: Any, what: str) -> Array:
    out = np.asarray(values)
    if out.ndim != 1:
        raise ValueError(f"{what}: expected one value per row, got an array of shape {out.shape}")
    return out


def _regression_values(business: Business, truth: Array, predicted: Array) -> Array:
    actual = _numbers(truth, "actual values")
    guess = _numbers(predicted, "predictions")
    error = guess - actual
    # Above the actual costs `over` per unit, below it `under`: value = -cost.
    return np.where(error > 0, -business.over_cost * error, business.under_cost * error)


def _numbers(values: Array, what: str) -> Array:
    if values.dtype.kind in "iufb":
        numbers = values.astype(float)
    else:  # text from a label file or JSON: "3.5" is a number, "n/a" is not
        numbers = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(numbers)
    if bad.any():
        shown = pd.unique(pd.Series(values[bad], dtype=object))[:5].tolist()
        raise DataError(
            f"business value: {int(bad.sum())} {what} are not finite numbers (e.g. {shown}); a regression "
            "value needs a number for every actual and every prediction"
        )
    return numbers


def _classification_values(business: Business, truth: Array, predicted: Array) -> Array:
    assert business.matrix is not None  # checked when the spec was read (`Business.check_task`)
    classes = business.classes
    k = len(classes)
    table = np.full((k, k), np.nan if business.default is None else business.default, dtype=float)
    for i, actual in enumerate(classes):
        for predicted_class, value in business.matrix.get(actual, {}).items():
            table[i, classes.index(predicted_class)] = value
    actual_idx = _class_indices(truth, classes, "actual")
    predicted_idx = _class_indices(predicted, classes, "predicted")
    values = table[actual_idx, predicted_idx]
    missing = np.isnan(values)
    if missing.any():  # only without a default; the spec check refuses such a matrix, a bug if here
        pairs = sorted({(classes[a], classes[p]) for a, p in zip(actual_idx[missing], predicted_idx[missing],
                                                                  strict=True)})  # fmt: skip
        raise SpecError(
            f"business.matrix: no value for the (actual, predicted) pairs {pairs}; give each a value "
            "or set business.default"
        )
    return np.asarray(values)


def _class_indices(values: Array, classes: list[str], role: str) -> Array:
    """Each label's position in `classes`, comparing as text; only the distinct labels are converted."""
    codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=True)
    if (codes < 0).any():
        raise DataError(
            f"business value: {int((codes < 0).sum())} {role} labels are missing (null); every row needs "
            "an actual outcome and a prediction"
        )
    texts = [category_text(u) for u in uniques]
    positions = pd.Index(classes, dtype=object).get_indexer(pd.Index(texts, dtype=object))
    unknown = [t for t, pos in zip(texts, positions, strict=True) if pos < 0]
    if unknown:
        raise SpecError(_unknown_classes(unknown, classes, role))
    return np.asarray(positions[codes])


def _unknown_classes(unknown: list[str], classes: list[str], role: str) -> str:
    message = (
        f"business.matrix: {role} class(es) {sorted(unknown)[:10]} are not in the matrix, which names "
        f"{classes}; add them to business.matrix (a row like `{unknown[0]}: {{}}` with business.default "
        "is enough), or correct the keys. Labels compare as text: 1, 1.0 and '1' are one class"
    )
    if {"True", "False"} & set(classes) and any(u.lower() in _YAML_BOOLEAN_WORDS for u in unknown):
        message += "; YAML reads unquoted yes/no/on/off as true/false, so quote such keys ('yes': ...)"
    return message
