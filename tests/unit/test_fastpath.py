"""The serving fast path is used only when it reproduces the sklearn pipeline exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cd4ml.core.spec import load_spec
from cd4ml.ml.training import features, split_holdout, train
from cd4ml.serving.fastpath import compile_pipeline, split_rows, verified
from cd4ml_dev.datagen import generate_churn
from tests.helpers import DEMO_SPEC

SPEC = load_spec(DEMO_SPEC)
SPLIT = split_holdout(SPEC, generate_churn(3000, seed=5))
MODEL = train(SPEC, SPLIT.train)
COLUMNS = SPEC.feature_names


def test_fast_path_equals_sklearn_bit_for_bit_including_nulls_and_unseen_categories() -> None:
    fast = verified(MODEL, features(SPEC, SPLIT.train.head(5)), COLUMNS)
    assert fast is not None
    frame = features(SPEC, SPLIT.holdout)
    frame.loc[frame.index[:20], "age"] = np.nan
    frame.loc[frame.index[20:40], "region"] = "mars"
    frame.loc[frame.index[40:60], "plan"] = None
    rows = frame.astype(object).where(frame.notna(), None).values.tolist()
    labels, proba = fast.predict(*split_rows(fast, COLUMNS, rows))
    assert np.array_equal(proba, MODEL.predict_proba(frame))
    assert np.array_equal(labels, MODEL.predict(frame))


def test_other_pipeline_shapes_are_not_compiled() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    assert compile_pipeline(LogisticRegression()) is None
    assert compile_pipeline(Pipeline([("m", LogisticRegression())])) is None


def test_a_mismatch_disables_the_fast_path(monkeypatch) -> None:
    import dataclasses

    from cd4ml.serving import fastpath

    good = compile_pipeline(MODEL)
    assert good is not None and good.mean is not None
    off_by_a_bit = dataclasses.replace(good, mean=good.mean + 1e-12)
    monkeypatch.setattr(fastpath, "compile_pipeline", lambda model: off_by_a_bit)
    assert fastpath.verified(MODEL, features(SPEC, SPLIT.train.head(5)), COLUMNS) is None


def test_regression_pipelines_compile_too() -> None:
    from pathlib import Path

    import yaml

    from cd4ml.core.spec import parse_spec
    from tests.helpers import spec_dict

    raw = spec_dict(task="regression", target="monthly_charges", metric={"name": "rmse"},
                    estimator={"class": "sklearn.linear_model.Ridge", "params": {}})  # fmt: skip
    raw["features"]["numerical"] = [
        f for f in raw["features"]["numerical"] if isinstance(f, dict) and f["name"] != "monthly_charges"
    ]
    raw["features"]["categorical"] = raw["features"]["categorical"] + ["churned"]
    spec = parse_spec(yaml.safe_dump(raw), Path("reg.yaml"))
    frame = generate_churn(1000, seed=2).assign(churned=lambda f: f["churned"].astype(str))
    model = train(spec, frame)
    fast = verified(model, features(spec, frame.head(5)), spec.feature_names)
    assert fast is not None and fast.classes is None
    rows = features(spec, frame).astype(object).values.tolist()
    values, proba = fast.predict(*split_rows(fast, spec.feature_names, rows))
    assert proba is None
    assert np.array_equal(values, model.predict(features(spec, frame)))
    assert isinstance(pd.Series(values).iloc[0], float)


def _mix_spec(numerical: list[str], categorical: list[str], estimator: dict | None = None):  # type: ignore[no-untyped-def]
    from pathlib import Path

    import yaml

    from cd4ml.core.spec import parse_spec
    from tests.helpers import spec_dict

    raw = spec_dict(**({"estimator": estimator} if estimator else {}))
    raw["features"] = {"numerical": numerical, "categorical": categorical}
    return parse_spec(yaml.safe_dump(raw), Path("churn.yaml"))


MIXES = [
    (["age", "tenure_months", "monthly_charges"], []),
    ([], ["plan", "region", "contract"]),
    (["monthly_charges"], []),
    ([], ["region"]),
]


def _odd_rows(spec, frame: pd.DataFrame) -> list[list[object]]:  # type: ignore[no-untyped-def]
    odd = features(spec, frame).copy()
    for col in spec.numerical:
        odd.loc[odd.index[:7], col] = np.nan
    for col in spec.categorical:
        odd.loc[odd.index[7:14], col] = "never-seen"
        odd.loc[odd.index[14:20], col] = None
    return odd.astype(object).where(odd.notna(), None).values.tolist()


LOGREG = {"class": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 500}}


@pytest.mark.parametrize("estimator", [None, LOGREG], ids=["hist_gradient_boosting", "logistic_regression"])
@pytest.mark.parametrize(("numerical", "categorical"), MIXES)
def test_every_feature_mix_compiles_and_equals_sklearn(
    numerical: list[str], categorical: list[str], estimator: dict | None
) -> None:
    spec = _mix_spec(numerical, categorical, estimator)
    model = train(spec, SPLIT.train)
    fast = verified(model, features(spec, SPLIT.train.head(5)), spec.feature_names)
    assert fast is not None
    assert (fast.numerical, fast.categorical) == (numerical, categorical)
    rows = _odd_rows(spec, SPLIT.holdout)
    frame = pd.DataFrame(rows, columns=spec.feature_names)
    for col in numerical:
        frame[col] = frame[col].astype(float)
    labels, proba = fast.predict(*split_rows(fast, spec.feature_names, rows))
    assert np.array_equal(proba, model.predict_proba(frame))
    assert np.array_equal(labels, model.predict(frame))


def test_an_unfitted_empty_transformer_is_skipped_not_fatal() -> None:
    """Pipelines registered before the fix carry an unfitted encoder for an empty column list."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    numerical = ["age", "tenure_months"]
    old = Pipeline([
        ("preprocess", ColumnTransformer([
            ("num", Pipeline([("impute", SimpleImputer(strategy="median")),
                              ("scale", StandardScaler())]), numerical),
            ("cat", Pipeline([("impute", SimpleImputer(strategy="constant", fill_value="__missing__")),
                              ("onehot", OneHotEncoder(handle_unknown="ignore", sparse_output=False))]), []),
        ], remainder="drop", verbose_feature_names_out=False)),
        ("model", LogisticRegression()),
    ])  # fmt: skip
    x = SPLIT.train[numerical].astype(float)
    old.fit(x, SPLIT.train["churned"])
    fast = verified(old, x.head(5), numerical)
    assert fast is not None and fast.categorical == [] and fast.width == 2


@pytest.mark.parametrize(("numerical", "categorical"), [MIXES[0], MIXES[1]])
def test_a_classifier_without_probabilities_serves_labels(
    numerical: list[str], categorical: list[str]
) -> None:
    """SVC (no probability=True) with f1: labels on the fast path, and the service's sanity check passes."""
    from dataclasses import replace

    from cd4ml.serving.models import Slot, sanity_check
    from cd4ml.serving.payload import FeatureSchema

    spec = _mix_spec(numerical, categorical, {"class": "sklearn.svm.SVC", "params": {}})
    spec = spec.model_copy(update={"metric": spec.metric.model_copy(update={"name": "f1"})})
    model = train(spec, SPLIT.train.head(600))
    example = features(spec, SPLIT.train.head(5))
    fast = verified(model, example, spec.feature_names)
    assert fast is not None and fast.classes is None
    slot = Slot(name="m", version="1", run_id="", champion_since="", data_fingerprint="", loaded_at=0.0,
                model=model, schema=FeatureSchema(tuple(numerical), tuple(categorical)), classes=None,
                classifier=True)  # fmt: skip
    for candidate in (slot, replace(slot, fast=fast)):
        sanity_check(candidate, example)
        out = candidate.predict(_odd_rows(spec, SPLIT.holdout.head(40)))
        assert set(out["predictions"]) <= {0, 1} and "probabilities" not in out


def test_sanity_check_still_refuses_non_finite_regression_output() -> None:
    from cd4ml.serving.models import SanityError, Slot, sanity_check
    from cd4ml.serving.payload import FeatureSchema

    class Broken:
        def predict(self, frame: pd.DataFrame) -> np.ndarray:
            return np.full(len(frame), np.nan)

    slot = Slot(name="m", version="1", run_id="", champion_since="", data_fingerprint="", loaded_at=0.0,
                model=Broken(), schema=FeatureSchema(("age",), ()), classes=None)  # fmt: skip
    with pytest.raises(SanityError, match="non-finite"):
        sanity_check(slot, pd.DataFrame({"age": [30.0, 40.0]}))


def test_missing_categories_in_the_training_data_serve_as_sklearn_does() -> None:
    """Parquet gives nulls back as None, which the encoder learns as a category; NaN is imputed."""
    spec = _mix_spec(["age"], ["plan", "region"], LOGREG)
    train_frame = SPLIT.train.copy()
    train_frame.loc[train_frame.index[::9], "region"] = None
    model = train(spec, train_frame)
    fast = verified(model, features(spec, train_frame.head(5)), spec.feature_names)
    assert fast is not None
    rows = [
        [40.0, "basic", None],
        [40.0, "basic", float("nan")],
        [40.0, "basic", "mars"],
        [None, None, "north"],
    ]
    frame = pd.DataFrame(rows, columns=spec.feature_names).astype({"age": float})
    labels, proba = fast.predict(*split_rows(fast, spec.feature_names, rows))
    assert np.array_equal(proba, model.predict_proba(frame))
    assert np.array_equal(labels, model.predict(frame))
    assert not np.array_equal(proba[0], proba[1])  # None and NaN really are different inputs


def test_an_example_with_nan_categories_is_checked_as_the_service_receives_it() -> None:
    """In memory a missing category may be NaN; over HTTP it is null. The check uses the latter."""
    from cd4ml.serving.models import Slot
    from cd4ml.serving.payload import FeatureSchema

    spec = _mix_spec(["age"], ["plan", "region"], LOGREG)
    train_frame = SPLIT.train.copy()
    train_frame.loc[train_frame.index[::7], "region"] = np.nan
    model = train(spec, train_frame)
    example = features(spec, train_frame.head(8))
    assert example["region"].isna().any()
    fast = verified(model, example, spec.feature_names)
    assert fast is not None
    slot = Slot(name="m", version="1", run_id="", champion_since="", data_fingerprint="", loaded_at=0.0,
                model=model, schema=FeatureSchema(("age",), ("plan", "region")), classes=[0, 1],
                classifier=True)  # fmt: skip
    rows = [[40.0, "basic", None], [None, None, "north"], [33.0, "premium", "mars"]]
    from dataclasses import replace

    assert replace(slot, fast=fast).predict(rows) == slot.predict_with_sklearn(rows)


def test_a_null_of_a_numeric_coded_category_is_served_as_it_was_trained() -> None:
    """A grade coded 1..4 with gaps reads as floats with NaN; a client sends the gap as JSON null.
    The model must answer that request as it scored the row offline (evaluation, golden rows)."""
    import json

    from cd4ml.serving.models import Slot
    from cd4ml.serving.payload import FeatureSchema

    spec = _mix_spec(["age"], ["plan", "grade"], LOGREG)
    frame = SPLIT.train.copy()
    frame["grade"] = (frame["tenure_months"] % 4 + 1).astype(float)
    frame.loc[frame.index[::5], "grade"] = np.nan
    model = train(spec, frame)
    fast = verified(model, features(spec, frame.head(8)), spec.feature_names)
    assert fast is not None
    raw = frame[frame["grade"].isna()].head(3)[spec.feature_names]
    offline = model.predict_proba(features(spec, raw))
    # Over HTTP: NaN is null, null is None; a grade the client sends as 2 is the category "2".
    rows = [[r["age"], r["plan"], r["grade"]] for r in json.loads(raw.to_json(orient="records"))]
    assert all(row[2] is None for row in rows)
    slot = Slot(name="m", version="1", run_id="", champion_since="", data_fingerprint="", loaded_at=0.0,
                model=model, schema=FeatureSchema(("age",), ("plan", "grade")), classes=[0, 1],
                classifier=True, fast=fast)  # fmt: skip
    assert slot.predict(rows)["probabilities"] == offline.tolist()
    assert slot.predict_with_sklearn(rows)["probabilities"] == offline.tolist()
