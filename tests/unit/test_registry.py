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
