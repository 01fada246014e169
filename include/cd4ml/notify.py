"""Notifications: what a message says (pure) and how it is sent (SMTP via an Airflow connection).

Events: promotion, rejected challenger (opt-in per spec), quarantine, drift-triggered retrain,
rollback, failure. Every message names the model and the version and links to MLflow / Airflow.
"""

from __future__ import annotations

import html
import logging
import os
import smtplib
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

log = logging.getLogger(__name__)
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
    base = os.environ.get("CD4ML_MLFLOW_UI_URL") or os.environ.get(
        "MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"
    )
    if version:
        return f"{base.rstrip('/')}/#/models/{model}/versions/{version}"
    return f"{base.rstrip('/')}/#/models/{model}"


def airflow_run_url(dag_id: str, run_id: str) -> str:
    base = os.environ.get("AIRFLOW__API__BASE_URL", "http://127.0.0.1:8080").rstrip("/")
    return f"{base}/dags/{dag_id}/runs/{run_id}"


def promotion(model: str, result: dict[str, Any], run_url: str) -> Message:
    version = str(result.get("version"))
    return Message(
        subject=f"[cd4ml] {model}: version {version} is the new champion",
        body=(
            f"Model: {model}\nVersion: {version} (previous champion: {result.get('previous') or 'none'})\n"
            f"Why: {result.get('why')}\nModel version: {mlflow_version_url(model, version)}\nRun: {run_url}\n"
        ),
    )


def rejection(model: str, result: dict[str, Any], run_url: str) -> Message:
    version = str(result.get("version"))
    return Message(
        subject=f"[cd4ml] {model}: challenger version {version} rejected",
        body=(
            f"Model: {model}\nVersion: {version} (registered, not serving)\nWhy: {result.get('why')}\n"
            f"Model version: {mlflow_version_url(model, version)}\nRun: {run_url}\n"
        ),
    )


def quarantine(model: str, reasons: str, run_url: str) -> Message:
    return Message(
        subject=f"[cd4ml] {model}: landed data quarantined",
        body=(
            f"Model: {model}\nVersion: unchanged (nothing was trained)\n\n{reasons}\n\n"
            f"Model: {mlflow_version_url(model, None)}\nRun: {run_url}\n"
        ),
    )


def drift(model: str, summary: dict[str, Any], run_url: str) -> Message:
    version = str(summary.get("champion_version"))
    return Message(
        subject=f"[cd4ml] {model}: drift detected, retraining",
        body=(
            f"Model: {model}\nVersion: {version} (champion)\nWhy: {summary['decision']['reason']}\n"
            f"Drifted columns: {', '.join(summary.get('drifted_columns') or []) or 'none'}\n"
            f"Report: {summary.get('report_uri')}\nModel version: {mlflow_version_url(model, version)}\n"
            f"Run: {run_url}\n"
        ),
    )


def rollback(model: str, result: dict[str, Any], run_url: str) -> Message:
    version = str(result.get("to"))
    return Message(
        subject=f"[cd4ml] {model}: rolled back to version {version}",
        body=(
            f"Model: {model}\nVersion: {version} (was {result.get('from')})\n"
            f"Model version: {mlflow_version_url(model, version)}\nRun: {run_url}\n"
        ),
    )


def failure(model: str, task_id: str, error: str, run_url: str) -> Message:
    return Message(
        subject=f"[cd4ml] {model}: {task_id} failed",
        body=(
            f"Model: {model}\nVersion: see the run\nTask: {task_id}\nError: {error[:4000]}\nRun: {run_url}\n"
        ),
    )


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    login: str | None
    password: str | None
    sender: str
    starttls: bool


def send(message: Message, recipients: list[str], smtp: SmtpSettings) -> None:
    email = EmailMessage()
    email["Subject"] = message.subject
    email["From"] = smtp.sender
    email["To"] = ", ".join(recipients)
    email.set_content(message.body)
    email.add_alternative(message.html(), subtype="html")
    with smtplib.SMTP(smtp.host, smtp.port, timeout=30) as server:
        if smtp.starttls:
            server.starttls()
        if smtp.login:
            server.login(smtp.login, smtp.password or "")
        server.send_message(email)
    log.info("sent %r to %s", message.subject, recipients)
