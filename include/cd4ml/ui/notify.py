"""Notifications: what a message says. Sending is cd4ml.airflow.notifiers (the SMTP provider's
SmtpHook with the Airflow connection `cd4ml_smtp`).

Events: promotion, rejected challenger (opt-in per spec), quarantine, drift-triggered retrain,
rollback, failure. Every message names the model and the version and links to MLflow / Airflow,
at the public URLs of the settings (a reader's browser, not a container, follows them).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from cd4ml.core.settings import get_settings

SMTP_CONN_ID = "cd4ml_smtp"


@dataclass(frozen=True)
class Message:
    subject: str
    body: str  # plain text; the HTML part is the same text, escaped, with links clickable

    def html(self) -> str:
        lines = []
        for line in self.body.splitlines():
            escaped = html.escape(line)
            for word in line.split():
                if word.startswith(("http://", "https://", "file://")):
                    link = html.escape(word)
                    escaped = escaped.replace(link, f'<a href="{link}">{link}</a>')
            lines.append(escaped)
        return "<html><body><pre>" + "\n".join(lines) + "</pre></body></html>"


def mlflow_version_url(model: str, version: str | None) -> str:
    base = get_settings().mlflow_public_url
    if version:
        return f"{base}/#/models/{model}/versions/{version}"
    return f"{base}/#/models/{model}"


def airflow_run_url(dag_id: str, run_id: str) -> str:
    return f"{get_settings().airflow_public_url}/dags/{dag_id}/runs/{run_id}"


def _message(subject: str, model: str, version_line: str, details: list[str], links: list[str]) -> Message:
    """Every mail has the same skeleton: model, version, what happened, then the links."""
    lines = [f"Model: {model}", f"Version: {version_line}", *details, *links]
    return Message(subject=f"[cd4ml] {model}: {subject}", body="\n".join(lines) + "\n")


def promotion(model: str, result: dict[str, Any], run_url: str) -> Message:
    version = str(result.get("version"))
    return _message(
        f"version {version} is the new champion", model,
        f"{version} (previous champion: {result.get('previous') or 'none'})",
        [f"Why: {result.get('why')}"],
        [f"Model version: {mlflow_version_url(model, version)}", f"Run: {run_url}"],
    )  # fmt: skip


def rejection(model: str, result: dict[str, Any], run_url: str) -> Message:
    version = str(result.get("version"))
    return _message(
        f"challenger version {version} rejected", model, f"{version} (registered, not serving)",
        [f"Why: {result.get('why')}"],
        [f"Model version: {mlflow_version_url(model, version)}", f"Run: {run_url}"],
    )  # fmt: skip


def quarantine(model: str, reasons: str, run_url: str) -> Message:
    return _message(
        "landed data quarantined", model, "unchanged (nothing was trained)",
        ["", reasons, ""],
        [f"Model: {mlflow_version_url(model, None)}", f"Run: {run_url}"],
    )  # fmt: skip


def drift(model: str, summary: dict[str, Any], run_url: str) -> Message:
    version = str(summary.get("champion_version"))
    columns = ", ".join(summary.get("drifted_columns") or []) or "none"
    return _message(
        "drift detected, retraining", model, f"{version} (champion)",
        [f"Why: {summary['decision']['reason']}", f"Drifted columns: {columns}",
         f"Report: {summary.get('report_uri')}"],
        [f"Model version: {mlflow_version_url(model, version)}", f"Run: {run_url}"],
    )  # fmt: skip


def rollback(model: str, result: dict[str, Any], run_url: str) -> Message:
    version = str(result.get("to"))
    return _message(
        f"rolled back to version {version}", model, f"{version} (was {result.get('from')})", [],
        [f"Model version: {mlflow_version_url(model, version)}", f"Run: {run_url}"],
    )  # fmt: skip


def failure(model: str, task_id: str, error: str, run_url: str) -> Message:
    return _message(
        f"{task_id} failed", model, "see the run", [f"Task: {task_id}", f"Error: {error[:4000]}"],
        [f"Run: {run_url}"],
    )  # fmt: skip


def approval_needed(model: str, version: str, evidence: list[str], approve_url: str, run_url: str) -> Message:
    """promotion.approval: required: a challenger that won waits for a person."""
    return _message(
        f"version {version} waits for your approval", model, f"{version} (challenger; champion unchanged)",
        ["Approve or reject it in Airflow (the run's approve_promotion task):", *evidence],
        [f"Approve or reject: {approve_url}", f"Model version: {mlflow_version_url(model, version)}",
         f"Run: {run_url}"],
    )  # fmt: skip


def canary(model: str, result: dict[str, Any], run_url: str) -> Message:
    """deployment.strategy: canary: how the canary ended (promoted or rolled back), and why."""
    version = str(result.get("version"))
    promoted = result.get("outcome") == "promoted"
    subject = (
        f"canary version {version} promoted to champion" if promoted
        else f"canary version {version} rolled back"
    )  # fmt: skip
    champion = version if promoted else result.get("champion")
    arms = [f"{arm}: {line}" for arm, line in (result.get("arms") or {}).items()]
    return _message(
        subject, model, f"{version} (champion {'now' if promoted else 'stays'} {champion})",
        [f"Why: {result.get('why')}", *arms],
        [f"Model version: {mlflow_version_url(model, version)}", f"Run: {run_url}"],
    )  # fmt: skip
