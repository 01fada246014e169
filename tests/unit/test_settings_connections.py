"""The prediction service as an Airflow connection (`cd4ml_service`), and the settings fallback."""

from __future__ import annotations

import json

import pytest

from cd4ml.airflow.connections import ConnectionConfigError, service_endpoint


@pytest.fixture
def no_service_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("AIRFLOW_CONN_CD4ML_SERVICE", "CD4ML_SERVICE_URL", "CD4ML_SERVICE_PORT",
                "CD4ML_SERVICE_ADMIN_TOKEN", "CD4ML_DEPLOY_WAIT_SECONDS"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def connect(monkeypatch: pytest.MonkeyPatch, **conn: object) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_CD4ML_SERVICE", json.dumps({"conn_type": "http", **conn}))


def test_without_the_connection_the_settings_decide(no_service_env: pytest.MonkeyPatch) -> None:
    no_service_env.setenv("CD4ML_SERVICE_URL", "http://svc.local:9000/")
    no_service_env.setenv("CD4ML_SERVICE_ADMIN_TOKEN", "env-token")
    no_service_env.setenv("CD4ML_DEPLOY_WAIT_SECONDS", "12")
    ep = service_endpoint()
    assert (ep.url, ep.admin_token, ep.wait_seconds) == ("http://svc.local:9000", "env-token", 12.0)


def test_the_connection_wins_over_the_settings(no_service_env: pytest.MonkeyPatch) -> None:
    no_service_env.setenv("CD4ML_SERVICE_URL", "http://wrong:1")
    no_service_env.setenv("CD4ML_SERVICE_ADMIN_TOKEN", "wrong-token")
    no_service_env.setenv("CD4ML_DEPLOY_WAIT_SECONDS", "7")
    connect(no_service_env, host="prediction-service", port=8000, password="conn-token")
    ep = service_endpoint()
    assert (ep.url, ep.admin_token, ep.wait_seconds) == ("http://prediction-service:8000", "conn-token", 7.0)


def test_host_as_url_scheme_and_wait_extra(no_service_env: pytest.MonkeyPatch) -> None:
    connect(no_service_env, host="https://serve.example.com/", extra={"wait_seconds": 90})
    ep = service_endpoint()
    assert (ep.url, ep.admin_token, ep.wait_seconds) == ("https://serve.example.com", None, 90.0)
    connect(no_service_env, host="serve.example.com", schema="https")
    assert service_endpoint().url == "https://serve.example.com"


def test_a_connection_without_host_or_with_a_bad_wait_says_which_field(
    no_service_env: pytest.MonkeyPatch,
) -> None:
    connect(no_service_env, port=8000)
    with pytest.raises(ConnectionConfigError, match="'cd4ml_service' has no host"):
        service_endpoint()
    connect(no_service_env, host="svc", extra={"wait_seconds": "soon"})
    with pytest.raises(ConnectionConfigError, match="wait_seconds='soon'"):
        service_endpoint()
