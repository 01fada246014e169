"""`approve_promotion` (promotion.approval: required): what the approver sees, and what an answer
records. The text is built by pure functions (tiny records in, strings out); reading the evidence and
recording the answer run against a real MLflow store (SQLite, in this process). The operator's two
halves run with a minimal task context (the XComs it pulls); the real Airflow UI answering it is
tests/system/test_embedded_stack.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cd4ml import registry
from cd4ml.airflow import approval as ap
from cd4ml.core.settings import get_settings
from cd4ml.core.spec import ModelSpec, load_spec
from cd4ml.steps import monitor, pipeline
from cd4ml.steps.contracts import Approval, Evaluation, Registration
from cd4ml.steps.pipeline import run_training
from cd4ml.ui import notify
from cd4ml_dev.datagen import generate_churn
from tests.helpers import LOGREG, WEAK, sqlite_mlflow, write_spec

WHEN = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
DECISION = {
    "promote": True, "reason": "promoted: roc_auc improves by +0.2100; the 95% lower bound +0.1800 "
    "exceeds the minimum improvement 0.0", "metric": "roc_auc", "direction": "maximize",
    "challenger_score": 0.81, "champion_score": 0.6, "champion_version": "3", "difference": 0.21,
    "ci_low": 0.18, "ci_high": 0.24, "confidence": 0.95, "min_improvement": 0.0, "floor": 0.7, "n": 420,
    "resamples": 1000, "average": None,
}  # fmt: skip
SPEC_V3 = (
    "task: classification\nestimator:\n  class: sklearn.dummy.DummyClassifier\n  params:\n"
    "    strategy: prior\n"
)
SPEC_V4 = (
    "task: classification\nestimator:\n  class: sklearn.linear_model.LogisticRegression\n  params:\n"
    "    max_iter: 500\n"
)
CHECK = {
    "window": {"end": "2026-03-02T08:00:00+00:00", "rows": 600, "source": "prediction log"},
    "share": 0.43, "drifted_columns": ["tenure_months", "contract"], "champion_version": "3",
    "decision": {"drift": True, "trigger": True, "reason": "drift share 0.43 >= threshold 0.3"},
    "live": {"value": 0.71, "reason": "live roc_auc 0.71 on 120 labelled rows"},
}  # fmt: skip


def gated(tmp_path: Path, name: str = "gated", **overrides: Any) -> ModelSpec:
    (tmp_path / "specs").mkdir(exist_ok=True)
    return load_spec(write_spec(tmp_path / "specs", name, promotion__approval="required",
                                promotion__approval_timeout_hours=6, **overrides))  # fmt: skip


def facts(version: str, spec_text: str | None, rows: int, **tags: str) -> ap.VersionFacts:
    return ap.VersionFacts(
        version, {f"cd4ml.{k}": v for k, v in tags.items()}, spec_text,
        {"train": {"rows": rows}, "holdout": {"rows": rows // 4}}, {"accepted": [f"week{version}.csv"]},
    )  # fmt: skip


# -- what the approver sees --------------------------------------------------------------------------


def test_the_form_shows_scores_interval_drift_and_the_diff_against_the_champion(tmp_path: Path) -> None:
    spec = gated(tmp_path)
    challenger = facts("4", SPEC_V4, 2400, spec_hash="bbb", data_fingerprint="f2", code_version="c1")
    champion = facts("3", SPEC_V3, 1600, spec_hash="aaa", data_fingerprint="f1", code_version="c1")
    request = ap.approval_request(spec, DECISION, challenger, champion, CHECK)

    assert request.subject == "gated: promote v4 to champion? roc_auc 0.8100 vs champion v3 0.6000"
    body = request.body
    assert "roc_auc (maximize) on the same 420 holdout rows: challenger 0.8100, champion v3 0.6000" in body
    assert "Improvement +0.2100" in body and "95% lower bound +0.1800, interval [+0.1800, +0.2400]" in body
    assert "needed: lower bound > 0.0" in body and "Floor: 0.7" in body
    assert "drifted share 0.43 (threshold 0.3); drifted columns: tenure_months, contract" in body
    assert "600 rows from prediction log" in body and "Live performance: live roc_auc 0.71" in body
    assert "**gated v4** beat champion v3; it is staged and smoke-tested" in body
    # The diff as a table, champion then challenger, what changed in bold; hashes cut to 12 characters.
    assert "| | champion v3 | challenger v4 |\n|---|---|---|\n" in body
    assert "| spec_hash | aaa | **bbb** |" in body and "| data_fingerprint | f1 | **f2** |" in body
    assert "| code_version | c1 | c1 |" in body and "| lock_hash | - | - |" in body
    assert "| train rows | 1600 | **2400** |" in body and "| holdout rows | 400 | **600** |" in body
    assert (
        "| estimator | sklearn.dummy.DummyClassifier | **sklearn.linear_model.LogisticRegression** |" in body
    )
    assert "| estimator max_iter | - | **500** |" in body and "| estimator strategy | prior | **-** |" in body
    assert "- New accepted files in this run: week4.csv" in body
    assert "```diff\n--- v3 spec\n+++ v4 spec\n" in body and "+  class: sklearn.linear_model" in body
    assert "no answer within 6 h (promotion.approval_timeout_hours), promotes nothing" in body
    # The mail carries the same evidence as text lines, and the link to the form.
    text = "\n".join(request.lines)
    assert "Improvement +0.2100" in text
    assert "Changed: data_fingerprint: f1 -> f2; spec_hash: aaa -> bbb; train rows: 1600 -> 2400;" in text
    assert "estimator max_iter: - -> 500; estimator strategy: prior -> -" in text
    assert "Unchanged: code_version, lock_hash, trained_through" in text
    assert not any(line.startswith("#") or "**" in line for line in request.lines)  # text, not Markdown
    mail = notify.approval_needed("gated", "4", request.lines, "http://af/form", "http://af/run")
    assert mail.subject == "[cd4ml] gated: version 4 waits for your approval"
    assert "drifted share 0.43" in mail.body and "Approve or reject: http://af/form" in mail.body


def test_a_first_model_and_no_drift_check_say_so_and_a_long_spec_diff_is_cut(tmp_path: Path) -> None:
    spec = gated(tmp_path)
    first = {**DECISION, "champion_version": None, "champion_score": None, "difference": None,
             "ci_low": None, "ci_high": None, "resamples": 0,
             "reason": "first model: roc_auc=0.8100 vs floor 0.7 met"}  # fmt: skip
    request = ap.approval_request(spec, first, facts("1", SPEC_V4, 800), None, None)
    assert request.subject.endswith("roc_auc 0.8100 vs no champion")
    assert "challenger 0.8100, no champion yet" in request.body
    assert "Improvement" not in request.body  # no interval without a champion
    assert "Drift: no drift check has run yet" in request.body
    assert "Champion: none yet; approving makes this version the first champion" in request.body

    long_a = "\n".join(f"k{i}: {i}" for i in range(200))
    long_b = "\n".join(f"k{i}: {i + 1}" for i in range(200))
    diff = ap.diff_against(facts("2", long_b, 10), facts("1", long_a, 10))
    assert len(diff.spec_diff) == ap.SPEC_DIFF_LINES + 1 and diff.spec_diff[-1] == "... 343 more lines"
    fingerprint = "0123456789abcdef" * 4
    diff = ap.diff_against(facts("2", SPEC_V3, 10, data_fingerprint=fingerprint), facts("1", SPEC_V3, 10))
    assert diff.spec_diff == [] and "Spec: unchanged" in diff.notes
    assert ("data_fingerprint", "-", "0123456789ab") in diff.rows
    assert ("estimator strategy", "prior", "prior") in diff.rows
    assert "| a\\|b | 1 | **2** |" in ap.Diff([("a|b", "1", "2")], [], []).markdown("1", "2")
    unreadable = ap.VersionFacts(
        "1", {"cd4ml.rows_train": "77"}, problem="artifact cd4ml/spec.yaml unreadable"
    )
    diff = ap.diff_against(facts("2", SPEC_V3, 10), unreadable)
    assert diff.notes[0] == "v1: evidence not readable (artifact cd4ml/spec.yaml unreadable)"
    assert ("train rows", "77", "10") in diff.rows and diff.spec_diff == []


# -- what an answer records --------------------------------------------------------------------------


def test_answers_become_approvals_with_who_and_when() -> None:
    admin = {"id": "admin", "name": "admin"}
    approved = ap.answer_of(
        {"chosen_options": ["Approve"], "responded_at": WHEN, "responded_by_user": admin}, 24
    )
    assert approved == Approval(True, "admin", "2026-03-02T09:30:00+00:00", "approved")
    rejected = ap.answer_of(
        {"chosen_options": ["Reject"], "responded_at": WHEN, "responded_by_user": {"id": "7", "name": "Ann"}},
        24,
    )
    assert rejected == Approval(False, "Ann (id 7)", "2026-03-02T09:30:00+00:00", "rejected")
    # The scheduler's time-out: the default (Reject), nobody responded.
    timed_out = ap.answer_of(
        {"chosen_options": ["Reject"], "responded_at": WHEN, "responded_by_user": None, "timedout": True}, 6
    )
    assert timed_out == Approval(False, "timeout", "2026-03-02T09:30:00+00:00", "timed out after 6 h")
    assert ap.version_tags(approved) == {"cd4ml.approval": "approved by admin at 2026-03-02T09:30:00+00:00"}
    assert (
        ap.version_tags(rejected)["cd4ml.approval"] == "rejected by Ann (id 7) at 2026-03-02T09:30:00+00:00"
    )
    assert ap.version_tags(timed_out)["cd4ml.promotion"].startswith("not approved: timed out after 6 h at ")
    # promote_champion's view: an answer, or None when the task did not ask.
    assert ap.approval_of(approved.to_xcom()) == approved
    assert ap.approval_of({"asked": False, "version": "2", "why": "evaluate_only"}) is None
    assert ap.approval_of(None) is None


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with sqlite_mlflow(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


class TaskInstance:
    """The two things the operator asks of its task instance: upstream XComs, and skipping."""

    def __init__(self, xcoms: dict[str, Any]) -> None:
        self.xcoms = xcoms

    def xcom_pull(self, task_ids: str) -> Any:
        return self.xcoms[task_ids]


def test_a_winning_challenger_is_asked_with_real_evidence_and_each_answer_is_recorded(
    workspace: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    settings = get_settings()
    weak = load_spec(write_spec(workspace / "specs", "asked", estimator=WEAK, promotion__floor=None))
    pipeline.zone_for(weak, settings)  # creates landing/
    generate_churn(400, seed=5).to_csv(pipeline.zone_for(weak, settings).landing / "week0.csv", index=False)
    when = "2026-03-01T00:00:00+00:00"
    assert run_training(weak, settings, run_id="r1", run_time=when, deploy=False)["promoted"]
    spec = load_spec(write_spec(
        workspace / "specs", "asked", estimator=LOGREG, promotion__floor=None,
        promotion__approval="required", promotion__approval_timeout_hours=6,
    ))  # fmt: skip
    # Without an answer (`cd4ml train`, outside Airflow) nothing moves.
    unasked = run_training(spec, settings, run_id="r2", run_time=when, deploy=False, force=True)
    assert not unasked["promoted"] and "no approval was given" in unasked["why"]
    client = registry.client(tracking_uri)
    v2 = client.get_model_version("asked", "2")
    evaluation = Evaluation.from_xcom(registry.read_evidence(client, "asked", v2).decision)
    registration = Registration("2", str(v2.run_id))
    assert evaluation.promote and str(evaluation.champion_version) == "1"
    with monitor.monitor_paths(settings, "asked").monitor_history.open("a") as fh:
        fh.write(json.dumps({**CHECK, "share": 0.11, "champion_version": "1"}) + "\n")
        fh.write(json.dumps({**CHECK, "champion_version": "1"}) + "\n")  # the last one is shown

    request = ap.gather_request(spec, settings, evaluation, registration)
    assert request.subject.startswith("asked: promote v2 to champion? roc_auc ")
    assert f"challenger {evaluation.decision.challenger_score:.4f}, champion v1 " in request.body
    assert "drifted share 0.43" in request.body
    body = request.body
    assert (
        "| estimator | sklearn.dummy.DummyClassifier | **sklearn.linear_model.LogisticRegression** |" in body
    )
    data = client.get_model_version("asked", "1").tags["cd4ml.data_fingerprint"][:12]
    assert f"| data_fingerprint | {data} | {data} |" in body  # the same data, another spec
    assert "| spec_hash | " in body and "| train rows | 320 | 320 |" in body
    assert "New accepted files" not in body  # forced: nothing new landed
    # The spec diff shows what changes the model; who signs off is not part of it (nor of the hash).
    assert "+    max_iter: 500" in request.body and "approval" not in request.body.split("```")[-2]
    assert ap.form_url(settings, "asked__train", "manual__2026-03-01T00:00:00+00:00") == (
        f"{settings.airflow_public_url}/dags/asked__train/runs/manual__2026-03-01T00%3A00%3A00%2B00%3A00"
        "/tasks/approve_promotion/required_actions"
    )

    op = ap.PromotionApproval(spec=spec, settings=settings)
    ti = TaskInstance({"evaluate_against_champion": evaluation.to_xcom(),
                       "register_challenger": registration.to_xcom()})  # fmt: skip
    # Nothing to approve: the task does not ask (and promote_champion decides as it always does).
    ctx: dict[str, Any] = {"ti": ti, "params": {"evaluate_only": True}, "run_id": "r3"}
    assert op.execute(ctx) == {
        "asked": False, "version": "2", "why": "evaluate_only: the champion does not move, nothing to approve"
    }  # fmt: skip
    lost = {**evaluation.to_xcom(), "promote": False, "reason": "rejected: worse"}
    losing = TaskInstance({**ti.xcoms, "evaluate_against_champion": lost})
    assert op.execute({"ti": losing, "params": {}, "run_id": "r3"})["why"] == (
        "the challenger did not win: rejected: worse"
    )
    assert [e for e in registry.events(client, "asked") if e.kind == "approval"] == []

    # A rejection, then (a later run) an approval, then a time-out: each recorded with who and when.
    answers = [
        ({"chosen_options": ["Reject"], "responded_by_user": {"id": "ann", "name": "ann"}}, "r4"),
        ({"chosen_options": ["Approve"], "responded_by_user": {"id": "bob", "name": "bob"}}, "r5"),
        ({"chosen_options": ["Reject"], "responded_by_user": None, "timedout": True}, "r6"),
    ]
    returned = []
    for i, (answer, run_id) in enumerate(answers):
        event = {**answer, "params_input": {}, "responded_at": WHEN.replace(hour=10 + i)}
        returned.append(op.execute_complete({"ti": ti, "run_id": run_id, "params": {}}, event))
        if i == 1:  # the same answer delivered twice is recorded once
            op.execute_complete({"ti": ti, "run_id": run_id, "params": {}}, event)
    assert [Approval.from_xcom(r).approved for r in returned] == [False, True, False]
    recorded = [e for e in registry.events(client, "asked") if e.kind == "approval"]
    assert [(e.version, e.who, e.when, e.outcome) for e in recorded] == [
        ("2", "ann", "2026-03-02T10:30:00+00:00", "rejected"),
        ("2", "bob", "2026-03-02T11:30:00+00:00", "approved"),
        ("2", "timeout", "2026-03-02T12:30:00+00:00", "timed out"),
    ]
    assert recorded[0].why == "rejected by ann" and recorded[1].why == "approved by bob"
    assert recorded[2].why == "timed out after 6 h: nobody answered; the default (Reject) applied"
    assert recorded[1].details["approval"] == returned[1]
    assert recorded[1].details["champion"] == "1" and recorded[1].details["evidence"]["promote"]
    tags = client.get_model_version("asked", "2").tags
    assert tags["cd4ml.approval"] == "timed out after 6 h at 2026-03-02T12:30:00+00:00"
    assert tags["cd4ml.promotion"] == "not approved: timed out after 6 h at 2026-03-02T12:30:00+00:00; " \
        "champion untouched"  # fmt: skip

    # A retry or a clear of an answered run acts on the recorded answer instead of asking again (a
    # rejection skips what follows the task, as the answer itself did); nothing is recorded twice.
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG

    with DAG("asked__train", schedule=None):
        wired = ap.PromotionApproval(spec=spec, settings=settings)
        wired >> EmptyOperator(task_id="promote_champion")
    skipped: list[list[str]] = []
    monkeypatch.setattr(wired, "skip", lambda ti, tasks: skipped.append([t.task_id for t in tasks]))
    again = {"ti": ti, "task": wired, "params": {}}
    assert wired.execute({**again, "run_id": "r4"}) == returned[0] and skipped == [["promote_champion"]]
    assert wired.execute({**again, "run_id": "r5"}) == returned[1] and skipped == [["promote_champion"]]
    assert ap.recorded_answer(client, "asked", "2", "r9") is None  # another run is asked afresh
    assert len([e for e in registry.events(client, "asked") if e.kind == "approval"]) == 3

    # The approval reaches promote_champion, which moves champion and carries it on the promotion.
    promoted = pipeline.promote_champion(
        spec, settings, version="2", evaluation=evaluation, evaluate_only=False, run_time=when, who="r5",
        run_id="r5", approval=Approval.from_xcom(returned[1]),
    )  # fmt: skip
    assert promoted.promoted and promoted.previous == "1"
    (promotion,) = [e for e in registry.events(client, "asked") if e.kind == "promotion" and e.version == "2"]
    assert promotion.details["approval"]["who"] == "bob"
    assert client.get_model_version("asked", "2").tags["cd4ml.approved_by"] == "bob"
