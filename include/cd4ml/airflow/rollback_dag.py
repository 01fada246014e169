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
and smoke-tests it on golden holdout rows. Versions that never passed validation are refused. If
the smoke test fails, the champion is restored and the run fails with the reason.

**What starts it.** Only a manual trigger: *Trigger* opens a form with the version and a reason.

**What it produces.** The moved alias, and a `rollback` event in the model's history in MLflow
(experiment `{name}-history`: who, when, the reason, the outcome), which the *Models* view lists.
The version keeps only small tags (`cd4ml.rolled_back_at`, `cd4ml.previous_champion`).
"""


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
                "manual rollback",
                type="string",
                minLength=1,
                maxLength=500,
                title="Reason",
                description="Why; recorded on the version.",
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
            return rollback(
                spec, settings, target=target, reason=reason, who=who(ctx), when=run_time(ctx),
                endpoint=service_endpoint(),
            )  # fmt: skip

        roll_back()

    return rollback_pipeline()
