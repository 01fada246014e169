"""What every cd4ml DAG shares: start date, default args (owner, retries, error policy, failure
mail), run facts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import get_current_context
from airflow.sdk.definitions.retry_policy import RetryDecision, RetryPolicy

from cd4ml.airflow.notifiers import Cd4mlNotifier
from cd4ml.core.errors import is_transient
from cd4ml.core.spec import ModelSpec

if TYPE_CHECKING:
    from airflow.sdk import XComArg

START = datetime(2026, 1, 1, tzinfo=UTC)


def retry_decision(err: BaseException) -> RetryDecision:
    """cd4ml's one error policy, as Airflow sees it.

    A transient error (MLflow or the prediction service unreachable, `TransientError`) is retried
    up to the task's `retries`. Anything else a task raises — a spec, data or training error, or
    an unexpected exception — fails the task at once: the same inputs would fail the same way, and
    three identical failures only delay the message. Airflow's own signals (timeouts, terminations,
    SystemExit) keep Airflow's rules. The exception itself is untouched, so the log and the failure
    callbacks see its type and full message.
    """
    if not isinstance(err, Exception) or type(err).__module__.split(".")[0] == "airflow":
        return RetryDecision.default()
    kind = type(err).__name__
    if is_transient(err):
        return RetryDecision.retry(reason=f"cd4ml: {kind} is transient; retrying as the task's retries allow")
    return RetryDecision.fail(
        reason=f"cd4ml: {kind} is deterministic (the same inputs fail the same way); not retried"
    )


class Cd4mlRetryPolicy(RetryPolicy):
    """Attached to every task through `default_args`; the task process calls it on a failure."""

    def evaluate(
        self, exception: BaseException, try_number: int, max_tries: int, context: Any = None
    ) -> RetryDecision:
        return retry_decision(exception)

    def serialize(self) -> dict[str, Any]:
        return {"__type": "Cd4mlRetryPolicy"}

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> Cd4mlRetryPolicy:
        return cls()


def default_args(spec: ModelSpec, *, retries: int, retry_delay_s: float) -> dict[str, Any]:
    return {
        "owner": spec.owner,
        "retries": retries,
        "retry_delay": timedelta(seconds=retry_delay_s),
        "retry_policy": Cd4mlRetryPolicy(),
        "on_failure_callback": [Cd4mlNotifier("failure", spec)],
    }


def context() -> dict[str, Any]:
    return dict(get_current_context())


def params(ctx: dict[str, Any]) -> dict[str, Any]:
    return dict(ctx.get("params") or {})


def run_time(ctx: dict[str, Any]) -> str:
    # The run's own timestamp, not "now": a retried task writes the same values.
    return str(ctx["dag_run"].run_after.isoformat())


def who(ctx: dict[str, Any]) -> str:
    dag_run = ctx["dag_run"]
    user = getattr(dag_run, "triggering_user_name", None)
    return f"{user or 'airflow'} via {dag_run.dag_id} run {ctx['run_id']}"


def last_attempt(ctx: dict[str, Any]) -> bool:
    """No retry follows this try (a step may then clean up instead of leaving it to the retry)."""
    ti = ctx["ti"]
    return int(ti.try_number) > int(getattr(ti, "max_tries", 0) or 0)


def xcom_dict(task_id: str, value: XComArg | dict[str, Any]) -> dict[str, Any]:
    """A task's view of an upstream task's return value. TaskFlow wiring passes an XComArg
    placeholder that Airflow resolves into the upstream dict before the task runs."""
    if not isinstance(value, dict):
        raise TypeError(f"upstream task {task_id!r} returned {type(value).__name__}, not a dict")
    return value
