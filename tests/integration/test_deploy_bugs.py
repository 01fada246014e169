"""Regression tests for the deploy and rollback bugs of issue 15, on the real stack: a real MLflow
tracking server, the real prediction service (subprocess), real trained versions. Faults are real:
a golden-rows file that does not exist, a smoke test the service answers with HTTP 413 (more golden
rows than it accepts per request), a version the champion/challenger gate rejected.

1. any failure after `champion` moved rolls back and is recorded, not only a `DeployError`;
2. a failed first deploy (alias removed) leaves nothing served for the model, readiness says so;
3. a failed rollback while there was no champion removes the alias again and says so;
4. the rollback refuses a rejected version unless given `force` and a reason, and records it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cd4ml import registry
from cd4ml.core.settings import get_settings
from cd4ml.core.spec import ModelSpec, load_spec
from cd4ml.steps.deploy import DeployError, ServiceEndpoint, deploy_champion, rollback
from cd4ml.steps.pipeline import run_training
from cd4ml_dev.datagen import generate_churn
from tests.helpers import LOGREG, WEAK, write_spec
from tests.integration.dagtools import champion, land, run_dag, served

pytestmark = pytest.mark.integration
ROWS = 1500
WHEN = "2026-05-01T00:00:00"


def train(env: dict[str, Any], model: str, estimator: dict[str, Any], *, deploy: bool, force: bool = False,
          run: str = "r1") -> tuple[ModelSpec, dict[str, Any]]:  # fmt: skip
    spec = load_spec(write_spec(env["specs"], model, estimator=estimator, promotion__floor=None))
    out = run_training(spec, get_settings(), run_id=f"{model}-{run}", run_time=f"{WHEN}+00:00",
                       deploy=deploy, force=force, trigger="regression test")  # fmt: skip
    return spec, out


def events(env: dict[str, Any], model: str, kind: str, version: str) -> list[Any]:
    return [e for e in registry.events(env["mlflow"], model) if e.kind == kind and e.version == version]


def wait_for(check: Any, seconds: float = 20.0) -> Any:
    """The service polls MLflow every 0.5 s here: give it a few polls to catch up."""
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.25)


def test_a_failure_that_is_not_a_deploy_error_still_rolls_back_and_is_recorded(
    env: dict[str, Any], tmp_path: Path
) -> None:
    model = "dbunexpected"
    land(env, model, "week0.csv", generate_churn(ROWS, seed=21))
    train(env, model, WEAK, deploy=True)
    assert champion(env, model) == served(env, model) == "1"
    spec, promoted = train(env, model, LOGREG, deploy=False, force=True, run="r2")
    assert promoted["promoted"] and promoted["version"] == "2" and promoted["previous"] == "1"
    assert champion(env, model) == "2"  # the alias has moved; the deploy step has not run yet

    # The golden rows cannot be read: a FileNotFoundError, not a DeployError, after the alias moved.
    missing = tmp_path / "gone" / "holdout.parquet"
    with pytest.raises(DeployError) as caught:
        deploy_champion(spec, get_settings(), promoted=promoted, holdout_path=str(missing), who="test",
                        when=WHEN)  # fmt: skip
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    assert "champion rolled back to 1, which the service serves again" in str(caught.value)
    assert champion(env, model) == served(env, model) == "1"
    assert env["mlflow"].get_model_version(model, "2").tags["cd4ml.rolled_back"] == "to 1"
    (failed,) = [e for e in events(env, model, "deployment", "2") if e.details["outcome"] == "failed"]
    assert failed.details["error"].startswith("FileNotFoundError")
    assert failed.details["rollback"] == "champion rolled back to 1, which the service serves again"


def test_a_failed_first_deploy_serves_nothing_then_a_failed_rollback_removes_the_alias_again(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = "dbfirst"
    url = env["service"]
    land(env, model, "week0.csv", generate_churn(ROWS, seed=22))
    spec, promoted = train(env, model, LOGREG, deploy=False)
    assert promoted["promoted"] and promoted.get("previous") is None and champion(env, model) == "1"
    assert wait_for(lambda: served(env, model) == "1")  # the service loaded the first champion

    # More golden rows than the service takes per request: the smoke test fails with HTTP 413.
    monkeypatch.setenv("CD4ML_DEPLOY_GOLDEN_ROWS", "250")
    with pytest.raises(DeployError, match="HTTP 413"):
        deploy_champion(spec, get_settings(), promoted=promoted, who="test", when=WHEN)
    assert champion(env, model) is None
    # Bug 2: the service stopped serving the model; requests get the usual "no champion yet" 503.
    assert wait_for(lambda: served(env, model) is None), "the service still serves the removed champion"
    meta = httpx.get(f"{url}/v1/models/{model}", timeout=10)
    assert meta.status_code == 503 and "no champion loaded yet" in meta.text
    row = {"dataframe_records": [generate_churn(5, seed=1).drop(columns=["churned"]).iloc[0].to_dict()]}
    predicted = httpx.post(f"{url}/v1/models/{model}/predict", json=row, timeout=10)
    assert predicted.status_code == 503 and "no champion loaded yet" in predicted.text
    ready = httpx.get(f"{url}/health/ready", timeout=10)
    assert ready.status_code == 503 and model in ready.json()["waiting_for_champion"]
    assert model not in ready.json()["serving"]
    exported = httpx.get(f"{url}/metrics", timeout=10).text  # nor does the serving-version gauge say so
    assert f'cd4ml_serving_version{{model="{model}"}}' not in exported

    # A rollback whose target fails the smoke test fails in the staging slot: nothing moves.
    before = dict(env["mlflow"].get_model_version(model, "1").tags)
    with pytest.raises(DeployError) as caught:
        rollback(spec, get_settings(), target="1", reason="try v1 again", who="test", when=WHEN)
    message = str(caught.value)
    assert "HTTP 413" in message and "nothing moved: version 1 failed in staging" in message
    assert champion(env, model) is None and served(env, model) is None
    (staged,) = events(env, model, "rollback", "1")
    assert staged.details["outcome"] == "rollback failed" and staged.details["from"] is None

    # Bug 3: a rollback that fails *after* the alias moved while there was no champion puts back
    # exactly that: no alias. (Without the admin token nothing is staged and the record is not
    # signed, so the service never serves the target and the wait after the switch fails.)
    unsigned = ServiceEndpoint(url, None, wait_seconds=4)
    with pytest.raises(DeployError) as caught:
        rollback(
            spec, get_settings(), target="1", reason="try v1 again", who="test", when=WHEN, endpoint=unsigned
        )
    message = str(caught.value)
    assert "left unchanged" not in message
    assert "there was no champion before; the champion alias was removed again" in message
    assert champion(env, model) is None
    after = env["mlflow"].get_model_version(model, "1").tags
    for key in ("cd4ml.rolled_back_at", "cd4ml.previous_champion"):
        assert after.get(key) == before.get(key), key
    failed = events(env, model, "rollback", "1")[-1]
    assert failed.details["outcome"] == "rollback failed" and failed.details["from"] is None
    assert failed.details["restored"].startswith("there was no champion before")
    assert wait_for(lambda: served(env, model) is None)

    # A normal rollback is unaffected: the service serves the model again once `champion` is back.
    monkeypatch.setenv("CD4ML_DEPLOY_GOLDEN_ROWS", "20")
    done = rollback(spec, get_settings(), target="1", reason="v1 is fine", who="test", when=WHEN)
    assert done["rolled_back"] and "forced" not in done
    assert champion(env, model) == served(env, model) == "1"


def test_the_rollback_refuses_a_rejected_version_unless_forced_with_a_reason(env: dict[str, Any]) -> None:
    model = "dbreject"
    land(env, model, "week0.csv", generate_churn(ROWS, seed=23))
    spec, _ = train(env, model, LOGREG, deploy=True)
    assert champion(env, model) == served(env, model) == "1"
    _, rejected = train(env, model, WEAK, deploy=False, force=True, run="r2")
    assert not rejected["promoted"] and rejected["version"] == "2"
    v2 = env["mlflow"].get_model_version(model, "2")
    assert v2.tags["cd4ml.decision"] == "reject"
    assert registry.validation_status(env["mlflow"], model, v2) == "passed"  # its data was fine

    for force, reason in ((False, "looks better"), (True, "  ")):
        with pytest.raises(DeployError) as caught:
            forced = {"force": True} if force else {}  # without force: the call as it always was
            rollback(spec, get_settings(), target="2", reason=reason, who="test", when=WHEN, **forced)
        message = str(caught.value)
        assert "refusing to roll back to version 2" in message and "rejected it" in message
        assert "`force`" in message and "`reason`" in message
    assert champion(env, model) == served(env, model) == "1"
    assert events(env, model, "rollback", "2") == []

    # Through the rollback DAG's form: force and a reason of one's own serve it, and say so.
    why = "v1 mislabels the new plan; v2 is the safer default until retrained"
    states = run_dag(f"{model}__rollback", {"version": "2", "reason": why, "force": True})
    assert states["__run__"] == "success", states
    assert champion(env, model) == served(env, model) == "2"
    (done,) = events(env, model, "rollback", "2")
    assert done.why == why and done.details["outcome"] == "rolled back"
    assert done.details["forced"] is True
    assert any("rejected it" in o for o in done.details["overrode"])
