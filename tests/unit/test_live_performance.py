"""Live performance of the champion on labelled served traffic (cd4ml.steps.monitor): which rows a
check judges, how outcomes sent as text or numbers become classes, the bootstrap interval, the
significance of a drop, the decision it feeds and the cooldown notice. Small real models and
frames; negative cases: no labels, too few, labels of another version, labels that came late."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from cd4ml.core.spec import ModelSpec, load_spec
from cd4ml.ml import training
from cd4ml.ml.drift import DriftDecision
from cd4ml.steps.monitor import (
    LivePerformance,
    bootstrap_interval,
    cast_outcomes,
    cooldown_notice_due,
    decide_with_live,
    judge_drop,
    live_performance,
    live_rows,
)
from cd4ml_dev.datagen import generate_churn
from tests.helpers import LOGREG, write_spec

END = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)
START = END - timedelta(hours=168)


def make_spec(tmp_path: Path, **overrides: Any) -> ModelSpec:
    return load_spec(write_spec(tmp_path, "churn", estimator=LOGREG, **overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSpec, Any]:
    spec = make_spec(tmp_path_factory.mktemp("specs"))
    return spec, training.train(spec, generate_churn(1500, seed=1))


def served(spec: ModelSpec, model: Any, n: int, *, seed: int, version: str = "3") -> pd.DataFrame:
    """What the prediction log and the label store give back for n labelled predictions."""
    frame = generate_churn(n, seed=seed, batch=1)
    out = training.features(spec, frame)
    out["prediction"] = model.predict(out)
    out["model_version"] = version
    out["request_id"] = [f"r{seed}-{i}" for i in range(n)]
    out["row"] = 0
    out["ts"] = pd.Timestamp(END - timedelta(hours=5))
    out["outcome"] = frame[spec.target].to_numpy()
    out["labelled_at"] = pd.Timestamp(END - timedelta(hours=1))
    return out


def judge(spec: ModelSpec, model: Any, rows: pd.DataFrame, served_rows: int, baseline: float | None):
    return live_performance(spec, model, rows, served_rows=served_rows, version="3", baseline=baseline,
                            start=START, end=END)  # fmt: skip


# -- outcomes -------------------------------------------------------------------------------------


def test_outcomes_sent_as_text_or_floats_become_the_models_integer_classes() -> None:
    values, usable = cast_outcomes(np.array(["1", "0", " 1.0", 0.0, 1, None, "maybe"], dtype=object), (0, 1))
    assert usable.tolist() == [True, True, True, True, True, False, False]
    assert values[usable].tolist() == [1, 0, 1, 0, 1]
    clean, ok = cast_outcomes(np.array(["1", "0"], dtype=object), (0, 1))
    assert ok.all() and clean.dtype.kind == "i"  # the classes' own dtype when nothing new came in


def test_a_new_text_class_stays_as_text_and_regression_outcomes_must_be_numbers() -> None:
    values, usable = cast_outcomes(np.array(["rain", "sun", "fog", 5], dtype=object), ("rain", "sun"))
    assert usable.all() and values.tolist() == ["rain", "sun", "fog", "5"]
    numbers, ok = cast_outcomes(np.array(["3.5", 2, "n/a", None], dtype=object), None)
    assert ok.tolist() == [True, True, False, False] and numbers[ok].tolist() == [3.5, 2.0]


# -- bootstrap interval and significance ----------------------------------------------------------


def test_the_interval_brackets_the_same_value_sklearn_computes_and_is_reproducible() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    pred = np.where(rng.random(400) < 0.8, y, 1 - y)
    value, low, high = bootstrap_interval("accuracy", y, pred, resamples=1000, confidence=0.95, seed=7)
    assert value == pytest.approx(accuracy_score(y, pred))
    assert low is not None and high is not None and low < value < high
    # A 90% two-sided interval of a proportion: about +-1.645 standard errors.
    se = np.sqrt(value * (1 - value) / 400)
    assert (high - low) == pytest.approx(2 * 1.645 * se, rel=0.2)
    assert bootstrap_interval("accuracy", y, pred, resamples=1000, confidence=0.95, seed=7) == (
        value,
        low,
        high,
    )


def test_a_large_window_resamples_a_subsample_and_scales_the_spread_to_all_rows() -> None:
    rng = np.random.default_rng(4)
    n = 20_000
    y = rng.integers(0, 2, n)
    proba = np.clip(y * 0.3 + rng.random(n) * 0.7, 0, 1)
    value, low, high = bootstrap_interval("roc_auc", y, proba, resamples=1000, confidence=0.95, seed=1,
                                          max_rows=2_000)  # fmt: skip
    assert value == pytest.approx(roc_auc_score(y, proba))
    assert low is not None and high is not None and low < value < high
    _, full_low, full_high = bootstrap_interval("roc_auc", y, proba, resamples=1000, confidence=0.95, seed=1,
                                                max_rows=n)  # fmt: skip
    assert full_low is not None and full_high is not None
    assert (high - low) == pytest.approx(full_high - full_low, rel=0.25)
    # A subsample of 2,000 resampled as is would be sqrt(10) times wider.
    assert (high - low) < 0.5 * np.sqrt(n / 2_000) * (full_high - full_low)


def test_one_class_has_no_auc_and_no_interval() -> None:
    value, low, high = bootstrap_interval("roc_auc", np.ones(50), np.linspace(0, 1, 50), resamples=1000,
                                          confidence=0.95, seed=0)  # fmt: skip
    assert np.isnan(value) and low is None and high is None


def test_a_drop_is_significant_only_when_even_the_better_bound_is_worse_by_more_than_the_limit() -> None:
    kw: dict[str, Any] = {"higher_is_better": True, "baseline": 0.85, "limit": 0.05}
    drop, at_better, significant = judge_drop(value=0.70, low=0.66, high=0.74, **kw)
    assert drop == pytest.approx(0.15) and at_better == pytest.approx(0.11) and significant
    assert judge_drop(value=0.70, low=0.58, high=0.82, **kw)[2] is False  # wide: could be a 0.03 drop
    assert judge_drop(value=0.70, low=None, high=None, **kw) == (pytest.approx(0.15), None, False)
    # Lower is better (rmse): the better bound is the low one, and a rise is the drop.
    drop, at_better, significant = judge_drop(higher_is_better=False, value=1.5, low=1.3, high=1.7,
                                              baseline=1.0, limit=0.2)  # fmt: skip
    assert drop == pytest.approx(0.5) and at_better == pytest.approx(0.3) and significant
    # No limit in the spec: any interval wholly below the baseline is significant (reported only).
    assert judge_drop(value=0.84, low=0.83, high=0.849, higher_is_better=True, baseline=0.85, limit=None)[2]
    assert judge_drop(value=0.70, low=0.6, high=0.8, higher_is_better=True, baseline=None, limit=0.05) == (
        None, None, False,
    )  # fmt: skip


# -- which rows a check judges --------------------------------------------------------------------


def test_the_window_keeps_the_champions_predictions_whose_labels_were_in_by_the_check() -> None:
    day = timedelta(days=1)
    labelled = pd.DataFrame({
        "model_version": ["3", "3", "2", "3", "3", "3", "3"],
        # in window; 6 days old with a label 5 days late; other version; 8 days old; in window but
        # labelled after the check; at the window's start (in); at its end (out: the next window's)
        "ts": [END - day, END - 6 * day, END - day, END - 8 * day, END - day, START, END],
        "labelled_at": [END - day / 2, END - day / 4, END, END, END + day, END, END],
        "outcome": [1, 0, 1, 1, 0, 1, 0],
    })  # fmt: skip
    rows, left_out = live_rows(labelled, version="3", start=START, end=END)
    assert rows["outcome"].tolist() == [1, 0, 1]
    assert left_out == {"other_versions": 1, "labelled_after_check": 1, "outside_window": 2}
    empty, none_left = live_rows(pd.DataFrame(), version="3", start=START, end=END)
    assert empty.empty and sum(none_left.values()) == 0


# -- live_performance on a real model -------------------------------------------------------------


def test_no_labels_and_too_few_labels_judge_nothing(trained: tuple[ModelSpec, Any]) -> None:
    spec, model = trained
    nothing = judge(spec, None, pd.DataFrame(), served_rows=500, baseline=0.85)
    assert nothing.value is None and nothing.coverage == 0.0 and "no labels yet" in nothing.reason
    assert not nothing.significant
    few = judge(spec, model, served(spec, model, 12, seed=2), served_rows=500, baseline=0.85)
    assert few.value is None and few.labelled_rows == 12 and few.coverage == pytest.approx(12 / 500)
    assert "too few labels to judge: 12 usable labelled rows, 30 needed" in few.reason


def test_labels_as_text_give_the_same_figures_as_integers(trained: tuple[ModelSpec, Any]) -> None:
    spec, model = trained
    rows = served(spec, model, 600, seed=3)
    as_ints = judge(spec, model, rows, served_rows=1200, baseline=0.80)
    as_text = judge(spec, model, rows.assign(outcome=rows["outcome"].astype(str)), served_rows=1200,
                    baseline=0.80)  # fmt: skip
    assert as_ints == as_text
    assert as_ints.value == pytest.approx(
        roc_auc_score(rows["outcome"], model.predict_proba(training.features(spec, rows))[:, 1])
    )
    assert as_ints.low is not None and as_ints.high is not None and as_ints.low < as_ints.value < as_ints.high
    assert as_ints.coverage == 0.5 and as_ints.labelled_rows == 600 and as_ints.served_rows == 1200
    assert not as_ints.significant and as_ints.business_value is None  # no business section


def test_outcomes_that_turned_against_the_model_are_a_significant_drop(
    trained: tuple[ModelSpec, Any],
) -> None:
    spec, model = trained
    rows = served(spec, model, 400, seed=4)
    flipped = np.where(np.random.default_rng(0).random(400) < 0.5, 1 - rows["outcome"], rows["outcome"])
    rows["outcome"] = flipped.astype(object)
    rows.loc[:9, "outcome"] = "not a class"  # unusable: left out and counted, not an error
    live = judge(spec, model, rows, served_rows=400, baseline=0.85)
    assert live.unusable_labels == 10 and live.labelled_rows == 390
    assert live.coverage == pytest.approx(390 / 400)
    assert live.significant and live.drop is not None and live.drop_at_better_bound is not None
    assert live.drop > live.drop_at_better_bound > spec.drift.performance_drop
    assert "significant drop" in live.reason and "vs 0.8500 at promotion" in live.reason
    assert LivePerformance(**live.as_dict()) == live


def test_business_value_is_reported_on_what_was_served(tmp_path: Path) -> None:
    matrix = {0: {0: 0.0, 1: -5.0}, 1: {0: -50.0, 1: 20.0}}
    spec = make_spec(tmp_path, business={"unit": "EUR", "matrix": matrix})
    model = training.train(spec, generate_churn(800, seed=5))
    rows = served(spec, model, 300, seed=6)
    as_text = rows.assign(outcome=rows["outcome"].astype(str))
    live = live_performance(spec, model, as_text, served_rows=300, version="3", baseline=None, start=START,
                            end=END, business_baseline=2.5)  # fmt: skip
    y, p = rows["outcome"].to_numpy(), rows["prediction"].to_numpy()
    expected = np.mean([matrix[int(a)][int(b)] for a, b in zip(y, p, strict=True)])
    assert live.business_value == pytest.approx(expected) and live.business_baseline == 2.5
    assert live.drop is None and not live.significant and "no score at promotion" in live.reason


# -- the decision and the cooldown notice ---------------------------------------------------------


def live_result(significant: bool) -> LivePerformance:
    return LivePerformance(
        metric="roc_auc", version="3", window_start=START.isoformat(), window_end=END.isoformat(),
        labelled_rows=80, served_rows=100, coverage=0.8, value=0.7, low=0.66, high=0.74, confidence=0.95,
        baseline=0.85, drop=0.15, drop_at_better_bound=0.11, significant=significant, business_value=None,
        unusable_labels=0, reason="live roc_auc 0.7000 [0.6600, 0.7400] on 80 labelled rows",
    )  # fmt: skip


def test_a_significant_live_drop_triggers_a_retrain_whatever_the_drift_window_holds(tmp_path: Path) -> None:
    policy = make_spec(tmp_path).drift
    too_small = DriftDecision(False, False, "not enough data: 50 rows in the window, 200 needed")
    decision = decide_with_live(policy, too_small, live_result(True), now=END, last_trigger_at=None)
    assert decision.drift and decision.trigger and "drift.performance_drop 0.05" in decision.reason
    assert "not enough data" in decision.reason
    assert decide_with_live(policy, too_small, live_result(False), now=END, last_trigger_at=None) is too_small
    held = decide_with_live(
        policy, too_small, live_result(True), now=END, last_trigger_at=END - timedelta(hours=1)
    )
    assert held.drift and not held.trigger and "cooldown: no retrain before" in held.reason
    # Without drift.performance_drop a significant drop is reported, never acted on.
    unset = make_spec(tmp_path, drift__performance_drop=None).drift
    assert decide_with_live(unset, too_small, live_result(True), now=END, last_trigger_at=None) is too_small


def test_drift_in_a_cooldown_asks_for_one_notice_per_cooldown_period(tmp_path: Path) -> None:
    policy = make_spec(tmp_path).drift  # cooldown_hours: 6
    held = DriftDecision(True, False, "share 0.5 >= 0.3; cooldown: no retrain before ...")
    trigger = END - timedelta(hours=2)
    due = lambda decision, notice, **kw: cooldown_notice_due(  # noqa: E731
        policy, decision, now=END, last_trigger_at=kw.get("trigger", trigger), last_notice_at=notice,
        held_for_another_reason=kw.get("other", False))  # fmt: skip
    assert due(held, None)
    assert not due(held, END - timedelta(hours=1))  # already sent in this period
    assert due(held, trigger - timedelta(hours=7))  # sent in an earlier period
    assert not due(held, None, trigger=END - timedelta(hours=7))  # the cooldown is over
    assert not due(held, None, trigger=None)  # never triggered: no cooldown
    assert not due(DriftDecision(True, True, "retrain"), None)
    assert not due(DriftDecision(False, False, "no drift"), None)
    assert not due(held, None, other=True)  # already trained on the window: nothing to tell


# -- the stores: the real prediction log and label store ------------------------------------------


def test_a_check_joins_late_labels_from_the_store_and_counts_coverage_per_version(
    tmp_path: Path, trained: tuple[ModelSpec, Any]
) -> None:
    from cd4ml.core.paths import ModelPaths
    from cd4ml.core.settings import Settings
    from cd4ml.data.feedback import record_labels
    from cd4ml.serving.predlog import Entry, PredictionLog
    from cd4ml.steps.monitor import live_check

    spec, model = trained
    settings = Settings(tmp_path, tmp_path / "data", tmp_path / "specs", "http://unused")
    frame = training.features(spec, generate_churn(240, seed=8, batch=1))
    truth = generate_churn(240, seed=8, batch=1)[spec.target].to_numpy()
    columns = tuple(spec.feature_names)
    plog = PredictionLog(settings.data_dir, flush_seconds=0.05)
    plog.start()
    # 200 rows of version 3 in requests of 4 rows, 3 and 4 days before the check; 20 of version 2;
    # 20 of version 3 predicted 9 days before (outside the week).
    for i in range(0, 240, 4):
        version, age = ("3", timedelta(days=3 + (i % 8 == 0))) if i < 200 else (
            ("2", timedelta(days=1)) if i < 220 else ("3", timedelta(days=9)))  # fmt: skip
        rows = frame.iloc[i : i + 4]
        plog.put(Entry(spec.name, version, (END - age).timestamp(), f"req-{i}", columns,
                       rows.to_numpy().tolist(), model.predict(rows).tolist()))  # fmt: skip
    plog.close()
    paths = ModelPaths.for_model(settings, spec.name)
    labels = pd.DataFrame({
        "request_id": [f"req-{i - i % 4}" for i in range(240)],
        "row": [i % 4 for i in range(240)],
        "outcome": [str(v) for v in truth],
    })  # fmt: skip
    # Most labels arrive two days after their prediction; 40 arrive only after the check.
    record_labels(paths, labels.iloc[:160], source="test", received_at=END - timedelta(days=1))
    record_labels(paths, labels.iloc[160:200], source="test", received_at=END + timedelta(hours=2))
    record_labels(paths, labels.iloc[200:], source="test", received_at=END - timedelta(hours=1))
    calls: list[int] = []

    def load() -> Any:
        calls.append(1)
        return model

    live, left_out = live_check(spec, settings, "3", {"challenger_score": 0.8}, END, load)
    assert live.labelled_rows == 160 and live.served_rows == 200 and live.coverage == pytest.approx(0.8)
    assert left_out == {"other_versions": 20, "labelled_after_check": 40, "outside_window": 0}
    scores = model.predict_proba(frame.iloc[:160])[:, 1]
    assert live.value == pytest.approx(roc_auc_score(truth[:160], scores))
    assert live.baseline == 0.8 and calls == [1]
    # Two hours later the late labels are in: the same predictions, now 200 of 200 labelled.
    later, _ = live_check(spec, settings, "3", {"challenger_score": 0.8}, END + timedelta(hours=2), load)
    assert later.labelled_rows == 200 and later.coverage == pytest.approx(1.0)
    # A version nobody labelled: nothing judged, and the model is not even loaded.
    other, _ = live_check(spec, settings, "7", {}, END, load)
    assert other.value is None and other.served_rows == 0 and other.coverage is None and calls == [1, 1]
