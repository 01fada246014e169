"""Airflow notifiers for cd4ml events, sending e-mail with the SMTP provider's `SmtpHook` through
the connection `cd4ml_smtp` (host, port, login, password; extras `from_email`, and `disable_ssl` /
`disable_tls` for a server without implicit TLS / STARTTLS, as the provider documents them).

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
from cd4ml.ui import notify

log = logging.getLogger(__name__)
DEFAULT_SENDER = "cd4ml@localhost"  # when the connection has no `from_email`


class Cd4mlNotifier(BaseNotifier):
    """`event`: decision | quarantine | drift | drift_cooldown | rollback | canary | failure.

    `drift_cooldown` sits on the monitor's check: drift that the cooldown keeps from retraining
    sends one notice per cooldown period (the check decides, `cooldown_notice` in its summary, and
    records it in the monitor state), where before nothing was said until the next retrain."""

    def __init__(self, event: str, spec: ModelSpec) -> None:
        super().__init__()
        self.event = event
        self.model = spec.name
        self.recipients = list(spec.notifications.email)
        self.settings = spec.notifications

    def notify(self, context: Any) -> None:
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
            elif (
                not result.get("promoted")
                and self.settings.on_reject
                and not (
                    result.get("canary") or result.get("shadow")  # not a rejection: a trial on live traffic
                )
            ):
                message = notify.rejection(self.model, result, run_url)
        elif self.event == "quarantine" and isinstance(exception, QuarantinedError):
            if not self.settings.on_quarantine:
                return
            reasons = "\n\n".join(str(q.get("reason", "")) for q in exception.quarantined)
            message = notify.quarantine(self.model, reasons, run_url)
        elif self.event == "drift" and self.settings.on_drift:
            message = notify.drift(self.model, ti.xcom_pull(task_ids="check_drift") or {}, run_url)
        elif self.event == "drift_cooldown" and self.settings.on_drift:
            summary = ti.xcom_pull(task_ids=ti.task_id) or {}
            if summary.get("cooldown_notice"):
                message = drift_in_cooldown(self.model, summary, run_url)
        elif self.event == "rollback" and self.settings.on_rollback:
            message = notify.rollback(self.model, ti.xcom_pull(task_ids=ti.task_id) or {}, run_url)
        elif self.event == "canary":
            result = (ti.xcom_pull(task_ids=ti.task_id) or {}).get("canary") or {}
            promoted = result.get("outcome") == "promoted"
            if result and (self.settings.on_promotion if promoted else self.settings.on_rollback):
                message = notify.canary(self.model, result, run_url)
        elif self.event == "failure" and not quarantined and self.settings.on_failure:
            message = notify.failure(self.model, ti.task_id, error, run_url)
        if message is None:
            return
        if not has_smtp_connection():
            log.warning("cd4ml: no '%s' connection; not sending %r", notify.SMTP_CONN_ID, message.subject)
            return
        send(message, self.recipients)


def drift_in_cooldown(model: str, summary: dict[str, Any], run_url: str) -> notify.Message:
    """Drift found, retraining held back by the cooldown: what was found, and when a retrain can
    start again. (Message text beside `cd4ml.ui.notify`'s, in its skeleton.)"""
    version = str(summary.get("champion_version"))
    columns = ", ".join(summary.get("drifted_columns") or []) or "none"
    live = summary.get("live") or {}
    lines = [
        f"Why: {summary['decision']['reason']}",
        "No retrain now: a drift-triggered retrain ran within the cooldown (drift.cooldown_hours). "
        "This is the only notice for this cooldown period; the next check after it retrains if "
        "the drift is still there.",
        f"Drifted columns: {columns}",
    ]
    if live.get("value") is not None:
        lines.append(f"Live performance: {live.get('reason')}")
    lines.append(f"Report: {summary.get('report_uri')}")
    return notify.Message(
        subject=f"[cd4ml] {model}: drift detected during the retrain cooldown",
        body="\n".join([
            f"Model: {model}", f"Version: {version} (champion)", *lines,
            f"Model version: {notify.mlflow_version_url(model, version)}", f"Run: {run_url}",
        ]) + "\n",
    )  # fmt: skip


def has_smtp_connection() -> bool:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        BaseHook.get_connection(notify.SMTP_CONN_ID)
    except AirflowNotFoundException:
        return False
    return True


def _legacy_starttls(extra: dict[str, Any]) -> bool | None:
    """cd4ml's own rule before the provider's hook: plain SMTP, upgraded with STARTTLS only when the
    `starttls` extra says so. Kept for every connection that sets neither of the provider's keys
    (`disable_ssl`, `disable_tls`) -- including one with no extras at all, which the hook alone would
    send over implicit SSL -- so existing connections keep sending; None when the provider's keys rule."""
    if "disable_ssl" in extra or "disable_tls" in extra:
        return None
    return bool(extra.get("starttls", False))


def send(message: notify.Message, recipients: list[str]) -> None:
    """Send one message through `cd4ml_smtp`; the connection's `from_email` is the sender."""
    from email.mime.text import MIMEText

    # Imported here: DAG files import this module, and parsing them must stay light.
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    class TextAndHtmlSmtpHook(SmtpHook):
        """The provider sends an HTML part only; cd4ml's mails are text first (terminal mail
        readers, filters), so the text goes in as the first part of a multipart/alternative and
        the HTML rendering of the same text second (preferred where HTML is shown)."""

        @property
        def use_ssl(self) -> bool:
            if _legacy_starttls(self.conn.extra_dejson) is not None:
                return False
            return bool(super().use_ssl)

        @property
        def smtp_starttls(self) -> bool:
            legacy = _legacy_starttls(self.conn.extra_dejson)
            return bool(super().smtp_starttls) if legacy is None else legacy

        def _build_mime_message(self, *args: Any, **kwargs: Any) -> Any:
            msg, recipients = super()._build_mime_message(*args, **kwargs)
            msg.set_payload([MIMEText(message.body, "plain", "utf-8"), *msg.get_payload()])
            return msg, recipients

    with TextAndHtmlSmtpHook(smtp_conn_id=notify.SMTP_CONN_ID) as hook:
        hook.send_email_smtp(
            to=recipients,
            subject=message.subject,
            html_content=message.html(),
            from_email=hook.from_email or DEFAULT_SENDER,
            mime_subtype="alternative",
        )
    log.info("sent %r to %s", message.subject, recipients)
