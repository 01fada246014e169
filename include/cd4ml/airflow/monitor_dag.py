"""`<model>__monitor`: drift reports on what the service receives, and retraining when it matters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from airflow.sdk import DAG, Metadata, Param, XComArg, dag, task

from cd4ml.airflow import assets
from cd4ml.airflow.common import START, context, default_args, params, run_time, xcom_dict
from cd4ml.airflow.notifiers import Cd4mlNotifier
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec

DOC = """\
### {name}: drift monitor

**What it does.** First takes in label files dropped into `feedback/landing/` (ground truth by
request id; bad files go to `feedback/quarantine/` with a reason){to_training}. Then compares what
the prediction service received since the last check (or, with no traffic, the batches accepted
since then) with the data the current champion was trained on: per feature drift verdicts
(Evidently's default tests, computed on all rows), prediction drift, and the champion's performance
on newly labelled batches. An Evidently report (HTML + JSON) is saved under `reports/drift/` and
logged to the MLflow experiment `{name}-monitoring`.

**Live performance.** The champion's {metric} on its labelled served traffic of the last week
(`cd4ml.steps.monitor.LIVE_WINDOW_HOURS`; labels received by the check count, however late, as
long as their prediction is in the window), with a bootstrap interval, the label coverage and the
business value when the spec has one, against its holdout score at promotion. Logged to the same
MLflow run, charted in the Models view, exported on `/cd4ml/metrics`.

**Decision.** Drift when the share of drifted features reaches {threshold}, or the performance
drop reaches the spec's limit ({drop}), on newly labelled batches or significantly on live traffic
(even the interval's better bound is that much below the score at promotion). Then it emits
`{name}.drift_detected` with the reason and the evidence, and that event starts `{name}__train` —
unless the window has fewer than {min_rows} rows ("not enough data"; a live drop is judged on its
own labelled rows), the champion was already trained on it, or the last drift-triggered retrain
was less than {cooldown} h ago (cooldown: then one notice per cooldown period goes to the spec's
recipients instead of silence).

**What starts it.** The schedule `{schedule}` or a manual trigger (form: window override in hours).

**Where to look.** check_drift's *Details* tab links the *Evidently report* and the *MLflow run*;
the Models view charts the drift share and the live metric of every check.
"""


def build_monitor_dag(spec: ModelSpec, settings: Settings) -> DAG:
    drift_detected = assets.drift_detected(spec)

    @dag(
        dag_id=f"{spec.name}__monitor",
        description=f"Drift reports for {spec.name}; retrains on drift",
        doc_md=DOC.format(
            name=spec.name,
            threshold=spec.drift.threshold,
            min_rows=spec.drift.min_rows,
            cooldown=spec.drift.cooldown_hours,
            schedule=spec.drift.schedule,
            metric=spec.metric.name,
            drop=spec.drift.performance_drop if spec.drift.performance_drop is not None else "unset: never",
            to_training=(
                ", and turns labelled traffic into a training batch in `landing/` (`feedback.to_training`)"
                if spec.feedback.to_training
                else ""
            ),
        ),
        schedule=spec.drift.schedule,
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=["cd4ml", spec.name, "monitor"],
        default_args=default_args(spec, retries=2, retry_delay_s=30),
        params={
            "window_hours": Param(
                None,
                type=["null", "number"],
                minimum=0.01,
                title="Window (hours)",
                description="Look back this many hours instead of 'since the last check'.",
            ),
        },
    )
    def monitor_pipeline() -> None:
        @task
        def ingest_labels() -> dict[str, Any]:
            from cd4ml.steps.monitor import ingest_labels as step

            return step(spec, settings, now=run_time(context()))

        @task
        def land_feedback_batch() -> dict[str, Any]:
            from cd4ml.steps.monitor import land_feedback_batch as step

            return step(spec, settings, now=run_time(context()))

        @task(on_success_callback=[Cd4mlNotifier("drift_cooldown", spec)])
        def check_drift() -> dict[str, Any]:
            from cd4ml.steps.monitor import check_drift as step

            ctx = context()
            hours = params(ctx).get("window_hours")
            return step(spec, settings, run_id=ctx["run_id"], window_end=run_time(ctx),
                        window_hours=float(hours) if hours else None)  # fmt: skip

        @task.short_circuit
        def should_retrain(summary: XComArg | dict[str, Any]) -> bool:
            summary = xcom_dict("check_drift", summary)
            print(summary["decision"]["reason"])
            return bool(summary["decision"]["trigger"])

        @task(outlets=[drift_detected], on_success_callback=[Cd4mlNotifier("drift", spec)])
        def emit_drift_detected(summary: XComArg | dict[str, Any]) -> Iterator[Metadata]:
            summary = xcom_dict("check_drift", summary)
            from cd4ml.steps.monitor import record_trigger

            record_trigger(settings, spec.name, summary["window"]["end"])
            yield Metadata(
                drift_detected,
                extra={
                    "reason": summary["decision"]["reason"],
                    "share": summary["share"],
                    "drifted_columns": summary["drifted_columns"],
                    "performance_drop": (summary.get("performance") or {}).get("drop"),
                    "report_uri": summary["report_uri"],
                    "champion_version": summary["champion_version"],
                    "live_performance": live_evidence(summary.get("live")),
                },
            )

        labels = ingest_labels()
        summary = check_drift()
        labels >> summary
        if spec.feedback.to_training:
            labels >> land_feedback_batch()
        should_retrain(summary) >> emit_drift_detected(summary)

    return monitor_pipeline()


LIVE_EVIDENCE = (
    "metric", "version", "value", "low", "high", "confidence", "baseline", "drop", "drop_at_better_bound",
    "significant", "labelled_rows", "served_rows", "coverage", "business_value", "business_baseline",
    "window_start", "window_end",
)  # fmt: skip


def live_evidence(live: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the retrain's trigger says about live performance (small scalars for the event)."""
    return {k: live.get(k) for k in LIVE_EVIDENCE} if live else None
