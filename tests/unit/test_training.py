from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cd4ml.datagen import generate_churn
from cd4ml.errors import TrainingError
from cd4ml.evaluation import score
from cd4ml.spec import load_spec
from cd4ml.training import build_pipeline, metric_inputs, split_holdout, train
from tests.helpers import DEMO_SPEC

SPEC = load_spec(DEMO_SPEC)


def test_holdout_is_the_newest_rows_and_never_overlaps() -> None:
    frame = pd.concat([generate_churn(500, seed=1, batch=b) for b in (2, 0, 1)], ignore_index=True)
    split = split_holdout(SPEC, frame)
    assert len(split.holdout) == 300 and len(split.train) == 1200
    assert split.train["event_time"].max() < split.holdout["event_time"].min()
    assert split.cutoff == split.holdout["event_time"].iloc[0]


def test_holdout_start_only_moves_forward_as_data_grows() -> None:
    old = generate_churn(1000, seed=1, batch=0)
    new = pd.concat([old, generate_churn(1000, seed=1, batch=1)], ignore_index=True)
    assert split_holdout(SPEC, new).cutoff > split_holdout(SPEC, old).cutoff


def test_pipeline_learns_the_demo_rule_and_is_seeded() -> None:
    split = split_holdout(SPEC, generate_churn(3000, seed=4))
    a = train(SPEC, split.train)
    b = train(SPEC, split.train)
    pa, pb = metric_inputs(SPEC, a, split.holdout), metric_inputs(SPEC, b, split.holdout)
    assert np.array_equal(pa, pb)
    assert score("roc_auc", split.holdout["churned"].to_numpy(), pa) > 0.75


def test_unseen_category_and_missing_values_do_not_break_prediction() -> None:
    split = split_holdout(SPEC, generate_churn(1000, seed=4))
    model = train(SPEC, split.train)
    odd = split.holdout.head(3).assign(region="mars", age=np.nan)
    assert metric_inputs(SPEC, model, odd).shape == (3,)


def test_bad_estimator_is_a_training_error() -> None:
    spec = SPEC.model_copy(
        update={"estimator": SPEC.estimator.model_copy(update={"class_path": "sklearn.nope.X"})}
    )
    with pytest.raises(TrainingError, match=r"estimator\.class: cannot import 'sklearn\.nope\.X'"):
        build_pipeline(spec)
    spec = SPEC.model_copy(update={"estimator": SPEC.estimator.model_copy(update={"params": {"bogus": 1}})})
    with pytest.raises(TrainingError, match=r"estimator\.params"):
        build_pipeline(spec)


def test_single_class_training_data_is_refused() -> None:
    frame = generate_churn(200, seed=1).assign(churned=0)
    with pytest.raises(TrainingError, match="single class"):
        train(SPEC, frame)
