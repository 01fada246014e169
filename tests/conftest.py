"""Shared fixtures. Airflow reads its config at import, so the environment is set here, first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

# Before anything imports MLflow (in this process and the servers it starts): its telemetry thread
# sets and unsets an environment variable while other threads read os.environ (a KeyError in a
# task, seen once in a clean-clone run).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from cd4ml_dev.netutil import free_port, local_mlflow_server, wait_http

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="cd4ml-tests-"))

os.environ.update(
    {
        "AIRFLOW_HOME": str(_SESSION_DIR / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_SESSION_DIR}/airflow/airflow.db",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        # As on the embedded stack: new DAGs are live, so asset events queue their consumers.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "CD4ML_HOME": str(_SESSION_DIR / "cd4ml"),
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # As on every stack: waiting OpenMP threads sleep instead of starving concurrent fits.
        "OMP_WAIT_POLICY": "passive",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
)
# Tests never talk to a developer's running stack by accident.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("CD4ML_SPECS_DIR", None)
os.environ.pop("CD4ML_DATA_DIR", None)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata DB (dag.test() needs one; no scheduler needed)."""
    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], check=True, capture_output=True)
    return home


# How long a test server may take to answer its health check. A clean machine needs ~10 s; the same
# 2 cores shared with other test sessions (load 15+) took over 90 s to start MLflow.
START_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[str]:
    """A real MLflow tracking server (SQLite backend, local proxied artifacts) for the session."""
    root = _SESSION_DIR / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        local_mlflow_server(BIN, root, port),
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", START_TIMEOUT_S)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


SERVICE_TOKEN = "test-admin-token"
SERVICE_MAX_ROWS = 200


@pytest.fixture(scope="session")
def shared_specs() -> Path:
    """One specs dir the session's prediction service watches; each test adds its own model name."""
    path = _SESSION_DIR / "specs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_service(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [str(BIN / "cd4ml"), "serve", "--port", str(port)],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/health/live", START_TIMEOUT_S)
    return proc


@pytest.fixture(scope="session")
def prediction_service(mlflow_server: str, shared_specs: Path) -> Iterator[dict[str, str]]:
    """The real prediction service (uvicorn subprocess) serving every model in `shared_specs`."""
    port = free_port()
    env = {
        **os.environ,
        "CD4ML_SPECS_DIR": str(shared_specs),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "CD4ML_SERVICE_ADMIN_TOKEN": SERVICE_TOKEN,
        "CD4ML_SERVICE_POLL_SECONDS": "0.5",
        "CD4ML_SERVICE_MAX_ROWS": str(SERVICE_MAX_ROWS),
    }
    proc = start_service(env, port, _SESSION_DIR / "service.log")
    try:
        yield {
            "url": f"http://127.0.0.1:{port}",
            "token": SERVICE_TOKEN,
            "log": str(_SESSION_DIR / "service.log"),
            "pid": str(proc.pid),
        }
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


@pytest.fixture
def deploy_env(
    prediction_service: dict[str, str],
    mlflow_server: str,
    shared_specs: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    """The environment a training task sees on the embedded stack, pointed at the test services."""
    monkeypatch.setenv("CD4ML_SPECS_DIR", str(shared_specs))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("CD4ML_SERVICE_URL", prediction_service["url"])
    monkeypatch.setenv("CD4ML_SERVICE_ADMIN_TOKEN", prediction_service["token"])
    monkeypatch.setenv("CD4ML_DEPLOY_GOLDEN_ROWS", "20")
    monkeypatch.setenv("CD4ML_DEPLOY_WAIT_SECONDS", "30")
    return prediction_service


@pytest.fixture
def env(deploy_env: dict[str, str], shared_specs: Path, airflow_db: Path) -> dict[str, Any]:
    """For dag.test() runs: specs in the dir the session's service watches, data under the session home."""
    from mlflow import MlflowClient

    return {
        "specs": shared_specs,
        "data": Path(os.environ["CD4ML_HOME"]) / "data",
        "mlflow": MlflowClient(os.environ["MLFLOW_TRACKING_URI"]),
        "service": deploy_env["url"],
    }


class Inbox:
    """What a real local SMTP server (aiosmtpd) received."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def inbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[Inbox]:
    """A real SMTP server on a free port, configured as the Airflow connection `cd4ml_smtp`."""
    from aiosmtpd.controller import Controller

    handler = Inbox()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    monkeypatch.setenv(
        "AIRFLOW_CONN_CD4ML_SMTP",
        json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port,
                    "extra": {"from_email": "cd4ml@test.local"}}),
    )  # fmt: skip
    try:
        yield handler
    finally:
        controller.stop()


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private data root and specs dir for one test."""
    specs = tmp_path / "specs"
    specs.mkdir()
    monkeypatch.setenv("CD4ML_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CD4ML_SPECS_DIR", str(specs))
    return tmp_path


_STOPPING: list[tuple[subprocess.Popen[bytes], Path | None]] = []


def stop_in_background(command: list[str], env: dict[str, str], remove: Path | None = None) -> None:
    """Run a slow shutdown (a stack's `down` waits up to 20 s per process) while later tests run;
    the session waits for it, then removes `remove`, before it ends."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _STOPPING.append((proc, remove))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for proc, remove in _STOPPING:
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            print(f"\nconftest: `{' '.join(map(str, proc.args))}` still running after 180 s; killed")
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


# The slowest files first (a real stack, dag.test() stories, Prometheus, whole trainings): with
# `--dist loadfile` each file runs on one worker, so starting them last leaves one worker busy long
# after the others ran out of work. Rough order, longest first; everything else keeps its order.
SLOW_FIRST = (
    "tests/integration/test_monitor_dag.py",
    "tests/system/test_embedded_stack.py",
    "tests/integration/test_train_dag.py",
    "tests/reliability/test_faults.py",
    "tests/integration/test_staged_deploy.py",
    "tests/integration/test_canary.py",
    "tests/integration/test_approval_dag.py",
    "tests/integration/test_score_dag.py",
    "tests/reliability/test_bad_requests.py",
    "tests/integration/test_notifications.py",
    "tests/integration/test_retract.py",
    "tests/system/test_feedback_loop.py",
    "tests/system/test_alerts.py",
    "tests/system/test_tracing.py",
    "tests/integration/test_extra_links.py",
    "tests/unit/test_steps.py",
    "tests/reliability/test_bad_data.py",
    "tests/zoo/test_zoo.py",
    "tests/integration/test_deploy_bugs.py",
    "tests/system/test_feedback_api.py",
    "tests/system/test_prediction_service.py",
    "tests/system/test_protocols.py",
    "tests/reliability/test_security.py",
    "tests/integration/test_feature_mix.py",
    "tests/reliability/test_load.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(SLOW_FIRST)}
    root = Path(str(config.rootpath))

    def key(item: pytest.Item) -> int:
        return rank.get(Path(str(item.path)).relative_to(root).as_posix(), len(SLOW_FIRST))

    items.sort(key=key)  # stable: the order inside a file, and of the other files, is kept
