"""Airflow notifiers for cd4ml events, sending e-mail through the connection `cd4ml_smtp`.

Attached as task callbacks by the DAG factory. A missing connection or an empty recipient list
means "notifications off": logged, never an error. Failures of the notifier itself are logged by
Airflow and never change a task's outcome.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import BaseNotifier

from cd4ml.core.errors import QuarantinedError
from cd4ml.core.spec import ModelSpec

log = logging.getLogger(__name__)


class Cd4mlNotifier(BaseNotifier):
    """`event`: decision | quarantine | drift | rollback | failure."""

    def __init__(self, event: str, spec: ModelSpec) -> None:
        super().__init__()
        self.event = event
        self.model = spec.name
        self.recipients = list(spec.notifications.email)
        self.settings = spec.notifications

    def notify(self, context: Any) -> None:
        from cd4ml.ui import notify

        if not self.recipients:
            return
        ti, dag_run = context["ti"], context["dag_run"]
        run_url = notify.airflow_run_url(dag_run.dag_id, dag_run.run_id)
        exception = context.get("exception")
        # A quarantine is an expected outcome with its own mail, not a failure: told apart by type.
        quarantined = isinstance(exception, QuarantinedError)
        error = str(exception or "")
        message = None
        if self.event == "decision":
            result = ti.xcom_pull(task_ids=ti.task_id) or {}
            if result.get("promoted") and self.settings.on_promotion:
                message = notify.promotion(self.model, result, run_url)
            elif not result.get("promoted") and self.settings.on_reject:
                message = notify.rejection(self.model, result, run_url)
        elif self.event == "quarantine" and isinstance(exception, QuarantinedError):
            if not self.settings.on_quarantine:
                return
            reasons = "\n\n".join(str(q.get("reason", "")) for q in exception.quarantined)
            message = notify.quarantine(self.model, reasons, run_url)
        elif self.event == "drift" and self.settings.on_drift:
            message = notify.drift(self.model, ti.xcom_pull(task_ids="check_drift") or {}, run_url)
        elif self.event == "rollback" and self.settings.on_rollback:
            message = notify.rollback(self.model, ti.xcom_pull(task_ids=ti.task_id) or {}, run_url)
        elif self.event == "failure" and not quarantined and self.settings.on_failure:
            message = notify.failure(self.model, ti.task_id, error, run_url)
        if message is None:
            return
        smtp = smtp_settings()
        if smtp is None:
            log.warning("cd4ml: no '%s' connection; not sending %r", notify.SMTP_CONN_ID, message.subject)
            return
        notify.send(message, self.recipients, smtp)


def smtp_settings() -> Any:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    from cd4ml.ui import notify

    try:
        conn = BaseHook.get_connection(notify.SMTP_CONN_ID)
    except AirflowNotFoundException:
        return None
    extra = conn.extra_dejson
    return notify.SmtpSettings(
        host=conn.host or "127.0.0.1",
        port=int(conn.port or 25),
        login=conn.login or None,
        password=conn.password or None,
        sender=str(extra.get("from_email", "cd4ml@localhost")),
        starttls=bool(extra.get("starttls", False)),
    )
