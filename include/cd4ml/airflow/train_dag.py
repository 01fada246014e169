"""`<model>__train`: validate new data, train a challenger, judge it, register it, maybe promote it.

One task per step of `cd4ml.steps.pipeline.TRAINING_STEPS` (the list `cd4ml train` runs too), each a
thin adapter: read the upstream XComs back into the step's typed inputs, run the step, return its
record's XCom. Only the Airflow parts live here: callbacks, the short circuit, the run's context.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from airflow.sdk import (
    DAG,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    XComArg,
    dag,
    task,
)
from airflow.sdk.bases.decorator import Task

from cd4ml.airflow import assets
from cd4ml.airflow.approval import TASK_ID as APPROVAL_TASK
from cd4ml.airflow.approval import PromotionApproval, approval_of
from cd4ml.airflow.common import START, context, default_args, last_attempt, run_time, who, xcom_dict
from cd4ml.airflow.notifiers import Cd4mlNotifier
from cd4ml.core.paths import ModelPaths
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec
from cd4ml.steps.contracts import NothingAccepted, RunContext, TrainingGate, XCom
from cd4ml.steps.pipeline import CONNECTION_STEPS, RETRIES, RETRY_DELAY_S, TRAINING_STEPS, Step, load_inputs

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
Before `champion` moves, `stage_challenger` has the prediction service load the challenger into a
staging slot no client reaches and smoke-tests it there on golden holdout rows: a failure stops the
run with live traffic untouched. After a promotion, `deploy_champion` waits until the service
serves the new version, smoke-tests it again, and rolls `champion` back by itself if anything
fails. With `deployment.strategy: shadow` in the spec, a better challenger gets the `shadow` alias
instead and answers a copy of live traffic (promote it with `{name}__rollback`).

**Approval.** {approval}

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

APPROVAL_DOC = {
    "none": "Not asked (`promotion.approval: none`): a challenger that wins is promoted at once. With "
    "`promotion.approval: required` in the spec, a person approves every promotion in Airflow.",
    "required": "Required (`promotion.approval: required`). A challenger that wins waits, staged and "
    "smoke-tested, in `approve_promotion` until a person answers in Airflow (*Browse > Required "
    "Actions*, or the task's *Required Actions* tab). The form shows both scores, the bootstrap "
    "interval of the improvement, the last drift check and how the challenger differs from the "
    "champion. *Approve* promotes and deploys it; *Reject*, or no answer within {hours:g} h, skips "
    "`promote_champion` and `deploy_champion`: champion stays. Who answered and when is recorded in "
    "{name}'s history (Models view) and on the version. See docs/approval.md.",
}


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


def run_context(ctx: dict[str, Any], *, with_service: bool = False) -> RunContext:
    """The steps' view of an Airflow run: ids, the run's own time, why it started, its Params, and
    (`with_service`) the prediction service from the `cd4ml_service` connection."""
    from cd4ml.airflow.connections import service_endpoint

    params = ctx.get("params") or {}
    return RunContext(
        run_id=str(ctx["run_id"]),
        run_time=run_time(ctx),
        trigger=_trigger_reason(ctx),
        who=who(ctx),
        force=bool(params.get("force")),
        evaluate_only=bool(params.get("evaluate_only")),
        last_attempt=last_attempt(ctx),
        service=service_endpoint() if with_service else None,
    )


def build_train_dag(spec: ModelSpec, settings: Settings) -> DAG:
    new_data = assets.new_data(spec, settings)
    drift = assets.drift_detected(spec)
    doc = DOC.format(
        name=spec.name,
        description=spec.description,
        landing=ModelPaths.for_model(settings, spec.name).landing,
        holdout=spec.data.holdout_fraction,
        estimator=spec.estimator.class_path,
        metric=spec.metric.name,
        direction=spec.metric.direction,
        confidence=spec.promotion.confidence,
        min_improvement=spec.promotion.min_improvement,
        floor=spec.promotion.floor,
        cron=spec.schedule.retrain_cron,
        approval=APPROVAL_DOC[spec.promotion.approval].format(
            name=spec.name, hours=spec.promotion.approval_timeout_hours
        ),
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
        default_args=default_args(spec, retries=RETRIES, retry_delay_s=RETRY_DELAY_S),
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
        tasks: dict[str, XComArg] = {}
        gate: str | None = None
        for step in TRAINING_STEPS:
            upstream = {name: tasks[name] for name in step.inputs}
            if step.name == "promote_champion" and spec.promotion.approval == "required":
                # After the staged smoke test, a person approves; promote_champion reads the answer.
                approval = PromotionApproval(spec=spec, settings=settings)
                tasks["stage_challenger"] >> approval
                upstream[APPROVAL_TASK] = approval.output
            made = _task(step, spec, settings)(upstream)
            if gate is not None:
                # Skipped with everything after it when the gate says no (it reads no gate output).
                tasks[gate] >> made
                gate = None
            tasks[step.name] = made
            if step.gate:
                gate = step.name

    return train_pipeline()


# What only Airflow adds to a step: mails on a quarantine or failure, and on the decision.
def _callbacks(step: str, spec: ModelSpec) -> dict[str, Any]:
    if step == "validate_batches":
        return {"on_failure_callback": [Cd4mlNotifier("quarantine", spec), Cd4mlNotifier("failure", spec)]}
    if step == "promote_champion":
        return {"on_success_callback": [Cd4mlNotifier("decision", spec)]}
    if step == "deploy_champion" and spec.deployment.strategy == "canary":
        return {"on_success_callback": [Cd4mlNotifier("canary", spec)]}
    return {}


def _task(step: Step, spec: ModelSpec, settings: Settings) -> Task[[Mapping[str, XComArg | XCom]], Any]:
    """The task for one step; a gate becomes a short-circuit task (its XCom: the boolean)."""

    def adapter(upstream: Mapping[str, XComArg | XCom]) -> Any:
        ctx = context()
        xcoms = {name: xcom_dict(name, value) for name, value in upstream.items()}
        approval = approval_of(xcoms.pop(APPROVAL_TASK, None))  # promotion.approval: required
        inputs = load_inputs(step, xcoms)
        run = replace(run_context(ctx, with_service=step.name in CONNECTION_STEPS), approval=approval)
        try:
            result = step.run(spec, settings, run, inputs)
        except NothingAccepted as err:
            # The task fails, so it has no return value: keep the Data Docs link reachable.
            ctx["ti"].xcom_push(key="report", value={"docs_url": err.docs_url})
            raise
        if step.gate and isinstance(result, TrainingGate):
            return result.needed  # the step logged why
        return result.to_xcom()

    adapter.__name__ = adapter.__qualname__ = step.name
    decorator = task.short_circuit if step.gate else task
    return decorator(task_id=step.name, **_callbacks(step.name, spec))(adapter)
