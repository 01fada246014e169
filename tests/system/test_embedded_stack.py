"""The real embedded stack, started exactly as `make up` starts it (the same `cd4ml stack up`),
on non-default ports in a temporary state dir: a file lands, the training run starts by itself,
and a champion is registered."""

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

import pytest

from cd4ml.datagen import generate_churn, write_batch
from tests.conftest import free_port

pytestmark = pytest.mark.system
CLI = str(Path(sys.executable).parent / "cd4ml")


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, str]]:
    home = Path(tempfile.mkdtemp(prefix="cd4ml-sys-"))
    env = {
        **os.environ,
        "CD4ML_HOME": str(home),
        "CD4ML_AIRFLOW_PORT": str(free_port()),
        "CD4ML_MLFLOW_PORT": str(free_port()),
        "CD4ML_PARALLELISM": "2",
    }
    for key in (
        "AIRFLOW_HOME",
        "CD4ML_SPECS_DIR",
        "MLFLOW_TRACKING_URI",
        *tuple(k for k in os.environ if k.startswith("AIRFLOW__")),
    ):
        env.pop(key, None)
    up = subprocess.run(
        [CLI, "stack", "up", "--no-demo"], env=env, capture_output=True, text=True, timeout=400
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {**env, "up_output": up.stdout}
    finally:
        subprocess.run([CLI, "stack", "down"], env=env, capture_output=True, timeout=120)
        if os.environ.get("CD4ML_KEEP_SYSTEM_STATE") != "1":
            shutil.rmtree(home, ignore_errors=True)


def http_json(
    url: str, *, token: str | None = None, body: dict | None = None, method: str | None = None
) -> dict:
    req = urllib.request.Request(url, method=method or ("POST" if body is not None else "GET"))
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(req, data=data, timeout=10) as resp:
        return json.loads(resp.read())


def airflow_token(stack: dict[str, str]) -> str:
    password = json.loads(Path(stack["CD4ML_HOME"], "secrets.json").read_text())["admin_password"]
    base = f"http://127.0.0.1:{stack['CD4ML_AIRFLOW_PORT']}"
    return http_json(f"{base}/auth/token", body={"username": "admin", "password": password})["access_token"]


def wait_until_idle(base: str, token: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        runs = http_json(f"{base}/api/v2/dags/churn__train/dagRuns", token=token)["dag_runs"]
        if runs and all(r["state"] in {"success", "failed"} for r in runs):
            return
        if not runs and time.monotonic() - quiet_since > 20:
            return
        time.sleep(2)
    raise TimeoutError("churn__train did not become idle")


def test_up_prints_urls_and_a_login_and_binds_to_loopback(stack: dict[str, str]) -> None:
    out = stack["up_output"]
    assert f"http://127.0.0.1:{stack['CD4ML_AIRFLOW_PORT']}" in out
    assert f"http://127.0.0.1:{stack['CD4ML_MLFLOW_PORT']}" in out
    assert "login: admin / " in out


def test_airflow_api_requires_login(stack: dict[str, str]) -> None:
    base = f"http://127.0.0.1:{stack['CD4ML_AIRFLOW_PORT']}"
    with pytest.raises(urllib.error.HTTPError) as err:
        http_json(f"{base}/api/v2/dags")
    assert err.value.code in {401, 403}
    assert "churn__train" in {
        d["dag_id"] for d in http_json(f"{base}/api/v2/dags", token=airflow_token(stack))["dags"]
    }


def test_landed_file_starts_a_run_by_itself_and_a_champion_is_registered(stack: dict[str, str]) -> None:
    base = f"http://127.0.0.1:{stack['CD4ML_AIRFLOW_PORT']}"
    mlflow = f"http://127.0.0.1:{stack['CD4ML_MLFLOW_PORT']}"
    token = airflow_token(stack)
    wait_until_idle(base, token)  # the first start runs the missed nightly slot; let it finish
    landing = Path(stack["CD4ML_HOME"]) / "data" / "churn" / "landing"
    landed_at = time.monotonic()
    write_batch(generate_churn(3000, seed=11), landing, "first_week.csv")

    deadline = time.monotonic() + 300
    champion = None
    while time.monotonic() < deadline and champion is None:
        time.sleep(3)
        try:
            champion = http_json(f"{mlflow}/api/2.0/mlflow/registered-models/alias?name=churn&alias=champion")
        except urllib.error.HTTPError:
            champion = None
    assert champion is not None, "no champion within 300 s of the file landing"
    latency = time.monotonic() - landed_at
    runs = http_json(f"{base}/api/v2/dags/churn__train/dagRuns?order_by=-start_date", token=token)["dag_runs"]
    triggered = [r for r in runs if r["run_type"] == "asset_triggered"]
    assert triggered, [r["run_type"] for r in runs]
    assert triggered[0]["state"] in {"success", "running"}
    assert all(r["state"] != "failed" for r in runs), runs
    accepted = list((Path(stack["CD4ML_HOME"]) / "data" / "churn" / "accepted").glob("*__first_week.csv"))
    assert len(accepted) == 1
    print(f"landing -> champion: {latency:.1f} s")
