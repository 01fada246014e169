"""A fast serving path for the pipelines cd4ml builds, proven equal to the real one at load time.

scikit-learn's ColumnTransformer spends ~3 ms per call on pandas bookkeeping, ten times what the
model itself needs for one row. `compile_pipeline` reads the *fitted* imputers, scaler and encoder
of a pipeline built by `cd4ml.training.build_pipeline` and applies the same arithmetic with numpy.
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
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler


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
                if value is None or (isinstance(value, float) and np.isnan(value)):
                    value = self.cat_fill
                k = lookup.get(value)
                if k is not None:
                    block[i, k] = 1.0
            blocks.append(block)
        return np.hstack(blocks) if len(blocks) > 1 else x

    def predict(
        self, num: NDArray[np.float64], cat: NDArray[Any]
    ) -> tuple[NDArray[Any], NDArray[Any] | None]:
        x = self.transform(num, cat)
        if self.classes is not None:
            proba = self.estimator.predict_proba(x)
            return self.classes[np.argmax(proba, axis=1)], proba
        return self.estimator.predict(x), None


def compile_pipeline(model: Any) -> FastPipeline | None:
    """The fast path for a fitted cd4ml pipeline, or None if the pipeline has another shape."""
    if not (isinstance(model, Pipeline) and len(model.steps) == 2):
        return None
    pre, estimator = model.steps[0][1], model.steps[1][1]
    if not isinstance(pre, ColumnTransformer) or pre.remainder != "drop":
        return None
    named = dict((name, (trans, cols)) for name, trans, cols in pre.transformers_ if name != "remainder")
    if set(named) != {"num", "cat"} or [t[0] for t in pre.transformers_[:2]] != ["num", "cat"]:
        return None
    num_pipe, numerical = named["num"]
    cat_pipe, categorical = named["cat"]
    if not (isinstance(num_pipe, Pipeline) and isinstance(cat_pipe, Pipeline)):
        return None
    imputer, scaler = (s for _, s in num_pipe.steps)
    cat_imputer, encoder = (s for _, s in cat_pipe.steps)
    ok = (
        isinstance(imputer, SimpleImputer)
        and isinstance(scaler, StandardScaler)
        and isinstance(cat_imputer, SimpleImputer)
        and cat_imputer.strategy == "constant"
        and isinstance(encoder, OneHotEncoder)
        and encoder.drop is None
        and encoder.handle_unknown == "ignore"
        and getattr(encoder, "_infrequent_enabled", False) is False
    )
    if not ok:
        return None
    categories = [{v: k for k, v in enumerate(cats.tolist())} for cats in encoder.categories_]
    proba = hasattr(estimator, "predict_proba") and hasattr(estimator, "classes_")
    return FastPipeline(
        numerical=list(numerical),
        categorical=list(categorical),
        num_fill=np.asarray(imputer.statistics_, dtype=float),
        mean=np.asarray(scaler.mean_) if scaler.with_mean else None,
        scale=np.asarray(scaler.scale_) if scaler.with_std else None,
        cat_fill=cat_imputer.fill_value,
        categories=categories,
        width=len(numerical) + sum(len(c) for c in categories),
        estimator=estimator,
        classes=np.asarray(estimator.classes_) if proba else None,
    )


def split_rows(
    fast: FastPipeline, columns: list[str], rows: list[list[Any]]
) -> tuple[NDArray[Any], NDArray[Any]]:
    index = {c: i for i, c in enumerate(columns)}
    num_idx = [index[c] for c in fast.numerical]
    cat_idx = [index[c] for c in fast.categorical]
    num = np.array([[r[i] for i in num_idx] for r in rows], dtype=float)
    cat = np.array([[r[i] for i in cat_idx] for r in rows], dtype=object).reshape(len(rows), len(cat_idx))
    return num, cat


def verified(model: Any, example: pd.DataFrame, columns: list[str]) -> FastPipeline | None:
    """Compile, then keep the fast path only if it matches sklearn exactly on the example."""
    fast = compile_pipeline(model)
    if fast is None or example is None or example.empty:
        return None
    # The example plus the edge cases it may lack: every value missing, and unseen categories.
    frame = pd.concat(
        [example[columns], pd.DataFrame([[None] * len(columns)], columns=columns)], ignore_index=True
    )
    unseen = example[columns].head(1).copy()
    for col in fast.categorical:
        unseen[col] = "__cd4ml_unseen__"
    frame = pd.concat([frame, unseen], ignore_index=True)
    for col in fast.numerical:
        frame[col] = frame[col].astype(float)
    rows = frame.astype(object).where(frame.notna(), None).values.tolist()
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
