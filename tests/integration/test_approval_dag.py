"""`approve_promotion` in `<model>__train` with dag.test(): real Airflow task execution, real MLflow,
the real prediction service and a real local SMTP server. The time-out path: a winning challenger
waits in Airflow's awaiting-input state, the mail with its evidence goes out, nobody answers, and the
scheduler's own time-out sweep (`SchedulerJobRunner.check_awaiting_input_timeouts`, called here as
the scheduler calls it, since dag.test() runs no scheduler) applies the default, Reject: promote and
deploy are skipped, the run succeeds, the champion does not move, and the history says "timeout".
Then a run with nothing to approve (evaluate_only) does not ask. A person approving and rejecting in
the Airflow UI is tests/system/test_embedded_stack.py."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from cd4ml import registry
from cd4ml_dev.datagen import generate_churn
from tests.conftest import Inbox
from tests.helpers import WEAK, write_spec
from tests.integration.dagtools import champion, land, run, versions

pytestmark = pytest.mark.integration
MODEL = "appr_timeout"
TIMEOUT_HOURS = 0.001  # 3.6 s


@pytest.fixture
def plain_smtp(inbox: Inbox, monkeypatch: pytest.MonkeyPatch) -> Inbox:
    conn = json.loads(os.environ["AIRFLOW_CONN_CD4ML_SMTP"])
    conn["extra"] = {**conn.get("extra", {}), "disable_ssl": True, "disable_tls": True}
    monkeypatch.setenv("AIRFLOW_CONN_CD4ML_SMTP", json.dumps(conn))
    return inbox


@pytest.fixture
def time_out_sweep() -> Iterator[None]:
    """What the scheduler does every loop for tasks awaiting input past their deadline."""
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    runner = SimpleNamespace(log=logging.getLogger("test.sweep"))
    stop = threading.Event()

    def sweep() -> None:
        while not stop.wait(0.5):
            SchedulerJobRunner.check_awaiting_input_timeouts(runner)  # type: ignore[arg-type]

    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def test_nobody_answers_the_time_out_rejects_and_a_run_with_nothing_to_approve_does_not_ask(
    env: dict[str, Any], plain_smtp: Inbox, time_out_sweep: None
) -> None:
    write_spec(env["specs"], MODEL, estimator=WEAK, promotion__floor=None, promotion__approval="required",
               promotion__approval_timeout_hours=TIMEOUT_HOURS,
               notifications={"email": ["approvers@example.com"]})  # fmt: skip
    land(env, MODEL, "week0.csv", generate_churn(600, seed=81))
    states = run(env, MODEL)
    assert states["__run__"] == "success", states
    assert states["approve_promotion"] == "success", states
    assert states["promote_champion"] == states["deploy_champion"] == "skipped", states
    assert champion(env, MODEL) is None
    (approval,) = [e for e in registry.events(env["mlflow"], MODEL) if e.kind == "approval"]
    assert (approval.version, approval.who, approval.outcome) == ("1", "timeout", "timed out")
    assert approval.why == "timed out after 0.001 h: nobody answered; the default (Reject) applied"
    assert (
        approval.details["approval"]["approved"] is False
        and approval.details["run_id"] == states["__run_id__"]
    )
    assert not [e for e in registry.events(env["mlflow"], MODEL) if e.kind == "promotion"]
    (v1,) = versions(env, MODEL)
    assert v1.tags["cd4ml.approval"] == f"timed out after 0.001 h at {approval.when}"
    # The mail asked, with the evidence and the link to the form, before the time-out.
    (asked,) = plain_smtp.messages
    assert asked["Subject"] == f"[cd4ml] {MODEL}: version 1 waits for your approval"
    text = asked.get_payload()[0].get_payload(decode=True).decode()
    assert (
        "roc_auc (maximize, binary average) on the same 120 holdout rows: challenger 0.5000, no champion yet"
        in text
    )
    assert "Drift: no drift check has run yet" in text
    assert f"/dags/{MODEL}__train/runs/" in text and "/tasks/approve_promotion/required_actions" in text

    # evaluate_only: the challenger wins, but nothing would move: not asked, promote records it.
    states = run(env, MODEL, evaluate_only=True, force=True)
    assert states["__run__"] == "success" and states["promote_champion"] == "success", states
    assert versions(env, MODEL)[1].tags["cd4ml.promotion"] == "skipped: evaluate_only"
    assert len([e for e in registry.events(env["mlflow"], MODEL) if e.kind == "approval"]) == 1
    assert len(plain_smtp.messages) == 1 and champion(env, MODEL) is None
