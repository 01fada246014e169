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

**What it does.** Compares what the prediction service received since the last check (or, with no
traffic, the batches accepted since then) with the data the current champion was trained on. Per
feature drift verdicts (Evidently's default tests, computed on all rows), prediction drift, and the
champion's performance on newly labelled data. An Evidently report (HTML + JSON) is saved under
`reports/drift/` and logged to the MLflow experiment `{name}-monitoring`.

**Decision.** Drift when the share of drifted features reaches {threshold} (or the performance drop
reaches the spec's limit). Then it emits `{name}.drift_detected` with the reason, and that event
starts `{name}__train` — unless the window has fewer than {min_rows} rows ("not enough data"), the
champion was already trained on it, or the last drift-triggered retrain was less than
{cooldown} h ago (cooldown).

**What starts it.** The schedule `{schedule}` or a manual trigger (form: window override in hours).

**Where to look.** check_drift's *Details* tab links the *Evidently report* and the *MLflow run*;
the *Model* tab charts the drift share of every check.
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
                },
            )

        summary = check_drift()
        should_retrain(summary) >> emit_drift_detected(summary)

    return monitor_pipeline()
