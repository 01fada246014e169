"""Drift statistics against Evidently itself, the decision's every branch, and seeded sampling."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cd4ml.core.spec import Drift
from cd4ml.ml.drift import (
    DriftDecision,
    column_drift,
    dataset_drift,
    decide_drift,
    evidently_drift,
    sample_size,
    stratified_sample,
)

RNG = np.random.default_rng(0)
NUM = ["x", "y", "few"]
CAT = ["c"]


def frame(
    n: int, *, shift: float = 0.0, cats: tuple[float, ...] = (0.5, 0.3, 0.2), seed: int = 0
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "x": rng.normal(shift, 1, n),
        "y": rng.exponential(2, n),
        "few": rng.integers(0, 3, n).astype(float),
        "c": rng.choice(["a", "b", "c"], n, p=list(cats)),
    })  # fmt: skip


@pytest.mark.parametrize(
    ("current_kwargs", "drifted"),
    [
        ({"seed": 1}, []),
        ({"seed": 1, "shift": 0.5}, ["x"]),
        ({"seed": 1, "cats": (0.1, 0.3, 0.6)}, ["c"]),
    ],
)
def test_verdicts_and_scores_match_evidently(current_kwargs: dict, drifted: list[str]) -> None:
    ref, cur = frame(5000), frame(4000, **current_kwargs)
    ours = dataset_drift(ref, cur, NUM, CAT)
    theirs = evidently_drift(ref, cur, NUM, CAT)
    assert ours.drifted_columns == drifted
    assert sorted(theirs.drifted_columns) == sorted(drifted)
    by_name = {c.column: c for c in theirs.columns}
    for col in ours.columns:
        assert col.score == pytest.approx(by_name[col.column].score, rel=1e-6, abs=1e-9), col.column


def test_method_choice_follows_evidently_defaults() -> None:
    ref, cur = frame(2000), frame(2000, seed=3)
    assert column_drift("x", ref["x"], cur["x"], "num").method == "wasserstein"
    assert column_drift("few", ref["few"], cur["few"], "num").method == "jensenshannon"
    assert column_drift("c", ref["c"], cur["c"], "cat").method == "jensenshannon"


def test_nulls_are_ignored_by_the_distance_but_reported_as_missing_rate_rise() -> None:
    ref, cur = frame(3000), frame(3000, seed=2)
    cur.loc[cur.index[:600], "y"] = np.nan
    summary = dataset_drift(ref, cur, NUM, CAT)
    assert "y" not in summary.drifted_columns
    assert summary.missing_rate_rise == {"y": 0.2}


def test_small_references_get_evidentlys_p_value_tests() -> None:
    ref, cur = frame(500), frame(500, seed=1, shift=1.0)
    summary = dataset_drift(ref, cur, NUM, CAT)
    assert "x" in summary.drifted_columns
    assert {c.column: c.method for c in summary.columns} == {
        "x": "ks", "y": "ks", "few": "chisquare", "c": "chisquare"
    }  # fmt: skip
    theirs = evidently_drift(ref, cur, NUM, CAT)
    assert [(c.method, c.drifted) for c in theirs.columns] == [(c.method, c.drifted) for c in summary.columns]


def test_the_choice_counts_non_null_reference_values_not_rows() -> None:
    """1,500 rows of which 600 are null: 900 values, so a p-value test, as Evidently picks."""
    ref, cur = frame(1500), frame(1500, seed=1)
    ref.loc[ref.index[:600], ["x", "few", "c"]] = np.nan
    methods = {c.column: c.method for c in dataset_drift(ref, cur, NUM, CAT).columns}
    assert methods == {"x": "ks", "y": "wasserstein", "few": "chisquare", "c": "chisquare"}


def test_sample_size_is_powered_and_capped() -> None:
    assert sample_size(10_000_000) == 9613  # (z_.995 + z_.99)^2 / 0.05^2 rows see a 0.05-sd shift
    assert sample_size(10_000_000, effect=0.01) == 50_000  # capped
    assert sample_size(3000) == 3000  # never more than there is


def test_stratified_sample_is_seeded_and_keeps_proportions() -> None:
    df = pd.DataFrame({"p": [0] * 9000 + [1] * 1000, "v": range(10_000)})
    a = stratified_sample(df, 1000, by="p", seed=7)
    b = stratified_sample(df, 1000, by="p", seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 1000 and a["p"].mean() == pytest.approx(0.1)
    assert not a.equals(stratified_sample(df, 1000, by="p", seed=8))
    assert stratified_sample(df, 20_000, by="p", seed=1) is df


POLICY = Drift(threshold=0.3, cooldown_hours=6, min_rows=200, performance_drop=0.05)
NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)


def decide(**kw: Any) -> DriftDecision:
    args = dict(window_rows=1000, share=0.0, performance_drop=None, now=NOW, last_trigger_at=None,
                window_already_trained_on=False)  # fmt: skip
    return decide_drift(POLICY, **{**args, **kw})


def test_decision_branches() -> None:
    assert decide().trigger is False and "no drift" in decide().reason
    small = decide(window_rows=150, share=1.0)
    assert not small.drift and not small.trigger and small.reason.startswith("not enough data: 150 rows")
    drifted = decide(share=0.5)
    assert drifted.drift and drifted.trigger and "share 0.50 >= threshold 0.3" in drifted.reason
    perf = decide(performance_drop=0.08)
    assert perf.trigger and "performance dropped by 0.0800" in perf.reason
    assert not decide(performance_drop=0.01).drift
    cooling = decide(share=0.5, last_trigger_at=NOW - timedelta(hours=2))
    assert (
        cooling.drift
        and not cooling.trigger
        and "cooldown: no retrain before 2026-03-01T16:00:00" in cooling.reason
    )
    assert decide(share=0.5, last_trigger_at=NOW - timedelta(hours=7)).trigger
    known = decide(share=0.9, window_already_trained_on=True)
    assert known.drift and not known.trigger and "already trained on" in known.reason


@pytest.mark.parametrize(("n", "m"), [(1000, 1000), (1000, 1337), (50, 7)])
def test_wasserstein_matches_scipy(n: int, m: int) -> None:
    from scipy.stats import wasserstein_distance

    from cd4ml.ml.drift import wasserstein_1d

    rng = np.random.default_rng(n + m)
    u, v = rng.normal(0, 1, n), rng.gamma(2, 1, m)
    u[:5] = v[:5] = 1.0  # ties across the samples
    assert wasserstein_1d(u, v) == pytest.approx(wasserstein_distance(u, v), rel=1e-12, abs=1e-12)
