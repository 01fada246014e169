"""Datasets and training: pure functions from frames and a spec to a fitted sklearn Pipeline."""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from sklearn.base import BaseEstimator
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from cd4ml.errors import TrainingError
from cd4ml.spec import ModelSpec
from cd4ml.validation import normalise

PROBABILITY_METRICS = {"roc_auc", "log_loss"}


@dataclass(frozen=True)
class Split:
    train: pd.DataFrame
    holdout: pd.DataFrame
    cutoff: str  # the first holdout row's position key: everything before it may be trained on


def order_rows(spec: ModelSpec, frame: pd.DataFrame) -> pd.DataFrame:
    """Oldest first. Rows keep their acceptance order; a timestamp column, if any, decides first."""
    out = frame.reset_index(drop=True)
    if spec.timestamp:
        ts = pd.to_datetime(out[spec.timestamp], utc=True, errors="coerce", format="mixed")
        out = (
            out.assign(_ts=ts).sort_values("_ts", kind="mergesort").drop(columns="_ts").reset_index(drop=True)
        )
    return out


def split_holdout(spec: ModelSpec, frame: pd.DataFrame) -> Split:
    """The newest `holdout_fraction` rows are the holdout; nobody ever trains on them.

    Because the holdout is always the newest slice, its start only moves forward as data accumulates:
    a champion trained on an earlier split never saw any row of a later holdout.
    """
    ordered = order_rows(spec, normalise(spec, frame))
    n = len(ordered)
    n_holdout = max(1, math.ceil(n * spec.data.holdout_fraction))
    if n - n_holdout < 2:
        raise TrainingError(
            f"{spec.name}: only {n} accepted rows; too few to split into training and holdout"
        )
    train, holdout = ordered.iloc[: n - n_holdout], ordered.iloc[n - n_holdout :]
    cutoff = str(holdout[spec.timestamp].iloc[0]) if spec.timestamp else f"row {n - n_holdout}"
    return Split(train.reset_index(drop=True), holdout.reset_index(drop=True), cutoff)


def features(spec: ModelSpec, frame: pd.DataFrame) -> pd.DataFrame:
    out = normalise(spec, frame[spec.feature_names])
    for col in spec.numerical:
        out[col] = pd.to_numeric(out[col], errors="coerce").astype(float)
    return out


def load_estimator_class(path: str) -> type[BaseEstimator]:
    module_name, _, cls_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as err:
        raise TrainingError(f"estimator.class: cannot import {path!r}: {err}") from None
    if not (inspect.isclass(cls) and hasattr(cls, "fit") and hasattr(cls, "predict")):
        raise TrainingError(f"estimator.class: {path!r} is not an estimator class with fit/predict")
    return cls


def build_pipeline(spec: ModelSpec) -> Pipeline:
    cls = load_estimator_class(spec.estimator.class_path)
    params = dict(spec.estimator.params)
    if "random_state" in inspect.signature(cls).parameters:
        params.setdefault("random_state", spec.seed)
    try:
        estimator = cls(**params)
    except TypeError as err:
        raise TrainingError(
            f"estimator.params: {spec.estimator.class_path} rejects {params}: {err}"
        ) from None
    numeric = Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())])
    categorical = Pipeline(
        [
            ("impute", SimpleImputer(strategy="constant", fill_value="__missing__")),
            ("onehot", OneHotEncoder(handle_unknown="ignore", sparse_output=False)),
        ]
    )
    pre = ColumnTransformer(
        [("num", numeric, spec.numerical), ("cat", categorical, spec.categorical)],
        remainder="drop",
        verbose_feature_names_out=False,
    )
    return Pipeline([("preprocess", pre), ("model", estimator)])


def train(spec: ModelSpec, train_frame: pd.DataFrame) -> Pipeline:
    pipeline = build_pipeline(spec)
    y = train_frame[spec.target]
    if spec.task == "classification" and y.nunique() < 2:
        raise TrainingError(f"{spec.name}: target {spec.target!r} has a single class in the training data")
    try:
        pipeline.fit(features(spec, train_frame), y)
    except ValueError as err:
        raise TrainingError(f"{spec.name}: fitting {spec.estimator.class_path} failed: {err}") from None
    return pipeline


def metric_inputs(spec: ModelSpec, model: Any, frame: pd.DataFrame) -> NDArray[Any]:
    """What the primary metric scores: P(positive class) for ranking metrics, predictions otherwise."""
    x = features(spec, frame)
    if spec.metric.name in PROBABILITY_METRICS:
        if not hasattr(model, "predict_proba"):
            raise TrainingError(
                f"metric {spec.metric.name} needs predict_proba; {type(model).__name__} has none"
            )
        proba = model.predict_proba(x)
        classes = list(model.classes_)
        positive = classes[-1] if len(classes) == 2 else None  # sklearn sorts classes_ like np.unique
        if positive is None:
            raise TrainingError(f"metric {spec.metric.name} needs a binary target, found classes {classes}")
        return np.asarray(proba[:, classes.index(positive)])
    return np.asarray(model.predict(x))
