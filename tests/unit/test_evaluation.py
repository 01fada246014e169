from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    log_loss,
    mean_absolute_error,
    r2_score,
    roc_auc_score,
)

from cd4ml.core.spec import Promotion
from cd4ml.ml.evaluation import BusinessValues, decide, paired_bootstrap, score

RNG = np.random.default_rng(0)
N = 2000
Y = RNG.integers(0, 2, N)
GOOD = np.clip(Y * 0.45 + RNG.random(N) * 0.55, 0, 1)  # AUC ~0.9
WEAK = np.clip(Y * 0.10 + RNG.random(N) * 0.90, 0, 1)  # AUC ~0.6


@pytest.mark.parametrize(
    ("name", "reference", "kind"),
    [
        ("roc_auc", roc_auc_score, "proba"),
        ("log_loss", log_loss, "proba"),
        ("accuracy", accuracy_score, "label"),
        ("balanced_accuracy", balanced_accuracy_score, "label"),
        ("f1", f1_score, "label"),
    ],
)
def test_classification_metrics_match_sklearn(name: str, reference, kind: str) -> None:
    scores = GOOD if kind == "proba" else (GOOD > 0.5).astype(int)
    assert score(name, Y, scores) == pytest.approx(reference(Y, scores), rel=1e-9)


def test_regression_metrics_match_sklearn() -> None:
    y = RNG.normal(size=500)
    p = y + RNG.normal(size=500) * 0.3
    assert score("mae", y, p) == pytest.approx(mean_absolute_error(y, p))
    assert score("r2", y, p) == pytest.approx(r2_score(y, p))
    assert score("rmse", y, p) == pytest.approx(np.sqrt(np.mean((y - p) ** 2)))


def test_auc_handles_ties() -> None:
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.5, 0.5, 0.2, 0.9, 0.5, 0.5])
    assert score("roc_auc", y, s) == pytest.approx(roc_auc_score(y, s))


def test_bootstrap_is_deterministic_under_seed_and_paired() -> None:
    a = paired_bootstrap("roc_auc", Y, GOOD, WEAK, resamples=1000, seed=3)
    b = paired_bootstrap("roc_auc", Y, GOOD, WEAK, resamples=1000, seed=3)
    assert np.array_equal(a, b)
    assert len(a) == 1000
    assert (a > 0).all()  # clearly better on every resample
    same = paired_bootstrap("roc_auc", Y, GOOD, GOOD, resamples=1000, seed=3)
    assert np.allclose(same, 0.0)  # pairing: identical models differ by exactly zero


def test_bootstrap_orients_lower_is_better_metrics() -> None:
    y = RNG.normal(size=400)
    good = y + RNG.normal(size=400) * 0.1
    bad = y + RNG.normal(size=400) * 1.0
    diffs = paired_bootstrap("rmse", y, good, bad, resamples=1000, seed=1)
    assert (diffs > 0).all()


POLICY = Promotion(min_improvement=0.0, confidence=0.95, floor=0.7, bootstrap_resamples=1000)


def test_no_champion_floor_alone_decides() -> None:
    d = decide("roc_auc", POLICY, Y, GOOD, None, champion_version=None, seed=1)
    assert d.promote and d.champion_score is None and "first model" in d.reason
    d = decide("roc_auc", POLICY, Y, WEAK, None, champion_version=None, seed=1)
    assert not d.promote and "floor 0.7 not met" in d.reason


def test_clearly_better_challenger_is_promoted() -> None:
    d = decide(
        "roc_auc", POLICY.model_copy(update={"floor": 0.5}), Y, GOOD, WEAK, champion_version="3", seed=1
    )
    assert d.promote
    assert d.ci_low is not None and d.ci_low > 0
    assert d.champion_version == "3" and d.n == N and d.resamples == 1000
    assert d.difference == pytest.approx(d.challenger_score - d.champion_score)


def test_equal_challenger_is_rejected() -> None:
    d = decide("roc_auc", POLICY, Y, GOOD, GOOD.copy(), champion_version="1", seed=1)
    assert not d.promote
    assert d.difference == 0.0 and "does not exceed the minimum improvement" in d.reason


def test_worse_challenger_is_rejected() -> None:
    d = decide(
        "roc_auc", POLICY.model_copy(update={"floor": None}), Y, WEAK, GOOD, champion_version="1", seed=1
    )
    assert not d.promote and d.ci_high is not None and d.ci_high < 0


def test_slightly_better_but_not_significant_is_rejected() -> None:
    noisy = np.clip(GOOD + RNG.normal(0, 0.002, N), 0, 1)
    d = decide("roc_auc", POLICY, Y, noisy, GOOD, champion_version="1", seed=1)
    assert not d.promote and d.ci_low is not None and d.ci_low <= 0 <= d.ci_high


def test_min_improvement_margin_is_enforced() -> None:
    policy = POLICY.model_copy(update={"floor": None, "min_improvement": 0.5})
    d = decide("roc_auc", policy, Y, GOOD, WEAK, champion_version="1", seed=1)
    assert not d.promote and "minimum improvement 0.5" in d.reason


def test_better_but_below_floor_is_rejected() -> None:
    policy = POLICY.model_copy(update={"floor": 0.999})
    d = decide("roc_auc", policy, Y, GOOD, WEAK, champion_version="1", seed=1)
    assert not d.promote and "floor 0.999 not met" in d.reason


def test_tiny_holdout_is_refused() -> None:
    d = decide("roc_auc", POLICY, Y[:10], GOOD[:10], WEAK[:10], champion_version="1", seed=1)
    assert not d.promote and "holdout has 10 rows" in d.reason


def test_single_class_holdout_cannot_be_judged() -> None:
    y = np.ones(100, dtype=int)
    policy = POLICY.model_copy(update={"floor": None})
    d = decide("roc_auc", policy, y, GOOD[:100], WEAK[:100], champion_version="1", seed=1)
    assert not d.promote and "could be scored" in d.reason


# -- the business gate: the value must not fall ------------------------------------------------------

BETTER_ML = POLICY.model_copy(update={"floor": 0.5})


def worth(challenger: float, champion: float | None, *, gate: bool = True) -> BusinessValues:
    return BusinessValues("retention margin", "EUR", gate, challenger, champion)


def test_a_better_metric_worth_less_to_the_business_is_rejected_when_the_gate_is_on() -> None:
    d = decide("roc_auc", BETTER_ML, Y, GOOD, WEAK, champion_version="3", seed=1, business=worth(-12.5, -9.0))
    assert not d.promote
    assert d.reason.startswith(
        "rejected: business metric retention margin -12.5000 EUR per prediction is below the champion's "
        "-9.0000 EUR per prediction on the same holdout, and business.gate is true"
    )
    assert "(the ML metric alone: promoted: roc_auc improves" in d.reason
    assert (d.challenger_business_value, d.champion_business_value) == (-12.5, -9.0)
    assert (d.business_metric, d.business_unit, d.business_gate) == ("retention margin", "EUR", True)


def test_without_the_gate_the_business_value_is_reported_and_decides_nothing() -> None:
    d = decide(
        "roc_auc",
        BETTER_ML,
        Y,
        GOOD,
        WEAK,
        champion_version="3",
        seed=1,
        business=worth(-12.5, -9.0, gate=False),
    )
    assert d.promote and "business" not in d.reason
    evidence = d.as_dict()
    assert evidence["challenger_business_value"] == -12.5 and evidence["champion_business_value"] == -9.0
    assert evidence["business_gate"] is False


def test_a_value_that_does_not_fall_passes_the_gate_and_the_reason_says_so() -> None:
    d = decide("roc_auc", BETTER_ML, Y, GOOD, WEAK, champion_version="3", seed=1, business=worth(-9.0, -9.0))
    assert d.promote and d.reason.endswith(
        "business metric retention margin -9.0000 EUR per prediction does not fall below the champion's "
        "-9.0000 EUR per prediction (business.gate)"
    )


def test_a_rejected_challenger_worth_less_names_both_reasons() -> None:
    d = decide("roc_auc", BETTER_ML, Y, WEAK, GOOD, champion_version="3", seed=1, business=worth(1.0, 2.0))
    assert not d.promote and "does not exceed the minimum improvement" in d.reason
    assert "; also business metric retention margin 1.0000 EUR per prediction is below" in d.reason


def test_the_first_model_has_no_champion_value_to_fall_below() -> None:
    d = decide("roc_auc", POLICY, Y, GOOD, None, champion_version=None, seed=1, business=worth(-50.0, None))
    assert d.promote and "first model" in d.reason
    assert d.challenger_business_value == -50.0 and d.champion_business_value is None


def test_no_business_section_leaves_the_evidence_as_it_was() -> None:
    d = decide("roc_auc", BETTER_ML, Y, GOOD, WEAK, champion_version="3", seed=1)
    assert d.business_metric is None and d.challenger_business_value is None and d.business_gate is None
