"""The drift check behind `<model>__monitor`: reference vs current window, report, decision.

reference  the snapshot of the data the current champion was trained on, read from MLflow
           (`registry.reference_frame`: an artifact of the version, or for versions registered
           before that, the local path in its tags)
current    what the prediction service received since the last check; when there was no traffic,
           the batches accepted since then that the champion has not been trained on
verdicts   `cd4ml.ml.drift` on the full data; the Evidently report on a seeded, stratified sample
decision   `cd4ml.ml.drift.decide_drift` (threshold, performance drop, min rows, cooldown)

Live performance: the champion's primary metric on labelled served traffic (ground truth sent back
by request id, `cd4ml.data.feedback`). Labels arrive late -- hours or days after the prediction --
so a check cannot judge "the traffic since the last check". The live window of a check ending at
`end` is instead:

  * the champion version's predictions made in the trailing LIVE_WINDOW_HOURS before `end`
    (`ts` in [end - LIVE_WINDOW_HOURS, end), as `feedback.labelled_predictions` reads them),
  * that have a label received by `end` (`labelled_at <= end`: re-running a past check gives the
    same answer, and a label that arrives later joins the next check's window as long as its
    prediction is still inside it);
  * label coverage = those labelled rows / every row the champion version served in the window.

Each check reports the metric (`cd4ml.ml.evaluation.score`, the same code as the promotion gate),
a bootstrap interval at `promotion.confidence` (each bound one-sided, as the gate's), the coverage,
the business value when the spec has a `business` section, and the champion's holdout score at
promotion (its decision's `challenger_score`) as the baseline. Below `promotion.min_holdout_rows`
labelled rows nothing is judged. The drop is sign-adjusted (positive = worse); it is significant
when even the interval's better bound is worse than the baseline by more than
`drift.performance_drop` (by more than 0 when that is unset: reported, never acted on). A
significant drop triggers retraining through `decide_drift`'s cooldown rules, with the evidence
in the `drift_detected` event. Windows overlap from one check to the next on purpose: the label
of an old prediction counts as soon as it arrives.

Drift during a cooldown is not silent: the check asks for one notice per cooldown period
(`cooldown_notice` in its summary, sent by the DAG's notifier; the last one sent is in the state).

State (last window end, last retrain trigger, last cooldown notice) and the history (one JSON line
per check, read by the Models view and /cd4ml/metrics) live in `<data>/<model>/monitor/`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cd4ml import registry
from cd4ml.core.errors import DataError, SpecError
from cd4ml.core.paths import ModelPaths
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec
from cd4ml.data import landing

log = logging.getLogger(__name__)
EVIDENTLY_SAMPLE_CAP = 20_000
# How far back a check looks for labelled predictions of the champion (see the module docstring):
# a week lets labels that arrive days late count, and keeps a slow weekly cycle inside one window.
LIVE_WINDOW_HOURS = 168.0
# Above this many labelled rows the bootstrap resamples a seeded subsample of this size and scales
# the spread by sqrt(m/n) (the m-out-of-n bootstrap): every metric here is asymptotically normal,
# and 1,000 resamples of a million rows would cost minutes for an interval a few 1e-4 wide.
LIVE_BOOTSTRAP_ROWS = 20_000
# Bootstrap draws (x rows) held in memory at once.
_BOOTSTRAP_CELLS = 10_000_000


def _parse(ts: str | None) -> datetime | None:
    if not ts:
        return None
    value = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def monitor_paths(settings: Settings, model: str) -> ModelPaths:
    paths = ModelPaths.for_model(settings, model)
    paths.monitor.mkdir(parents=True, exist_ok=True)
    return paths


def load_state(settings: Settings, model: str) -> dict[str, Any]:
    path = monitor_paths(settings, model).monitor_state
    return dict(json.loads(path.read_text())) if path.exists() else {}


def save_state(settings: Settings, model: str, state: dict[str, Any]) -> None:
    path = monitor_paths(settings, model).monitor_state
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, path)


def history(settings: Settings, model: str) -> list[dict[str, Any]]:
    path = monitor_paths(settings, model).monitor_history
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _current_window(
    spec: ModelSpec, settings: Settings, start: datetime | None, end: datetime, trained_through: str
) -> tuple[Any, str, bool, Any]:
    """(features frame, source, already trained on, labelled frame or None)."""
    import pandas as pd

    from cd4ml.data.tables import read_table
    from cd4ml.data.validation import normalise
    from cd4ml.serving.predlog import read_predictions

    traffic = read_predictions(settings.data_dir, spec.name, since=start)
    if not traffic.empty:
        mask = traffic["ts"] <= pd.Timestamp(end)
        if start is not None:
            mask &= traffic["ts"] > pd.Timestamp(start)
        traffic = traffic[mask]
    zone = ModelPaths.for_model(settings, spec.name)
    batches = [
        f for f in landing.list_accepted(zone)
        if (start is None or (_parse(f.accepted_at) or end) > start) and (_parse(f.accepted_at) or end) <= end
    ]  # fmt: skip
    new_batches = [f for f in batches if f.accepted_at > trained_through]
    labelled = None
    if new_batches:
        labelled = pd.concat(
            [normalise(spec, read_table(Path(f.path))) for f in new_batches], ignore_index=True
        )
    if not traffic.empty:
        return traffic, "prediction log", False, labelled
    if labelled is not None:
        return labelled, f"{len(new_batches)} newly accepted batch(es)", False, labelled
    already = bool(batches)  # batches arrived, but the champion was trained on all of them
    empty = pd.DataFrame(columns=spec.feature_names)
    return empty, "accepted batches the champion was trained on" if already else "nothing", already, None


def check_drift(
    spec: ModelSpec,
    settings: Settings,
    *,
    run_id: str,
    window_end: str,
    window_hours: float | None = None,
) -> dict[str, Any]:
    """One drift check; returns a small JSON-able summary with the decision."""
    import pandas as pd

    from cd4ml.ml import drift
    from cd4ml.steps.pipeline import run_key

    client = registry.client(settings.mlflow_tracking_uri)
    champion = registry.version_by_alias(client, spec.name, registry.CHAMPION)
    if champion is None:  # a new model: nothing serves yet, so there is nothing to compare
        reason = f"{spec.name}: no champion yet; nothing to monitor"
        log.info(reason)
        return {"model": spec.name, "champion_version": None, "window": {"end": window_end, "rows": 0},
                "share": 0.0, "drifted_columns": [], "report_uri": None, "live": None,
                "cooldown_notice": False,
                "decision": {"drift": False, "trigger": False, "reason": reason}}  # fmt: skip
    tags = champion.tags or {}
    # Read first: without a reference there is nothing to compare, whatever the window holds.
    reference = registry.reference_frame(client, spec.name, champion, "train")
    evidence = registry.read_evidence(client, spec.name, champion)
    state = load_state(settings, spec.name)
    end = _parse(window_end) or datetime.now(UTC)
    start: datetime | None
    if window_hours:
        start = end - pd.Timedelta(hours=window_hours).to_pytimedelta()
    else:
        start = _parse(state.get("last_window_end")) or _parse(tags.get("cd4ml.promoted_at"))
    trained_through = tags.get("cd4ml.trained_through", "")
    current, source, already, labelled = _current_window(spec, settings, start, end, trained_through)
    summary: dict[str, Any] = {
        "model": spec.name,
        "champion_version": str(champion.version),
        "window": {
            "start": start.isoformat() if start else None,
            "end": end.isoformat(),
            "source": source,
            "rows": len(current),
        },
    }
    summary["new_categories"] = _new_categories(
        spec, _known_categories(spec, client, champion, reference, evidence), current
    )
    report_dir = ModelPaths.for_model(settings, spec.name).drift_report_dir(run_key(run_id))
    report_dir.mkdir(parents=True, exist_ok=True)
    loaded: list[Any] = []

    def model() -> Any:  # loaded once, and only when something needs predictions
        if not loaded:
            uri = f"models:/{spec.name}/{champion.version}"
            loaded.append(registry.load_model(settings.mlflow_tracking_uri, uri))
        return loaded[0]

    performance_drop = None
    if len(current) >= spec.drift.min_rows:
        summary.update(_measure(spec, model(), reference, current, report_dir))
        if labelled is not None and len(labelled) >= spec.promotion.min_holdout_rows:
            summary["performance"] = _performance(spec, model(), labelled, evidence.decision)
            performance_drop = summary["performance"]["drop"]
    else:
        summary.update({"share": 0.0, "drifted_columns": [], "columns": []})
        (report_dir / "report.html").write_text(
            f"<html><body><h1>{spec.name}: not enough data</h1><p>{len(current)} rows in the window "
            f"({source}); at least {spec.drift.min_rows} are needed to judge drift.</p></body></html>"
        )
    live, left_out = live_check(spec, settings, str(champion.version), evidence.decision, end, model)
    summary["live"] = {**live.as_dict(), "left_out": left_out}
    last_trigger = _parse(state.get("last_trigger_at"))
    features_decision = drift.decide_drift(
        spec.drift,
        window_rows=len(current),
        share=float(summary["share"]),
        performance_drop=performance_drop,
        now=end,
        last_trigger_at=last_trigger,
        window_already_trained_on=already,
    )
    decision = decide_with_live(spec.drift, features_decision, live, now=end, last_trigger_at=last_trigger)
    notice = cooldown_notice_due(
        spec.drift, decision, now=end, last_trigger_at=last_trigger,
        last_notice_at=_parse(state.get("last_cooldown_notice_at")),
        held_for_another_reason=already and decision is features_decision,
    )  # fmt: skip
    summary["decision"] = {"drift": decision.drift, "trigger": decision.trigger, "reason": decision.reason}
    summary["cooldown_notice"] = notice
    summary["report_uri"] = (report_dir / "report.html").as_uri()
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["mlflow_run_id"] = _log_to_mlflow(spec, settings, summary, report_dir, run_id)
    state["last_window_end"] = end.isoformat()
    if notice:  # asked for now, so no second one in this cooldown period (sent by the DAG's notifier)
        state["last_cooldown_notice_at"] = end.isoformat()
    save_state(settings, spec.name, state)
    keep = (
        "window",
        "share",
        "drifted_columns",
        "no_data_columns",
        "new_categories",
        "decision",
        "report_uri",
        "champion_version",
        "live",
        "performance",
    )
    with monitor_paths(settings, spec.name).monitor_history.open("a") as fh:
        fh.write(json.dumps({k: summary[k] for k in keep if k in summary}, default=str) + "\n")
    log.info("%s: %s", spec.name, decision.reason)
    return {k: v for k, v in summary.items() if k != "columns"}


def live_check(
    spec: ModelSpec, settings: Settings, version: str, decision: dict[str, Any], end: datetime, model: Any
) -> tuple[LivePerformance, dict[str, int]]:
    """Live performance of `version` over the window ending at `end` (see the module docstring).
    `model` is a function returning the loaded champion; called only when there are labels."""
    from cd4ml.data import feedback

    paths = ModelPaths.for_model(settings, spec.name)
    start = end - timedelta(hours=LIVE_WINDOW_HOURS)
    labelled = feedback.labelled_predictions(paths, since=start, until=end)
    rows, left_out = live_rows(labelled, version=version, start=start, end=end)
    del labelled  # a week of labelled traffic: the rows judged are a copy, this need not stay alive
    served = feedback.served_rows(paths, since=start, until=end, version=version)
    number = lambda key: float(v) if isinstance(v := decision.get(key), int | float) else None  # noqa: E731
    live = live_performance(
        spec, model() if len(rows) else None, rows, served_rows=served, version=version,
        baseline=number("challenger_score"), start=start, end=end,
        business_baseline=number("challenger_business_value"),
    )  # fmt: skip
    log.info("%s: %s", spec.name, live.reason)
    return live, left_out


def cooldown_until(policy: Any, now: datetime, last_trigger_at: datetime | None) -> datetime | None:
    """When the current cooldown ends, or None outside one (`drift.cooldown_hours`)."""
    if last_trigger_at is None:
        return None
    until = last_trigger_at + timedelta(hours=policy.cooldown_hours)
    return until if now < until else None


def decide_with_live(
    policy: Any, features: Any, live: LivePerformance, *, now: datetime, last_trigger_at: datetime | None
) -> Any:
    """The feature-drift decision, plus retraining on a significant live drop beyond
    `drift.performance_drop` (judged on its own labelled rows, whatever the size of the drift
    window), under the same cooldown."""
    from cd4ml.ml.drift import DriftDecision

    if policy.performance_drop is None or not live.significant:
        return features
    why = f"{live.reason} > drift.performance_drop {policy.performance_drop}"
    if features.trigger:
        return DriftDecision(True, True, f"{features.reason}; {why}")
    also = f" (features: {features.reason})"
    until = cooldown_until(policy, now, last_trigger_at)
    if until is not None:
        return DriftDecision(True, False, f"{why}; cooldown: no retrain before {until.isoformat()}{also}")
    return DriftDecision(True, True, why + also)


def cooldown_notice_due(
    policy: Any, decision: Any, *, now: datetime, last_trigger_at: datetime | None,
    last_notice_at: datetime | None, held_for_another_reason: bool = False,
) -> bool:  # fmt: skip
    """Drift that the cooldown keeps from retraining gets one notice per cooldown period: the
    period starts at the last trigger, and a notice sent since then covers it. Drift held back for
    another reason (the champion was already trained on the window) needs no one's attention."""
    if not decision.drift or decision.trigger or held_for_another_reason:
        return False
    if last_trigger_at is None or cooldown_until(policy, now, last_trigger_at) is None:
        return False
    return last_notice_at is None or last_notice_at < last_trigger_at


def _known_categories(
    spec: ModelSpec, client: Any, champion: Any, reference: Any, evidence: registry.Evidence
) -> dict[str, set[str]]:
    """Every categorical value in the champion's data (train + holdout). A snapshot stored as a
    sample carries the distinct values of the whole table, so a rare value is not reported as new."""
    known: dict[str, set[str]] = {c: set() for c in spec.categorical}
    if not spec.categorical:
        return known
    frames = [reference]
    try:
        frames.append(registry.reference_frame(client, spec.name, champion, "holdout",
                                               columns=list(spec.categorical)))  # fmt: skip
    except registry.EvidenceMissingError as err:
        log.info("%s: categories from the training snapshot only: %s", spec.name, err)
    for frame in frames:
        for col in spec.categorical:
            if col in frame:
                known[col].update(frame[col].dropna().astype(str).unique().tolist())
    for info in evidence.snapshots.values():
        for col, values in (info.get("categories") or {}).items():
            if col in known:
                known[col].update(values)
    return known


def _new_categories(spec: ModelSpec, known: dict[str, set[str]], current: Any) -> dict[str, Any]:
    """Categorical values in the window that the champion never saw in its data (train + holdout).

    Validation lets a share of rows with new values through (validation.max_new_category_fraction),
    and the service answers them; this is where they become visible before the next retrain.
    """
    from cd4ml.data.validation import Reference, new_category_values

    if not spec.categorical or current.empty:
        return {}
    reference = Reference(categories={c: sorted(v) for c, v in known.items() if v})
    found = new_category_values(spec, reference, current)
    for col, info in found.items():
        log.info("%s: %d row(s) with values of %r the champion never saw: %s",
                 spec.name, info["rows"], col, list(info["values"])[:5])  # fmt: skip
    return found


def _measure(spec: ModelSpec, model: Any, reference: Any, current: Any, report_dir: Path) -> dict[str, Any]:
    """Feature and prediction drift on all rows; the Evidently report on a stratified sample."""
    import pandas as pd

    from cd4ml.ml import drift, training

    now = training.features(spec, current)
    ref = training.features(spec, reference)
    result = drift.dataset_drift(ref, now, spec.numerical, spec.categorical)
    ref_pred = pd.Series(model.predict(ref))
    cur_pred = current["prediction"] if "prediction" in current else pd.Series(model.predict(now))
    if spec.task == "classification":
        pred = drift.column_drift("prediction", ref_pred.astype(object), cur_pred.astype(object), "cat")
    else:
        pred = drift.column_drift("prediction", ref_pred, cur_pred, "num")
    n = drift.sample_size(min(len(ref), len(now)), cap=EVIDENTLY_SAMPLE_CAP)
    ref_sample = drift.stratified_sample(
        ref.assign(prediction=ref_pred.to_numpy()), n, by="prediction", seed=spec.seed
    )
    cur_sample = drift.stratified_sample(
        now.assign(prediction=cur_pred.to_numpy()), n, by="prediction", seed=spec.seed
    )
    report = drift.run_evidently(ref_sample, cur_sample, spec.numerical, spec.categorical)
    report.save_html(str(report_dir / "report.html"))
    report.save_json(str(report_dir / "report.json"))
    return {
        **result.as_dict(),
        "prediction_drift": {"score": pred.score, "method": pred.method, "drifted": pred.drifted},
        "sample": {
            "rows": n,
            "stratified_by": "prediction",
            "seed": spec.seed,
            "why": "Evidently renders its plots from this sample; the verdicts above use all rows",
        },
    }


def _performance(spec: ModelSpec, model: Any, labelled: Any, decision: dict[str, Any]) -> dict[str, Any]:
    """The champion's primary metric on newly labelled rows vs its holdout score at promotion."""
    from cd4ml.ml import training
    from cd4ml.ml.evaluation import score

    baseline = decision.get("challenger_score")
    now_score = score(
        spec.metric.name, labelled[spec.target].to_numpy(), training.metric_inputs(spec, model, labelled)
    )
    sign = 1.0 if spec.metric.higher_is_better else -1.0
    drop = sign * (baseline - now_score) if baseline is not None else None
    return {
        "metric": spec.metric.name,
        "baseline": baseline,
        "window": now_score,
        "drop": drop,
        "rows": len(labelled),
    }


def _log_to_mlflow(
    spec: ModelSpec, settings: Settings, summary: dict[str, Any], report_dir: Path, run_id: str
) -> str:
    """A monitoring run per check, linked to the champion version by tags."""
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment(f"{spec.name}-monitoring")
    tags = {
        "cd4ml.model": spec.name,
        "cd4ml.model_version": summary["champion_version"],
        "cd4ml.airflow_run_id": run_id,
        "cd4ml.decision": summary["decision"]["reason"][:500],
    }
    metrics = {
        "drift_share": float(summary["share"]),
        "window_rows": float(summary["window"]["rows"]),
        "drifted_columns": float(len(summary["drifted_columns"])),
        "new_category_rows": float(sum(c["rows"] for c in summary.get("new_categories", {}).values())),
        **_live_metrics(summary.get("live")),
    }
    if summary.get("live"):
        tags["cd4ml.live_metric"] = summary["live"]["metric"]
        tags["cd4ml.live"] = summary["live"]["reason"][:500]
    with mlflow.start_run(run_name=f"drift check {run_id}", tags=tags) as run:
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(report_dir), artifact_path="drift_report")
    summary["experiment_id"] = str(run.info.experiment_id)
    return str(run.info.run_id)


def _live_metrics(live: dict[str, Any] | None) -> dict[str, float]:
    """The live figures as MLflow metrics; what a check could not judge is left out, not zero."""
    if not live:
        return {}
    names = {
        "live_metric": "value", "live_metric_low": "low", "live_metric_high": "high",
        "live_metric_baseline": "baseline", "live_metric_drop": "drop", "label_coverage": "coverage",
        "business_value": "business_value",
    }  # fmt: skip
    out = {name: float(live[key]) for name, key in names.items() if live.get(key) is not None}
    out["labelled_rows"] = float(live.get("labelled_rows") or 0)
    out["served_rows"] = float(live.get("served_rows") or 0)
    if live.get("value") is not None:
        out["live_metric_drop_significant"] = 1.0 if live.get("significant") else 0.0
    return out


def record_trigger(settings: Settings, model: str, at: str) -> None:
    """Start the cooldown; called when the drift_detected event is emitted."""
    state = load_state(settings, model)
    state["last_trigger_at"] = at
    save_state(settings, model, state)


# -- live performance on labelled served traffic --------------------------------------------------


@dataclass(frozen=True)
class LivePerformance:
    """One check's judgement of the champion on its labelled traffic (JSON-able by `as_dict`)."""

    metric: str
    version: str
    window_start: str
    window_end: str
    labelled_rows: int
    served_rows: int
    coverage: float | None  # labelled / served rows of the version in the window
    value: float | None  # None: nothing judged (see `reason`)
    low: float | None
    high: float | None
    confidence: float
    baseline: float | None  # the champion's holdout score at promotion
    drop: float | None  # sign-adjusted: positive = worse than the baseline
    drop_at_better_bound: float | None
    significant: bool
    business_value: float | None
    unusable_labels: int  # outcomes that match none of the model's classes / are no number
    reason: str
    business_baseline: float | None = None  # the champion's business value on its holdout

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def label_key(value: Any) -> Any:
    """How an outcome is matched to a class: as categories are compared everywhere
    (`tables.category_text`: 1, 1.0 and "1" are one class), and a numeric string as its number."""
    from cd4ml.data.tables import category_text

    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            return text
        return category_text(number) if math.isfinite(number) else text
    return category_text(value)


def cast_outcomes(values: Any, classes: tuple[Any, ...] | None) -> tuple[Any, Any]:
    """Outcomes as the model's own class values (classification) or floats (regression, `classes`
    None): labels arrive as whatever JSON or a CSV made of them ("1", 1, 1.0, True). Returns
    (values, usable mask); an outcome that is no number (regression) or matches no class of a
    model with numeric classes is unusable. A new text class stays, as text: it is a class the
    champion cannot predict, and leaving it out would flatter the champion."""
    import numpy as np
    import pandas as pd

    series = pd.Series(values).reset_index(drop=True)
    if classes is None:
        numbers = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        return numbers, np.isfinite(numbers)
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    by_key = {label_key(c): c for c in classes}
    numeric_classes = all(isinstance(c, int | float | np.integer | np.floating) for c in classes)
    mapped: list[Any] = []
    usable_unique: list[bool] = []
    for u in uniques:
        key = label_key(u)
        if key in by_key:
            mapped.append(by_key[key])
            usable_unique.append(True)
        elif numeric_classes or not isinstance(key, str):
            mapped.append(None)
            usable_unique.append(False)
        else:
            mapped.append(key)
            usable_unique.append(True)
    table = np.asarray([*mapped, None], dtype=object)
    usable = np.asarray([*usable_unique, False], dtype=bool)[codes]  # code -1 (null) -> the last slot
    out = table[codes]
    if usable.all() and all(m in classes for m in mapped):
        out = out.astype(np.asarray(classes).dtype)  # plain class dtype where nothing new came in
    return out, usable


def bootstrap_interval(
    metric: Any,
    y_true: Any,
    scores: Any,
    *,
    resamples: int,
    confidence: float,
    seed: int,
    max_rows: int | None = None,
) -> tuple[float, float | None, float | None]:
    """(value, low, high): the metric on all rows and its bootstrap interval, each bound one-sided
    at `confidence` (the promotion gate's convention). Resampling weights are multinomial counts
    (rows drawn with replacement), scored by `evaluation.weighted_metric` as the gate's paired
    bootstrap does. Above `max_rows` rows (default LIVE_BOOTSTRAP_ROWS) a seeded subsample of
    `max_rows` is resampled and its spread scaled by sqrt(m/n). (None, None) bounds: fewer than
    half the resamples could be scored (a metric undefined on most draws, e.g. AUC of one class)."""
    import numpy as np

    from cd4ml.ml.evaluation import Scores, score, weighted_metric

    y = np.asarray(y_true)
    value = score(metric, y, scores)
    n = len(y)
    if n == 0 or not math.isfinite(value):
        return value, None, None
    rng = np.random.default_rng(seed)
    max_rows = LIVE_BOOTSTRAP_ROWS if max_rows is None else max_rows  # read when called: settable
    if n > max_rows:
        idx = np.sort(rng.choice(n, size=max_rows, replace=False))
        y_sub = y[idx]
        if isinstance(scores, Scores):
            sub: Any = Scores(np.asarray(scores.values)[idx], scores.classes, scores.average)
        else:
            sub = np.asarray(scores)[idx]
        centre = score(metric, y_sub, sub)
    else:
        y_sub, sub, centre = y, scores, value
    m = len(y_sub)
    width = int(np.asarray(sub).shape[1]) if np.asarray(sub).ndim == 2 else 1
    chunk = max(1, min(200, _BOOTSTRAP_CELLS // max(1, m * width)))
    draws = []
    for done in range(0, resamples, chunk):
        b = min(chunk, resamples - done)
        # Counts of m rows drawn with replacement (a multinomial draw), for b resamples at once.
        picks = rng.integers(0, m, size=(b, m)) + (np.arange(b) * m)[:, None]
        weights = np.bincount(picks.ravel(), minlength=b * m).reshape(b, m).astype(float)
        draws.append(weighted_metric(metric, y_sub, sub, weights))
    found = np.concatenate(draws)
    found = found[np.isfinite(found)]
    if len(found) < resamples // 2 or not math.isfinite(centre):
        return value, None, None
    scale = math.sqrt(m / n)
    alpha = 1.0 - confidence
    low = value + scale * (float(np.quantile(found, alpha)) - centre)
    high = value + scale * (float(np.quantile(found, 1.0 - alpha)) - centre)
    return value, low, high


def judge_drop(
    *,
    higher_is_better: bool,
    value: float,
    low: float | None,
    high: float | None,
    baseline: float | None,
    limit: float | None,
) -> tuple[float | None, float | None, bool]:
    """(drop, drop at the interval's better bound, significant), drops sign-adjusted so that
    positive = worse. Significant: even the better bound is worse than the baseline by more than
    `limit` (more than 0 when the spec sets no `drift.performance_drop`)."""
    if baseline is None or not math.isfinite(baseline):
        return None, None, False
    sign = 1.0 if higher_is_better else -1.0
    drop = sign * (baseline - value)
    better = high if higher_is_better else low
    if better is None:
        return drop, None, False
    at_better = sign * (baseline - better)
    return drop, at_better, at_better > (limit or 0.0)


def live_rows(labelled: Any, *, version: str, start: datetime, end: datetime) -> tuple[Any, dict[str, int]]:
    """The labelled predictions a check judges: the version's, predicted in [start, end) (the
    window `feedback.served_rows` counts too), labelled by `end`. Also counts what was left out."""
    import pandas as pd

    if labelled is None or len(labelled) == 0:
        return pd.DataFrame(), {"other_versions": 0, "labelled_after_check": 0, "outside_window": 0}
    ts = pd.to_datetime(labelled["ts"], utc=True)
    at = pd.to_datetime(labelled["labelled_at"], utc=True)
    in_window = (ts >= pd.Timestamp(start)) & (ts < pd.Timestamp(end))
    ours = labelled["model_version"].astype(str) == str(version)
    known = at <= pd.Timestamp(end)
    left_out = {
        "other_versions": int((in_window & ~ours).sum()),
        "labelled_after_check": int((in_window & ours & ~known).sum()),
        "outside_window": int((~in_window).sum()),
    }
    return labelled[in_window & ours & known].reset_index(drop=True), left_out


def live_performance(
    spec: ModelSpec,
    model: Any,
    rows: Any,
    *,
    served_rows: int,
    version: str,
    baseline: float | None,
    start: datetime,
    end: datetime,
    business_baseline: float | None = None,
) -> LivePerformance:
    """Judge the champion on the labelled rows of its window (`live_rows`). `model` re-scores the
    logged features for the metric (probability metrics need what the log does not keep); the
    business value is computed on what was served, the logged `prediction`."""
    from cd4ml.ml import training

    metric = spec.metric.name
    base: dict[str, Any] = dict(
        metric=metric, version=str(version), window_start=start.isoformat(), window_end=end.isoformat(),
        served_rows=int(served_rows), confidence=spec.promotion.confidence, baseline=baseline,
        value=None, low=None, high=None, drop=None, drop_at_better_bound=None, significant=False,
        business_value=None, business_baseline=business_baseline,
    )  # fmt: skip
    labelled = len(rows)
    coverage = min(1.0, labelled / served_rows) if served_rows else None
    if labelled == 0:
        why = f"no labels yet for version {version}'s predictions in the window"
        return LivePerformance(labelled_rows=0, coverage=coverage, unusable_labels=0, reason=why, **base)
    classes = None if spec.task == "regression" else tuple(model.classes_.tolist())
    y, usable = cast_outcomes(rows["outcome"].to_numpy(), classes)
    unusable = int((~usable).sum())
    if unusable:  # (a copy of a million rows only when some must go)
        rows, y = rows[usable].reset_index(drop=True), y[usable]
    need = spec.promotion.min_holdout_rows
    if len(rows) < need:
        return LivePerformance(labelled_rows=len(rows), coverage=coverage, unusable_labels=unusable, **base,
                               reason=f"too few labels to judge: {len(rows)} usable labelled rows, "
                                      f"{need} needed (promotion.min_holdout_rows)")  # fmt: skip
    if unusable:
        coverage = min(1.0, len(rows) / served_rows) if served_rows else None
    value, low, high = bootstrap_interval(
        spec.metric, y, training.metric_inputs(spec, model, rows),
        resamples=spec.promotion.bootstrap_resamples, confidence=spec.promotion.confidence, seed=spec.seed,
    )  # fmt: skip
    if not math.isfinite(value):
        return LivePerformance(labelled_rows=len(rows), coverage=coverage, unusable_labels=unusable,
                               **{**base, "value": None},
                               reason=f"{metric} is undefined on these {len(rows)} labelled rows "
                                      "(one class only?)")  # fmt: skip
    drop, at_better, significant = judge_drop(
        higher_is_better=spec.metric.higher_is_better, value=value, low=low, high=high,
        baseline=baseline, limit=spec.drift.performance_drop,
    )  # fmt: skip
    try:
        business = _business_value(spec, rows, classes)
    except (SpecError, DataError) as err:  # reported with the check; the ML metric still stands
        log.warning("%s: business value not computed: %s", spec.name, err)
        business, business_error = None, f"; business value not computed: {err}"
    else:
        business_error = ""
    interval = f"[{low:.4f}, {high:.4f}]" if low is not None and high is not None else "(no interval)"
    text = f"live {metric} {value:.4f} {interval} on {len(rows)} labelled rows"
    if coverage is not None:
        text += f" ({coverage:.0%} of {served_rows} served)"
    if baseline is None:
        text += "; no score at promotion to compare with"
    else:
        text += f" vs {baseline:.4f} at promotion"
        if significant:
            text += f": significant drop ({at_better:.4f} even at the interval's better bound)"
    return LivePerformance(
        labelled_rows=len(rows), coverage=coverage, unusable_labels=unusable, reason=text + business_error,
        **{**base, "value": value, "low": low, "high": high, "drop": drop,
           "drop_at_better_bound": at_better, "significant": significant, "business_value": business},
    )  # fmt: skip


def _business_value(spec: ModelSpec, rows: Any, classes: tuple[Any, ...] | None) -> float | None:
    """The spec's business value of what was served (the logged predictions) against the outcomes."""
    from cd4ml.ml.business import business_value

    if spec.business is None:
        return None
    y_true, ok_true = cast_outcomes(rows["outcome"].to_numpy(), classes)
    y_pred, ok_pred = cast_outcomes(rows["prediction"].to_numpy(), classes)
    ok = ok_true & ok_pred
    value = business_value(spec, y_true[ok], y_pred[ok])
    return None if value is None else float(value)


# -- ground truth in, and labelled traffic out as training data -----------------------------------


def ingest_labels(spec: ModelSpec, settings: Settings, *, now: str) -> dict[str, Any]:
    """Take in the label files dropped into `feedback/landing/` before the check judges the
    champion (`cd4ml.data.feedback.ingest_label_files`; bad files are quarantined with a reason)."""
    from cd4ml.data import feedback

    at = _parse(now) or datetime.now(UTC)
    result = feedback.ingest_label_files(ModelPaths.for_model(settings, spec.name), now=at)
    if result.accepted or result.quarantined:
        log.info("%s: %d label file(s) taken in (%d rows, %d not matching a logged request), %d "
                 "quarantined", spec.name, len(result.accepted), result.rows, result.unmatched,
                 len(result.quarantined))  # fmt: skip
    for q in result.quarantined:
        log.warning("%s: label file %s quarantined: %s", spec.name, q.name, q.reason)
    return result.as_dict()


def land_feedback_batch(spec: ModelSpec, settings: Settings, *, now: str) -> dict[str, Any]:
    """`feedback.to_training`: labelled served traffic not yet exported becomes one file in the
    model's landing/, validated like any landed file (`cd4ml.steps.feedback_batch`)."""
    from cd4ml.steps import feedback_batch

    return feedback_batch.land_feedback_batch(spec, settings, now=_parse(now) or datetime.now(UTC))
