"""Champion vs challenger: metrics, a paired bootstrap, and the one promotion decision.

Everything here is pure: arrays in, numbers and a `Decision` out. The bootstrap draws multinomial
resampling weights (equivalent to resampling rows with replacement) and evaluates both models on
the same draw, so the interval is for the *difference* and the pairing removes the noise both
models share. Weighted metrics make 1000+ resamples cost a few matrix products, not 2000 sklearn calls.

Every metric equals scikit-learn's on unweighted data, with these choices for multiclass targets:

- `f1`: `average` unset means 'binary' for two classes (positive = the last class in sorted order,
  as `model.classes_[-1]`) and 'macro' for more; 'micro' and 'weighted' as in `f1_score`. Like
  `f1_score` without `labels=`, a class neither in the holdout nor predicted is not averaged in.
- `roc_auc`: one-vs-rest, 'macro' (unset) or 'weighted' by class prevalence or 'micro', as
  `roc_auc_score(multi_class='ovr')`. A class the model knows but the holdout lacks has no AUC (no
  positives): it is left out of the average, where sklearn would return nan for the whole score.
- `log_loss`: against the model's own class list, as `log_loss(y, proba, labels=model.classes_)`,
  so a holdout lacking a class is fine. A holdout class the model never saw gets probability 0,
  clipped to machine epsilon (a large but finite loss, as sklearn clips).
- `balanced_accuracy`, `accuracy`: as sklearn (recall averaged over the classes in the holdout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from cd4ml.core.errors import SpecError
from cd4ml.core.spec import METRICS, Metric, Promotion

Array = NDArray[Any]
Evaluator = Callable[[Array], Array]

LABEL_METRICS = {"accuracy", "balanced_accuracy", "f1"}
PROBABILITY_METRICS = {"roc_auc", "log_loss"}
REGRESSION_METRICS = {"rmse", "mae", "r2"}
# Rows of (bootstrap draws x holdout cells) held at once; bounds memory on large multiclass holdouts.
_CELLS_PER_CHUNK = 10_000_000


@dataclass(frozen=True, eq=False)
class Scores:
    """What one model says about a holdout, in the form its metric needs.

    `values`: predicted labels (accuracy, balanced_accuracy, f1), predicted values (regression), or
    class probabilities (roc_auc, log_loss): P(classes[-1]) as a vector for a two-class model, else
    an (n, k) matrix whose columns follow `classes`. `classes` is the model's `classes_`.
    `average` carries the spec's `metric.average`, so a caller that passes only the metric's name
    still scores what the spec asked for. Behaves as `values` under `numpy.asarray`.
    """

    values: Array
    classes: tuple[Any, ...] | None = None
    average: str | None = None

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> Array:
        return np.asarray(self.values, dtype=dtype)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)


ScoresLike = Scores | Array


def _weights_ok(w: Array) -> Array:
    return np.atleast_2d(np.asarray(w, dtype=float))


def _name_and_average(
    metric: str | Metric, average: str | None, parts: Iterable[ScoresLike | None]
) -> tuple[str, str | None]:
    """One `average` from the arguments, the Metric and the Scores; conflicting ones are a bug."""
    name = metric.name if isinstance(metric, Metric) else metric
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}")
    given = {a for a in (average, metric.average if isinstance(metric, Metric) else None) if a}
    given |= {p.average for p in parts if isinstance(p, Scores) and p.average}
    if len(given) > 1:
        raise ValueError(f"{name}: conflicting averages {sorted(given)}")
    return name, (given.pop() if given else None)


def _sorted_labels(values: Iterable[Any]) -> list[Any]:
    unique = list(dict.fromkeys(v.item() if isinstance(v, np.generic) else v for v in values))
    try:
        return sorted(unique)
    except TypeError:  # mixed types cannot be ordered: a stable, documented order instead
        return sorted(unique, key=lambda v: (type(v).__name__, str(v)))


def _universe(name: str, y: Array, parts: Sequence[ScoresLike | None]) -> list[Any]:
    """Every class in play: the models' classes, the holdout's and, for label metrics, predicted ones."""
    labels: list[Any] = list(pd.unique(pd.Series(y, dtype=object)))
    for part in parts:
        if part is None:
            continue
        if isinstance(part, Scores) and part.classes is not None:
            labels.extend(part.classes)
        if name in LABEL_METRICS:
            labels.extend(pd.unique(pd.Series(np.asarray(part), dtype=object)))
    return _sorted_labels(labels)


def _resolve_average(name: str, average: str | None, n_classes: int) -> str | None:
    if name not in {"f1", "roc_auc"}:
        return None
    if name == "roc_auc" and n_classes <= 2:
        return "binary"  # as roc_auc_score, which ignores `average` on a binary target
    if average is None:
        return "binary" if n_classes <= 2 else "macro"
    if average == "binary" and n_classes > 2:
        raise SpecError(
            f"metric.average: {name} with average 'binary' needs two classes, found {n_classes}; "
            "set metric.average to 'macro', 'weighted' or 'micro'"
        )
    return average


def _indices(universe: list[Any], values: Array) -> Array:
    idx = pd.Index(universe, dtype=object).get_indexer(pd.Series(values, dtype=object).map(_plain))
    if (idx < 0).any():
        raise ValueError(
            f"labels {sorted(set(np.asarray(values)[idx < 0].tolist()), key=str)} not in {universe}"
        )
    return np.asarray(idx)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _one_hot(idx: Array, k: int) -> Array:
    out = np.zeros((len(idx), k))
    out[np.arange(len(idx)), idx] = 1.0
    return out


def _probability_matrix(part: ScoresLike, universe: list[Any]) -> Array:
    """Class probabilities as (n, len(universe)); classes a model does not know get probability 0."""
    values = np.asarray(part, dtype=float)
    classes = part.classes if isinstance(part, Scores) else None
    k = len(universe)
    if classes is None:
        if values.ndim == 1:
            if k > 2:
                raise ValueError(f"P(positive) scores but {k} classes; pass the model's class list")
            classes = tuple(universe[-2:]) if k == 2 else (None, universe[-1])
        elif values.shape[1] == k:
            classes = tuple(universe)  # sklearn's convention: columns follow the sorted labels
        else:
            raise ValueError(f"{values.shape[1]} probability columns for {k} classes and no class list")
    if values.ndim == 1:
        values = np.column_stack([1.0 - values, values])
    if values.shape[1] != len(classes):
        raise ValueError(f"{values.shape[1]} probability columns for classes {list(classes)}")
    out = np.zeros((values.shape[0], k))
    known = [(j, c) for j, c in enumerate(classes) if c is not None]
    cols = _indices(universe, np.asarray([c for _, c in known], dtype=object))
    out[:, cols] = values[:, [j for j, _ in known]]
    return out


def _evaluator(name: str, y: Array, part: ScoresLike, universe: list[Any], average: str | None) -> Evaluator:
    """A function from weight rows (B, n) to the metric of each row (B,), with the setup done once."""
    values = np.asarray(part)
    if name in REGRESSION_METRICS:
        return _regression(name, y.astype(float), values.astype(float))
    k = len(universe)
    y_idx = _indices(universe, y)
    if name in LABEL_METRICS:
        correct = (y_idx == _indices(universe, values)).astype(float)
        if name == "accuracy":
            return lambda w: np.asarray((w @ correct) / w.sum(axis=1))
        truth = _one_hot(y_idx, k)
        hits = truth * correct[:, None]
        if name == "balanced_accuracy":
            return lambda w: _nanmean_rows(_ratio(w @ hits, w @ truth))
        predicted = _one_hot(_indices(universe, values), k)
        return lambda w: _f1(w @ hits, w @ predicted, w @ truth, average)
    proba = _probability_matrix(part, universe)
    if name == "log_loss":
        eps = np.finfo(float).eps
        loss = -np.log(np.clip(proba[np.arange(len(y_idx)), y_idx], eps, 1 - eps))
        return lambda w: np.asarray((w @ loss) / w.sum(axis=1))
    if average == "binary":
        return _auc_evaluator(y_idx == k - 1, proba[:, k - 1])
    truth = _one_hot(y_idx, k)
    if average == "micro":
        return _auc_evaluator(truth.ravel().astype(bool), proba.ravel(), np.repeat(np.arange(len(y_idx)), k))
    present = [c for c in range(k) if truth[:, c].any()]
    per_class = [_auc_evaluator(y_idx == c, proba[:, c]) for c in present]
    truth = truth[:, present]

    def ovr(w: Array) -> Array:
        aucs = np.column_stack([f(w) for f in per_class]) if per_class else np.full((len(w), 0), np.nan)
        if average == "weighted":
            prevalence = np.where(np.isnan(aucs), 0.0, w @ truth)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.asarray(np.nansum(aucs * prevalence, axis=1) / prevalence.sum(axis=1))
        return _nanmean_rows(aucs)

    return ovr


def _ratio(num: Array, den: Array) -> Array:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan))


def _nanmean_rows(values: Array) -> Array:
    counts = (~np.isnan(values)).sum(axis=1)
    sums = np.nansum(values, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan))


def _f1(tp: Array, predicted: Array, truth: Array, average: str | None) -> Array:
    """F1 from per-class weighted counts (B, k); 0 where a class was neither true nor predicted."""
    denom = predicted + truth  # = 2tp + fp + fn
    if average == "micro":
        return _ratio(2 * tp.sum(axis=1), denom.sum(axis=1))
    per_class = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1.0), 0.0)
    if average == "binary":
        return np.asarray(per_class[:, -1])
    if average == "weighted":
        support = truth.sum(axis=1)
        return np.asarray(
            np.where(support > 0, (per_class * truth).sum(axis=1) / np.where(support > 0, support, 1.0), 0.0)
        )
    # macro: sklearn averages over the labels present in y_true or y_pred, i.e. denom > 0
    return _nanmean_rows(np.where(denom > 0, per_class, np.nan))


def _auc_evaluator(positive: Array, score: Array, rows: Array | None = None) -> Evaluator:
    """AUC = P(score_pos > score_neg) + 0.5 P(tie), for every weight row at once.

    Each positive counts the (weighted) negatives scored below it plus half of those tied with it:
    half the sum of the negatives' cumulative weight just before and just after its score.
    `rows[i]` is the weight column of item i (micro-averaging scores n x k items with n weights).
    """
    positive = np.asarray(positive, dtype=bool)
    pos = np.flatnonzero(positive)
    neg = np.flatnonzero(~positive)
    neg = neg[np.argsort(score[neg], kind="mergesort")]
    neg_scores = score[neg]
    below = np.searchsorted(neg_scores, score[pos], side="left")
    up_to = np.searchsorted(neg_scores, score[pos], side="right")
    neg_cols, pos_cols = (neg, pos) if rows is None else (rows[neg], rows[pos])

    def auc(w: Array) -> Array:
        cum = np.zeros((len(w), len(neg) + 1))
        np.cumsum(w[:, neg_cols], axis=1, out=cum[:, 1:])
        w_pos = w[:, pos_cols]
        numerator = 0.5 * (w_pos * (cum[:, below] + cum[:, up_to])).sum(axis=1)
        denom = w_pos.sum(axis=1) * cum[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(np.where(denom > 0, numerator / np.where(denom > 0, denom, 1.0), np.nan))

    return auc


def _regression(name: str, y: Array, pred: Array) -> Evaluator:
    err = pred - y
    if name == "rmse":
        return lambda w: np.asarray(np.sqrt((w @ err**2) / w.sum(axis=1)))
    if name == "mae":
        return lambda w: np.asarray((w @ np.abs(err)) / w.sum(axis=1))

    def r2(w: Array) -> Array:
        total = w.sum(axis=1)
        mean = (w @ y) / total
        ss_tot = (w * (y[None, :] - mean[:, None]) ** 2).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(1 - (w @ err**2) / ss_tot)

    return r2


def _prepare(
    metric: str | Metric,
    y_true: Array,
    parts: Sequence[ScoresLike | None],
    average: str | None,
) -> tuple[str, Array, list[Any], str | None]:
    name, wanted = _name_and_average(metric, average, parts)
    y = np.asarray(y_true)
    if name in REGRESSION_METRICS:
        return name, y, [], None
    universe = _universe(name, y, parts)
    return name, y, universe, _resolve_average(name, wanted, len(universe))


def weighted_metric(
    metric: str | Metric,
    y_true: Array,
    scores: ScoresLike,
    weights: Array,
    *,
    average: str | None = None,
) -> Array:
    """Metric of each weight row (shape (B, n)). `scores` as in `Scores`: labels, values, or
    probabilities (a plain 2-D array's columns are taken to follow the sorted classes of
    `y_true`, as sklearn does). Returns shape (B,)."""
    name, y, universe, avg = _prepare(metric, y_true, [scores], average)
    return _evaluator(name, y, scores, universe, avg)(_weights_ok(weights))


def score(metric: str | Metric, y_true: Array, scores: ScoresLike, *, average: str | None = None) -> float:
    return float(weighted_metric(metric, y_true, scores, np.ones((1, len(y_true))), average=average)[0])


def paired_bootstrap(
    metric: str | Metric,
    y_true: Array,
    challenger: ScoresLike,
    champion: ScoresLike,
    *,
    resamples: int,
    seed: int,
    chunk: int = 200,
    average: str | None = None,
) -> Array:
    """Differences (challenger - champion, oriented so that positive = challenger better)."""
    name, y, universe, avg = _prepare(metric, y_true, [challenger, champion], average)
    first = _evaluator(name, y, challenger, universe, avg)
    second = _evaluator(name, y, champion, universe, avg)
    return _bootstrap(name, len(y), len(universe), first, second, resamples, seed, chunk)


def _bootstrap(
    name: str, n: int, k: int, first: Evaluator, second: Evaluator, resamples: int, seed: int, chunk: int
) -> Array:
    sign = 1.0 if METRICS[name][1] == "maximize" else -1.0
    chunk = max(1, min(chunk, _CELLS_PER_CHUNK // max(1, n * max(1, k))))
    rng = np.random.default_rng(seed)
    diffs = []
    done = 0
    while done < resamples:
        b = min(chunk, resamples - done)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(float)
        diffs.append(sign * (first(weights) - second(weights)))
        done += b
    out = np.concatenate(diffs)
    return out[np.isfinite(out)]  # resamples with a single class have no AUC


@dataclass(frozen=True)
class BusinessValues:
    """Both models' business value on the same holdout (`cd4ml.ml.business`): mean value per
    prediction in `unit`, higher is better; `gate` is the spec's `business.gate`."""

    name: str
    unit: str
    gate: bool
    challenger: float
    champion: float | None = None


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
    average: str | None = None
    classes: int | None = None
    # The spec's business metric on the same holdout (all None when the spec has no business section).
    business_metric: str | None = None
    business_unit: str | None = None
    business_gate: bool | None = None
    challenger_business_value: float | None = None
    champion_business_value: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _business_fields(business: BusinessValues | None) -> dict[str, Any]:
    if business is None:
        return {}
    return dict(
        business_metric=business.name,
        business_unit=business.unit,
        business_gate=business.gate,
        challenger_business_value=business.challenger,
        champion_business_value=business.champion,
    )


def _business_verdict(decision: Decision, business: BusinessValues | None) -> Decision:
    """With `business.gate`, a challenger worth less than the champion on the same holdout is rejected,
    whatever its ML metric says; the reason names the business metric, both values and the setting."""
    if business is None or not business.gate or business.champion is None:
        return decision
    if business.challenger >= business.champion:
        if decision.promote:
            return replace(decision, reason=(
                f"{decision.reason}; business metric {business.name} {_money(business.challenger, business)} "
                f"does not fall below the champion's {_money(business.champion, business)} (business.gate)"
            ))  # fmt: skip
        return decision
    fall = (
        f"business metric {business.name} {_money(business.challenger, business)} is below the "
        f"champion's {_money(business.champion, business)} on the same holdout, and business.gate is true"
    )
    if decision.promote:
        return replace(
            decision, promote=False, reason=f"rejected: {fall} (the ML metric alone: {decision.reason})"
        )
    return replace(decision, reason=f"{decision.reason}; also {fall}")


def _money(value: float, business: BusinessValues) -> str:
    return f"{value:.4f} {business.unit} per prediction" if business.unit else f"{value:.4f} per prediction"


def _meets_floor(name: str, value: float, floor: float | None) -> bool:
    if floor is None:
        return True
    return value >= floor if METRICS[name][1] == "maximize" else value <= floor


def decide(
    metric: str | Metric,
    policy: Promotion,
    y_true: Array,
    challenger: ScoresLike,
    champion: ScoresLike | None,
    *,
    champion_version: str | None,
    seed: int,
    average: str | None = None,
    business: BusinessValues | None = None,
) -> Decision:
    """Promote only if the challenger meets the floor and, when there is a champion, the lower bound
    of the one-sided confidence interval of (challenger - champion) exceeds `min_improvement`.

    Both models are scored over the same classes (theirs and the holdout's) with the same average.
    `business` (both models' business value on the same holdout) is recorded in the decision; with
    its `gate`, a challenger worth less than the champion is rejected too (a point comparison: the
    value must not fall, a tie passes)."""
    return _business_verdict(
        _decide(metric, policy, y_true, challenger, champion, champion_version=champion_version, seed=seed,
                average=average, extra=_business_fields(business)),
        business,
    )  # fmt: skip


def _decide(
    metric: str | Metric,
    policy: Promotion,
    y_true: Array,
    challenger: ScoresLike,
    champion: ScoresLike | None,
    *,
    champion_version: str | None,
    seed: int,
    average: str | None,
    extra: dict[str, Any],
) -> Decision:
    name, y, universe, avg = _prepare(metric, y_true, [challenger, champion], average)
    n = len(y)
    ones = np.ones((1, n))
    judge_challenger = _evaluator(name, y, challenger, universe, avg)
    challenger_score = float(judge_challenger(ones)[0])
    base: dict[str, Any] = dict(
        metric=name,
        direction=METRICS[name][1],
        challenger_score=challenger_score,
        confidence=policy.confidence,
        min_improvement=policy.min_improvement,
        floor=policy.floor,
        n=n,
        average=avg,
        classes=len(universe) or None,
        **extra,
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
    judge_champion = _evaluator(name, y, champion, universe, avg)
    champion_score = float(judge_champion(ones)[0])
    diffs = _bootstrap(
        name, n, len(universe), judge_challenger, judge_champion, policy.bootstrap_resamples, seed, 200
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
