"""`<model>__train` end to end with dag.test(): real Airflow task execution, real GX, real sklearn,
a real MLflow tracking server and the real prediction service (deploy step). These runs cover the
DAG's wiring of every gate path: promote (first model and over a champion), reject, evaluate-only and
force from the form, the short circuit, a quarantine, a failed deploy, deterministic failures, and the
rollback DAG. Edge cases of the steps themselves (equal scores, duplicates, a registration retried,
nothing accepted, ...) run without Airflow in tests/unit/test_steps*.py. Each test has its own model."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from cd4ml import registry
from cd4ml_dev.datagen import generate_churn
from tests.helpers import LOGREG, WEAK, make_champion, write_spec
from tests.integration.dagtools import champion, land, run, run_dag, served, task_tries, versions

pytestmark = pytest.mark.integration
ROWS = 1500


def last_event(env: dict[str, Any], model: str, kind: str, version: str) -> Any:
    """The newest history event of that kind for that version (deploys and rollbacks are events)."""
    found = [e for e in registry.events(env["mlflow"], model) if e.kind == kind and e.version == version]
    assert found, f"no {kind} event for {model} v{version}"
    return found[-1]


def test_promotion_paths_through_the_dag_then_rollback(env: dict[str, Any]) -> None:
    """First model, evaluate-only, forced better model, forced worse model, then the rollback DAG."""
    model = "lifecycle"
    write_spec(env["specs"], model, estimator=WEAK, promotion__floor=None)
    land(env, model, "week0.csv", generate_churn(ROWS, seed=2))
    states = run(env, model)
    assert states["__run__"] == "success", states
    assert champion(env, model) == served(env, model) == "1"
    (v1,) = versions(env, model)
    evidence = registry.read_evidence(env["mlflow"], model, v1).decision
    assert evidence["promote"] and evidence["champion_version"] is None and evidence["n"] == 300
    assert "first model" in evidence["reason"]
    assert registry.read_evidence(env["mlflow"], model, v1).validation["accepted"] == ["week0.csv"]
    (accepted,) = (env["data"] / model / "accepted").glob("*.csv")
    assert accepted.name.endswith("__week0.csv")
    assert not any((env["data"] / model / "landing").iterdir())

    # The form's evaluate_only reaches promote_champion: a winning decision, the champion untouched.
    write_spec(env["specs"], model, estimator=LOGREG, promotion__floor=None)  # a real model now
    assert run(env, model, evaluate_only=True)["__run__"] == "success"
    assert champion(env, model) == "1"
    v2 = versions(env, model)[1]
    assert v2.tags["cd4ml.decision"] == "promote" and v2.tags["cd4ml.promotion"] == "skipped: evaluate_only"

    # The form's force reaches the gate (v2 has exactly these inputs); a better model is promoted
    # over the champion with full lineage, deployed and smoke-tested.
    states = run(env, model, force=True)
    assert states["__run__"] == "success" and states["deploy_champion"] == "success", states
    assert champion(env, model) == served(env, model) == "3"
    v3 = versions(env, model)[2]
    tags = v3.tags
    for key in (
        "data_fingerprint",
        "spec_hash",
        "code_version",
        "lock_hash",
        "decision",
        "validation_status",  # the whole evidence is stored as artifacts of the version's run
        "evidence_format",
    ):
        assert tags.get(f"cd4ml.{key}"), key
    assert "cd4ml.evidence" not in tags and "cd4ml.validation" not in tags  # tags keep small scalars
    evidence = registry.read_evidence(env["mlflow"], model, v3).decision
    assert evidence["promote"] and evidence["champion_version"] == "1"
    assert evidence["ci_low"] > 0 and evidence["resamples"] == 1000
    assert evidence["challenger_score"] > evidence["champion_score"] == 0.5
    assert (
        tags["cd4ml.previous_champion"] == "1" and tags["cd4ml.trigger_reason"] == "manual: integration test"
    )
    from mlflow.models import get_model_info

    info = get_model_info(f"models:/{model}/3")
    assert info.signature is not None and info.saved_input_example_info is not None
    assert {c.name for c in info.signature.inputs} == {"tenure_months", "monthly_charges", "support_calls",
                                                       "age", "contract", "plan", "region"}  # fmt: skip
    deployment = last_event(env, model, "deployment", "3").details
    assert deployment["outcome"] == "deployed" and deployment["golden_rows"] == 20

    # A worse challenger is registered and rejected; promote_champion succeeds and changes nothing.
    write_spec(env["specs"], model, estimator=WEAK, promotion__floor=None)
    states = run(env, model, force=True)
    assert states["__run__"] == "success" and states["promote_champion"] == "success", states
    assert champion(env, model) == served(env, model) == "3"
    evidence = registry.read_evidence(env["mlflow"], model, versions(env, model)[3]).decision
    assert not evidence["promote"] and "rejected" in evidence["reason"]
    assert env["mlflow"].get_model_version_by_alias(model, "challenger").version == "4"

    # The rollback DAG: back to the previous champion by default, to a chosen version, never to an
    # unknown one or to one registered outside cd4ml.
    states = run_dag(f"{model}__rollback", {"version": "", "reason": "bad predictions in prod"})
    assert states["__run__"] == "success", states
    assert champion(env, model) == served(env, model) == "1"
    rollback = last_event(env, model, "rollback", "1")
    assert rollback.why == "bad predictions in prod" and rollback.details["outcome"] == "rolled back"

    assert run_dag(f"{model}__rollback", {"version": "3", "reason": "fixed"})["__run__"] == "success"
    assert champion(env, model) == served(env, model) == "3"

    assert run_dag(f"{model}__rollback", {"version": "99", "reason": "typo"})["__run__"] == "failed"
    assert champion(env, model) == "3"

    import mlflow
    from sklearn.dummy import DummyClassifier

    mlflow.set_experiment(model)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(DummyClassifier().fit([[0], [1]], [0, 1]), name="model")
    outsider = mlflow.register_model(info.model_uri, model).version
    assert run_dag(f"{model}__rollback", {"version": str(outsider), "reason": "x"})["__run__"] == "failed"
    assert champion(env, model) == served(env, model) == "3"


def test_a_quarantine_fails_validate_batches_with_the_reason_and_trains_nothing(env: dict[str, Any]) -> None:
    write_spec(env["specs"], "guarded", estimator=LOGREG)
    bad = generate_churn(ROWS, seed=5, batch=1).drop(columns=["plan"])
    bad.loc[:30, "tenure_months"] = -7
    landed_bytes = land(env, "guarded", "week1.csv", bad).read_bytes()

    states = run(env, "guarded")
    assert states["__run__"] == "failed"
    assert states["validate_batches"] == "failed"
    assert states["build_datasets"] in {"upstream_failed", "None"}
    assert states["train_challenger"] in {"upstream_failed", "None"}
    assert champion(env, "guarded") is None and versions(env, "guarded") == []
    quarantine = env["data"] / "guarded" / "quarantine"
    (stored,) = [p for p in quarantine.iterdir() if p.name.endswith("__week1.csv")]
    assert stored.read_bytes() == landed_bytes  # nothing lost
    reason = stored.with_name(stored.name + ".reason.txt").read_text()
    assert "week1.csv was rejected by validation" in reason
    assert "missing columns ['plan']" in reason
    assert "column 'tenure_months': 31 of 1500 rows outside [0, 120]" in reason
    assert "Data Docs: file://" in reason
    assert task_tries(states["__run_id__"], "guarded__train")["validate_batches"] == 1
    assert not any((env["data"] / "guarded" / "landing").iterdir())


def test_nothing_to_train_on_short_circuits_and_records_why(env: dict[str, Any]) -> None:
    write_spec(env["specs"], "idle", estimator=LOGREG)
    states = run(env, "idle")
    assert states["__run__"] == "success", states
    assert states["needs_training"] == "success"
    for skipped in ("train_challenger", "evaluate_against_champion", "register_challenger",
                    "promote_champion", "deploy_champion"):  # fmt: skip
        assert states[skipped] == "skipped", (skipped, states)
    (outcome,) = (env["data"] / "idle" / "runs").glob("*/outcome.json")
    recorded = json.loads(outcome.read_text())
    assert recorded["run_id"] == states["__run_id__"] and recorded["trained"] is False
    assert recorded["trigger"] == "manual: integration test" and recorded["why"].startswith(
        "no accepted data"
    )


def test_a_challenger_that_fails_in_staging_never_reaches_live_traffic(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_spec(env["specs"], "deployfail", estimator=WEAK, promotion__floor=None)
    land(env, "deployfail", "week0.csv", generate_churn(ROWS, seed=7))
    assert run(env, "deployfail")["__run__"] == "success"
    assert served(env, "deployfail") == "1"

    write_spec(env["specs"], "deployfail", estimator=LOGREG, promotion__floor=None)
    # More golden rows than the service accepts per request: the staged smoke test fails (HTTP 413).
    monkeypatch.setenv("CD4ML_DEPLOY_GOLDEN_ROWS", "250")
    states = run(env, "deployfail")
    assert states["__run__"] == "failed" and states["stage_challenger"] == "failed", states
    assert states["promote_champion"] == states["deploy_champion"] == "upstream_failed", states
    # A deterministic failure: not retried.
    assert task_tries(states["__run_id__"], "deployfail__train")["stage_challenger"] == 1
    assert champion(env, "deployfail") == "1"  # the alias never moved
    assert served(env, "deployfail") == "1"
    v2 = env["mlflow"].get_model_version("deployfail", "2")
    staging = last_event(env, "deployfail", "deployment", "2").details
    assert staging["outcome"] == "staging failed" and "HTTP 413" in staging["error"], staging
    assert staging["champion"] == "1"
    assert v2.tags["cd4ml.staging"].startswith("failed: ") and "cd4ml.rolled_back" not in v2.tags
    staged = httpx.get(f"{env['service']}/v1/models/deployfail", timeout=10).json()["staged_version"]
    assert staged is None  # the failed version was dropped from the staging slot


def test_a_version_the_service_refuses_is_recorded_as_refused_not_unreachable(env: dict[str, Any]) -> None:
    """The issue's "still serves version None 60s after ... (service unreachable)" for a version the
    service had refused: the deploy now says at once what the service said."""
    import time

    import httpx
    import mlflow
    from sklearn.dummy import DummyClassifier

    from cd4ml.core.settings import get_settings
    from cd4ml.core.spec import load_spec
    from cd4ml.steps.deploy import ServiceRefusedError, deploy_champion

    model = "refusedv"
    spec_path = write_spec(env["specs"], model, estimator=LOGREG)
    land(env, model, "week0.csv", generate_churn(ROWS, seed=9))
    assert run(env, model)["__run__"] == "success"
    assert served(env, model) == "1"
    # A version the service cannot serve: logged without an input signature (nor an example).
    mlflow.set_experiment(model)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(DummyClassifier().fit([[0], [1]], [0, 1]), name="model")
    bad = str(mlflow.register_model(info.model_uri, model).version)
    make_champion(env["mlflow"], model, bad)  # as promote_champion does

    started = time.monotonic()
    with pytest.raises(ServiceRefusedError) as caught:
        promoted = {"promoted": True, "version": bad, "previous": "1"}
        deploy_champion(load_spec(spec_path), get_settings(), promoted=promoted, holdout_path="unused",
                        who="test", when="2026-05-01T00:00:00")  # fmt: skip
    assert time.monotonic() - started < 25  # at once, not after the whole wait (30 s here)
    said = httpx.get(f"{env['service']}/v1/models/{model}", timeout=10).json()["refused_versions"][bad]
    assert "no input signature" in said  # the service's own reason, whatever the words
    message = str(caught.value)
    assert f"refused version {bad}: {said}" in message and "unreachable" not in message
    deployment = last_event(env, model, "deployment", bad).details
    assert deployment["outcome"] == "failed"
    assert f"the prediction service at {env['service']} refused version {bad}: {said}" in deployment["error"]
    assert deployment["rollback"] == "champion rolled back to 1, which the service serves again"
    assert champion(env, model) == served(env, model) == "1"
    # Deploying it again (a cleared task, say) finds champion back at 1 and deploys nothing.
    from cd4ml.steps.deploy import DeployError

    with pytest.raises(DeployError, match=f"champion is version 1, no longer version {bad}"):
        deploy_champion(load_spec(spec_path), get_settings(), promoted=promoted, holdout_path="unused",
                        who="test", when="2026-05-01T00:00:01")  # fmt: skip
    assert champion(env, model) == served(env, model) == "1"


def test_deterministic_spec_and_training_failures_fail_after_one_try(env: dict[str, Any]) -> None:
    """The issue's failures were retried 3 times each; a spec or training error now fails once."""
    model = "unfittable"
    land(env, model, "week0.csv", generate_churn(ROWS, seed=10))
    # sklearn refuses C=-1: a spec error, found before any data is read.
    write_spec(env["specs"], model, estimator={"class": "sklearn.linear_model.LogisticRegression",
                                               "params": {"C": -1.0}})  # fmt: skip
    states = run(env, model)
    assert states["__run__"] == "failed", states
    (failed,) = [task for task, state in states.items() if state == "failed" and task != "__run__"]
    assert task_tries(states["__run_id__"], f"{model}__train")[failed] == 1, failed

    # MultinomialNB cannot fit the standardised (negative) features: a training error, at fit time.
    write_spec(env["specs"], model, estimator={"class": "sklearn.naive_bayes.MultinomialNB", "params": {}})
    states = run(env, model)
    assert states["__run__"] == "failed", states
    failed_tasks = [task for task, state in states.items() if state == "failed" and task != "__run__"]
    assert failed_tasks == ["train_challenger"], states
    assert task_tries(states["__run_id__"], f"{model}__train")["train_challenger"] == 1
    assert versions(env, model) == []
