"""registry.load_bundle reads the input columns through MLflow's own Model/ModelSignature API, from a
model really logged to a (sqlite) MLflow store: integer and float columns are numerical, strings are
categorical, and the example comes back with the model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder

from cd4ml import registry


def test_load_bundle_reads_the_signature_with_mlflows_schema_types(tmp_path: Path) -> None:
    frame = pd.DataFrame({
        "age": [23, 45, 31, 52, 38, 27],  # int64 -> long
        "income": [1.5, 3.2, 2.1, 4.0, 2.7, 1.1],  # float64 -> double
        "plan": ["basic", "pro", "basic", "pro", "max", "max"],  # object -> string
    })  # fmt: skip
    y = [0, 1, 0, 1, 1, 0]
    model = make_pipeline(
        ColumnTransformer(
            [("cat", OneHotEncoder(handle_unknown="ignore"), ["plan"])], remainder="passthrough"
        ),
        LogisticRegression(),
    ).fit(frame, y)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logged = registry.log_challenger(
        uri, experiment="unit", run_name="r", model=model, input_example=frame.head(3),
        params={}, tags={}, metrics={"roc_auc": 1.0},
    )  # fmt: skip

    bundle = registry.load_bundle(uri, logged.model_uri)

    assert (bundle.numerical, bundle.categorical) == (["age", "income"], ["plan"])
    assert bundle.example is not None and list(bundle.example.columns) == ["age", "income", "plan"]
    assert list(bundle.model.predict(frame)) == list(model.predict(frame))


def test_a_model_without_a_signature_has_no_served_columns() -> None:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    assert registry._input_columns(None) == ([], [])
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.boolean, "flag"), ColSpec(DataType.float, "x")])
    )
    assert registry._input_columns(signature) == (["x"], [])


def test_pip_requirements_pin_this_environment_and_the_estimators_package() -> None:
    import importlib.metadata as md

    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline

    from cd4ml.registry import pip_requirements

    pins = pip_requirements(Pipeline([("model", HistGradientBoostingClassifier())]))
    for dist in ("mlflow", "scikit-learn", "skops", "pandas", "numpy", "scipy"):
        assert f"{dist}=={md.version(dist)}" in pins, pins

    class LocalEstimator:  # a module that is no installed distribution: nothing to pin, no error
        pass

    LocalEstimator.__module__ = "cd4ml_no_such_distribution"
    assert pip_requirements(LocalEstimator()) == pins
