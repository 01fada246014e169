"""The drift check behind `<model>__monitor`: reference vs current window, report, decision.

reference  the snapshot of the data the current champion was trained on, read from MLflow
           (`registry.reference_frame`: an artifact of the version, or for versions registered
           before that, the local path in its tags)
current    what the prediction service received since the last check; when there was no traffic,
           the batches accepted since then that the champion has not been trained on
verdicts   `cd4ml.ml.drift` on the full data; the Evidently report on a seeded, stratified sample
decision   `cd4ml.ml.drift.decide_drift` (threshold, performance drop, min rows, cooldown)

State (last window end, last retrain trigger, history) lives in `<data>/<model>/monitor/`.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cd4ml import registry
from cd4ml.core.paths import ModelPaths
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec
from cd4ml.data import landing

log = logging.getLogger(__name__)
EVIDENTLY_SAMPLE_CAP = 20_000


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
                "share": 0.0, "drifted_columns": [], "report_uri": None,
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
    performance_drop = None
    if len(current) >= spec.drift.min_rows:
        model = registry.load_model(settings.mlflow_tracking_uri, f"models:/{spec.name}/{champion.version}")
        summary.update(_measure(spec, model, reference, current, report_dir))
        if labelled is not None and len(labelled) >= spec.promotion.min_holdout_rows:
            summary["performance"] = _performance(spec, model, labelled, evidence.decision)
            performance_drop = summary["performance"]["drop"]
    else:
        summary.update({"share": 0.0, "drifted_columns": [], "columns": []})
        (report_dir / "report.html").write_text(
            f"<html><body><h1>{spec.name}: not enough data</h1><p>{len(current)} rows in the window "
            f"({source}); at least {spec.drift.min_rows} are needed to judge drift.</p></body></html>"
        )
    decision = drift.decide_drift(
        spec.drift,
        window_rows=len(current),
        share=float(summary["share"]),
        performance_drop=performance_drop,
        now=end,
        last_trigger_at=_parse(state.get("last_trigger_at")),
        window_already_trained_on=already,
    )
    summary["decision"] = {"drift": decision.drift, "trigger": decision.trigger, "reason": decision.reason}
    summary["report_uri"] = (report_dir / "report.html").as_uri()
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["mlflow_run_id"] = _log_to_mlflow(spec, settings, summary, report_dir, run_id)
    state["last_window_end"] = end.isoformat()
    save_state(settings, spec.name, state)
    keep = (
        "window",
        "share",
        "drifted_columns",
        "new_categories",
        "decision",
        "report_uri",
        "champion_version",
    )
    with monitor_paths(settings, spec.name).monitor_history.open("a") as fh:
        fh.write(json.dumps({k: summary[k] for k in keep}, default=str) + "\n")
    log.info("%s: %s", spec.name, decision.reason)
    return {k: v for k, v in summary.items() if k != "columns"}


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
    }
    with mlflow.start_run(run_name=f"drift check {run_id}", tags=tags) as run:
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(report_dir), artifact_path="drift_report")
    summary["experiment_id"] = str(run.info.experiment_id)
    return str(run.info.run_id)


def record_trigger(settings: Settings, model: str, at: str) -> None:
    """Start the cooldown; called when the drift_detected event is emitted."""
    state = load_state(settings, model)
    state["last_trigger_at"] = at
    save_state(settings, model, state)
