"""The one error policy: which failures Airflow retries and which fail the task at once.

The transient cases are real failures (a real MLflow client and a real HTTP client against a port
nothing listens on), not hand-built exception objects, so a change in how those libraries report
a dead server shows up here.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import httpx
import pytest
from airflow.sdk.definitions.retry_policy import RetryAction

from cd4ml import registry
from cd4ml.airflow.common import Cd4mlRetryPolicy, retry_decision
from cd4ml.core.errors import (
    Cd4mlError,
    DataError,
    DataReadError,
    QuarantinedError,
    RetractionError,
    SpecError,
    TrainingError,
    TransientError,
    is_transient,
)
from cd4ml.steps.deploy import DeployError, ServiceRefusedError, ServiceUnreachableError
from cd4ml_dev.netutil import free_port


def raised(fn) -> BaseException:  # type: ignore[no-untyped-def]
    try:
        fn()
    except BaseException as err:  # noqa: BLE001 -- the point is to look at whatever it raised
        return err
    raise AssertionError(f"{fn} raised nothing")


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # free: nothing listens there


@pytest.mark.parametrize(
    "err",
    [
        SpecError("churn.yaml: field 'metric.name': f1 needs a binary target"),
        DataError("week3.csv: column 'x' has infinite values"),
        DataReadError("week3.csv: not a CSV"),
        TrainingError("fit failed"),
        QuarantinedError([{"name": "a.csv", "path": "/q/a.csv", "reason": "a.csv: bad"}]),
        RetractionError("no accepted file matches 'x'"),
        DeployError("smoke test: predictions differ"),
        ServiceRefusedError("refused version 3: OneHotEncoder has no attribute categories_"),
        Cd4mlError("stale decision"),
        ValueError("Input X contains infinity"),  # sklearn's own: the 3 identical retries
        KeyError("target"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_deterministic_errors_fail_at_once_with_their_message(err: Exception) -> None:
    decision = retry_decision(err)
    assert decision.action is RetryAction.FAIL
    assert type(err).__name__ in (decision.reason or "") and "not retried" in (decision.reason or "")
    assert not is_transient(err)


@pytest.mark.parametrize(
    "err",
    [
        TransientError("MLflow did not answer"),
        registry.RegistryUnreachableError("MLflow at http://x is unreachable"),
        ServiceUnreachableError("the prediction service at http://x is unreachable"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transient_errors_are_retried(err: Exception) -> None:
    assert retry_decision(err).action is RetryAction.RETRY
    assert is_transient(err)


def test_a_dead_mlflow_server_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    err = raised(lambda: MlflowClient(dead_url()).search_registered_models())
    # MLflow hides the connection error's type behind its own exception; the chain keeps it.
    assert isinstance(err, MlflowException)
    assert registry.unreachable(err)
    assert retry_decision(err).action is RetryAction.RETRY


def test_mlflow_answering_no_is_deterministic() -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    err = MlflowException("Registered Model with name=x not found", error_code=RESOURCE_DOES_NOT_EXIST)
    assert err.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert retry_decision(err).action is RetryAction.FAIL
    busy = MlflowException("try later", error_code=TEMPORARILY_UNAVAILABLE)
    assert retry_decision(busy).action is RetryAction.RETRY


def test_a_dead_http_service_is_transient() -> None:
    err = raised(lambda: httpx.get(dead_url(), timeout=5))
    assert isinstance(err, httpx.ConnectError)
    assert retry_decision(err).action is RetryAction.RETRY


def test_the_outermost_cd4ml_error_decides_over_what_it_wraps() -> None:
    def wrapped() -> None:
        try:
            raise ConnectionRefusedError("Connection refused")
        except ConnectionRefusedError as err:
            raise DataError("the data file is unusable whatever the network does") from err

    assert retry_decision(raised(wrapped)).action is RetryAction.FAIL

    def hidden() -> None:
        try:
            raise ConnectionRefusedError("Connection refused")
        except ConnectionRefusedError:
            raise KeyError("column") from None  # explicitly not caused by the connection

    assert retry_decision(raised(hidden)).action is RetryAction.FAIL


def test_airflow_signals_keep_airflows_own_rules() -> None:
    from airflow.sdk.exceptions import AirflowTaskTimeout

    assert retry_decision(AirflowTaskTimeout("execution_timeout")).action is RetryAction.DEFAULT
    assert retry_decision(SystemExit(1)).action is RetryAction.DEFAULT
    assert retry_decision(KeyboardInterrupt()).action is RetryAction.DEFAULT


def test_policy_object_evaluates_and_serialises() -> None:
    policy = Cd4mlRetryPolicy()
    decision = policy.evaluate(SpecError("bad"), try_number=1, max_tries=3)
    assert decision.action is RetryAction.FAIL
    assert isinstance(Cd4mlRetryPolicy.deserialize(policy.serialize()), Cd4mlRetryPolicy)


def test_quarantined_error_carries_the_files_and_survives_pickling() -> None:
    files = [
        {"name": "a.csv", "path": "/q/a.csv", "reason": "a.csv was rejected by validation"},
        {"name": "b.csv", "path": "/q/b.csv", "reason": "b.csv: rejected before validation"},
    ]
    err = QuarantinedError(files)
    assert str(err).startswith("2 file(s) quarantined; nothing trained.")
    assert "a.csv was rejected" in str(err) and "b.csv: rejected" in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, QuarantinedError) and back.quarantined == files and str(back) == str(err)


def test_spec_check_refuses_what_training_would_refuse_naming_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Spec errors are deterministic; `cd4ml spec check` finds them before anything is trained."""
    from cd4ml import cli
    from tests.helpers import write_spec

    good = write_spec(tmp_path, "good")
    ridge = {"class": "sklearn.linear_model.Ridge", "params": {}}
    regressor = write_spec(tmp_path, "wrongkind", estimator=ridge)
    svc = {"class": "sklearn.svm.LinearSVC", "params": {}}
    no_proba = write_spec(tmp_path, "noproba", estimator=svc, metric__name="roc_auc")
    assert cli.main(["spec", "check", str(good)]) == 0
    assert "ok      good" in capsys.readouterr().out

    assert cli.main(["spec", "check", str(good), str(regressor), str(no_proba)]) == 1
    out = capsys.readouterr()
    assert "ok      good" in out.out
    assert f"error   {regressor}: estimator.class: sklearn.linear_model.Ridge is a regressor" in out.err
    assert f"error   {no_proba}: metric.name: roc_auc scores class probabilities" in out.err
