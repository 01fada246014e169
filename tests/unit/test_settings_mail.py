"""Mail texts link to the public URLs of the settings, and `send` goes through the SMTP provider's
hook to a real local SMTP server (aiosmtpd), with the text part users read first."""

from __future__ import annotations

import json
from collections.abc import Iterator
from email.message import Message

import pytest

from cd4ml.airflow.notifiers import has_smtp_connection, send
from cd4ml.ui import notify
from cd4ml_dev.netutil import free_port
from tests.conftest import Inbox


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Inbox, int]]:
    from aiosmtpd.controller import Controller

    handler, port = Inbox(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    monkeypatch.delenv("AIRFLOW_CONN_CD4ML_SMTP", raising=False)
    try:
        yield handler, port
    finally:
        controller.stop()


def connect(monkeypatch: pytest.MonkeyPatch, port: int, extra: dict[str, object]) -> None:
    conn = {"conn_type": "smtp", "host": "127.0.0.1", "port": port, "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_CD4ML_SMTP", json.dumps(conn))


def parts(message: Message) -> dict[str, str]:
    return {
        p.get_content_type(): bytes(p.get_payload(decode=True)).decode()
        for p in message.walk()
        if not p.is_multipart()
    }


def test_links_use_the_public_urls_not_the_containers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("CD4ML_MLFLOW_PUBLIC_URL", "http://localhost:5000")
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/")
    run_url = notify.airflow_run_url("churn__train", "manual__1")
    message = notify.promotion("churn", {"version": 3, "previous": "2", "why": "better"}, run_url)
    assert "Model version: http://localhost:5000/#/models/churn/versions/3" in message.body
    assert "Run: https://airflow.example.com/dags/churn__train/runs/manual__1" in message.body
    assert "mlflow:5000" not in message.body
    assert notify.mlflow_version_url("churn", None) == "http://localhost:5000/#/models/churn"


def test_no_connection_means_no_mail(server: tuple[Inbox, int]) -> None:
    assert has_smtp_connection() is False


def test_send_text_first_then_html(server: tuple[Inbox, int], monkeypatch: pytest.MonkeyPatch) -> None:
    inbox, port = server
    connect(monkeypatch, port, {"from_email": "cd4ml@test.local", "disable_ssl": True, "disable_tls": True})
    assert has_smtp_connection() is True
    message = notify.failure("churn", "train", "boom <b>", "http://127.0.0.1:8080/dags/d/runs/r")
    send(message, ["a@example.com", "b@example.com"])
    (got,) = inbox.messages
    assert got["Subject"] == "[cd4ml] churn: train failed" and got["From"] == "cd4ml@test.local"
    assert got["To"] == "a@example.com, b@example.com"
    assert got.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in got.walk()][1:] == ["text/plain", "text/html"]
    text, html = parts(got)["text/plain"], parts(got)["text/html"]
    assert text == message.body and "Error: boom <b>" in text
    assert "boom &lt;b&gt;" in html
    assert '<a href="http://127.0.0.1:8080/dags/d/runs/r">' in html


def test_the_old_starttls_extra_still_sends_plain(
    server: tuple[Inbox, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections written for cd4ml before the hook (README: `starttls`) keep working; without
    `from_email` the sender is cd4ml@localhost, as before."""
    inbox, port = server
    connect(monkeypatch, port, {"starttls": False})
    send(notify.failure("churn", "train", "x", "http://r"), ["a@example.com"])
    (got,) = inbox.messages
    assert got["From"] == "cd4ml@localhost"


def test_a_connection_without_tls_keys_sends_plain_as_before(
    server: tuple[Inbox, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """cd4ml's rule before the hook: no `starttls`, no provider keys = plain SMTP. The hook alone would
    speak implicit TLS here, and such an existing connection would silently stop sending."""
    inbox, port = server
    connect(monkeypatch, port, {"from_email": "cd4ml@test.local", "retry_limit": 0, "timeout": 5})
    send(notify.failure("churn", "train", "x", "http://r"), ["a@example.com"])
    (got,) = inbox.messages
    assert got["From"] == "cd4ml@test.local"


def test_the_providers_keys_rule_once_set(server: tuple[Inbox, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """`disable_ssl: false` asks for implicit TLS (port 465): a plain server gets no mail."""
    inbox, port = server
    connect(monkeypatch, port, {"disable_ssl": False, "retry_limit": 0, "timeout": 5})
    with pytest.raises(OSError):
        send(notify.failure("churn", "train", "x", "http://r"), ["a@example.com"])
    assert inbox.messages == []
