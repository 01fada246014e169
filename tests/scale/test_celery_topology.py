"""docker-compose.yaml's topology, run here without Docker (`make test-scale`).

Airflow on CeleryExecutor with the machine's PostgreSQL (metadata DB, Celery results) and Redis
(broker), two `airflow celery worker` processes, MLflow on PostgreSQL and the prediction service,
each started with the command and environment docker-compose.yaml gives it (cd4ml_dev.scale). A demo
batch lands; the landing watcher starts `churn__train`; its tasks run on both workers; the outcome
is the one the same pipeline reaches in a plain process on the same file (the embedded stack runs
that pipeline too): same decision, `champion` on version 1, and the service serving it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cd4ml import registry
from cd4ml_dev.datagen import generate_churn, write_batch
from cd4ml_dev.scale import LocalTopology

pytestmark = pytest.mark.scale
BIN = Path(sys.executable).parent
MODEL = "churn"
ROWS, SEED, FILE = 3000, 11, "first_week.csv"
# Seconds to come up (and for the reference run), and from landing to a served champion: enough on an
# idle 2-core machine; on one busy with other work, scale them with CD4ML_SCALE_TIMEOUT_FACTOR (e.g. 3).
FACTOR = float(os.environ.get("CD4ML_SCALE_TIMEOUT_FACTOR", "1"))
START_TIMEOUT, SERVE_TIMEOUT = 240 * FACTOR, 150 * FACTOR


def get_json(url: str, token: str | None = None, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(url, method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(req, data=data, timeout=10) as resp:
        return json.loads(resp.read())


def reference_run(root: Path) -> subprocess.Popen[bytes]:
    """The same pipeline in one plain process (`cd4ml train`) on the same file: the expected outcome."""
    env = {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", str(root)),
        "CD4ML_HOME": str(root),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "OMP_WAIT_POLICY": "passive",  # as every stack sets it (cd4ml/stack.py, docker-compose.yaml)
    }
    write_batch(generate_churn(ROWS, seed=SEED), root / "data" / MODEL / "landing", FILE)
    return subprocess.Popen(
        [str(BIN / "cd4ml"), "train", MODEL, "--no-deploy"], cwd=root, env=env,
        stdout=subprocess.PIPE, stderr=(root / "train.log").open("wb"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def topology() -> Iterator[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="cd4ml-scale-"))
    ref_root = root / "reference"
    ref_root.mkdir()
    reference = reference_run(ref_root)
    # Two task slots per worker, as on a small VM; one MLflow worker: this machine has 2 cores.
    topo = LocalTopology(root, workers=2, settings={"AIRFLOW_WORKER_CONCURRENCY": "2", "MLFLOW_WORKERS": "1"})
    started = time.monotonic()
    try:
        topo.start(timeout=START_TIMEOUT)
        print(f"topology up in {time.monotonic() - started:.1f}s: {topo.events}")
        out, _ = reference.communicate(timeout=180 * FACTOR)
        assert reference.returncode == 0, (ref_root / "train.log").read_text()[-3000:]
        yield {"topo": topo, "reference": json.loads(out)}
    finally:
        if reference.poll() is None:
            reference.kill()
        topo.stop()
        if os.environ.get("CD4ML_KEEP_SCALE_STATE") != "1":
            shutil.rmtree(root, ignore_errors=True)


def champion(mlflow: str) -> dict[str, Any] | None:
    try:
        return get_json(f"{mlflow}/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias=champion")[
            "model_version"
        ]
    except urllib.error.HTTPError as err:
        if err.code in {400, 404}:  # no registered model yet / no alias yet
            return None
        raise


def version_tags(mv: dict[str, Any]) -> dict[str, str]:
    tags = mv.get("tags") or []
    return dict(tags) if isinstance(tags, dict) else {t["key"]: t["value"] for t in tags}


def served_version(service: str) -> str | None:
    try:
        return get_json(f"{service}/v1/models/{MODEL}").get("version")
    except urllib.error.HTTPError:
        return None


def finished_runs(topo: LocalTopology) -> list[tuple[str, str, str]]:
    return [
        (r[0], r[1], r[2])
        for r in topo.sql(
            "SELECT run_id, run_type, state FROM dag_run WHERE dag_id = %s", (f"{MODEL}__train",)
        )
    ]


def test_landed_batch_trains_on_both_workers_and_matches_the_plain_pipeline(
    topology: dict[str, Any],
) -> None:
    topo: LocalTopology = topology["topo"]
    expected: dict[str, Any] = topology["reference"]
    landed = time.monotonic()
    write_batch(generate_churn(ROWS, seed=SEED), topo.data_dir / MODEL / "landing", FILE)

    deadline = time.monotonic() + SERVE_TIMEOUT
    version, trained_by = None, None
    while time.monotonic() < deadline:
        topo.check_alive()
        mv = champion(topo.mlflow_url)
        if mv:
            run_id = version_tags(mv)["cd4ml.airflow_run_id"]
            state = topo.sql("SELECT state FROM dag_run WHERE run_id = %s", (run_id,))
            if state == [("success",)] and served_version(topo.service_url) == mv["version"]:
                version, trained_by = mv, run_id
                break
        time.sleep(1)
    assert version is not None, (
        f"no served champion from a finished run within {SERVE_TIMEOUT:.0f} s "
        f"(CD4ML_SCALE_TIMEOUT_FACTOR={FACTOR}): runs={finished_runs(topo)}\n"
        + topo.log_tail("airflow-scheduler-1")
    )
    print(f"landing -> served champion: {time.monotonic() - landed:.1f}s")

    # The landing watcher (or the nightly slot) started the run that trained it: nobody triggered
    # anything by hand, and no run failed.
    runs = {run_id: (run_type, state) for run_id, run_type, state in finished_runs(topo)}
    assert runs[trained_by] in {("asset_triggered", "success"), ("scheduled", "success")}, runs
    assert all(state in {"success", "running", "queued"} for _, state in runs.values()), runs

    # Tasks ran on both Celery workers (the hostname each task reported to the api-server).
    hosts = dict(
        topo.sql(
            "SELECT hostname, count(*) FROM task_instance WHERE run_id = %s AND state = 'success' "
            "GROUP BY hostname",
            (trained_by,),
        )
    )
    assert set(hosts) == set(topo.worker_hostnames()), hosts

    # The same outcome as the plain pipeline on the same file: decision, version and its reason.
    tags = version_tags(version)
    assert expected["promoted"] is True and expected["version"] == "1", expected
    assert tags["cd4ml.decision"] == "promote"
    assert version["version"] == expected["version"]
    decision = registry.read_evidence(registry.client(topo.mlflow_url), MODEL, str(version["version"]))
    assert decision.decision["reason"] == expected["why"]
    assert served_version(topo.service_url) == version["version"]
    accepted = list((topo.data_dir / MODEL / "accepted").glob(f"*__{FILE}"))
    assert len(accepted) == 1, accepted


def test_every_service_runs_with_the_compose_environment(topology: dict[str, Any]) -> None:
    topo: LocalTopology = topology["topo"]
    by_name = {p.name: p for p in topo.processes}
    assert set(by_name) == {
        "mlflow-1", "prediction-service-1", "airflow-init-1", "airflow-api-server-1",
        "airflow-scheduler-1", "airflow-dag-processor-1", "airflow-triggerer-1",
        "airflow-worker-1", "airflow-worker-2",
    }  # fmt: skip
    assert by_name["airflow-init-1"].exit_code == 0
    for name, proc in by_name.items():
        if name != "airflow-init-1":
            assert proc.exit_code is None, f"{name} died:\n{topo.log_tail(name)}"
    worker = by_name["airflow-worker-1"].env
    assert worker["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert worker["AIRFLOW__CELERY__BROKER_URL"] == f"redis://127.0.0.1:6379/{topo.redis_db}"
    assert worker["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith(f"/{topo.prefix}_airflow")
    assert worker["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == f"{topo.airflow_url}/execution/"
    assert worker["MLFLOW_TRACKING_URI"] == topo.mlflow_url
    store = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{topo.prefix}_mlflow"
    assert by_name["mlflow-1"].argv[:4] == ["mlflow", "server", "--backend-store-uri", store]
    # The REST API answers with the login airflow-init wrote from the (generated) admin secret.
    token = get_json(
        f"{topo.airflow_url}/auth/token",
        body={"username": "admin", "password": topo.values["AIRFLOW_ADMIN_PASSWORD"]},
    )["access_token"]
    dags = {d["dag_id"] for d in get_json(f"{topo.airflow_url}/api/v2/dags", token=token)["dags"]}
    assert f"{MODEL}__train" in dags
