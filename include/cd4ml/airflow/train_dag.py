"""`<model>__train`: validate new data, train a challenger, judge it, register it, maybe promote it.

Each task is a thin adapter: import inside, call one `cd4ml.steps.pipeline` step, return a small dict.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import (
    DAG,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    dag,
    task,
)

from cd4ml.airflow import assets
from cd4ml.airflow.common import START, context, default_args, last_attempt, run_time, who
from cd4ml.airflow.notifiers import Cd4mlNotifier
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec

DOC = """\
### {name}: training pipeline

{description}

**What it does.** Collects every file that landed in `{landing}`, validates each one with Great
Expectations (a failing file goes to `quarantine/` with a reason file; nothing is trained on it),
builds a training set and a holdout (the newest {holdout:.0%} of accepted rows, never trained on),
trains a challenger (`{estimator}`), re-scores it and the current champion on the same holdout, and
decides with a paired bootstrap of **{metric}** ({direction}): promote only if the
{confidence:.0%} lower bound of the improvement exceeds {min_improvement} and the floor
{floor} is met. Every challenger is registered in MLflow as `{name}` with lineage tags; `champion`
moves only on a promotion.

**What starts it.** A file landing in `{landing}` (within seconds), the nightly schedule
`{cron}` (UTC), a `drift_detected` event from `{name}__monitor`, or a manual trigger
(form: reason, evaluate only, force).

**What it produces.** Files moved to `accepted/` or `quarantine/`, GX Data Docs, an MLflow run and
model version with the decision and its evidence, and the `challenger` / `champion` aliases.
After a promotion, `deploy_champion` waits until the prediction service serves the new version,
smoke-tests it on golden holdout rows, and rolls `champion` back by itself if anything fails.

**When a task fails.** Only transient errors (MLflow or the prediction service unreachable) are
retried. A spec, data or training error fails its task at once with a message that names the
file, column or spec field. Retrying would fail the same way. A quarantine fails
`validate_batches` with the reasons and mails them (nothing is trained). If the service refuses
the new version, `deploy_champion` records "the service refused version N: <its reason>" and rolls
back at once. If the service is unreachable, the deploy is retried with the new champion left in
place, and only the last try rolls back.

**Where to look.** A task's *Details* tab has extra links: *Data Docs* (validate_batches), *MLflow
run* (train_challenger), *Model version* (register, promote, deploy). The *Model* tab of this DAG
(and *Models* in the nav bar) shows the champion, its lineage, every decision and why, and drift.
"""


def _readable(value: Any) -> str:
    """An asset event's extra value as words: lists joined, floats short, nested dicts flattened."""
    if isinstance(value, dict):
        return ", ".join(
            f"{k.replace('_', ' ')} {_readable(v)}" for k, v in value.items() if v not in (None, "", [])
        )
    if isinstance(value, list | tuple):
        return ", ".join(_readable(v) for v in value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def describe_asset_event(name: str, extra: dict[str, Any]) -> str:
    """`drift of churn: share 0.42 over 0.3; drifted columns age, income`, not a dict repr.

    The extra's `reason` (if any) leads; paths and URIs are left out (the Models view links them).
    """
    reason = extra.get("reason")
    rest = {
        k: v for k, v in extra.items()
        if k != "reason" and not k.endswith(("_uri", "_path", "directory")) and v not in (None, "", [])
    }  # fmt: skip
    parts = [str(reason)] if reason else []
    parts += [f"{k.replace('_', ' ')}: {_readable(v)}" for k, v in rest.items()]
    return f"{name}: {'; '.join(parts)}" if parts else name


def _trigger_reason(ctx: dict[str, Any]) -> str:
    dag_run = ctx["dag_run"]
    params = ctx.get("params") or {}
    raw_type = getattr(dag_run, "run_type", "unknown")
    run_type = str(getattr(raw_type, "value", raw_type))
    if "manual" in run_type:
        return f"manual: {params.get('reason') or 'no reason given'}"
    events = ctx.get("triggering_asset_events") or {}
    sources = []
    for asset, asset_events in dict(events).items():
        name = getattr(asset, "name", str(asset))
        for ev in asset_events:
            extra = getattr(ev, "extra", None) or {}
            sources.append(describe_asset_event(name, dict(extra)) if isinstance(extra, dict) else name)
    if sources:
        return "asset " + " | ".join(sources)[:400]
    return f"{run_type}: nightly schedule"


def build_train_dag(spec: ModelSpec, settings: Settings) -> DAG:
    new_data = assets.new_data(spec, settings)
    drift = assets.drift_detected(spec)
    doc = DOC.format(
        name=spec.name,
        description=spec.description,
        landing=settings.model_dir(spec.name) / "landing",
        holdout=spec.data.holdout_fraction,
        estimator=spec.estimator.class_path,
        metric=spec.metric.name,
        direction=spec.metric.direction,
        confidence=spec.promotion.confidence,
        min_improvement=spec.promotion.min_improvement,
        floor=spec.promotion.floor,
        cron=spec.schedule.retrain_cron,
    )

    @dag(
        dag_id=f"{spec.name}__train",
        description=f"Validate, train, evaluate and promote {spec.name}",
        doc_md=doc,
        schedule=AssetOrTimeSchedule(
            timetable=CronTriggerTimetable(spec.schedule.retrain_cron, timezone="UTC"),
            assets=(new_data | drift),
        ),
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=["cd4ml", spec.name, "train"],
        default_args=default_args(spec, retries=2, retry_delay_s=10),
        params={
            "reason": Param(
                "manual run",
                type="string",
                minLength=1,
                maxLength=500,
                title="Reason",
                description="Why this run; recorded on the model version.",
            ),
            "evaluate_only": Param(
                False,
                type="boolean",
                title="Evaluate only",
                description="Train, evaluate and register, but never move the champion.",
            ),
            "force": Param(
                False,
                type="boolean",
                title="Force retrain",
                description="Train even if the champion was built from exactly this data and spec.",
            ),
        },
        render_template_as_native_obj=False,
    )
    def train_pipeline() -> None:
        @task
        def collect_landed_files() -> dict[str, Any]:
            from cd4ml.steps.pipeline import collect_landed_files as step

            return step(spec, settings)

        @task(on_failure_callback=[Cd4mlNotifier("quarantine", spec), Cd4mlNotifier("failure", spec)])
        def validate_batches(collected: dict[str, Any]) -> dict[str, Any]:
            from cd4ml.core.errors import QuarantinedError
            from cd4ml.steps.pipeline import validate_landed_files

            ctx = context()
            result = validate_landed_files(
                spec, settings, collected["new"], run_id=ctx["run_id"], run_time=run_time(ctx)
            )
            if result["quarantined"] and not result["accepted"]:
                # The task fails, so it has no return value: keep the Data Docs link reachable.
                ctx["ti"].xcom_push(key="report", value={"docs_url": result["docs_url"]})
                raise QuarantinedError(result["quarantined"])  # a data error: never retried
            return result

        @task
        def build_datasets(validated: dict[str, Any]) -> dict[str, Any]:
            from cd4ml.steps.pipeline import prepare_datasets

            return prepare_datasets(spec, settings, run_id=context()["run_id"])

        @task.short_circuit
        def needs_training(datasets: dict[str, Any]) -> bool:
            from cd4ml.steps.pipeline import record_run_outcome, training_needed

            ctx = context()
            params = ctx.get("params") or {}
            needed, why = training_needed(spec, settings, datasets, force=bool(params.get("force")))
            print(f"{'Training' if needed else 'Skipping training'}: {why}")
            record_run_outcome(spec, settings, run_id=ctx["run_id"], trigger=_trigger_reason(ctx),
                               trained=needed, why=why)  # fmt: skip
            return needed

        @task
        def train_challenger(datasets: dict[str, Any]) -> dict[str, Any]:
            from cd4ml.steps.pipeline import train_challenger as step

            return step(spec, settings, datasets, run_id=context()["run_id"])

        @task
        def evaluate_against_champion(datasets: dict[str, Any], challenger: dict[str, Any]) -> dict[str, Any]:
            from cd4ml.steps.pipeline import evaluate_against_champion as step

            return step(spec, settings, datasets, challenger)

        @task
        def register_challenger(
            challenger: dict[str, Any],
            evidence: dict[str, Any],
            datasets: dict[str, Any],
            validated: dict[str, Any],
        ) -> dict[str, Any]:
            from cd4ml.steps.pipeline import register_challenger as step

            ctx = context()
            return step(
                spec, settings, challenger=challenger, evidence=evidence, datasets=datasets,
                validation=validated, run_id=ctx["run_id"], reason=_trigger_reason(ctx),
            )  # fmt: skip

        @task(on_success_callback=[Cd4mlNotifier("decision", spec)])
        def promote_champion(registered: dict[str, Any], evidence: dict[str, Any]) -> dict[str, Any]:
            from cd4ml.steps.pipeline import promote_champion as step

            ctx = context()
            params = ctx.get("params") or {}
            return step(
                spec, settings, version=registered["version"], evidence=evidence,
                evaluate_only=bool(params.get("evaluate_only")), run_time=run_time(ctx),
            )  # fmt: skip

        @task
        def deploy_champion(promoted: dict[str, Any], datasets: dict[str, Any]) -> dict[str, Any]:
            from cd4ml.steps.deploy import deploy_champion as step

            ctx = context()
            return step(spec, settings, promoted=promoted, holdout_path=datasets["holdout_path"],
                        who=who(ctx), when=run_time(ctx), last_attempt=last_attempt(ctx))  # fmt: skip

        collected = collect_landed_files()
        validated = validate_batches(collected)
        datasets = build_datasets(validated)
        gate = needs_training(datasets)
        challenger = train_challenger(datasets)
        gate >> challenger
        evidence = evaluate_against_champion(datasets, challenger)
        registered = register_challenger(challenger, evidence, datasets, validated)
        promoted = promote_champion(registered, evidence)
        deploy_champion(promoted, datasets)

    return train_pipeline()
