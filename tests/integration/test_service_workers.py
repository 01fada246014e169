"""The prediction service as several processes (`CD4ML_SERVICE_WORKERS`, issue 16) on the real stack:
a real MLflow server, `cd4ml serve --workers 3` (uvicorn workers on one port), real trained versions,
real HTTP load from threads.

Any request may reach any process, so what a deploy, a probe or Prometheus reads must hold for all of
them: staging answers once every process staged, a deploy returns once every process serves the new
champion (no stale answer after it), readiness drops while a process is missing, /metrics and the
canary's counts add up over every process, and the prediction log holds every row exactly once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cd4ml import registry
from cd4ml.core.settings import get_settings
from cd4ml.core.spec import ModelSpec, load_spec
from cd4ml.ml import training
from cd4ml.serving.predlog import read_predictions
from cd4ml.serving.processes import HUNG_SECONDS
from cd4ml.steps.deploy import (
    ServiceEndpoint,
    ServiceRefusedError,
    smoke_test,
    stage_version,
    wait_until_serving,
)
from cd4ml_dev.datagen import generate_churn
from cd4ml_dev.netutil import free_port, wait_http
from tests.conftest import BIN, SERVICE_TOKEN
from tests.helpers import LOGREG, WEAK, make_champion, write_spec

pytestmark = pytest.mark.integration
WORKERS = 3
ADMIN = {"Authorization": f"Bearer {SERVICE_TOKEN}"}


@pytest.fixture(scope="module")
def fleet(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`cd4ml serve --workers 3` with its own specs, data root and state folder."""
    home = tmp_path_factory.mktemp("fleet")
    specs, data, state = home / "specs", home / "data", home / "state"
    specs.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "CD4ML_SPECS_DIR": str(specs),
        "CD4ML_DATA_DIR": str(data),
        "CD4ML_SERVICE_STATE_DIR": str(state),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "CD4ML_SERVICE_ADMIN_TOKEN": SERVICE_TOKEN,
        "CD4ML_SERVICE_POLL_SECONDS": "0.5",
    }
    log = home / "service.log"
    proc = subprocess.Popen(
        [str(BIN / "cd4ml"), "serve", "--port", str(port), "--workers", str(WORKERS)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health/live", 300)
        yield {"url": url, "specs": specs, "data": data, "state": state, "log": log, "proc": proc,
               "mlflow": registry.client(mlflow_server), "tracking_uri": mlflow_server}  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def register(fleet: dict[str, Any], spec: ModelSpec, seed: int) -> str:
    """Train `spec`'s pipeline on generated data and register it (not champion yet)."""
    frame = generate_churn(600, seed=seed)
    logged = registry.log_challenger(
        fleet["tracking_uri"], experiment=spec.name, run_name=f"workers test {seed}",
        model=training.train(spec, frame), input_example=training.features(spec, frame.head(5)),
        params={}, tags={}, metrics={},
    )  # fmt: skip
    mv = registry.register_version(fleet["mlflow"], name=spec.name, description="", logged=logged, tags={})
    return str(mv.version)


def rows(n: int, seed: int) -> list[dict[str, Any]]:
    frame = generate_churn(n, seed=seed).drop(columns=["churned"])
    return list(frame.to_dict(orient="records"))


def wait_ready(url: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = httpx.get(f"{url}/health/ready", timeout=10)
        if resp.status_code == 200 or time.monotonic() > deadline:
            return dict(resp.json())
        time.sleep(0.3)


class Load:
    """Requests of 1 to 3 rows from 4 threads, each with its own request id, until stopped."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model, self.stop = url, model, threading.Event()
        self.sent: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(4)]

    def _run(self, seed: int) -> None:
        pool = rows(60, seed=100 + seed)
        i = 0
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                n = 1 + i % 3
                body = {"dataframe_records": [pool[(i + k) % len(pool)] for k in range(n)]}
                rid = uuid.uuid4().hex
                began = time.time()
                try:
                    resp = client.post(f"{self.url}/v1/models/{self.model}/predict", json=body,
                                       headers={"x-request-id": rid})  # fmt: skip
                    got = (resp.status_code, resp.headers.get("x-model-version"))
                except httpx.HTTPError as err:
                    got = (0, type(err).__name__)
                with self.lock:
                    self.sent.append({"rid": rid, "rows": n, "status": got[0], "version": got[1],
                                      "began": began, "ended": time.time()})  # fmt: skip
                i += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def counted(url: str, model: str) -> float:
    """cd4ml_requests_total over every process and version of `model`, as /metrics reports it."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    pattern = rf'^cd4ml_requests_total{{[^}}]*model="{model}"[^}}]*}} ([0-9.e+]+)$'
    return sum(float(v) for v in re.findall(pattern, text, flags=re.M))


def test_a_swap_across_every_process_fails_nothing_and_logs_every_row_once(
    fleet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, model = fleet["url"], "fleet_swap"
    spec = load_spec(write_spec(fleet["specs"], model, estimator=WEAK, promotion__floor=None))
    first = register(fleet, spec, seed=1)
    make_champion(fleet["mlflow"], model, first)
    ready = wait_ready(url)
    assert ready["ready"] and ready["processes"] == {"expected": WORKERS, "live": WORKERS,
                                                      "ready_processes": WORKERS}, ready  # fmt: skip
    meta = httpx.get(f"{url}/v1/models/{model}", timeout=10).json()
    assert sorted(meta["serving_versions"].values()) == [first] * WORKERS, meta

    spec = load_spec(write_spec(fleet["specs"], model, estimator=LOGREG, promotion__floor=None))
    second = register(fleet, spec, seed=2)
    endpoint = ServiceEndpoint(url, SERVICE_TOKEN, wait_seconds=60)
    # The smoke test computes the offline predictions from this MLflow, as the deploy task does.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fleet["tracking_uri"])
    settings = get_settings()
    with Load(url, model) as load:
        time.sleep(2)
        # Staging answers once every process holds the version; any process then smoke-tests it.
        stage_version(endpoint, model, second)
        assert httpx.get(f"{url}/v1/models/{model}", timeout=10).json()["staged_version"] == second
        holdout = training.features(spec, generate_churn(30, seed=9))
        for _ in range(2 * WORKERS):
            assert smoke_test(spec, settings, endpoint, second, holdout, staged=True)["golden_rows"] == 30
        make_champion(fleet["mlflow"], model, second, when="2026-06-02T00:00:00+00:00")
        wait_until_serving(endpoint, model, second)  # every process, not just the one that answers
        swapped = time.time()
        time.sleep(3)
    sent = load.sent
    assert sent and all(s["status"] == 200 for s in sent), [s for s in sent if s["status"] != 200][:5]
    stale = [s for s in sent if s["began"] > swapped and s["version"] != second]
    assert not stale, f"{len(stale)} answers from version {stale[0]['version']} after the swap"
    versions = {s["version"] for s in sent}
    assert versions == {first, second}, versions

    # Every row of every request logged exactly once, with the version that answered it.
    expected_rows = sum(s["rows"] for s in sent)
    deadline = time.monotonic() + 30
    while True:
        logged = read_predictions(fleet["data"], model)
        if len(logged) >= expected_rows or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(logged) == expected_rows, (len(logged), expected_rows)
    per_request = logged.groupby("request_id").agg(n=("row", "size"), distinct=("row", "nunique"),
                                                   version=("model_version", "first"))  # fmt: skip
    assert len(per_request) == len(sent)
    for s in sent:
        got = per_request.loc[s["rid"]]
        assert (got["n"], got["distinct"], got["version"]) == (s["rows"], s["rows"], s["version"]), s

    # /metrics adds up every process's counters, and more than one process answered.
    deadline = time.monotonic() + 10
    while counted(url, model) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert counted(url, model) == len(sent)
    answered_by = {p.name.split("_")[-1] for p in (fleet["state"] / "prometheus").glob("counter_*.db")}
    assert len(answered_by) >= 2, answered_by


def test_readiness_drops_while_a_process_is_missing_and_returns_with_its_replacement(
    fleet: dict[str, Any],
) -> None:
    url, model = fleet["url"], "fleet_ready"
    spec = load_spec(write_spec(fleet["specs"], model, estimator=WEAK, promotion__floor=None))
    make_champion(fleet["mlflow"], model, register(fleet, spec, seed=3))
    assert wait_ready(url)["ready"]
    pids = list(httpx.get(f"{url}/v1/models/{model}", timeout=10).json()["serving_versions"])
    assert len(pids) == WORKERS
    os.kill(int(pids[0]), signal.SIGKILL)  # a process dies: the supervisor starts a new one

    deadline = time.monotonic() + 30
    seen_down: dict[str, Any] | None = None
    while time.monotonic() < deadline and seen_down is None:
        try:
            resp = httpx.get(f"{url}/health/ready", timeout=10)
        except httpx.TransportError:
            # A connection the kernel had queued on the dead process's own socket is reset (with
            # sysctl net.ipv4.tcp_migrate_req=1 it would move to another process's): the client retries.
            continue
        if resp.status_code == 503:
            seen_down = resp.json()
        time.sleep(0.2)
    assert seen_down is not None, "readiness never reported the missing process"
    assert seen_down["processes"]["live"] < WORKERS or seen_down["processes"]["ready_processes"] < WORKERS
    for probe, code in (("/ping", 404), ("/v2/health/ready", 400)):
        # the same answer on every readiness probe while it lasts (or it is already back)
        assert httpx.get(f"{url}{probe}", timeout=10).status_code in (code, 200)

    back = wait_ready(url, timeout=120)
    assert back["ready"] and back["processes"]["live"] == WORKERS, back
    now = httpx.get(f"{url}/v1/models/{model}", timeout=10).json()["serving_versions"]
    assert pids[0] not in now and len(now) == WORKERS

    # A champion moved outside cd4ml (no signed record): every process refuses it, keeps serving the
    # old one, and a deploy waiting for it fails at once saying why (not after its whole wait).
    unsigned = register(fleet, spec, seed=7)
    fleet["mlflow"].set_registered_model_alias(model, registry.CHAMPION, unsigned)
    endpoint = ServiceEndpoint(url, SERVICE_TOKEN, wait_seconds=60)
    began = time.monotonic()
    with pytest.raises(ServiceRefusedError, match=f"refused version {unsigned}: .*cd4ml did not promote"):
        wait_until_serving(endpoint, model, unsigned)
    assert time.monotonic() - began < 30
    meta = httpx.get(f"{url}/v1/models/{model}", timeout=10).json()
    assert set(meta["serving_versions"].values()) == {meta["version"]} and meta["version"] != unsigned
    assert unsigned in meta["refused_versions"], meta
    make_champion(fleet["mlflow"], model, meta["version"])  # back to the signed one for the next test
    assert wait_ready(url)["ready"]


def test_a_hung_process_is_replaced(fleet: dict[str, Any]) -> None:
    """A stopped (hung) process would keep taking its share of new connections on its own socket:
    it stops reporting, so the supervisor kills it and starts another."""
    url, model = fleet["url"], "fleet_hung"
    spec = load_spec(write_spec(fleet["specs"], model, estimator=WEAK, promotion__floor=None))
    make_champion(fleet["mlflow"], model, register(fleet, spec, seed=8))
    assert wait_ready(url)["ready"]
    pids = list(httpx.get(f"{url}/v1/models/{model}", timeout=10).json()["serving_versions"])
    os.kill(int(pids[-1]), signal.SIGSTOP)
    deadline = time.monotonic() + HUNG_SECONDS + 90
    now: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{url}/v1/models/{model}", timeout=5)
        except httpx.TransportError:  # a connection that landed on the stopped process's socket
            continue
        now = resp.json().get("serving_versions") or {}
        if pids[-1] not in now and len(now) == WORKERS:
            break
        time.sleep(0.5)
    assert pids[-1] not in now and len(now) == WORKERS, now
    assert wait_ready(url)["ready"]
    assert "has not reported" in fleet["log"].read_text()


def test_the_canary_counts_and_feedback_cover_every_process(fleet: dict[str, Any]) -> None:
    url, model = fleet["url"], "fleet_canary"
    policy = {"fraction": 0.5, "min_requests": 10, "max_duration_minutes": 5, "sticky_key": "customer_id"}
    spec = load_spec(write_spec(fleet["specs"], model, estimator=WEAK, promotion__floor=None,
                                deployment={"strategy": "canary", "canary": policy}))  # fmt: skip
    champion_version = register(fleet, spec, seed=4)
    make_champion(fleet["mlflow"], model, champion_version)
    assert wait_ready(url)["ready"]
    canary_version = register(fleet, spec, seed=5)
    when = "2026-06-03T00:00:00+00:00"
    client = fleet["mlflow"]
    client.set_model_version_tag(model, canary_version, registry.CANARY_SIGNATURE_TAG,
                                 registry.champion_signature(SERVICE_TOKEN, model, canary_version, when,
                                                             registry.CANARY))  # fmt: skip
    client.set_registered_model_alias(model, registry.CANARY, canary_version)
    deadline = time.monotonic() + 60
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/v1/models/{model}/canary", timeout=10).json()
        if (status.get("canary") or {}).get("processes") == WORKERS:  # every process routes to it
            break
        time.sleep(0.3)
    assert status["canary"] and status["canary"]["processes"] == WORKERS, status

    answered: list[tuple[str, str]] = []
    with httpx.Client(timeout=30) as http:
        for i, row in enumerate(rows(120, seed=6)):
            rid = f"fleet-{i}"
            resp = http.post(f"{url}/v1/models/{model}/predict", json={"dataframe_records": [row]},
                             headers={"x-request-id": rid})  # fmt: skip
            assert resp.status_code == 200, resp.text
            answered.append((rid, resp.headers["x-model-version"]))
        # Labels right away, to whichever process: each knows ids another one served a moment ago.
        labels = [{"request_id": rid, "outcome": i % 2} for i, (rid, _) in enumerate(answered)]
        fed = http.post(f"{url}/v1/models/{model}/feedback", json={"feedback": labels})
        assert fed.status_code == 200 and fed.json()["accepted"] == len(labels), fed.text

    by_side = {side: sum(1 for _, v in answered if v == version)
               for side, version in (("champion", champion_version), ("canary", canary_version))}  # fmt: skip
    assert by_side["champion"] and by_side["canary"], by_side
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        arms = httpx.get(f"{url}/v1/models/{model}/canary", timeout=10).json()["canary"]["arms"]
        if {side: arms[side]["requests"] for side in by_side} == by_side:
            break
        time.sleep(0.3)
    assert {side: arms[side]["requests"] for side in by_side} == by_side, arms
    assert arms["canary"]["p99_ms"] is not None  # latencies merged over every process
    exported = httpx.get(f"{url}/metrics", timeout=10).text
    assert f'cd4ml_canary_latency_seconds{{arm="canary",model="{model}",quantile="0.99"}}' in exported
