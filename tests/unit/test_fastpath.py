"""The serving fast path is used only when it reproduces the sklearn pipeline exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cd4ml.datagen import generate_churn
from cd4ml.serving.fastpath import compile_pipeline, split_rows, verified
from cd4ml.spec import load_spec
from cd4ml.training import features, split_holdout, train
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

    from cd4ml.spec import parse_spec
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
