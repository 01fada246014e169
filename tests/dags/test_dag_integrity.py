"""Every DAG file imports cleanly, fast and light, and every DAG follows the house rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, spec_dict

HEAVY = ["pandas", "numpy", "sklearn", "scipy", "mlflow", "great_expectations", "evidently", "pyarrow"]

PROBE = r"""
import json, sys
from unittest import mock
def forbidden(*a, **k):
    raise AssertionError("connection/variable lookup at parse time")
patches = [mock.patch("airflow.sdk.BaseHook.get_connection", forbidden),
           mock.patch("airflow.sdk.Variable.get", forbidden)]
for p in patches:
    p.start()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in json.loads(sys.argv[2]))
print(json.dumps({"errors": bag.import_errors, "dags": sorted(bag.dags), "heavy": heavy}))
"""


def parse_in_fresh_process(env: dict[str, str] | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO / "dags"), json.dumps(HEAVY)],
        capture_output=True, text=True, check=True, env={**os.environ, **(env or {})},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dag_files_import_without_errors_heavy_modules_or_lookups() -> None:
    result = parse_in_fresh_process()
    assert result["errors"] == {}
    assert "churn__train" in result["dags"]
    assert result["heavy"] == [], f"DAG parsing imported heavy modules: {result['heavy']}"


def test_broken_spec_is_an_import_error_naming_file_and_field_and_others_still_load(tmp_path: Path) -> None:
    (tmp_path / "good_model.yaml").write_text(yaml.safe_dump(spec_dict()))
    (tmp_path / "bad_model.yaml").write_text(yaml.safe_dump(spec_dict(promotion__confidence=3)))
    result = parse_in_fresh_process({"CD4ML_SPECS_DIR": str(tmp_path)})
    assert "good_model__train" in result["dags"]
    assert not any(d.startswith("bad_model") for d in result["dags"])
    ((path, message),) = result["errors"].items()
    assert path.endswith("cd4ml_spec_check.py")
    assert f"{tmp_path}/bad_model.yaml: field 'promotion.confidence'" in message


@pytest.fixture(scope="module")
def bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_the_specs_owner_owns_every_dag_and_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import DagBag

    # Neither Airflow's default owner nor the spec's default: the spec's own owner reaches every task.
    (tmp_path / "owned.yaml").write_text(yaml.safe_dump(spec_dict(owner="fraud-team")))
    monkeypatch.setenv("CD4ML_SPECS_DIR", str(tmp_path))
    owned = DagBag(dag_folder=str(REPO / "dags"))
    assert owned.dags and not owned.import_errors, owned.import_errors
    for dag_id, dag in owned.dags.items():
        assert dag.default_args.get("owner") == "fraud-team", dag_id
        assert dag.owner == "fraud-team", dag_id
        for t in dag.tasks:
            assert t.owner == "fraud-team", f"{dag_id}.{t.task_id}"


def test_every_dag_has_tags_retries_docs_and_the_error_policy(bag) -> None:
    assert bag.dags
    for dag_id, dag in bag.dags.items():
        model = dag_id.split("__")[0]
        assert {"cd4ml", model} <= set(dag.tags), dag_id
        assert dag.doc_md and len(dag.doc_md) > 200, dag_id
        assert dag.default_args.get("retries", 0) >= 1, dag_id
        assert not dag.catchup, dag_id
        for t in dag.tasks:
            assert t.retries >= 1, f"{dag_id}.{t.task_id}"
            # One error policy for every task: transient errors retried, deterministic ones not.
            assert type(t.retry_policy).__name__ == "Cd4mlRetryPolicy", f"{dag_id}.{t.task_id}"


def test_training_dag_structure_schedule_and_form(bag) -> None:
    from airflow.sdk import AssetOrTimeSchedule

    dag = bag.dags["churn__train"]
    downstream = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert downstream == {
        "collect_landed_files": ["validate_batches"],
        "validate_batches": ["build_datasets", "register_challenger"],
        "build_datasets": [
            "deploy_champion",
            "evaluate_against_champion",
            "needs_training",
            "register_challenger",
            "stage_challenger",
            "train_challenger",
        ],
        "needs_training": ["train_challenger"],
        "train_challenger": ["evaluate_against_champion", "register_challenger"],
        "evaluate_against_champion": ["promote_champion", "register_challenger", "stage_challenger"],
        "register_challenger": ["promote_champion", "stage_challenger"],
        "stage_challenger": ["deploy_champion", "promote_champion"],
        "promote_champion": ["deploy_champion"],
        "deploy_champion": [],
    }
    assert dag.max_active_runs == 1
    timetable = dag.timetable
    assert isinstance(timetable, AssetOrTimeSchedule)
    assert "expression='0 2 * * *', timezone='UTC'" in repr(timetable.timetable)
    assert type(timetable.asset_condition).__name__ == "AssetAny"  # new data OR drift
    assert {a.name for a in timetable.asset_condition.objects} == {"churn.new_data", "churn.drift_detected"}
    (watcher,) = next(a for a in timetable.asset_condition.objects if a.name == "churn.new_data").watchers
    assert type(watcher.trigger).__name__ == "LandingZoneTrigger"
    assert set(dag.params) == {"reason", "evaluate_only", "force"}
    assert "**Approval.** Not asked (`promotion.approval: none`)" in dag.doc_md


def test_approval_required_puts_a_person_between_the_staged_challenger_and_the_promotion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    (tmp_path / "gated.yaml").write_text(
        yaml.safe_dump(spec_dict(promotion__approval="required", promotion__approval_timeout_hours=8))
    )
    monkeypatch.setenv("CD4ML_SPECS_DIR", str(tmp_path))
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["gated__train"]
    downstream = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert downstream["stage_challenger"] == ["approve_promotion", "deploy_champion", "promote_champion"]
    assert downstream["approve_promotion"] == ["promote_champion"]
    assert downstream["promote_champion"] == ["deploy_champion"]
    # Nothing else changes: the same graph as without approval, plus the one task and its edges.
    assert len(dag.tasks) == 11
    task = dag.get_task("approve_promotion")
    assert isinstance(task, ApprovalOperator) and type(task).__name__ == "PromotionApproval"
    # A time-out answers Reject (promotes nothing) after the spec's hours; a rejection skips the
    # promotion and the deploy, not the run: the DAG run still succeeds.
    assert task.defaults == ["Reject"] and task.response_timeout.total_seconds() == 8 * 3600
    assert not task.fail_on_reject and task.params == {}  # the run's form stays off the approval form
    assert "**Approval.** Required (`promotion.approval: required`)" in dag.doc_md
    assert "no answer within 8 h" in dag.doc_md


def test_rollback_dag_is_manual_with_a_version_and_reason_form(bag) -> None:
    dag = bag.dags["churn__rollback"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # manual only
    assert [t.task_id for t in dag.tasks] == ["roll_back"]
    assert set(dag.params) == {"version", "reason", "force"}
    assert dag.params["version"] == ""


def test_monitor_dag_emits_the_drift_asset_the_training_dag_listens_to(bag) -> None:
    dag = bag.dags["churn__monitor"]
    downstream = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert downstream == {
        "ingest_labels": ["check_drift"],
        "check_drift": ["emit_drift_detected", "should_retrain"],
        "should_retrain": ["emit_drift_detected"],
        "emit_drift_detected": [],
    }
    (outlet,) = dag.get_task("emit_drift_detected").outlets
    train_assets = {a.name for a in bag.dags["churn__train"].timetable.asset_condition.objects}
    assert outlet.name == "churn.drift_detected" and outlet.name in train_assets
    assert "0 * * * *" in repr(dag.timetable) or "@hourly" in repr(dag.timetable)
    assert set(dag.params) == {"window_hours"}


def test_retract_dag_is_manual_with_a_file_and_reason_form_and_starts_training(bag) -> None:
    dag = bag.dags["churn__retract"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # manual only
    downstream = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert downstream == {"retract_file": ["request_retrain"], "request_retrain": []}
    assert set(dag.params) == {"file", "reason"}
    (outlet,) = dag.get_task("request_retrain").outlets
    train_assets = {a.name for a in bag.dags["churn__train"].timetable.asset_condition.objects}
    assert outlet.name == "churn.new_data" and outlet.name in train_assets
    assert "cd4ml data retract churn" in dag.doc_md
