"""A fast serving path for the pipelines cd4ml builds, proven equal to the real one at load time.

scikit-learn's ColumnTransformer spends ~3 ms per call on pandas bookkeeping, ten times what the
model itself needs for one row. `compile_pipeline` reads the *fitted* imputers, scaler and encoder
of a pipeline built by `cd4ml.ml.training.build_pipeline` and applies the same arithmetic with numpy.
It is only used if, on the version's own input example, it reproduces the pipeline's transform and
predictions bit for bit; anything else (another pipeline shape, a mismatch) serves through sklearn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import NotFittedError
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.utils.validation import check_is_fitted


@dataclass(frozen=True)
class FastPipeline:
    numerical: list[str]
    categorical: list[str]
    num_fill: NDArray[np.float64]
    mean: NDArray[np.float64] | None
    scale: NDArray[np.float64] | None
    cat_fill: Any
    categories: list[dict[Any, int]]
    width: int
    estimator: Any
    classes: NDArray[Any] | None

    def transform(self, num: NDArray[np.float64], cat: NDArray[Any]) -> NDArray[np.float64]:
        n = num.shape[0]
        x = np.where(np.isnan(num), self.num_fill, num)
        if self.mean is not None:
            x = x - self.mean
        if self.scale is not None:
            x = x / self.scale
        blocks = [x]
        for j, lookup in enumerate(self.categories):
            block = np.zeros((n, len(lookup)))
            for i in range(n):
                value = cat[i, j]
                # As SimpleImputer on object columns: NaN is missing, None is a value of its own
                # (parquet hands nulls back as None, so the encoder may have learned it).
                if isinstance(value, float) and np.isnan(value):
                    value = self.cat_fill
                k = lookup.get(value)
                if k is not None:
                    block[i, k] = 1.0
            blocks.append(block)
        if len(blocks) > 1:
            return np.hstack(blocks)
        # sklearn hands a lone numeric block on as the scaler made it, column-major from a DataFrame;
        # BLAS-backed estimators round differently on the other memory layout.
        return np.asfortranarray(x)

    def predict(
        self, num: NDArray[np.float64], cat: NDArray[Any]
    ) -> tuple[NDArray[Any], NDArray[Any] | None]:
        x = self.transform(num, cat)
        if self.classes is not None:
            proba = self.estimator.predict_proba(x)
            return self.classes[np.argmax(proba, axis=1)], proba
        return self.estimator.predict(x), None


def compile_pipeline(model: Any) -> FastPipeline | None:
    """The fast path for a fitted cd4ml pipeline, or None if the pipeline has another shape.

    Any feature mix compiles: numbers and categories, numbers only, categories only. A transformer
    with no columns (left unfitted by sklearn, as older cd4ml pipelines had) adds nothing.
    """
    if not (isinstance(model, Pipeline) and len(model.steps) == 2):
        return None
    pre, estimator = model.steps[0][1], model.steps[1][1]
    if not isinstance(pre, ColumnTransformer) or pre.remainder != "drop":
        return None
    try:
        used = [
            (name, trans, list(cols))
            for name, trans, cols in pre.transformers_
            if name != "remainder" and len(cols) > 0
        ]
    except AttributeError:  # not fitted
        return None
    names = [name for name, _, _ in used]
    if names not in (["num", "cat"], ["num"], ["cat"]):
        return None
    named = {name: (trans, cols) for name, trans, cols in used}
    numerical: list[str] = []
    num_fill: NDArray[np.float64] = np.zeros(0)
    mean: NDArray[np.float64] | None = None
    scale: NDArray[np.float64] | None = None
    if "num" in named:
        num_pipe, numerical = named["num"]
        parts = _steps(num_pipe, SimpleImputer, StandardScaler)
        if parts is None:
            return None
        imputer, scaler = parts
        num_fill = np.asarray(imputer.statistics_, dtype=float)
        mean = np.asarray(scaler.mean_) if scaler.with_mean else None
        scale = np.asarray(scaler.scale_) if scaler.with_std else None
    categorical: list[str] = []
    categories: list[dict[Any, int]] = []
    cat_fill: Any = None
    if "cat" in named:
        cat_pipe, categorical = named["cat"]
        parts = _steps(cat_pipe, SimpleImputer, OneHotEncoder)
        if parts is None:
            return None
        cat_imputer, encoder = parts
        ok = (
            cat_imputer.strategy == "constant"
            and encoder.drop is None
            and encoder.handle_unknown == "ignore"
            and getattr(encoder, "_infrequent_enabled", False) is False
        )
        if not ok:
            return None
        cat_fill = cat_imputer.fill_value
        categories = [{v: k for k, v in enumerate(cats.tolist())} for cats in encoder.categories_]
    proba = hasattr(estimator, "predict_proba") and hasattr(estimator, "classes_")
    return FastPipeline(
        numerical=numerical,
        categorical=categorical,
        num_fill=num_fill,
        mean=mean,
        scale=scale,
        cat_fill=cat_fill,
        categories=categories,
        width=len(numerical) + sum(len(c) for c in categories),
        estimator=estimator,
        classes=np.asarray(estimator.classes_) if proba else None,
    )


def _steps(pipe: Any, first: type, second: type) -> tuple[Any, Any] | None:
    """The two fitted steps of a (first, second) sub-pipeline, or None for any other shape."""
    if not (isinstance(pipe, Pipeline) and len(pipe.steps) == 2):
        return None
    a, b = (step for _, step in pipe.steps)
    if not (isinstance(a, first) and isinstance(b, second)):
        return None
    try:
        check_is_fitted(a)
        check_is_fitted(b)
    except NotFittedError:
        return None
    return a, b


def split_rows(
    fast: FastPipeline, columns: list[str], rows: list[list[Any]]
) -> tuple[NDArray[Any], NDArray[Any]]:
    index = {c: i for i, c in enumerate(columns)}
    num_idx = [index[c] for c in fast.numerical]
    cat_idx = [index[c] for c in fast.categorical]
    num = np.array([[r[i] for i in num_idx] for r in rows], dtype=float).reshape(len(rows), len(num_idx))
    cat = np.array([[r[i] for i in cat_idx] for r in rows], dtype=object).reshape(len(rows), len(cat_idx))
    return num, cat


def verified(model: Any, example: pd.DataFrame, columns: list[str]) -> FastPipeline | None:
    """Compile, then keep the fast path only if it matches sklearn exactly on the example."""
    fast = compile_pipeline(model)
    if fast is None or example is None or example.empty:
        return None
    # The example plus the edge cases it may lack: every value missing, and unseen categories.
    frame = example[columns].reset_index(drop=True).astype(object)
    frame.loc[len(frame)] = [None] * len(columns)
    unseen = example[columns].head(1).astype(object)
    for col in fast.categorical:
        unseen[col] = "__cd4ml_unseen__"
    frame = pd.concat([frame, unseen], ignore_index=True)
    # Both paths get the rows as a request delivers them (a missing value is JSON null, i.e. None)
    # and sklearn gets the frame the service builds from them, so the check is of what is served.
    rows = frame.where(frame.notna(), None).values.tolist()
    frame = pd.DataFrame(rows, columns=columns)
    for col in fast.numerical:
        frame[col] = frame[col].astype(float)
    num, cat = split_rows(fast, columns, rows)
    reference = model.steps[0][1].transform(frame)
    if not np.array_equal(np.asarray(reference, dtype=float), fast.transform(num, cat)):
        return None
    labels, proba = fast.predict(num, cat)
    if not np.array_equal(labels, model.predict(frame)):
        return None
    if proba is not None and not np.array_equal(proba, model.predict_proba(frame)):
        return None
    return fast
