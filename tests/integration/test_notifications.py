"""E-mail notifications through Airflow's notifier mechanism to a real local SMTP server (aiosmtpd),
configured by the Airflow connection `cd4ml_smtp`, for a promotion and for a quarantine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from cd4ml.datagen import generate_churn
from tests.conftest import free_port
from tests.helpers import LOGREG, write_spec
from tests.integration.dagtools import land, run

pytestmark = pytest.mark.integration
MODEL = "notified"


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def inbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[Inbox]:
    handler = Inbox()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    monkeypatch.setenv(
        "AIRFLOW_CONN_CD4ML_SMTP",
        json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port,
                    "extra": {"from_email": "cd4ml@test.local"}}),
    )  # fmt: skip
    try:
        yield handler
    finally:
        controller.stop()


def body(message: Message) -> str:
    plain = next(part for part in message.walk() if part.get_content_type() == "text/plain")
    return bytes(plain.get_payload(decode=True)).decode()


def test_promotion_and_quarantine_emails(env: dict[str, Any], inbox: Inbox) -> None:
    write_spec(env["specs"], MODEL, estimator=LOGREG, notifications={"email": ["ml-team@example.com"]})
    land(env, MODEL, "week0.csv", generate_churn(1500, seed=70))
    assert run(env, MODEL)["__run__"] == "success"
    (promoted,) = inbox.messages
    assert promoted["Subject"] == f"[cd4ml] {MODEL}: version 1 is the new champion"
    assert promoted["To"] == "ml-team@example.com" and promoted["From"] == "cd4ml@test.local"
    text = body(promoted)
    assert "Version: 1 (previous champion: none)" in text
    assert f"/#/models/{MODEL}/versions/1" in text and f"/dags/{MODEL}__train/runs/" in text

    bad = generate_churn(1500, seed=71, batch=1).drop(columns=["region"])
    land(env, MODEL, "week1.csv", bad)
    assert run(env, MODEL)["__run__"] == "failed"
    assert len(inbox.messages) == 2  # the quarantine mail, and no second "failed" mail for it
    quarantined = inbox.messages[1]
    assert quarantined["Subject"] == f"[cd4ml] {MODEL}: landed data quarantined"
    text = body(quarantined)
    assert "week1.csv was rejected by validation" in text and "missing columns ['region']" in text
    assert "Version: unchanged" in text and f"/dags/{MODEL}__train/runs/" in text


def test_no_recipients_means_no_mail_and_no_error(env: dict[str, Any], inbox: Inbox) -> None:
    write_spec(env["specs"], "quiet", estimator=LOGREG)
    land(env, "quiet", "week0.csv", generate_churn(1500, seed=72))
    assert run(env, "quiet")["__run__"] == "success"
    assert inbox.messages == []
