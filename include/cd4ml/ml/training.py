"""Datasets and training: pure functions from frames and a spec to a fitted sklearn Pipeline."""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, is_classifier, is_regressor
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from cd4ml.core.errors import DataError, SpecError, TrainingError
from cd4ml.core.spec import AVERAGED_METRICS, ModelSpec
from cd4ml.data.validation import normalise
from cd4ml.ml.evaluation import PROBABILITY_METRICS, Scores

MISSING_CATEGORY = "__missing__"
# Above this a dense one-hot matrix of the training data is refused before it exhausts memory.
MAX_DENSE_BYTES = 4 * 2**30
CONTINUOUS_CLASSES = 20
MAX_NUMERIC_CLASSES = 100


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
    """The model's input frame. A missing categorical value is `None` whatever the file made of it:
    a request's JSON null reaches the model as `None`, Parquet gives text nulls back as `None`, but
    a numeric-coded categorical column (a grade, a month) reads its nulls as NaN, which the
    pipeline's imputer would fill where the service's `None` would not be: the same row would get
    another answer in production than in training."""
    out = normalise(spec, frame[spec.feature_names])
    for col in spec.categorical:
        if out[col].isna().any():
            out[col] = out[col].astype(object).where(out[col].notna(), None)
    for col in spec.numerical:
        out[col] = pd.to_numeric(out[col], errors="coerce").astype(float)
    return out


def load_estimator_class(path: str) -> type[BaseEstimator]:
    module_name, _, cls_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as err:
        raise SpecError(f"estimator.class: cannot import {path!r}: {err}") from None
    if not (inspect.isclass(cls) and hasattr(cls, "fit") and hasattr(cls, "predict")):
        raise SpecError(f"estimator.class: {path!r} is not an estimator class with fit/predict")
    return cls


def build_estimator(spec: ModelSpec) -> BaseEstimator:
    """The spec's estimator, instantiated and with its params checked by sklearn, unfitted."""
    cls = load_estimator_class(spec.estimator.class_path)
    params = dict(spec.estimator.params)
    if "random_state" in inspect.signature(cls).parameters:
        params.setdefault("random_state", spec.seed)
    try:
        estimator = cls(**params)
        # sklearn checks parameter values only when fitting; checking them now keeps a typo from
        # surfacing after the data was loaded and split.
        validate = getattr(estimator, "_validate_params", None)
        if callable(validate):
            validate()
    except (TypeError, ValueError) as err:
        raise SpecError(
            f"estimator.params: {spec.estimator.class_path} rejects {spec.estimator.params}: {err}"
        ) from None
    return estimator


def build_preprocessor(spec: ModelSpec) -> ColumnTransformer:
    """Median-imputed, standardised numbers and one-hot categories (unseen values encode as zeros).

    Only feature groups that have columns get a transformer: sklearn leaves a transformer with an
    empty column list unfitted, and an unfitted encoder inside a fitted pipeline breaks whoever
    inspects it (the serving fast path did, for every numeric-only model).
    """
    transformers: list[tuple[str, Pipeline, list[str]]] = []
    if spec.numerical:
        numeric = Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())])
        transformers.append(("num", numeric, spec.numerical))
    if spec.categorical:
        categorical = Pipeline(
            [
                ("impute", SimpleImputer(strategy="constant", fill_value=MISSING_CATEGORY)),
                ("onehot", OneHotEncoder(handle_unknown="ignore", sparse_output=False)),
            ]
        )
        transformers.append(("cat", categorical, spec.categorical))
    return ColumnTransformer(transformers, remainder="drop", verbose_feature_names_out=False)


def build_pipeline(spec: ModelSpec) -> Pipeline:
    return Pipeline([("preprocess", build_preprocessor(spec)), ("model", build_estimator(spec))])


def check_trainable_spec(spec: ModelSpec) -> None:
    """Refuse, before any data is read, a spec whose model cannot be trained or scored.

    Raises SpecError naming `estimator.class`, `estimator.params` or `metric.name`.
    """
    estimator = build_estimator(spec)
    path = spec.estimator.class_path
    if spec.task == "classification" and not is_classifier(estimator):
        kind = "a regressor" if is_regressor(estimator) else "not a classifier"
        raise SpecError(
            f"estimator.class: {path} is {kind}, but task is 'classification'; "
            "choose a classifier (e.g. sklearn.linear_model.LogisticRegression) or set task: regression"
        )
    if spec.task == "regression" and not is_regressor(estimator):
        kind = "a classifier" if is_classifier(estimator) else "not a regressor"
        raise SpecError(
            f"estimator.class: {path} is {kind}, but task is 'regression'; "
            "choose a regressor (e.g. sklearn.linear_model.Ridge) or set task: classification"
        )
    # On the instance: SVC has predict_proba only with probability=True.
    if spec.metric.name in PROBABILITY_METRICS and not hasattr(estimator, "predict_proba"):
        raise SpecError(
            f"metric.name: {spec.metric.name} scores class probabilities, but {path} with params "
            f"{spec.estimator.params} has no predict_proba; choose accuracy, balanced_accuracy or f1, "
            "or an estimator (or params, e.g. probability: true for SVC) that predicts probabilities"
        )


def check_target(spec: ModelSpec, y: pd.Series) -> None:
    """Refuse, before fitting, a target the spec's task and metric cannot be computed on.

    Raises SpecError when the spec must change (naming the field and what to set), DataError when
    the data cannot be trained on whatever the spec says.
    """
    present = y.dropna()
    if len(present) < len(y):
        raise DataError(
            f"{spec.name}: target {spec.target!r} is missing in {len(y) - len(present)} of {len(y)} "
            "accepted rows; every training row needs a target value"
        )
    if spec.task == "regression":
        values = pd.to_numeric(present, errors="coerce")
        bad = int(values.isna().sum())
        if bad:
            examples = present[values.isna()].astype(str).unique()[:3].tolist()
            raise SpecError(
                f"task: regression needs a numeric target, but {spec.target!r} has {bad} non-numeric "
                f"values (e.g. {examples}); set task: classification with a classification metric"
            )
        infinite = int((~np.isfinite(values.to_numpy(dtype=float))).sum())
        if infinite:
            raise DataError(f"{spec.name}: target {spec.target!r} has {infinite} non-finite values")
        return
    classes = present.unique()
    n = len(classes)
    if n < 2:
        raise DataError(
            f"{spec.name}: target {spec.target!r} has a single class ({classes.tolist()}) in the "
            "accepted data; a classifier needs at least two"
        )
    metric = spec.metric
    if metric.name in AVERAGED_METRICS and metric.average == "binary" and n > 2:
        raise SpecError(
            f"metric.average: {metric.name} with average 'binary' needs two classes, but target "
            f"{spec.target!r} has {n} classes; set metric.average to 'macro' ('weighted' or 'micro') "
            "or remove it (unset means 'binary' for two classes, 'macro' for more)"
        )
    numeric = pd.api.types.is_numeric_dtype(present) and not pd.api.types.is_bool_dtype(present)
    fractional = numeric and not np.all(np.mod(present.to_numpy(dtype=float), 1) == 0)
    # Many distinct numbers are a quantity, not classes (every class would also cost a one-vs-rest
    # pass in the bootstrap); a few fractional codes (grades 1.5, 2.5) may well be labels.
    limit = max(CONTINUOUS_CLASSES, 0.05 * len(present)) if fractional else MAX_NUMERIC_CLASSES
    if numeric and n > limit:
        kind = "non-integer numbers" if fractional else "integer values"
        raise SpecError(
            f"task: classification, but target {spec.target!r} holds {n} distinct {kind} (more than "
            f"{limit:.0f} numeric classes); set task: regression (with rmse, mae or r2) if it is a quantity"
        )


@dataclass(frozen=True)
class Finding:
    """One reason preprocessing refuses data. `kind` lets a caller that already reported a cause in
    its own words (non-finite numbers) leave it out without matching on the message."""

    kind: str  # "missing_columns", "non_finite", "all_missing", "numeric", "encoding", "too_wide"
    message: str


def preprocessing_problems(spec: ModelSpec, frame: pd.DataFrame) -> list[str]:
    """What the model's own preprocessing cannot take in `frame`'s features, naming the columns.

    [] means a model can be fitted on these features.
    """
    return [f.message for f in preprocessing_findings(spec, frame)]


def preprocessing_findings(spec: ModelSpec, frame: pd.DataFrame) -> list[Finding]:
    """`preprocessing_problems` with the kind of each. Categorical columns are checked on their
    distinct values only (what the encoder learns), so this stays cheap on large frames."""
    problems: list[Finding] = []
    missing = [c for c in spec.feature_names if c not in frame.columns]
    if missing:
        return [Finding("missing_columns", f"feature columns missing: {missing}")]
    x = features(spec, frame)
    if spec.numerical:
        num = x[spec.numerical].to_numpy(dtype=float)
        finite = np.isfinite(num)
        for j, col in enumerate(spec.numerical):
            infinite = int((np.isinf(num[:, j])).sum())
            if infinite:
                problems.append(Finding("non_finite", f"column {col!r}: {infinite} infinite values"))
            elif not finite[:, j].any():
                problems.append(
                    Finding("all_missing", f"column {col!r}: no numeric value in any row (all missing)")
                )
        if not problems:
            try:
                with np.errstate(over="ignore", invalid="ignore"):
                    out = build_preprocessor(spec.model_copy(update={"features": _only_numerical(spec)}))
                    transformed = np.asarray(out.fit_transform(x[spec.numerical]), dtype=float)
            except ValueError as err:
                problems.append(
                    Finding("numeric", f"numerical features {spec.numerical}: preprocessing failed: {err}")
                )
            else:
                for j in np.flatnonzero(~np.isfinite(transformed).all(axis=0)).tolist():
                    problems.append(
                        Finding(
                            "numeric",
                            f"column {spec.numerical[j]!r}: standardising gives non-finite values "
                            "(magnitudes too large for float64 arithmetic)",
                        )
                    )
    if spec.categorical:
        distinct = x[spec.categorical].drop_duplicates()
        width = 0
        try:
            pre = build_preprocessor(spec.model_copy(update={"features": _only_categorical(spec)}))
            pre.fit(distinct)
            width = len(pre.get_feature_names_out())
        except (ValueError, TypeError) as err:
            problems.append(
                Finding("encoding", f"categorical features {spec.categorical}: encoding failed: {err}")
            )
        dense_bytes = len(x) * (len(spec.numerical) + width) * 8
        if dense_bytes > MAX_DENSE_BYTES:
            counts = {c: int(x[c].nunique()) for c in spec.categorical}
            widest = max(counts, key=lambda c: counts[c])
            problems.append(
                Finding(
                    "too_wide",
                    f"column {widest!r} has {counts[widest]:,} distinct values: one-hot encoding "
                    f"{len(x):,} rows needs {dense_bytes / 2**30:.1f} GiB (limit "
                    f"{MAX_DENSE_BYTES / 2**30:.0f} GiB); drop it from features.categorical or bucket "
                    "it upstream",
                )
            )
    return problems


def acceptance_problems(spec: ModelSpec, combined: pd.DataFrame) -> list[str]:
    """Why accepted data plus a new batch (`combined`) could not be trained on; [] when it could.

    The target as `check_target` sees it before every fit, and the features as the model's
    preprocessing takes them: a batch that passes here cannot make a later training fail.
    """
    problems = preprocessing_problems(spec, combined)
    if spec.target in combined.columns:
        try:
            check_target(spec, combined[spec.target])
        except (SpecError, DataError) as err:
            problems.append(f"target {spec.target!r}: {err}")
    return problems


def _only_numerical(spec: ModelSpec) -> Any:
    return spec.features.model_copy(update={"categorical": []})


def _only_categorical(spec: ModelSpec) -> Any:
    return spec.features.model_copy(update={"numerical": []})


def train(spec: ModelSpec, train_frame: pd.DataFrame) -> Pipeline:
    pipeline = build_pipeline(spec)
    y = train_frame[spec.target]
    # The pipeline checks all accepted data first; this guards any other caller (single class included).
    check_target(spec, y)
    try:
        pipeline.fit(features(spec, train_frame), y)
    except (ValueError, TypeError, ArithmeticError, np.linalg.LinAlgError) as err:
        # Deterministic: the same data and spec fail the same way, so this is not retried.
        raise TrainingError(f"{spec.name}: fitting {spec.estimator.class_path} failed: {err}") from None
    return pipeline


def metric_inputs(spec: ModelSpec, model: Any, frame: pd.DataFrame) -> Scores:
    """What the primary metric scores, with the model's class list (see `evaluation.Scores`).

    Never refuses a class count: whether the metric can be computed on the target was settled by
    `check_target` before fitting, so nothing here can fail after a model was trained.
    """
    x = features(spec, frame)
    average = spec.metric.average
    if spec.task == "regression":
        return Scores(np.asarray(model.predict(x)))
    classes = tuple(np.asarray(model.classes_).tolist())
    if spec.metric.name not in PROBABILITY_METRICS:
        return Scores(np.asarray(model.predict(x)), classes, average)
    if not hasattr(model, "predict_proba"):
        raise SpecError(
            f"metric.name: {spec.metric.name} needs predict_proba; {type(model).__name__} has none"
        )
    proba = np.asarray(model.predict_proba(x), dtype=float)
    # Two classes: P(classes[-1]), the convention of sklearn's binary metrics.
    return Scores(proba[:, -1] if len(classes) == 2 else proba, classes, average)
