"""The canary's routing (sticky, by share) and its judgement (promote, roll back, keep watching)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cd4ml.core.errors import SpecError
from cd4ml.core.spec import CanaryPolicy, parse_spec
from cd4ml.serving.canary import canary_share, percentile, route_key
from cd4ml.steps.canary import LiveMetric, judge
from tests.helpers import spec_dict

POLICY = CanaryPolicy(min_requests=100, max_duration_minutes=30)


def arm(requests: int, errors: int = 0, p99: float | None = 2.0) -> dict[str, Any]:
    return {"requests": requests, "errors": errors, "p99_ms": p99}


def snap(canary: dict[str, Any], champion: dict[str, Any], seconds: float = 60.0) -> dict[str, Any]:
    return {"seconds": seconds, "arms": {"canary": canary, "champion": champion}}


def test_a_canary_no_worse_is_promoted_once_it_has_enough_requests() -> None:
    assert judge(POLICY, snap(arm(99), arm(900))) is None  # keep watching
    verdict = judge(POLICY, snap(arm(100), arm(900)))
    assert verdict is not None and verdict.promote
    assert "no worse than the champion after 100 requests" in verdict.why
    assert "no live metric compared yet" in verdict.why


def test_too_little_traffic_by_the_deadline_rolls_back_and_says_which_setting() -> None:
    verdict = judge(POLICY, snap(arm(40), arm(400), seconds=30 * 60))
    assert verdict is not None and not verdict.promote
    assert "40 canary requests of the 100 needed (deployment.canary.min_requests)" in verdict.why


def test_errors_roll_back_early_and_at_the_judgement() -> None:
    early = judge(POLICY, snap(arm(20, errors=5), arm(200)))  # before min_requests: clearly failing
    assert early is not None and not early.promote and "error rate 25.00%" in early.why
    # A champion failing as often is no reason: the canary is no worse.
    same = judge(POLICY, snap(arm(100, errors=10), arm(1000, errors=100)))
    assert same is not None and same.promote
    worse = judge(POLICY, snap(arm(100, errors=3), arm(1000, errors=0)))
    assert worse is not None and not worse.promote and "error rate 3.00% vs champion 0.00%" in worse.why


def test_p99_must_stay_within_the_ratio_but_tiny_differences_do_not_count() -> None:
    slow = judge(POLICY, snap(arm(100, p99=40.0), arm(900, p99=2.0)))
    assert slow is not None and not slow.promote and "p99 40.0 ms vs champion 2.0 ms" in slow.why
    # 0.9 ms against 0.3 ms is three times slower, but under min_p99_difference_ms (5 ms): equal.
    tiny = judge(POLICY, snap(arm(100, p99=0.9), arm(900, p99=0.3)))
    assert tiny is not None and tiny.promote
    ratio = judge(POLICY, snap(arm(100, p99=140.0), arm(900, p99=100.0)))  # 1.4 <= 1.5
    assert ratio is not None and ratio.promote


@pytest.mark.parametrize(("higher", "canary", "champion", "promote"), [
    (True, 0.70, 0.80, False), (True, 0.81, 0.80, True), (False, 12.0, 10.0, False), (False, 9.0, 10.0, True),
])  # fmt: skip
def test_the_primary_metric_counts_once_enough_labels_arrived(
    higher: bool, canary: float, champion: float, promote: bool
) -> None:
    labelled = {"canary": LiveMetric(canary, 50), "champion": LiveMetric(champion, 400)}
    verdict = judge(
        POLICY, snap(arm(100), arm(900)), metric_name="m", higher_is_better=higher, metrics=labelled
    )
    assert verdict is not None and verdict.promote is promote, verdict
    if not promote:
        assert f"live m {canary:.4f} vs champion {champion:.4f}" in verdict.why
    few = {"canary": LiveMetric(canary, 10), "champion": LiveMetric(champion, 400)}  # < min_labels (30)
    unjudged = judge(POLICY, snap(arm(100), arm(900)), higher_is_better=higher, metrics=few)
    assert unjudged is not None and unjudged.promote


def test_routing_is_sticky_by_key_and_takes_about_the_share() -> None:
    keys = [f"customer-{i}" for i in range(20_000)]
    share = sum(canary_share("churn", k) < 0.1 for k in keys) / len(keys)
    assert 0.09 < share < 0.11
    assert all(canary_share("churn", k) == canary_share("churn", k) for k in keys[:100])
    # Another model splits its callers differently (no caller is always everybody's canary).
    assert [canary_share("a", k) < 0.5 for k in keys[:200]] != [
        canary_share("b", k) < 0.5 for k in keys[:200]
    ]


def test_the_route_key_comes_from_the_header_or_the_first_row() -> None:
    columns, data = ["tenure", "customer_id"], [[3, "c-7"], [4, "c-8"]]
    assert route_key("customer_id", columns, data, None) == "c-7"
    assert route_key("customer_id", columns, data, "h-1") == "h-1"
    assert route_key("customer_id", ["tenure"], [[3]], None) is None  # not sent: random
    assert route_key(None, columns, data, None) is None
    assert route_key("customer_id", columns, [[3, None]], None) is None


def test_percentile_is_the_nearest_rank_and_one_stall_does_not_make_a_p99() -> None:
    assert percentile([], 0.99) is None
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
    assert percentile([float(i) for i in range(1, 1001)], 0.99, keep_above=2) == 990.0
    assert percentile([5.0], 0.5) == 5.0
    # 60 fast answers and one 9 ms stall: the stall is the plain p99, not the guarded one.
    sixty = [1.0] * 59 + [9.0]
    assert percentile(sixty, 0.99) == 9.0 and percentile(sixty, 0.99, keep_above=2) == 1.0
    slow = [1.0] * 50 + [20.0] * 10  # a real tail: 1 in 6 slow
    assert percentile(slow, 0.99, keep_above=2) == 20.0
    assert percentile([3.0], 0.99, keep_above=2) == 3.0


def test_a_bad_canary_policy_names_the_field() -> None:
    raw = spec_dict(deployment={"strategy": "canary", "canary": {"fraction": 1.5}})
    with pytest.raises(SpecError, match=r"deployment\.canary\.fraction"):
        parse_spec(yaml.safe_dump(raw), Path("bad.yaml"))
    raw = spec_dict(deployment={"strategy": "canary", "canary": {"min_request": 10}})
    with pytest.raises(SpecError, match=r"min_request"):
        parse_spec(yaml.safe_dump(raw), Path("bad.yaml"))


def test_each_sides_first_answers_are_counted_but_not_timed() -> None:
    from cd4ml.serving.canary import WARMUP_ANSWERS, CanaryState

    state = CanaryState(slot=object(), champion_version="1", fraction=0.5, sticky_key=None)  # type: ignore[arg-type]
    for _ in range(WARMUP_ANSWERS):
        state.count("canary", 0.050)  # a freshly loaded model's slow first answers
    for _ in range(100):
        state.count("canary", 0.001)
    state.count("canary", 0.0, error=True)
    arm = state.arms["canary"]
    assert arm.requests == WARMUP_ANSWERS + 101 and arm.errors == 1 and len(arm.seconds) == 100
    assert arm.summary()["p99_ms"] == 1.0
