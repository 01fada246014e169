"""Champion vs challenger: metrics, a paired bootstrap, and the one promotion decision.

Everything here is pure: arrays in, numbers and a `Decision` out. The bootstrap draws multinomial
resampling weights (equivalent to resampling rows with replacement) and evaluates both models on
the same draw, so the interval is for the *difference* and the pairing removes the noise both
models share. Weighted metrics make 1000+ resamples cost a few matrix products, not 2000 sklearn calls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cd4ml.spec import METRICS, Promotion

Array = NDArray[Any]


def _weights_ok(w: Array) -> Array:
    return np.atleast_2d(np.asarray(w, dtype=float))


def weighted_metric(name: str, y_true: Array, scores: Array, weights: Array) -> Array:
    """Metric of each weight row (shape (B, n)); `scores` are P(positive) for roc_auc/log_loss,
    labels for the other classification metrics, values for regression. Returns shape (B,)."""
    w = _weights_ok(weights)
    total = w.sum(axis=1)
    y = np.asarray(y_true)
    s = np.asarray(scores)
    if name == "accuracy":
        return np.asarray((w @ (y == s).astype(float)) / total)
    if name == "balanced_accuracy":
        classes = np.unique(y)
        recalls = []
        for c in classes:
            mask = (y == c).astype(float)
            denom = w @ mask
            with np.errstate(invalid="ignore", divide="ignore"):
                recalls.append((w @ (mask * (s == c))) / denom)
        return np.asarray(np.nanmean(np.vstack(recalls), axis=0))
    if name == "f1":
        pos = _positive_label(y)
        tp = w @ ((y == pos) & (s == pos)).astype(float)
        fp = w @ ((y != pos) & (s == pos)).astype(float)
        fn = w @ ((y == pos) & (s != pos)).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0))
    if name == "log_loss":
        pos = _positive_label(y)
        p = np.clip(s.astype(float), 1e-15, 1 - 1e-15)
        losses = -np.where(y == pos, np.log(p), np.log(1 - p))
        return np.asarray((w @ losses) / total)
    if name == "roc_auc":
        return _weighted_auc(y, s.astype(float), w)
    if name in {"rmse", "mae", "r2"}:
        err = s.astype(float) - y.astype(float)
        if name == "rmse":
            return np.asarray(np.sqrt((w @ err**2) / total))
        if name == "mae":
            return np.asarray((w @ np.abs(err)) / total)
        mean = (w @ y.astype(float)) / total
        ss_tot = (w * (y.astype(float)[None, :] - mean[:, None]) ** 2).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(1 - (w @ err**2) / ss_tot)
    raise ValueError(f"unknown metric {name!r}")


def _positive_label(y: Array) -> Any:
    classes = np.unique(y)
    if len(classes) > 2:
        raise ValueError(f"this metric needs a binary target, found {len(classes)} classes")
    return classes[-1]


def _weighted_auc(y: Array, score: Array, w: Array) -> Array:
    """AUC = P(score_pos > score_neg) + 0.5 P(tie), for every weight row at once."""
    pos_label = _positive_label(y)
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    is_pos = (y[order] == pos_label).astype(float)
    ws = w[:, order]
    group_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    pos_g = np.add.reduceat(ws * is_pos, group_starts, axis=1)
    neg_g = np.add.reduceat(ws * (1 - is_pos), group_starts, axis=1)
    neg_before = np.cumsum(neg_g, axis=1) - neg_g
    numerator = (pos_g * (neg_before + 0.5 * neg_g)).sum(axis=1)
    denom = pos_g.sum(axis=1) * neg_g.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.where(denom > 0, numerator / denom, np.nan))


def score(name: str, y_true: Array, scores: Array) -> float:
    return float(weighted_metric(name, y_true, scores, np.ones((1, len(y_true))))[0])


def paired_bootstrap(
    name: str,
    y_true: Array,
    challenger: Array,
    champion: Array,
    *,
    resamples: int,
    seed: int,
    chunk: int = 200,
) -> Array:
    """Differences (challenger - champion, oriented so that positive = challenger better)."""
    n = len(y_true)
    sign = 1.0 if METRICS[name][1] == "maximize" else -1.0
    rng = np.random.default_rng(seed)
    diffs = []
    done = 0
    while done < resamples:
        b = min(chunk, resamples - done)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(float)
        a = weighted_metric(name, y_true, challenger, weights)
        c = weighted_metric(name, y_true, champion, weights)
        diffs.append(sign * (a - c))
        done += b
    out = np.concatenate(diffs)
    return out[np.isfinite(out)]  # resamples with a single class have no AUC


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    metric: str
    direction: str
    challenger_score: float
    champion_score: float | None
    champion_version: str | None
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float
    min_improvement: float
    floor: float | None
    n: int
    resamples: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _meets_floor(name: str, value: float, floor: float | None) -> bool:
    if floor is None:
        return True
    return value >= floor if METRICS[name][1] == "maximize" else value <= floor


def decide(
    name: str,
    policy: Promotion,
    y_true: Array,
    challenger: Array,
    champion: Array | None,
    *,
    champion_version: str | None,
    seed: int,
) -> Decision:
    """Promote only if the challenger meets the floor and, when there is a champion, the lower bound
    of the one-sided confidence interval of (challenger - champion) exceeds `min_improvement`."""
    n = len(y_true)
    challenger_score = score(name, y_true, challenger)
    base: dict[str, Any] = dict(
        metric=name,
        direction=METRICS[name][1],
        challenger_score=challenger_score,
        confidence=policy.confidence,
        min_improvement=policy.min_improvement,
        floor=policy.floor,
        n=n,
    )
    if n < policy.min_holdout_rows:
        return Decision(
            promote=False,
            reason=f"holdout has {n} rows; at least {policy.min_holdout_rows} are needed to judge a model",
            champion_score=None, champion_version=champion_version, difference=None,
            ci_low=None, ci_high=None, resamples=0, **base,
        )  # fmt: skip
    floor_ok = _meets_floor(name, challenger_score, policy.floor)
    floor_text = f"{name}={challenger_score:.4f} vs floor {policy.floor}"
    if champion is None:
        return Decision(
            promote=floor_ok,
            reason=(f"first model: {floor_text} " + ("met" if floor_ok else "not met")),
            champion_score=None, champion_version=None, difference=None,
            ci_low=None, ci_high=None, resamples=0, **base,
        )  # fmt: skip
    champion_score = score(name, y_true, champion)
    diffs = paired_bootstrap(
        name, y_true, challenger, champion, resamples=policy.bootstrap_resamples, seed=seed
    )
    sign = 1.0 if METRICS[name][1] == "maximize" else -1.0
    difference = sign * (challenger_score - champion_score)
    if len(diffs) < policy.bootstrap_resamples // 2:
        return Decision(
            promote=False,
            reason=(
                f"only {len(diffs)} of {policy.bootstrap_resamples} resamples could be scored; "
                "holdout too degenerate"
            ),
            champion_score=champion_score, champion_version=champion_version, difference=difference,
            ci_low=None, ci_high=None, resamples=len(diffs), **base,
        )  # fmt: skip
    alpha = 1 - policy.confidence
    ci_low = float(np.quantile(diffs, alpha))
    ci_high = float(np.quantile(diffs, 1 - alpha))
    better = ci_low > policy.min_improvement
    if not floor_ok:
        reason = f"rejected: {floor_text} not met"
    elif better:
        reason = (
            f"promoted: {name} improves by {difference:+.4f}; the {policy.confidence:.0%} lower bound "
            f"{ci_low:+.4f} exceeds the minimum improvement {policy.min_improvement}"
        )
    else:
        reason = (
            f"rejected: {name} difference {difference:+.4f}; the {policy.confidence:.0%} lower bound "
            f"{ci_low:+.4f} does not exceed the minimum improvement {policy.min_improvement}"
        )
    return Decision(
        promote=floor_ok and better, reason=reason, champion_score=champion_score,
        champion_version=champion_version, difference=difference, ci_low=ci_low, ci_high=ci_high,
        resamples=len(diffs), **base,
    )  # fmt: skip
