"""`<model>__rollback`: move `champion` back to a chosen version, smoke-tested like any deploy."""

from __future__ import annotations

from typing import Any

from airflow.sdk import DAG, Param, dag, task

from cd4ml.airflow.common import START, context, default_args, params, run_time, who
from cd4ml.airflow.notifiers import Cd4mlNotifier
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec

DOC = """\
### {name}: roll back the champion

**What it does.** Moves the `champion` alias of `{name}` to the version you choose (default: the
previous champion recorded on the current one), waits until the prediction service serves it,
and smoke-tests it on golden holdout rows. Versions that never passed validation, or that the
champion/challenger gate rejected, are refused unless you tick *Force* and write a reason (the
record then says forced, what was overridden, and why). If anything fails after the alias moved,
the state before is restored exactly (no champion before: the alias is removed again) and the run
fails with the reason.

**What starts it.** Only a manual trigger: *Trigger* opens a form with the version, a reason and
*Force*.

**What it produces.** The moved alias, and a `rollback` event in the model's history in MLflow
(experiment `{name}-history`: who, when, the reason, the outcome), which the *Models* view lists.
The version keeps only small tags (`cd4ml.rolled_back_at`, `cd4ml.previous_champion`).
"""
DEFAULT_REASON = "manual rollback"


def build_rollback_dag(spec: ModelSpec, settings: Settings) -> DAG:
    @dag(
        dag_id=f"{spec.name}__rollback",
        description=f"Roll the {spec.name} champion back to a chosen version",
        doc_md=DOC.format(name=spec.name),
        schedule=None,
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=["cd4ml", spec.name, "rollback"],
        default_args=default_args(spec, retries=1, retry_delay_s=10),
        params={
            "version": Param(
                "",
                type="string",
                pattern="^[0-9]*$",
                title="Version",
                description="Model version to serve; empty means the previous champion.",
            ),
            "reason": Param(
                DEFAULT_REASON,
                type="string",
                minLength=1,
                maxLength=500,
                title="Reason",
                description="Why; recorded on the version. Required in your own words with Force.",
            ),
            "force": Param(
                False,
                type="boolean",
                title="Force",
                description="Serve a version the gate rejected or that never passed validation "
                "(give the reason why).",
            ),
        },
    )
    def rollback_pipeline() -> None:
        @task(on_success_callback=[Cd4mlNotifier("rollback", spec)])
        def roll_back() -> dict[str, Any]:
            from cd4ml.airflow.connections import service_endpoint
            from cd4ml.steps.deploy import rollback

            ctx = context()
            form = params(ctx)
            target = str(form.get("version") or "") or None
            reason = str(form.get("reason") or "")
            force = bool(form.get("force"))
            if force and reason == DEFAULT_REASON:
                reason = ""  # forcing needs a reason of your own, not the form's default
            return rollback(
                spec, settings, target=target, reason=reason, who=who(ctx), when=run_time(ctx),
                endpoint=service_endpoint(), force=force,
            )  # fmt: skip

        roll_back()

    return rollback_pipeline()
