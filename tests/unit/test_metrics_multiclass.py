"""Multiclass metrics equal scikit-learn's, weighted (bootstrap) rows equal sklearn on resampled rows,
and the champion/challenger decision works when the two models know different classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    log_loss,
    roc_auc_score,
)

from cd4ml.core.errors import SpecError
from cd4ml.core.spec import Metric, Promotion, parse_spec
from cd4ml.ml.evaluation import Scores, decide, paired_bootstrap, score, weighted_metric
from tests.helpers import spec_dict


def _labels(k: int) -> list[str]:
    return [f"class_{chr(ord('a') + i)}" for i in range(k)]


def _case(k: int, n: int = 600, seed: int = 0, ties: bool = False) -> tuple[Any, Scores, Scores]:
    """String labels, an informative probability matrix, and the labels it predicts."""
    rng = np.random.default_rng(seed)
    classes = _labels(k)
    y_idx = rng.integers(0, k, n)
    if ties:  # a handful of distinct rows: many exactly tied scores per class
        templates = rng.dirichlet(np.ones(k), size=4)
        proba = templates[rng.integers(0, 4, n)]
    else:
        proba = rng.dirichlet(np.ones(k), size=n)
        proba[np.arange(n), y_idx] += rng.random(n) * 1.5
        proba /= proba.sum(axis=1, keepdims=True)
    y = np.asarray(classes, dtype=object)[y_idx]
    predicted = np.asarray(classes, dtype=object)[proba.argmax(axis=1)]
    return y, Scores(proba, tuple(classes)), Scores(predicted, tuple(classes))


@pytest.mark.parametrize("k", [3, 5, 10])
@pytest.mark.parametrize("ties", [False, True])
def test_every_multiclass_metric_equals_sklearn(k: int, ties: bool) -> None:
    y, proba, labels = _case(k, seed=k, ties=ties)
    p, pred, classes = np.asarray(proba), np.asarray(labels), list(proba.classes or ())
    for average in ("macro", "micro", "weighted"):
        assert score("f1", y, labels, average=average) == pytest.approx(
            f1_score(y, pred, average=average), rel=1e-9, abs=1e-12
        )
    assert score("f1", y, labels) == pytest.approx(f1_score(y, pred, average="macro"), rel=1e-9)
    assert score("accuracy", y, labels) == pytest.approx(accuracy_score(y, pred), rel=1e-9)
    assert score("balanced_accuracy", y, labels) == pytest.approx(balanced_accuracy_score(y, pred), rel=1e-9)
    assert score("log_loss", y, proba) == pytest.approx(log_loss(y, p, labels=classes), rel=1e-9)
    for average in ("macro", "weighted", "micro"):
        expected = roc_auc_score(y, p, multi_class="ovr", average=average, labels=classes)
        assert score("roc_auc", y, proba, average=average) == pytest.approx(expected, rel=1e-9)
    expected = roc_auc_score(y, p, multi_class="ovr", average="macro", labels=classes)
    assert score("roc_auc", y, proba) == pytest.approx(expected, rel=1e-9)


def test_a_plain_matrix_follows_the_sorted_holdout_classes_like_sklearn() -> None:
    y, proba, _ = _case(4, seed=11)
    plain = np.asarray(proba)
    assert score("roc_auc", y, plain) == pytest.approx(roc_auc_score(y, plain, multi_class="ovr"), rel=1e-9)
    assert score("log_loss", y, plain) == pytest.approx(log_loss(y, plain), rel=1e-9)


def test_a_class_the_holdout_lacks() -> None:
    """The model knows 5 classes, the holdout has 4: label metrics as sklearn without `labels=`,
    log_loss with the model's classes, roc_auc averaged over the classes that have positives."""
    y, proba, labels = _case(5, seed=3)
    keep = y != "class_c"
    y, p, pred = y[keep], np.asarray(proba)[keep], np.asarray(labels)[keep]
    classes = list(proba.classes or ())
    proba, labels = Scores(p, proba.classes), Scores(pred, labels.classes)
    assert score("f1", y, labels) == pytest.approx(f1_score(y, pred, average="macro"), rel=1e-9)
    assert score("f1", y, labels, average="weighted") == pytest.approx(
        f1_score(y, pred, average="weighted"), rel=1e-9
    )
    assert score("balanced_accuracy", y, labels) == pytest.approx(balanced_accuracy_score(y, pred), rel=1e-9)
    assert score("log_loss", y, proba) == pytest.approx(log_loss(y, p, labels=classes), rel=1e-9)
    present = [j for j, c in enumerate(classes) if (y == c).any()]
    per_class = [roc_auc_score(y == classes[j], p[:, j]) for j in present]
    prevalence = [(y == classes[j]).mean() for j in present]
    assert score("roc_auc", y, proba) == pytest.approx(np.mean(per_class), rel=1e-9)
    assert score("roc_auc", y, proba, average="weighted") == pytest.approx(
        np.average(per_class, weights=prevalence), rel=1e-9
    )


def test_a_holdout_class_the_model_never_saw_costs_but_does_not_break() -> None:
    y, proba, labels = _case(3, seed=5)
    y = y.copy()
    y[:10] = "class_new"
    loss = score("log_loss", y, proba)
    seen_only = score("log_loss", y[10:], Scores(np.asarray(proba)[10:], proba.classes))
    unseen_cost = 10 * -np.log(np.finfo(float).eps) / len(y)  # probability 0, clipped to eps
    assert np.isfinite(loss)
    assert loss == pytest.approx(seen_only * (len(y) - 10) / len(y) + unseen_cost, rel=1e-9)
    assert 0 < score("f1", y, labels) < 1
    assert 0 < score("roc_auc", y, proba) < 1


def _sklearn(name: str, y: Any, s: Any, average: str | None, classes: list[str]) -> float:
    if name == "f1":
        return float(f1_score(y, s, average=average))
    if name == "roc_auc":
        return float(roc_auc_score(y, s, multi_class="ovr", average=average, labels=classes))
    if name == "log_loss":
        return float(log_loss(y, s, labels=classes))
    return float(balanced_accuracy_score(y, s) if name == "balanced_accuracy" else accuracy_score(y, s))


@pytest.mark.parametrize(
    ("name", "average"),
    [("f1", "macro"), ("f1", "micro"), ("f1", "weighted"), ("roc_auc", "macro"), ("roc_auc", "weighted"),
     ("roc_auc", "micro"), ("log_loss", None), ("balanced_accuracy", None), ("accuracy", None)],
)  # fmt: skip
def test_bootstrap_weights_equal_sklearn_on_the_resampled_rows(name: str, average: str | None) -> None:
    y, proba, labels = _case(4, n=300, seed=9, ties=True)
    scores = proba if name in {"roc_auc", "log_loss"} else labels
    classes = list(proba.classes or ())
    counts = np.random.default_rng(1).multinomial(len(y), np.full(len(y), 1 / len(y)), size=3)
    got = weighted_metric(name, y, scores, counts.astype(float), average=average)
    for row, value in zip(counts, got, strict=True):
        rows = np.repeat(np.arange(len(y)), row)
        ys, s = y[rows], np.asarray(scores)[rows]
        expected = _sklearn(name, ys, s, average, classes)
        assert value == pytest.approx(expected, rel=1e-9)


def test_binary_string_labels_and_both_probability_forms() -> None:
    rng = np.random.default_rng(2)
    y = np.where(rng.random(400) < 0.3, "yes", "no").astype(object)
    p_yes = np.clip((y == "yes") * 0.3 + rng.random(400) * 0.7, 0, 1)
    vector = Scores(p_yes, ("no", "yes"))
    matrix = Scores(np.column_stack([1 - p_yes, p_yes]), ("no", "yes"))
    for s in (vector, matrix):
        assert score("roc_auc", y, s) == pytest.approx(roc_auc_score(y == "yes", p_yes), rel=1e-9)
        assert score("log_loss", y, s) == pytest.approx(log_loss(y, p_yes), rel=1e-9)
    pred = Scores(np.where(p_yes > 0.5, "yes", "no").astype(object), ("no", "yes"))
    assert score("f1", y, pred) == pytest.approx(f1_score(y, np.asarray(pred), pos_label="yes"), rel=1e-9)
    assert score("f1", y, pred, average="macro") == pytest.approx(
        f1_score(y, np.asarray(pred), average="macro"), rel=1e-9
    )


def test_explicit_binary_average_on_many_classes_is_refused_naming_the_field() -> None:
    y, _, labels = _case(3)
    with pytest.raises(
        SpecError, match=r"^metric\.average: f1 with average 'binary' needs two classes, found 3"
    ):
        score("f1", y, labels, average="binary")


def test_the_metric_spec_and_the_scores_carry_the_average() -> None:
    y, _, labels = _case(4, seed=6)
    pred = np.asarray(labels)
    weighted = f1_score(y, pred, average="weighted")
    assert score(Metric(name="f1", average="weighted"), y, labels) == pytest.approx(weighted, rel=1e-9)
    carried = Scores(pred, labels.classes, average="weighted")
    assert score("f1", y, carried) == pytest.approx(weighted, rel=1e-9)
    assert score("f1", y, carried) != pytest.approx(score("f1", y, labels))
    with pytest.raises(ValueError, match="conflicting averages"):
        score(Metric(name="f1", average="micro"), y, carried)


def test_decide_judges_models_that_know_different_classes() -> None:
    """The champion predates class_d; the challenger knows it. Both are judged on the same classes."""
    rng = np.random.default_rng(4)
    y, proba, _ = _case(4, n=1500, seed=8)
    champion_p = rng.dirichlet(np.ones(3), size=len(y))
    champion = Scores(champion_p, ("class_a", "class_b", "class_c"))
    policy = Promotion()
    for name in ("roc_auc", "log_loss"):
        decision = decide(name, policy, y, proba, champion, champion_version="1", seed=0)
        assert decision.promote, decision.reason
        assert decision.classes == 4
        assert decision.challenger_score == pytest.approx(score(name, y, proba), rel=1e-12)
    worse = decide("roc_auc", policy, y, champion, proba, champion_version="1", seed=0)
    assert not worse.promote and worse.average == "macro"
    diffs = paired_bootstrap("log_loss", y, proba, champion, resamples=1000, seed=0)
    assert len(diffs) == 1000 and (diffs > 0).all()


def test_no_champion_decision_on_multiclass_labels() -> None:
    y, _, labels = _case(5, n=400)
    decision = decide(Metric(name="f1"), Promotion(floor=0.2), y, labels, None, champion_version=None, seed=0)
    assert decision.promote and decision.average == "macro"
    assert decision.challenger_score == pytest.approx(f1_score(y, np.asarray(labels), average="macro"))


def test_metric_inputs_of_a_real_multiclass_model_score_like_sklearn() -> None:
    """Iris with string species and a numeric-only spec, end to end through training."""
    from sklearn.datasets import load_iris

    from cd4ml.ml.training import check_target, metric_inputs, split_holdout, train

    iris = load_iris(as_frame=True)
    frame = iris.frame.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
    frame["species"] = np.asarray(iris.target_names)[frame.pop("target")]
    frame = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    logreg = {"class": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 500}}
    metric = {"name": "roc_auc", "average": "weighted"}
    raw = spec_dict(target="species", timestamp=None, metric=metric, estimator=logreg)
    raw["features"] = {"numerical": [c for c in frame.columns if c != "species"], "categorical": []}
    raw["promotion"]["floor"] = 0.5
    spec = parse_spec(yaml.safe_dump(raw), Path("churn.yaml"))
    check_target(spec, frame["species"])
    split = split_holdout(spec, frame)
    model = train(spec, split.train)
    scores = metric_inputs(spec, model, split.holdout)
    y = split.holdout["species"].to_numpy()
    assert scores.shape == (len(y), 3) and scores.classes == ("setosa", "versicolor", "virginica")
    x = split.holdout[spec.feature_names]
    present = [c for c in scores.classes if (y == c).any()]
    if len(present) == 3:
        expected = roc_auc_score(y, model.predict_proba(x), multi_class="ovr", average="weighted")
        assert score(spec.metric.name, y, scores) == pytest.approx(expected, rel=1e-9)
    for name in ("f1", "accuracy", "balanced_accuracy", "log_loss"):
        other = spec.model_copy(update={"metric": Metric(name=name)})
        got = score(other.metric, y, metric_inputs(other, model, split.holdout))
        expected = {
            "f1": lambda: f1_score(y, model.predict(x), average="macro"),
            "accuracy": lambda: accuracy_score(y, model.predict(x)),
            "balanced_accuracy": lambda: balanced_accuracy_score(y, model.predict(x)),
            "log_loss": lambda: log_loss(y, model.predict_proba(x), labels=list(model.classes_)),
        }[name]()
        assert got == pytest.approx(expected, rel=1e-9)
    assert isinstance(pd.Series(scores.classes).iloc[0], str)
