"""Faults, on real processes: MLflow going away mid-register, the prediction service down during a
deploy (dag.test() runs: real Airflow task execution and retries, real MLflow server, real service).

MLflow is cut off at an exact point of the protocol by a TCP proxy between the tasks and the real
server (`CutProxy`): it forwards bytes untouched until it sees the request it is told to cut at,
then drops every connection and stops listening (clients get "connection refused", exactly what a
dead server gives), and optionally listens again after a pause. That makes "MLflow dies between
creating the version and setting the alias" a deterministic test rather than a race.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cd4ml import registry
from cd4ml_dev.datagen import generate_churn
from cd4ml_dev.netutil import free_port, wait_http
from tests.conftest import SERVICE_TOKEN, start_service
from tests.helpers import LOGREG, WEAK, soak_only, write_spec
from tests.integration.dagtools import champion, land, run, served, task_tries, versions

pytestmark = pytest.mark.integration
ROWS = 1500


class CutProxy:
    """127.0.0.1:<port> -> upstream. Cuts MLflow off when a request containing `cut_at` arrives
    (after one containing `armed_by`, if given); listens again `restore_after` seconds later."""

    def __init__(
        self,
        upstream: str,
        *,
        cut_at: bytes,
        armed_by: bytes | None = None,
        restore_after: float | None = None,
    ) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.port = free_port()
        self.cut_at, self.armed_by, self.restore_after = cut_at, armed_by, restore_after
        self.armed = armed_by is None
        self.cuts: list[float] = []
        self.requests: list[str] = []  # the request lines that went through, for failure messages
        self.restored: list[float] = []
        self.refused_while_cut = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return len(self.cuts) > len(self.restored)

    def _listen(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # listener closed: the cut
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._conns |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if from_client and self._should_cut(chunk):
                    self.cut()
                    return
                dst.sendall(chunk)
        except OSError:
            pass  # the other direction closed, or the cut closed this socket: nothing left to pump
        finally:
            for s in (src, dst):
                self._close(s)

    def _should_cut(self, chunk: bytes) -> bool:
        with self._lock:
            if chunk[:8].split(b" ")[0] in {b"GET", b"POST", b"PUT", b"PATCH", b"DELETE"}:
                self.requests.append(chunk.split(b"\r\n", 1)[0].decode(errors="replace")[:120])
            if self.cuts or self._closed:
                return False  # one cut per proxy
            if not self.armed:
                self.armed = self.armed_by is not None and self.armed_by in chunk
                return False
            return self.cut_at in chunk

    def _close(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        try:
            s.close()
        except OSError:
            pass  # already closed

    def _stop_listening(self) -> None:
        # close() alone does not wake a thread blocked in accept(): the kernel would keep taking
        # connections until that accept returns. shutdown() wakes it; then nothing listens.
        try:
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected/listening any more
        self._server.close()

    def cut(self) -> None:
        with self._lock:
            self.cuts.append(time.monotonic())
            conns, self._conns = set(self._conns), set()
        self._stop_listening()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the peer already went
            s.close()
        if self.restore_after is not None:
            threading.Timer(self.restore_after, self.restore).start()

    def restore(self) -> None:
        with self._lock:
            if self._closed or not self.is_cut:
                return
            self.restored.append(time.monotonic())
        self._listen()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = set(self._conns)
        self._stop_listening()
        for s in conns:
            s.close()


@pytest.fixture
def fast_failing_mlflow_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """The MLflow client's own HTTP retries (default: 7 with exponential backoff, minutes) shortened,
    so the task-level retries (`default_args`: 2 retries, 10 s apart) are what is exercised."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def aliases(env: dict[str, Any], model: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for alias in (registry.CHAMPION, registry.CHALLENGER):
        mv = registry.version_by_alias(env["mlflow"], model, alias)
        out[alias] = str(mv.version) if mv else None
    return out


def deployments(env: dict[str, Any], model: str, version: str) -> list[dict[str, Any]]:
    """The deployment attempts of one version, oldest first, from the model's append-only history."""
    return [
        e.details
        for e in registry.events(env["mlflow"], model)
        if e.kind == "deployment" and e.version == version
    ]


def run_through(proxy: CutProxy, env: dict[str, Any], model: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    """One dag.test() run whose every MLflow call goes through `proxy` (the DAG is parsed with it)."""
    real_uri = os.environ["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    try:
        return run(env, model)
    finally:
        proxy.close()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", real_uri)
        registry.client(real_uri)  # mlflow's module-level URI back to the real server


def test_mlflow_lost_during_register_retries_fails_cleanly_then_registers_exactly_once(
    env: dict[str, Any],
    fast_failing_mlflow_client: None,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    model = "fault_register"
    dag_id = f"{model}__train"
    write_spec(env["specs"], model, estimator=WEAK, promotion__floor=None)
    land(env, model, "week0.csv", generate_churn(ROWS, seed=31))
    assert run(env, model)["__run__"] == "success"
    before = aliases(env, model)
    assert before == {"champion": "1", "challenger": "1"}

    # 1. A better model is trained and judged; MLflow dies as registration creates the version
    #    (the create request never reaches it) and stays down through both retries.
    write_spec(env["specs"], model, estimator=LOGREG, promotion__floor=None)
    proxy = CutProxy(os.environ["MLFLOW_TRACKING_URI"], cut_at=b"/model-versions/create")
    capfd.readouterr()
    states = run_through(proxy, env, model, monkeypatch)
    out = capfd.readouterr()
    log = out.out + out.err  # dag.test() runs the tasks in this process; their logs go to stdout

    assert len(proxy.cuts) == 1 and not proxy.restored, proxy.requests
    assert states["train_challenger"] == states["evaluate_against_champion"] == "success", states
    assert states["register_challenger"] == "failed", (
        states,
        proxy.url,
        os.environ["MLFLOW_TRACKING_URI"],
        proxy.requests,
    )
    assert states["promote_champion"] == states["deploy_champion"] == "upstream_failed", states
    assert states["__run__"] == "failed"
    assert task_tries(states["__run_id__"], dag_id)["register_challenger"] == 3  # 1 + 2 retries
    assert log.count("RegistryUnreachableError") >= 3, log[-3000:]
    assert "is unreachable while registering run" in log and "no alias was moved" in log
    # Nothing half-done: no new version, both aliases where they were, the service unchanged.
    assert aliases(env, model) == before
    assert [v.version for v in versions(env, model)] == ["1"]
    assert served(env, model) == "1"

    # 2. Next run: MLflow goes away right after it created the version, before the task could tag
    #    it or move an alias, and is back 3 s later, before the retry (10 s). The retry must find
    #    that version by run id instead of registering the same model twice.
    proxy = CutProxy(
        os.environ["MLFLOW_TRACKING_URI"],
        armed_by=b"/model-versions/create",
        cut_at=b"/model-versions/get",
        restore_after=3,
    )
    states = run_through(proxy, env, model, monkeypatch)

    assert len(proxy.cuts) == 1 and len(proxy.restored) == 1
    assert states["__run__"] == "success", states
    assert task_tries(states["__run_id__"], dag_id)["register_challenger"] == 2
    v1, v2 = versions(env, model)  # one new version for the one trained model
    assert v2.run_id != v1.run_id
    assert v2.tags["cd4ml.decision"] == "promote"
    assert registry.read_evidence(env["mlflow"], model, v2).decision["promote"]  # its evidence recorded
    assert v2.tags["cd4ml.airflow_run_id"] == states["__run_id__"]
    assert aliases(env, model) == {"champion": "2", "challenger": "2"}
    assert served(env, model) == "2"


@pytest.fixture
def own_service(
    env: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, Any]]:
    """A prediction service of this test's own, so it can be killed; deploys go to it."""
    port = free_port()
    svc_env = {
        **os.environ,
        "CD4ML_SPECS_DIR": str(env["specs"]),
        "CD4ML_SERVICE_ADMIN_TOKEN": SERVICE_TOKEN,
        "CD4ML_SERVICE_POLL_SECONDS": "0.5",
        "CD4ML_HOME": str(tmp_path / "service-home"),
    }
    state: dict[str, Any] = {"url": f"http://127.0.0.1:{port}", "log": tmp_path / "service.log"}

    def start() -> None:
        state["proc"] = start_service(svc_env, port, state["log"])

    def kill() -> None:
        os.killpg(state["proc"].pid, signal.SIGKILL)
        state["proc"].wait(timeout=30)

    state.update(start=start, kill=kill)
    start()
    monkeypatch.setenv("CD4ML_SERVICE_URL", state["url"])
    monkeypatch.setenv("CD4ML_DEPLOY_WAIT_SECONDS", "8")
    try:
        yield state
    finally:
        if state["proc"].poll() is None:
            os.killpg(state["proc"].pid, signal.SIGTERM)
            state["proc"].wait(timeout=60)


def kill_after_staging(own_service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """SIGKILL the service the moment the staged smoke test has passed: the service dies between
    staging and the switch, so the deploy after `champion` moved is what finds it gone."""
    from cd4ml.steps import deploy

    real_smoke_test = deploy.smoke_test
    killed: list[str] = []

    def smoke_test_then_kill(*args: Any, **kwargs: Any) -> dict[str, Any]:
        checked = real_smoke_test(*args, **kwargs)
        if kwargs.get("staged") and not killed:
            own_service["kill"]()
            killed.append(str(checked["version"]))
        return checked

    monkeypatch.setattr(deploy, "smoke_test", smoke_test_then_kill)
    return killed


def test_service_down_during_deploy_is_retried_then_rolls_champion_back_and_records_it(
    env: dict[str, Any],
    own_service: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = "fault_service_down"
    write_spec(env["specs"], model, estimator=WEAK, promotion__floor=None)
    land(env, model, "week0.csv", generate_churn(ROWS, seed=33))
    assert run(env, model)["__run__"] == "success"
    assert champion(env, model) == "1"
    wait_http(f"{own_service['url']}/v1/models/{model}", 30)  # not /health/ready: other tests' models

    # SIGKILL once v2 passed staging: no goodbye, the port just stops answering.
    killed = kill_after_staging(own_service, monkeypatch)
    # A dead port refuses at once; the 8 s that let a live service load a version would only be
    # waited out 4 times (3 tries and the rollback's check) before the same verdict.
    monkeypatch.setenv("CD4ML_DEPLOY_WAIT_SECONDS", "2")
    write_spec(env["specs"], model, estimator=LOGREG, promotion__floor=None)
    states = run(env, model)

    assert killed == ["2"]
    assert states["stage_challenger"] == states["promote_champion"] == "success", states
    assert states["deploy_champion"] == "failed" and states["__run__"] == "failed", states
    # Unreachable is transient: retried (1 + 2 retries), and only the last try rolls back.
    assert task_tries(states["__run_id__"], f"{model}__train")["deploy_champion"] == 3
    assert champion(env, model) == "1"
    v2 = env["mlflow"].get_model_version(model, "2")
    assert v2.tags["cd4ml.decision"] == "promote"
    assert v2.tags["cd4ml.rolled_back"] == "to 1"
    # Every try is its own event: the first two leave the champion for the retry, the last rolls back.
    attempts = deployments(env, model, "2")
    assert [a["outcome"] for a in attempts] == ["staged", "retrying", "retrying", "failed"], attempts
    deployment = attempts[-1]
    assert f"the prediction service at {own_service['url']} is unreachable" in deployment["error"]
    assert "refused version" not in deployment["error"]  # not a refusal by the service
    assert "champion moved back to 1" in deployment["rollback"]

    # Back up, the service serves the restored champion, never the failed one.
    own_service["start"]()
    wait_http(f"{own_service['url']}/v1/models/{model}", 60)
    import httpx

    body = httpx.get(f"{own_service['url']}/v1/models/{model}", timeout=10).json()
    assert str(body["version"]) == "1"


@soak_only  # the retry itself is covered by the rollback case above; this is its happy ending
def test_service_back_before_the_retry_deploys_the_new_champion(
    env: dict[str, Any],
    own_service: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transient failure is retried: the first deploy try finds the service down and leaves the
    champion in place; the service comes back; the retry deploys and smoke-tests it."""
    model = "fault_service_back"
    write_spec(env["specs"], model, estimator=WEAK, promotion__floor=None)
    land(env, model, "week0.csv", generate_churn(ROWS, seed=34))
    assert run(env, model)["__run__"] == "success"
    wait_http(f"{own_service['url']}/v1/models/{model}", 30)

    kill_after_staging(own_service, monkeypatch)
    monkeypatch.setenv("CD4ML_DEPLOY_WAIT_SECONDS", "15")
    write_spec(env["specs"], model, estimator=LOGREG, promotion__floor=None)
    restarted: list[float] = []

    def restart_when_the_first_try_gave_up() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if any(a.get("outcome") == "retrying" for a in deployments(env, model, "2")):
                own_service["start"]()
                restarted.append(time.monotonic())
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=restart_when_the_first_try_gave_up, daemon=True)
    watcher.start()
    states = run(env, model)
    watcher.join(timeout=60)

    assert restarted, "the first deploy try never recorded 'retrying'"
    assert states["__run__"] == "success" and states["deploy_champion"] == "success", states
    assert task_tries(states["__run_id__"], f"{model}__train")["deploy_champion"] == 2
    attempts = deployments(env, model, "2")
    assert [a["outcome"] for a in attempts] == ["staged", "retrying", "deployed"], attempts
    assert attempts[-1]["golden_rows"] == 20
    assert champion(env, model) == "2"
    import httpx

    assert str(httpx.get(f"{own_service['url']}/v1/models/{model}", timeout=10).json()["version"]) == "2"
