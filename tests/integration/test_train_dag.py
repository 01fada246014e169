"""`<model>__train` end to end with dag.test(): real Airflow task execution, real GX, real sklearn,
a real MLflow tracking server and the real prediction service (deploy step). One test per gate
path; each test uses its own model name."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cd4ml_dev.datagen import generate_churn
from tests.helpers import LOGREG, WEAK, write_spec
from tests.integration.dagtools import champion, land, run, run_dag, served, task_tries, versions

pytestmark = pytest.mark.integration
ROWS = 1500


def test_first_model_is_promoted_with_full_lineage(env: dict[str, Any]) -> None:
    write_spec(env["specs"], "first", estimator=LOGREG)
    land(env, "first", "week0.csv", generate_churn(ROWS, seed=1))
    states = run(env, "first")
    assert states["__run__"] == "success", states
    assert champion(env, "first") == "1"
    (v1,) = versions(env, "first")
    assert env["mlflow"].get_model_version_by_alias("first", "challenger").version == "1"
    tags = v1.tags
    for key in (
        "data_fingerprint",
        "spec_hash",
        "code_version",
        "lock_hash",
        "validation",
        "decision",
        "evidence",
    ):
        assert tags.get(f"cd4ml.{key}"), key
    evidence = json.loads(tags["cd4ml.evidence"])
    assert evidence["promote"] and evidence["champion_version"] is None and evidence["n"] == 300
    assert "first model" in evidence["reason"]
    assert tags["cd4ml.decision"] == "promote" and tags["cd4ml.trigger_reason"] == "manual: integration test"
    assert json.loads(tags["cd4ml.data.validation"])["accepted"] == ["week0.csv"]
    (accepted,) = (env["data"] / "first" / "accepted").glob("*.csv")
    assert accepted.name.endswith("__week0.csv")
    assert not any((env["data"] / "first" / "landing").iterdir())
    # The registered model has a signature and an input example.
    from mlflow.models import get_model_info

    info = get_model_info("models:/first/1")
    assert info.signature is not None
    assert {c.name for c in info.signature.inputs} == {"tenure_months", "monthly_charges", "support_calls",
                                                       "age", "contract", "plan", "region"}  # fmt: skip
    assert info.saved_input_example_info is not None
    # Deployed: the service serves it, and the smoke test passed on golden rows.
    assert served(env, "first") == "1"
    deployment = json.loads(env["mlflow"].get_model_version("first", "1").tags["cd4ml.deployment"])
    assert deployment["outcome"] == "deployed" and deployment["golden_rows"] == 20
    assert states["deploy_champion"] == "success"


def test_better_challenger_is_promoted_then_an_equal_one_is_rejected(env: dict[str, Any]) -> None:
    write_spec(env["specs"], "better", estimator=WEAK, promotion__floor=None)
    land(env, "better", "week0.csv", generate_churn(ROWS, seed=2))
    assert run(env, "better")["__run__"] == "success"
    assert champion(env, "better") == "1"

    write_spec(env["specs"], "better", estimator=LOGREG, promotion__floor=None)  # a real model now
    assert run(env, "better")["__run__"] == "success"
    assert champion(env, "better") == "2"
    evidence = json.loads(versions(env, "better")[1].tags["cd4ml.evidence"])
    assert evidence["promote"] and evidence["champion_version"] == "1"
    assert evidence["ci_low"] > 0 and evidence["resamples"] == 1000
    assert evidence["challenger_score"] > evidence["champion_score"] == 0.5
    assert versions(env, "better")[1].tags["cd4ml.previous_champion"] == "1"

    # Same data, spec and code: a forced retrain builds the identical model, which must not win.
    states = run(env, "better", force=True)
    assert states["__run__"] == "success"
    assert champion(env, "better") == "2"
    v3 = versions(env, "better")[2]
    assert v3.tags["cd4ml.decision"] == "reject"
    assert json.loads(v3.tags["cd4ml.evidence"])["difference"] == 0.0
    assert env["mlflow"].get_model_version_by_alias("better", "challenger").version == "3"


def test_worse_challenger_is_rejected_and_champion_unchanged(env: dict[str, Any]) -> None:
    write_spec(env["specs"], "worse", estimator=LOGREG)
    land(env, "worse", "week0.csv", generate_churn(ROWS, seed=3))
    assert run(env, "worse")["__run__"] == "success"
    write_spec(env["specs"], "worse", estimator=WEAK)
    states = run(env, "worse")
    assert states["__run__"] == "success" and states["promote_champion"] == "success"
    assert champion(env, "worse") == "1"
    evidence = json.loads(versions(env, "worse")[1].tags["cd4ml.evidence"])
    assert not evidence["promote"] and "rejected" in evidence["reason"]


def test_evaluate_only_records_the_decision_but_never_moves_the_champion(env: dict[str, Any]) -> None:
    write_spec(env["specs"], "evalonly", estimator=WEAK, promotion__floor=None)
    land(env, "evalonly", "week0.csv", generate_churn(ROWS, seed=4))
    assert run(env, "evalonly")["__run__"] == "success"
    write_spec(env["specs"], "evalonly", estimator=LOGREG, promotion__floor=None)
    assert run(env, "evalonly", evaluate_only=True)["__run__"] == "success"
    assert champion(env, "evalonly") == "1"
    v2 = versions(env, "evalonly")[1]
    assert v2.tags["cd4ml.decision"] == "promote"
    assert v2.tags["cd4ml.promotion"] == "skipped: evaluate_only"


def test_invalid_file_is_quarantined_with_reason_and_nothing_trained(env: dict[str, Any]) -> None:
    write_spec(env["specs"], "guarded", estimator=LOGREG)
    land(env, "guarded", "week0.csv", generate_churn(ROWS, seed=5))
    assert run(env, "guarded")["__run__"] == "success"
    bad = generate_churn(ROWS, seed=5, batch=1).drop(columns=["plan"])
    bad.loc[:30, "tenure_months"] = -7
    landed_bytes = land(env, "guarded", "week1.csv", bad).read_bytes()

    states = run(env, "guarded")
    assert states["__run__"] == "failed"
    assert states["validate_batches"] == "failed"
    assert states["train_challenger"] in {"upstream_failed", "None"}
    assert champion(env, "guarded") == "1" and len(versions(env, "guarded")) == 1
    quarantine = env["data"] / "guarded" / "quarantine"
    (stored,) = [p for p in quarantine.iterdir() if p.name.endswith("__week1.csv")]
    assert stored.read_bytes() == landed_bytes  # nothing lost
    reason = stored.with_name(stored.name + ".reason.txt").read_text()
    assert "week1.csv was rejected by validation" in reason
    assert "missing columns ['plan']" in reason
    assert "column 'tenure_months': 31 of 1500 rows outside [0, 120]" in reason
    assert "Data Docs: file://" in reason
    assert not any((env["data"] / "guarded" / "landing").iterdir())


def test_the_same_file_landed_twice_is_processed_once(env: dict[str, Any]) -> None:
    write_spec(env["specs"], "dedup", estimator=LOGREG)
    frame = generate_churn(ROWS, seed=6)
    land(env, "dedup", "week0.csv", frame)
    assert run(env, "dedup")["__run__"] == "success"
    land(env, "dedup", "week0-copy.csv", frame)  # same bytes, new name

    states = run(env, "dedup")
    assert states["__run__"] == "success"
    assert states["train_challenger"] == "skipped"  # nothing new to learn from
    assert len(versions(env, "dedup")) == 1
    accepted = [p for p in (env["data"] / "dedup" / "accepted").iterdir() if p.suffix == ".csv"]
    assert len(accepted) == 1
    (dup,) = [
        p for p in (env["data"] / "dedup" / "quarantine").iterdir() if p.name.endswith("week0-copy.csv")
    ]
    assert "duplicate: byte-identical to" in dup.with_name(dup.name + ".reason.txt").read_text()


def test_failed_deploy_rolls_back_and_the_service_serves_the_previous_champion(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_spec(env["specs"], "deployfail", estimator=WEAK, promotion__floor=None)
    land(env, "deployfail", "week0.csv", generate_churn(ROWS, seed=7))
    assert run(env, "deployfail")["__run__"] == "success"
    assert served(env, "deployfail") == "1"

    write_spec(env["specs"], "deployfail", estimator=LOGREG, promotion__floor=None)
    # More golden rows than the service accepts per request: the smoke test itself fails (HTTP 413).
    monkeypatch.setenv("CD4ML_DEPLOY_GOLDEN_ROWS", "250")
    states = run(env, "deployfail")
    assert states["__run__"] == "failed" and states["deploy_champion"] == "failed"
    assert states["promote_champion"] == "success"
    assert champion(env, "deployfail") == "1"
    assert served(env, "deployfail") == "1"
    v2 = env["mlflow"].get_model_version("deployfail", "2")
    deployment = json.loads(v2.tags["cd4ml.deployment"])
    assert deployment["outcome"] == "failed" and "HTTP 413" in deployment["error"]
    assert deployment["rollback"] == "champion rolled back to 1, which the service serves again"
    assert v2.tags["cd4ml.rolled_back"] == "to 1"


def test_rollback_dag_moves_the_champion_to_the_chosen_version(env: dict[str, Any]) -> None:
    write_spec(env["specs"], "rollme", estimator=WEAK, promotion__floor=None)
    land(env, "rollme", "week0.csv", generate_churn(ROWS, seed=8))
    assert run(env, "rollme")["__run__"] == "success"
    write_spec(env["specs"], "rollme", estimator=LOGREG, promotion__floor=None)
    assert run(env, "rollme")["__run__"] == "success"
    assert champion(env, "rollme") == served(env, "rollme") == "2"

    states = run_dag("rollme__rollback", {"version": "", "reason": "bad predictions in prod"})
    assert states["__run__"] == "success", states
    assert champion(env, "rollme") == served(env, "rollme") == "1"
    v1 = env["mlflow"].get_model_version("rollme", "1")
    assert v1.tags["cd4ml.rollback_reason"] == "bad predictions in prod"
    assert json.loads(v1.tags["cd4ml.deployment"])["outcome"] == "rolled back"

    assert run_dag("rollme__rollback", {"version": "2", "reason": "fixed"})["__run__"] == "success"
    assert champion(env, "rollme") == served(env, "rollme") == "2"

    assert run_dag("rollme__rollback", {"version": "99", "reason": "typo"})["__run__"] == "failed"
    assert champion(env, "rollme") == "2"

    # A version registered outside cd4ml never passed validation: refused.
    import mlflow
    from sklearn.dummy import DummyClassifier

    mlflow.set_experiment("rollme")
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(DummyClassifier().fit([[0], [1]], [0, 1]), name="model")
    outsider = mlflow.register_model(info.model_uri, "rollme").version
    assert run_dag("rollme__rollback", {"version": str(outsider), "reason": "x"})["__run__"] == "failed"
    assert champion(env, "rollme") == served(env, "rollme") == "2"


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
    env["mlflow"].set_registered_model_alias(model, "champion", bad)  # as promote_champion does

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
    deployment = json.loads(env["mlflow"].get_model_version(model, bad).tags["cd4ml.deployment"])
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
