"""E-mail notifications through Airflow's notifier mechanism to a real local SMTP server (aiosmtpd),
configured by the Airflow connection `cd4ml_smtp` and sent by the SMTP provider's hook, for a
promotion and for a quarantine, and for drift: the retrain it starts, then one notice (not silence,
not one per check) while the cooldown holds retraining back. What users get: a
multipart/alternative mail, the text first, its HTML rendering with clickable links second, links
at the public MLflow URL. That a spec without recipients sends nothing is asserted in
test_extra_links.py, on runs it makes anyway."""

from __future__ import annotations

import json
import os
import time
from email.message import Message
from typing import Any

import httpx
import pytest

from cd4ml_dev.datagen import generate_churn
from tests.conftest import Inbox
from tests.helpers import LOGREG, WEAK, write_spec
from tests.integration.dagtools import land, run, run_dag

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


def send_drifted_traffic(env: dict[str, Any], model: str, seed: int) -> None:
    from cd4ml.core.spec import load_spec
    from cd4ml.ml.training import features

    spec = load_spec(env["specs"] / f"{model}.yaml")
    frame = features(spec, generate_churn(300, seed=seed, batch=seed, drift=1.0))
    rows = json.loads(frame.to_json(orient="records"))
    for i in range(0, len(rows), 100):
        resp = httpx.post(f"{env['service']}/v1/models/{model}/predict", json=rows[i : i + 100], timeout=30)
        assert resp.status_code == 200, resp.text
    time.sleep(2.5)  # the prediction log flushes every second


def test_drift_during_the_cooldown_sends_one_notice_per_cooldown_period(
    env: dict[str, Any], plain_smtp: Inbox
) -> None:
    from cd4ml.core.settings import get_settings
    from cd4ml.steps.monitor import load_state

    inbox = plain_smtp
    model = "cooled"
    write_spec(env["specs"], model, estimator=LOGREG, drift__min_rows=200, drift__threshold=0.3,
               drift__cooldown_hours=6,
               notifications={"email": ["ml-team@example.com"], "on_promotion": False})  # fmt: skip
    land(env, model, "week0.csv", generate_churn(1500, seed=80))
    assert run(env, model)["__run__"] == "success" and inbox.messages == []

    decisions = []
    for seed in (81, 82, 83):  # drift every time: a retrain, then two checks inside its cooldown
        send_drifted_traffic(env, model, seed)
        states = run_dag(f"{model}__monitor", {"window_hours": None})
        assert states["__run__"] == "success", states
        decisions.append(states["emit_drift_detected"])
    assert decisions == ["success", "skipped", "skipped"]

    subjects = [m["Subject"] for m in inbox.messages]
    assert subjects == [
        f"[cd4ml] {model}: drift detected, retraining",
        f"[cd4ml] {model}: drift detected during the retrain cooldown",
    ]  # the third check is inside the same cooldown period: no second notice
    text = body(inbox.messages[1])
    assert "cooldown: no retrain before" in text and "only notice for this cooldown period" in text
    assert "Version: 1 (champion)" in text and "Drifted columns: " in text
    assert f"{PUBLIC_MLFLOW}/#/models/{model}/versions/1" in text and f"/dags/{model}__monitor/runs/" in text
    state = load_state(get_settings(), model)
    assert state["last_cooldown_notice_at"] > state["last_trigger_at"]


def test_a_canary_through_the_training_dag_mails_its_decision(
    env: dict[str, Any], plain_smtp: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real DAG (dag.test) with `deployment.strategy: canary`: deploy_champion watches the canary
    while live traffic flows, promotes it by itself and mails the decision with both sides' figures;
    promote_champion's own mail does not call a canary "rejected"."""
    from tests.integration.test_staged_deploy import Load

    monkeypatch.setenv("CD4ML_CANARY_POLL_SECONDS", "0.5")
    inbox, model = plain_smtp, "notified_canary"
    canary = {
        "strategy": "canary",
        # As fast as the champion: a shared CI machine's latency noise must not decide (the p99
        # judgement is proved in tests/integration/test_canary.py with the defaults).
        "canary": {
            "fraction": 0.5,
            "min_requests": 60,
            "max_duration_minutes": 5,
            "min_p99_difference_ms": 50,
        },
    }
    write_spec(env["specs"], model, estimator=WEAK, promotion__floor=None, deployment=canary,
               notifications={"email": ["ml-team@example.com"]})  # fmt: skip
    land(env, model, "week0.csv", generate_churn(1500, seed=72))
    assert run(env, model)["__run__"] == "success"
    assert [m["Subject"] for m in inbox.messages] == [f"[cd4ml] {model}: version 1 is the new champion"]

    write_spec(env["specs"], model, estimator=LOGREG, promotion__floor=None, deployment=canary,
               notifications={"email": ["ml-team@example.com"]})  # fmt: skip
    with Load(f"{env['service']}/v1/models/{model}/predict") as load:
        states = run(env, model, force=True)
    assert states["__run__"] == "success" and states["deploy_champion"] == "success", states
    assert all(code == 200 for code, _ in load.answers) and {v for _, v in load.answers} == {"1", "2"}
    assert [m["Subject"] for m in inbox.messages[1:]] == [
        f"[cd4ml] {model}: canary version 2 promoted to champion"
    ]
    text = body(inbox.messages[1])
    assert "Version: 2 (champion now 2)" in text and "Why: canary no worse than the champion" in text
    assert "canary: " in text and "champion: " in text and " requests, 0 errors" in text
