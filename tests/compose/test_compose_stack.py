"""docker-compose.yaml as a user runs it, under a real Docker engine (`make test-compose`).

One compose project with a generated .env of random secrets: every health check goes healthy,
the FAB login takes the admin password from .env, batches copied into the data volume train on
the Celery workers and the prediction-service container serves the champion, `--scale
airflow-worker=N` adds workers that take tasks, a scheduler restart mid-run loses nothing, and
`down` + `up` keeps every model, version and file. A missing secret stops `up` with its name.

The tests run in file order and share the project: each one starts from the state the one before
left. Land -> finished run times per worker count are printed (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cd4ml_dev.datagen import generate_churn
from tests.compose.stack import (
    SECRETS,
    ComposeProject,
    generated_env,
    http_json,
    http_status,
    write_env,
)

pytestmark = pytest.mark.compose
MODEL = "churn"
ROWS = 3000
RUN_TIMEOUT = float(os.environ.get("CD4ML_COMPOSE_RUN_TIMEOUT", "420"))
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def project() -> Iterator[ComposeProject]:
    workdir = Path(tempfile.mkdtemp(prefix="cd4ml-compose-"))
    values = generated_env()
    write_env(workdir / ".env", values)
    proj = ComposeProject(f"cd4mlt{os.getpid()}", workdir / ".env", values)
    try:
        TIMINGS["up_to_healthy_s"] = proj.up()
        yield proj
    finally:
        if os.environ.get("CD4ML_KEEP_COMPOSE") != "1":
            proj.run("down", "-v", "--remove-orphans", check=False, timeout=300)
        print("compose timings:", {k: round(v, 1) for k, v in TIMINGS.items()})


def land(proj: ComposeProject, name: str, seed: int) -> None:
    """Copy a batch into the data volume the way a user's sync job would: atomically, as the
    containers' user (temp name, then rename, so the watcher never sees half a file)."""
    csv = generate_churn(ROWS, seed=seed).to_csv(index=False).encode()
    landing = f"/data/{MODEL}/landing"
    proj.exec("airflow-scheduler", f"mkdir -p {landing} && cat > {landing}/.{name}.part && "
              f"mv {landing}/.{name}.part {landing}/{name}", stdin=csv)  # fmt: skip


def train_runs(proj: ComposeProject) -> list[list[str]]:
    return proj.sql(
        f"SELECT run_id, run_type, state FROM dag_run WHERE dag_id = '{MODEL}__train' ORDER BY id"
    )


def wait_for_run_on(proj: ComposeProject, name: str, known: int) -> str:
    """The run that took the landed file `name`: a run newer than the first `known` runs that
    finished with the file in accepted/. Returns its run_id."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        runs = train_runs(proj)
        accepted = proj.exec("airflow-scheduler", f"ls /data/{MODEL}/accepted/ 2>/dev/null || true")
        newer = runs[known:]
        if newer and any(name in line for line in accepted.splitlines()):
            if all(state == "success" for _, _, state in newer):
                return newer[-1][0]
            failed = [r for r in newer if r[2] == "failed"]
            assert not failed, f"{failed}\n{proj.logs('airflow-scheduler')}{proj.logs('airflow-worker')}"
        time.sleep(2)
    raise AssertionError(
        f"no finished run took {name} within {RUN_TIMEOUT:.0f}s (CD4ML_COMPOSE_RUN_TIMEOUT): "
        f"runs={train_runs(proj)}\n{proj.logs('airflow-scheduler')}{proj.logs('airflow-worker')}"
    )


def task_hosts(proj: ComposeProject, run_id: str) -> dict[str, int]:
    rows = proj.sql(
        "SELECT hostname, count(*) FROM task_instance WHERE state = 'success' "
        f"AND dag_id = '{MODEL}__train' AND run_id = '{run_id}' GROUP BY hostname"
    )
    return {host: int(n) for host, n in rows}


def worker_hostnames(proj: ComposeProject) -> set[str]:
    """Container hostnames of the running Celery workers (what task_instance.hostname records)."""
    hosts = set()
    for container in proj.containers("airflow-worker"):
        index = container.rsplit("-", 1)[1]
        hosts.add(proj.run("exec", "-T", "--index", index, "airflow-worker", "hostname").stdout.strip())
    return hosts


def champion(proj: ComposeProject) -> dict[str, Any] | None:
    try:
        mv: dict[str, Any] = http_json(
            f"{proj.url('MLFLOW_PORT')}/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias=champion"
        )["model_version"]
    except urllib.error.HTTPError as err:
        if err.code in {400, 404}:
            return None
        raise
    return mv


def served_version(proj: ComposeProject) -> str | None:
    try:
        version: str | None = http_json(f"{proj.url('CD4ML_SERVICE_PORT')}/v1/models/{MODEL}").get("version")
    except (urllib.error.HTTPError, urllib.error.URLError):
        return None
    return version


def wait_served(proj: ComposeProject, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served_version(proj) == version:
            return
        time.sleep(1)
    raise AssertionError(
        f"the prediction service serves {served_version(proj)}, not champion v{version}, "
        f"{timeout:.0f}s after the run\n{proj.logs('prediction-service')}"
    )


def versions(proj: ComposeProject) -> list[str]:
    query = f"filter=name%3D%27{MODEL}%27"
    out = http_json(f"{proj.url('MLFLOW_PORT')}/api/2.0/mlflow/model-versions/search?{query}")
    return sorted(v["version"] for v in out.get("model_versions", []))


def test_every_service_is_healthy_and_the_login_comes_from_env(project: ComposeProject) -> None:
    ps = project.run("ps", "-a", "--format", "{{.Service}} {{.State}} {{.Health}} {{.ExitCode}}").stdout
    state = {line.split()[0]: line.split()[1:] for line in ps.splitlines()}
    assert state.pop("airflow-init")[:1] == ["exited"], ps
    assert state and all(s[:2] == ["running", "healthy"] for s in state.values()), ps
    api = project.url("AIRFLOW_PORT")
    login = {"username": "admin", "password": project.values["AIRFLOW_ADMIN_PASSWORD"]}
    token = http_json(f"{api}/auth/token", body=login)["access_token"]
    # FAB, not the SimpleAuthManager: the password is the generated one, not a default.
    wrong = {"username": "admin", "password": "admin"}
    assert http_status(f"{api}/auth/token", body=wrong) in {400, 401, 403}
    dags = {d["dag_id"] for d in http_json(f"{api}/api/v2/dags?limit=200", token=token)["dags"]}
    assert f"{MODEL}__train" in dags, dags


def test_a_missing_secret_stops_start_up_and_names_it(project: ComposeProject, tmp_path: Path) -> None:
    for missing in SECRETS:
        values = {k: v for k, v in project.values.items() if k != missing}
        write_env(tmp_path / ".env", values)
        broken = ComposeProject(f"{project.name}x", tmp_path / ".env", values, project.binary)
        done = broken.run("up", "-d", "--no-build", check=False, timeout=120)
        assert done.returncode != 0, f"up started without {missing}"
        assert f"{missing} must be set in .env" in done.stderr, done.stderr
        created = subprocess.run(
            ["docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={broken.name}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert created.strip() == "", f"containers were created without {missing}"


def test_a_batch_in_the_data_volume_trains_on_celery_and_is_served(project: ComposeProject) -> None:
    known = len(train_runs(project))
    landed = time.monotonic()
    land(project, "week1.csv", seed=11)
    run_id = wait_for_run_on(project, "week1.csv", known)
    mv = champion(project)
    assert mv is not None, f"run {run_id} finished without a champion"
    wait_served(project, mv["version"])
    TIMINGS["land_to_served_1_worker_s"] = time.monotonic() - landed
    # Every task ran in the worker container, none in the scheduler's.
    assert set(task_hosts(project, run_id)) <= worker_hostnames(project), task_hosts(project, run_id)
    records = json.loads(generate_churn(5, seed=3).drop(columns=["churned"]).to_json(orient="records"))
    body = {"dataframe_records": records}
    prediction = http_json(f"{project.url('CD4ML_SERVICE_PORT')}/v1/models/{MODEL}/predict", body=body)
    assert str(prediction.get("version")) == mv["version"], prediction
    # The service runs as 2 processes (CD4ML_SERVICE_WORKERS in compose): both serve the champion.
    ready = http_json(f"{project.url('CD4ML_SERVICE_PORT')}/health/ready")
    assert ready["processes"] == {"expected": 2, "live": 2, "ready_processes": 2}, ready
    every = http_json(f"{project.url('CD4ML_SERVICE_PORT')}/v1/models/{MODEL}")["serving_versions"]
    assert sorted(every.values()) == [mv["version"]] * 2, every


@pytest.mark.parametrize("workers", [2, 3])
def test_scaled_out_workers_take_tasks(project: ComposeProject, workers: int) -> None:
    project.up("--scale", f"airflow-worker={workers}")
    hosts = worker_hostnames(project)
    assert len(hosts) == workers, hosts
    known = len(train_runs(project))
    landed = time.monotonic()
    name = f"scaled{workers}.csv"
    land(project, name, seed=20 + workers)
    run_id = wait_for_run_on(project, name, known)
    TIMINGS[f"land_to_run_done_{workers}_workers_s"] = time.monotonic() - landed
    ran_on = task_hosts(project, run_id)
    assert set(ran_on) <= hosts, (ran_on, hosts)
    assert len(ran_on) >= 2, f"all tasks of {run_id} ran on one of {workers} workers: {ran_on}"


def test_a_scheduler_restart_mid_run_loses_nothing(project: ComposeProject) -> None:
    known = len(train_runs(project))
    land(project, "restart.csv", seed=41)
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline and not any(s == "running" for _, _, s in train_runs(project)[known:]):
        time.sleep(1)
    assert any(s == "running" for _, _, s in train_runs(project)[known:]), train_runs(project)
    project.run("restart", "airflow-scheduler")
    run_id = wait_for_run_on(project, "restart.csv", known)
    failed = project.sql(
        f"SELECT task_id, state FROM task_instance WHERE run_id = '{run_id}' "
        "AND state NOT IN ('success', 'skipped')"
    )
    assert failed == [], failed


def data_files(project: ComposeProject) -> dict[str, str]:
    """Every file under the data volume, path (relative to /data) -> md5 of its content."""
    out = project.exec("airflow-scheduler", "cd /data && find . -type f -exec md5sum {} +")
    files: dict[str, str] = {}
    for line in out.splitlines():
        digest, _, path = line.partition("  ")
        if path:
            files[path.removeprefix("./")] = digest
    assert files, out
    return files


def test_down_and_up_keep_models_versions_and_files(project: ComposeProject) -> None:
    before_versions = versions(project)
    before_champion = champion(project)
    before_files = data_files(project)
    assert before_champion is not None and before_versions
    project.run("down", timeout=300)
    TIMINGS["up_again_s"] = project.up()
    assert versions(project) == before_versions
    after = champion(project)
    assert after is not None and after["version"] == before_champion["version"]
    # The stack keeps running after `up`: the hourly drift monitor may add reports, so files
    # may be added but none may go missing, and the batches, runs and quarantine must not change.
    after_files = data_files(project)
    assert sorted(set(before_files) - set(after_files)) == []
    kept = ("accepted/", "quarantine/", "runs/")
    changed = [
        p
        for p, digest in before_files.items()
        if p.split("/", 1)[-1].startswith(kept) and after_files[p] != digest
    ]
    assert changed == []
    wait_served(project, after["version"])
    api = project.url("AIRFLOW_PORT")
    login = {"username": "admin", "password": project.values["AIRFLOW_ADMIN_PASSWORD"]}
    assert http_json(f"{api}/auth/token", body=login)["access_token"]
