"""E-mail notifications through Airflow's notifier mechanism to a real local SMTP server (aiosmtpd),
configured by the Airflow connection `cd4ml_smtp` and sent by the SMTP provider's hook, for a
promotion and for a quarantine. What users get: a multipart/alternative mail, the text first, its
HTML rendering with clickable links second, links at the public MLflow URL. That a spec without
recipients sends nothing is asserted in test_extra_links.py, on runs it makes anyway."""

from __future__ import annotations

import json
import os
from email.message import Message
from typing import Any

import pytest

from cd4ml_dev.datagen import generate_churn
from tests.conftest import Inbox
from tests.helpers import LOGREG, write_spec
from tests.integration.dagtools import land, run

pytestmark = pytest.mark.integration
MODEL = "notified"
PUBLIC_MLFLOW = "http://mlflow.public.example:5000"


@pytest.fixture
def plain_smtp(inbox: Inbox, monkeypatch: pytest.MonkeyPatch) -> Inbox:
    """The inbox's connection, saying what the provider's hook needs for a plain local server."""
    conn = json.loads(os.environ["AIRFLOW_CONN_CD4ML_SMTP"])
    conn["extra"] = {**conn.get("extra", {}), "disable_ssl": True, "disable_tls": True}
    monkeypatch.setenv("AIRFLOW_CONN_CD4ML_SMTP", json.dumps(conn))
    # As under compose: links must not point at the tracking URI the tasks use.
    monkeypatch.setenv("CD4ML_MLFLOW_PUBLIC_URL", PUBLIC_MLFLOW)
    return inbox


def part(message: Message, kind: str) -> str:
    found = next(part for part in message.walk() if part.get_content_type() == kind)
    return bytes(found.get_payload(decode=True)).decode()


def body(message: Message) -> str:
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.walk()][1:] == ["text/plain", "text/html"]
    return part(message, "text/plain")


def test_promotion_and_quarantine_emails(env: dict[str, Any], plain_smtp: Inbox) -> None:
    inbox = plain_smtp
    write_spec(env["specs"], MODEL, estimator=LOGREG, notifications={"email": ["ml-team@example.com"]})
    land(env, MODEL, "week0.csv", generate_churn(1500, seed=70))
    assert run(env, MODEL)["__run__"] == "success"
    (promoted,) = inbox.messages
    assert promoted["Subject"] == f"[cd4ml] {MODEL}: version 1 is the new champion"
    assert promoted["To"] == "ml-team@example.com" and promoted["From"] == "cd4ml@test.local"
    text = body(promoted)
    assert "Version: 1 (previous champion: none)" in text
    assert f"Model version: {PUBLIC_MLFLOW}/#/models/{MODEL}/versions/1" in text
    assert f"/dags/{MODEL}__train/runs/" in text
    assert f'<a href="{PUBLIC_MLFLOW}/#/models/{MODEL}/versions/1">' in part(promoted, "text/html")

    bad = generate_churn(1500, seed=71, batch=1).drop(columns=["region"])
    land(env, MODEL, "week1.csv", bad)
    assert run(env, MODEL)["__run__"] == "failed"
    assert len(inbox.messages) == 2  # the quarantine mail, and no second "failed" mail for it
    quarantined = inbox.messages[1]
    assert quarantined["Subject"] == f"[cd4ml] {MODEL}: landed data quarantined"
    text = body(quarantined)
    assert "week1.csv was rejected by validation" in text and "missing columns ['region']" in text
    assert "Version: unchanged" in text and f"/dags/{MODEL}__train/runs/" in text
