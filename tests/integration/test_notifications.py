"""E-mail notifications through Airflow's notifier mechanism to a real local SMTP server (aiosmtpd),
configured by the Airflow connection `cd4ml_smtp`, for a promotion and for a quarantine. That a spec
without recipients sends nothing is asserted in test_extra_links.py, on runs it makes anyway."""

from __future__ import annotations

from email.message import Message
from typing import Any

import pytest

from cd4ml_dev.datagen import generate_churn
from tests.conftest import Inbox
from tests.helpers import LOGREG, write_spec
from tests.integration.dagtools import land, run

pytestmark = pytest.mark.integration
MODEL = "notified"


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
