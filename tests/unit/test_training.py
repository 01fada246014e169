from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cd4ml.core.errors import DataError, SpecError
from cd4ml.core.spec import ModelSpec, load_spec, parse_spec
from cd4ml.ml.evaluation import score
from cd4ml.ml.training import (
    build_pipeline,
    check_target,
    check_trainable_spec,
    metric_inputs,
    preprocessing_problems,
    split_holdout,
    train,
)
from cd4ml_dev.datagen import generate_churn
from tests.helpers import DEMO_SPEC, spec_dict

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


def test_bad_estimator_is_a_spec_error() -> None:
    spec = SPEC.model_copy(
        update={"estimator": SPEC.estimator.model_copy(update={"class_path": "sklearn.nope.X"})}
    )
    with pytest.raises(SpecError, match=r"estimator\.class: cannot import 'sklearn\.nope\.X'"):
        build_pipeline(spec)
    spec = SPEC.model_copy(update={"estimator": SPEC.estimator.model_copy(update={"params": {"bogus": 1}})})
    with pytest.raises(SpecError, match=r"estimator\.params"):
        build_pipeline(spec)


def test_single_class_training_data_is_refused() -> None:
    frame = generate_churn(200, seed=1).assign(churned=0)
    with pytest.raises(DataError, match="single class"):
        train(SPEC, frame)


def _spec(**overrides: object) -> ModelSpec:
    from pathlib import Path

    import yaml

    return parse_spec(yaml.safe_dump(spec_dict(**overrides)), Path("churn.yaml"))


@pytest.mark.parametrize(
    ("overrides", "field", "text"),
    [
        ({"estimator": {"class": "sklearn.nope.X"}}, "estimator.class", "cannot import"),
        ({"estimator": {"class": "sklearn.linear_model.Ridge"}}, "estimator.class", "is a regressor"),
        ({"estimator": {"class": "sklearn.cluster.KMeans"}}, "estimator.class", "not a classifier"),
        ({"estimator": {"class": "sklearn.svm.SVC"}}, "metric.name", "no predict_proba"),
        (
            {"estimator": {"class": "sklearn.linear_model.LogisticRegression", "params": {"C": -1}}},
            "estimator.params",
            "rejects",
        ),
        (
            {"estimator": {"class": "sklearn.linear_model.LogisticRegression", "params": {"nope": 1}}},
            "estimator.params",
            "rejects",
        ),
        (
            {
                "task": "regression",
                "metric": {"name": "rmse"},
                "estimator": {"class": "sklearn.linear_model.LogisticRegression"},
            },
            "estimator.class",
            "is a classifier",
        ),
    ],
)
def test_untrainable_specs_are_refused_naming_the_field(overrides: dict, field: str, text: str) -> None:
    with pytest.raises(SpecError, match=rf"^{field}: .*{text}"):
        check_trainable_spec(_spec(**overrides))


def test_trainable_specs_pass_the_check() -> None:
    check_trainable_spec(SPEC)
    check_trainable_spec(_spec(estimator={"class": "sklearn.svm.SVC", "params": {"probability": True}}))
    check_trainable_spec(_spec(metric={"name": "f1"}, estimator={"class": "sklearn.svm.SVC"}))
    check_trainable_spec(
        _spec(task="regression", metric={"name": "mae"},
              estimator={"class": "sklearn.ensemble.HistGradientBoostingRegressor"})
    )  # fmt: skip


def test_explicit_binary_average_on_a_multiclass_target_is_refused_before_fitting() -> None:
    spec = _spec(metric={"name": "f1", "average": "binary"})
    y = pd.Series(["rain", "sun", "snow", "fog"] * 5)
    refused = r"^metric\.average: f1 with average 'binary'.* has 4 classes.*'macro'"
    with pytest.raises(SpecError, match=refused):
        check_target(spec, y)
    check_target(spec, pd.Series(["rain", "sun"] * 5))
    check_target(_spec(metric={"name": "f1"}), y)  # unset: macro for more than two classes
    check_target(_spec(metric={"name": "roc_auc", "average": "weighted"}), y)


@pytest.mark.parametrize(
    ("task_overrides", "y", "error", "text"),
    [
        ({}, pd.Series(["a"] * 10), DataError, "single class"),
        ({}, pd.Series(["a", "b", None, "a"]), DataError, "missing in 1 of 4"),
        ({}, pd.Series(np.linspace(0, 1, 50)), SpecError, "^task: classification.*task: regression"),
        ({}, pd.Series(np.arange(1000) * 7), SpecError, "^task: classification.*1000 distinct integer"),
        (
            {"task": "regression", "metric": {"name": "rmse"},
             "estimator": {"class": "sklearn.linear_model.Ridge"}},
            pd.Series(["1.5", "high", "2"]), SpecError, "^task: regression needs a numeric target",
        ),
        (
            {"task": "regression", "metric": {"name": "rmse"},
             "estimator": {"class": "sklearn.linear_model.Ridge"}},
            pd.Series([1.0, np.inf, 2.0]), DataError, "1 non-finite",
        ),
    ],
)  # fmt: skip
def test_targets_that_cannot_be_trained_on_are_refused(
    task_overrides: dict, y: pd.Series, error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        check_target(_spec(**task_overrides), y)


def test_integer_coded_float_classes_are_accepted() -> None:
    check_target(SPEC, pd.Series([0.0, 1.0, 1.0, 0.0]))
    check_target(SPEC, pd.Series([1.5, 2.5, 3.0] * 30))  # a few fractional labels are still classes
    check_target(SPEC, pd.Series(np.arange(100).repeat(3)))  # digit-like integer codes
    check_target(SPEC, pd.Series([f"id{i}" for i in range(1000)]))  # many string classes: the user's call
    check_target(SPEC, pd.Series([True, False] * 20))


def _mix_spec(numerical: list[str], categorical: list[str], **overrides: object) -> ModelSpec:
    raw = spec_dict(**overrides)
    raw["features"] = {"numerical": numerical, "categorical": categorical}
    from pathlib import Path

    import yaml

    return parse_spec(yaml.safe_dump(raw), Path("churn.yaml"))


def test_preprocessing_accepts_clean_data_and_every_feature_mix() -> None:
    frame = generate_churn(400, seed=3)
    assert preprocessing_problems(SPEC, frame) == []
    for num, cat in ((["age", "tenure_months"], []), ([], ["plan", "region"]), (["age"], []), ([], ["plan"])):
        assert preprocessing_problems(_mix_spec(num, cat), frame) == []


def test_preprocessing_problems_name_the_column() -> None:
    frame = generate_churn(400, seed=3)
    inf = frame.assign(age=frame["age"].where(frame.index > 3, np.inf))
    assert preprocessing_problems(SPEC, inf) == ["column 'age': 4 infinite values"]
    empty = frame.assign(support_calls=np.nan)
    assert preprocessing_problems(SPEC, empty) == [
        "column 'support_calls': no numeric value in any row (all missing)"
    ]
    huge = frame.assign(monthly_charges=frame["monthly_charges"] * 1e306)
    (problem,) = preprocessing_problems(SPEC, huge)
    assert problem.startswith("column 'monthly_charges': standardising gives non-finite values")
    (missing,) = preprocessing_problems(SPEC, frame.drop(columns=["region"]))
    assert "region" in missing


def test_preprocessing_refuses_a_one_hot_matrix_that_cannot_fit_in_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cd4ml.ml import training

    frame = generate_churn(400, seed=3).assign(region=[f"id{i}" for i in range(400)])
    monkeypatch.setattr(training, "MAX_DENSE_BYTES", 400 * 100 * 8)
    (problem,) = preprocessing_problems(SPEC, frame)
    assert problem.startswith("column 'region' has 400 distinct values")


@pytest.mark.parametrize(
    ("numerical", "categorical"),
    [(["age", "tenure_months"], []), ([], ["plan", "region"]), (["monthly_charges"], []), ([], ["contract"])],
)
def test_every_feature_mix_builds_a_fully_fitted_pipeline(
    numerical: list[str], categorical: list[str]
) -> None:
    from sklearn.utils.validation import check_is_fitted

    spec = _mix_spec(numerical, categorical)
    model = train(spec, generate_churn(500, seed=8))
    pre = model.named_steps["preprocess"]
    for name, transformer, columns in pre.transformers_:
        if name != "remainder":
            assert columns, name
            check_is_fitted(transformer)
    assert {n for n, _, _ in pre.transformers_} - {"remainder"} == (
        ({"num"} if numerical else set()) | ({"cat"} if categorical else set())
    )


def test_an_integer_code_means_one_category_in_training_and_in_both_serving_paths() -> None:
    """A CSV batch with a null reads a month code as 5.0; a client sends 5 or 5.0: all are "5"."""
    from cd4ml.serving.fastpath import split_rows, verified
    from cd4ml.serving.payload import FeatureSchema, check

    raw = spec_dict()
    raw["features"] = {"numerical": [{"name": "x"}], "categorical": [{"name": "month"}]}
    raw["target"], raw["timestamp"] = "y", None
    raw["task"], raw["metric"] = "regression", {"name": "mae"}
    raw["estimator"] = {"class": "sklearn.linear_model.Ridge"}
    import yaml

    spec = parse_spec(yaml.safe_dump(raw), __import__("pathlib").Path("months.yaml"))
    rng = np.random.default_rng(0)
    months = rng.choice([5, 6, 7], 200)
    ints = pd.DataFrame({"x": rng.normal(size=200), "month": months, "y": months * 10.0})
    floats = ints.assign(month=ints["month"].astype(float))
    floats.loc[0, "month"] = np.nan  # as pandas reads the CSV of a batch with one null
    model = train(spec, pd.concat([ints, floats], ignore_index=True))
    encoder = model.steps[0][1].named_transformers_["cat"].steps[-1][1]
    # The null is learned as None, as a client's JSON null reaches the model (not imputed from NaN).
    assert encoder.categories_[0].tolist() == ["5", "6", "7", None]

    schema = FeatureSchema(("x",), ("month",))
    sent = [[0.0, 5], [0.0, 5.0], [0.0, "5"], [0.0, "5.0"]]
    rows = check(schema, ["x", "month"], sent, max_rows=10)
    frame = pd.DataFrame(rows, columns=["x", "month"]).astype({"x": float})
    slow = model.predict(frame)
    assert slow[0] == slow[1] == slow[2] != slow[3]  # "5.0" as text is a category of its own: unseen
    fast = verified(model, ints[["x", "month"]].pipe(lambda f: f.assign(month=f["month"].astype(str))),
                    ["x", "month"])  # fmt: skip
    assert fast is not None
    labels, _ = fast.predict(*split_rows(fast, ["x", "month"], rows))
    assert np.array_equal(labels, slow)


def test_acceptance_problems_include_the_target_check() -> None:
    from cd4ml.ml.training import acceptance_problems

    frame = generate_churn(300, seed=1)
    assert acceptance_problems(SPEC, frame) == []
    one_class = frame.assign(churned=0)
    assert any("single class" in p for p in acceptance_problems(SPEC, one_class))
