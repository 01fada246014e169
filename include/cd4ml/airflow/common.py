"""What every cd4ml DAG shares: start date, default args (owner, retries, failure mail), run facts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import get_current_context

from cd4ml.airflow.notifiers import Cd4mlNotifier
from cd4ml.spec import ModelSpec

START = datetime(2026, 1, 1, tzinfo=UTC)


def default_args(spec: ModelSpec, *, retries: int, retry_delay_s: float) -> dict[str, Any]:
    return {
        "owner": spec.owner,
        "retries": retries,
        "retry_delay": timedelta(seconds=retry_delay_s),
        "on_failure_callback": [Cd4mlNotifier("failure", spec)],
    }


def context() -> dict[str, Any]:
    return dict(get_current_context())


def run_time(ctx: dict[str, Any]) -> str:
    # The run's own timestamp, not "now": a retried task writes the same values.
    return str(ctx["dag_run"].run_after.isoformat())


def who(ctx: dict[str, Any]) -> str:
    dag_run = ctx["dag_run"]
    user = getattr(dag_run, "triggering_user_name", None)
    return f"{user or 'airflow'} via {dag_run.dag_id} run {ctx['run_id']}"
