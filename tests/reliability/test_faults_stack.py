"""Faults on the real embedded stack (`cd4ml stack up`, as `make up` starts it, on free ports in a
temp dir): the real scheduler, LocalExecutor task processes, triggerer, MLflow server and service.

One stack serves three scenarios, in order:
- 5 files land while the schedule fires (the spec's retrain cron is every minute here) and a manual
  run is triggered: one run at a time, every file accepted exactly once by exactly one run;
- the process running `train_challenger` is SIGKILLed: the retry completes, one new version;
- the whole stack is stopped mid-run and started again: no lost file, no half-moved alias, and
  the next run succeeds.

Slow (minutes on 2 cores): runs under `make soak` (CD4ML_SOAK=1). The fast, deterministic
versions of the same promises run in `make test` (test_faults.py, dag.test()).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from cd4ml import registry
from cd4ml.data import landing
from cd4ml_dev.datagen import generate_churn, write_batch
from cd4ml_dev.netutil import free_port
from tests.helpers import write_spec
from tests.system.test_embedded_stack import airflow_token, http_json

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.environ.get("CD4ML_SOAK") != "1", reason="soak test: make soak"),
]
CLI = str(Path(sys.executable).parent / "cd4ml-dev")
MODEL = "faults"
DAG = f"{MODEL}__train"
# Slow enough to be caught mid-training, single-threaded (no OpenMP storms on 2 shared cores).
SLOW = {"class": "sklearn.ensemble.RandomForestClassifier",
        "params": {"n_estimators": 150, "max_depth": 12, "n_jobs": 1}}  # fmt: skip


class Stack:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.home = Path(env["CD4ML_HOME"])
        self.base = f"http://127.0.0.1:{env['CD4ML_AIRFLOW_PORT']}"
        self.mlflow = f"http://127.0.0.1:{env['CD4ML_MLFLOW_PORT']}"
        self.zone = landing.Zone(self.home / "data" / MODEL)
        self._token: str | None = None

    def cli(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLI, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def api(self, path: str, body: dict | None = None) -> dict:
        for attempt in range(3):
            try:
                self._token = self._token or airflow_token(self.env)
                return http_json(f"{self.base}/api/v2{path}", token=self._token, body=body)
            except urllib.error.HTTPError as err:
                if err.code != 401 or attempt == 2:
                    raise
                self._token = None  # expired or the API restarted with the same secret: log in again
        raise AssertionError("unreachable")

    def runs(self) -> list[dict]:
        return self.api(f"/dags/{DAG}/dagRuns?order_by=start_date&limit=100")["dag_runs"]

    def trigger(self, reason: str, **conf: Any) -> str:
        body = {"logical_date": None, "conf": {"reason": reason, **conf}}
        return str(self.api(f"/dags/{DAG}/dagRuns", body=body)["dag_run_id"])

    def ti(self, run_id: str, task_id: str) -> dict:
        return self.api(f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/{task_id}")

    def xcom(self, run_id: str, task_id: str) -> Any:
        path = f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
        try:
            value = self.api(path)["value"]
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise
        return json.loads(value) if isinstance(value, str) else value

    def wait_idle(self, timeout: float = 600, settle: float = 0) -> list[dict]:
        """Until no run is queued or running (and, with `settle`, stays so that long)."""
        deadline = time.monotonic() + timeout
        idle_since: float | None = None
        while time.monotonic() < deadline:
            runs = self.runs()
            if all(r["state"] in {"success", "failed"} for r in runs):
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= settle:
                    return runs
            else:
                idle_since = None
            time.sleep(2)
        raise TimeoutError(f"{DAG} still busy after {timeout:.0f}s: {[r['state'] for r in self.runs()]}")

    def wait_state(self, run_id: str, task_id: str, states: set[str], timeout: float = 400) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ti = self.ti(run_id, task_id)
            if ti["state"] in states:
                return ti
            time.sleep(0.5)
        raise TimeoutError(f"{task_id} of {run_id} never reached {states}")

    def alias(self, alias: str) -> dict | None:
        try:
            return http_json(
                f"{self.mlflow}/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias={alias}"
            )["model_version"]
        except urllib.error.HTTPError:
            return None

    def versions(self) -> list[dict]:
        body = http_json(
            f"{self.mlflow}/api/2.0/mlflow/model-versions/search?filter=name%3D%27{MODEL}%27&max_results=1000"
        )
        return sorted(body.get("model_versions", []), key=lambda v: int(v["version"]))

    def hashes_on_disk(self) -> dict[str, list[str]]:
        """sha256 of every data file in landing/, accepted/ and quarantine/ -> where it is."""
        out: dict[str, list[str]] = {}
        for zone_dir in (self.zone.landing, self.zone.accepted, self.zone.quarantine):
            for path in zone_dir.glob("*") if zone_dir.exists() else []:
                if (
                    path.is_file()
                    and not path.name.endswith((".json", ".txt"))
                    and not path.name.startswith(".")
                ):
                    out.setdefault(landing.file_sha256(path), []).append(f"{zone_dir.name}/{path.name}")
        return out


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    home = Path(tempfile.mkdtemp(prefix="cd4ml-faults-"))
    specs = home / "specs"
    specs.mkdir()
    write_spec(specs, MODEL, estimator=SLOW, schedule__retrain_cron="* * * * *", promotion__floor=None)
    env = {**os.environ, "CD4ML_HOME": str(home), "CD4ML_SPECS_DIR": str(specs),
           "CD4ML_AIRFLOW_PORT": str(free_port()), "CD4ML_MLFLOW_PORT": str(free_port()),
           "CD4ML_SERVICE_PORT": str(free_port()), "CD4ML_PARALLELISM": "2"}  # fmt: skip
    for key in ("AIRFLOW_HOME", "MLFLOW_TRACKING_URI", *(k for k in os.environ if k.startswith("AIRFLOW__"))):
        env.pop(key, None)
    s = Stack(env)
    up = s.cli("stack", "up", "--no-demo")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield s
    finally:
        s.cli("stack", "down", timeout=180)
        if os.environ.get("CD4ML_KEEP_SYSTEM_STATE") != "1":
            shutil.rmtree(home, ignore_errors=True)


def _t(stamp: str | None) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() if stamp else float("inf")


def assert_one_run_at_a_time(runs: list[dict]) -> None:
    spans = sorted((_t(r["start_date"]), _t(r["end_date"]), r["dag_run_id"]) for r in runs if r["start_date"])
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        assert end <= start, f"runs {a} and {b} overlapped"


def test_five_files_and_the_schedule_at_once_one_run_at_a_time_each_file_once(stack: Stack) -> None:
    stack.wait_idle(settle=5)
    frames = {f"day{i}.csv": generate_churn(1200, seed=50 + i, batch=i) for i in range(5)}
    landed = {}
    for name, frame in frames.items():
        landed[landing.file_sha256(write_batch(frame, stack.zone.landing, name))] = name
    manual = stack.trigger("five files at once")
    runs_before = {r["dag_run_id"] for r in stack.runs()} - {manual}

    # Until the files are gone from landing/, a scheduled (cron) run has started since, and all is idle.
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        runs = stack.wait_idle(timeout=900)
        new = [r for r in runs if r["dag_run_id"] not in runs_before]
        if not any(stack.zone.landing.iterdir()) and any(r["run_type"] == "scheduled" for r in new):
            break
        time.sleep(5)
    new = [r for r in stack.runs() if r["dag_run_id"] not in runs_before]
    kinds = {r["run_type"] for r in new}
    assert {"manual", "scheduled"} <= kinds, kinds
    assert all(r["state"] == "success" for r in new), [(r["dag_run_id"], r["state"]) for r in new]
    assert_one_run_at_a_time(stack.runs())

    on_disk = stack.hashes_on_disk()
    for sha, name in landed.items():
        assert on_disk.get(sha) == [f"accepted/{sha[:16]}__{name}"], (name, on_disk.get(sha))
    # Each file in exactly one run's manifest (the validate task's output) and in its meta sidecar.
    owners: dict[str, list[str]] = {n: [] for n in frames}
    for r in new:
        validated = stack.xcom(r["dag_run_id"], "validate_batches") or {}
        for item in validated.get("accepted", []):
            owners.setdefault(item["name"], []).append(r["dag_run_id"])
        assert not validated.get("quarantined"), validated
    assert all(len(v) == 1 for v in owners.values()), owners
    for sha, name in landed.items():
        meta = json.loads((stack.zone.accepted / f"{sha[:16]}__{name}.meta.json").read_text())
        assert meta["run_id"] == owners[name][0]
    champion = stack.alias("champion")
    assert champion is not None
    mlflow = registry.client(stack.mlflow)
    assert registry.read_evidence(mlflow, MODEL, str(champion["version"])).validation["status"] == "passed"
    print(f"runs: {[(r['run_type'], r['dag_run_id']) for r in new]}; owners: {owners}")


def task_process(ti_id: str, timeout: float = 120) -> psutil.Process:
    """The task runner process (`airflow worker -- <ti id>`) running that task instance."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if ti_id in cmd and "airflow worker" in cmd:
                return proc
        time.sleep(0.2)
    raise TimeoutError(f"no process for task instance {ti_id}")


def test_sigkill_mid_training_the_retry_completes_with_exactly_one_new_version(stack: Stack) -> None:
    stack.wait_idle(settle=5)
    before = [v["version"] for v in stack.versions()]
    run_id = stack.trigger("sigkill test", force=True)
    ti = stack.wait_state(run_id, "train_challenger", {"running"})
    proc = task_process(ti["id"])
    time.sleep(0.5)  # into the task body; the fit itself takes seconds even on a quiet machine
    assert stack.ti(run_id, "train_challenger")["state"] == "running"
    os.kill(proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()

    runs = stack.wait_idle(timeout=900)
    (run,) = [r for r in runs if r["dag_run_id"] == run_id]
    assert run["state"] == "success", run
    ti = stack.ti(run_id, "train_challenger")
    assert ti["state"] == "success" and ti["try_number"] >= 2, ti
    after = stack.versions()
    new = [v for v in after if v["version"] not in before]
    assert len(new) == 1, [v["version"] for v in new]  # one trained model, one version, decided
    tags = {t["key"]: t["value"] for t in new[0]["tags"]}
    assert tags["cd4ml.airflow_run_id"] == run_id and tags["cd4ml.decision"] in {"promote", "reject"}
    assert stack.alias("challenger")["version"] == new[0]["version"]
    took = time.monotonic() - killed_at
    print(f"killed pid {proc.pid}; run finished {took:.0f}s later; tries {ti['try_number']}")


def test_whole_stack_restart_mid_run_loses_no_file_and_no_alias_then_recovers(stack: Stack) -> None:
    stack.wait_idle(settle=5)
    write_batch(generate_churn(1200, seed=70, batch=7), stack.zone.landing, "restart_day.csv")
    landed_sha = landing.file_sha256(stack.zone.landing / "restart_day.csv")
    run_id = stack.trigger("restart test")
    stack.wait_state(run_id, "train_challenger", {"running"}, timeout=600)
    time.sleep(2)

    down = stack.cli("stack", "down", timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    # Task processes run in process groups of their own, so they can outlive supervisord for a
    # moment; whatever is still there after 60 s is killed, as a power cut would.
    survivors = _survivors(stack)
    deadline = time.monotonic() + 60
    while _survivors(stack) and time.monotonic() < deadline:
        time.sleep(1)
    killed = [(p.pid, " ".join(p.cmdline())[:80]) for p in _survivors(stack)]
    for proc in _survivors(stack):
        proc.kill()
    print(f"after `stack down`: {len(survivors)} process(es) still up, {len(killed)} after 60 s: {killed}")
    up = stack.cli("stack", "up", "--no-demo")
    assert up.returncode == 0, up.stdout + up.stderr
    runs = stack.wait_idle(timeout=900)

    on_disk = stack.hashes_on_disk()
    assert len(on_disk[landed_sha]) == 1 and not on_disk[landed_sha][0].startswith("quarantine"), on_disk
    assert all(len(places) == 1 for places in on_disk.values()), on_disk
    champion = stack.alias("champion")
    if champion is not None:  # no half-moved alias: it points at a complete, validated version
        assert champion["status"] == "READY"
        tags = {t["key"]: t["value"] for t in champion["tags"]}
        evidence = registry.read_evidence(registry.client(stack.mlflow), MODEL, str(champion["version"]))
        assert evidence.validation["status"] == "passed"
        assert tags["cd4ml.decision"] == "promote"
    interrupted = next(r for r in runs if r["dag_run_id"] == run_id)

    # The pipeline recovers: the next run (a new file) succeeds end to end.
    write_batch(generate_churn(1200, seed=71, batch=8), stack.zone.landing, "after_restart.csv")
    recovery = stack.trigger("after restart")
    runs = stack.wait_idle(timeout=900)
    (rec,) = [r for r in runs if r["dag_run_id"] == recovery]
    assert rec["state"] == "success", rec
    assert not any(stack.zone.landing.iterdir())
    champion = stack.alias("champion")
    assert champion is not None and champion["status"] == "READY"
    print(f"interrupted run ended {interrupted['state']}; champion v{champion['version']}")


def _survivors(stack: Stack) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("CD4ML_HOME") == str(stack.home) and proc.pid != os.getpid():
                out.append(proc)
        except psutil.Error:
            continue  # gone meanwhile, or not ours to read
    return out
