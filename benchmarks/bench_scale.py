"""Several models' training DAGs at once: embedded LocalExecutor vs CeleryExecutor with 1 and 2 workers.

4 model specs (copies of the demo churn spec), 4 batches each. Per model, a driver lands batch k
and triggers `<model>__train`; when that run ends it lands batch k+1 and triggers again, so the 4
models' chains run side by side (each DAG has max_active_runs=1). The clock runs from the first
trigger to the last run's end, after start-up and the stacks' own first scheduled runs are over.

Where the time goes comes from each task instance's queued/start/end times (Airflow REST API):
  work      = the task's own start..end
  schedule  = upstream task's end (or the run's start) -> task queued (scheduler loop)
  dispatch  = queued -> start (executor hand-off: LocalExecutor fork / Celery broker, worker, fork)

Stacks: `cd4ml stack up` (the embedded stack: LocalExecutor, SQLite), and docker-compose.yaml's
topology run by cd4ml_dev.scale (CeleryExecutor, PostgreSQL, Redis) with 1 and with 2 workers. All
three get 4 task slots per executor (parallelism 4 / worker_concurrency 4) on this machine.

Usage: .venv/bin/python benchmarks/bench_scale.py [--models 4] [--batches 4] [--rows 2000]
Writes benchmarks/out/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from cd4ml_dev.datagen import generate_churn, write_batch
from cd4ml_dev.netutil import free_port
from cd4ml_dev.scale import LocalTopology

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUT = REPO / "benchmarks" / "out"
SLOTS = 4


def http_json(url: str, *, token: str | None = None, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(url, method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    data = json.dumps(body).encode() if body is not None else None
    for attempt in range(5):
        try:
            with urllib.request.urlopen(req, data=data, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            # SQLite (embedded stack) answers 500 "database is locked" under concurrent writes.
            if err.code < 500 or attempt == 4:
                raise
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def write_specs(specs: Path, models: list[str]) -> None:
    raw = yaml.safe_load((REPO / "include/specs/churn.yaml").read_text())
    # The driver lands and triggers; the landing watcher would only add runs that find nothing new.
    raw.setdefault("schedule", {})["landing_poll_seconds"] = 3600
    raw["drift"]["schedule"] = "@yearly"
    specs.mkdir(parents=True, exist_ok=True)
    for name in models:
        (specs / f"{name}.yaml").write_text(yaml.safe_dump(raw))


@dataclass
class Stack:
    label: str
    airflow_url: str
    token: str
    data_dir: Path


@contextmanager
def embedded(specs: Path) -> Iterator[Stack]:
    home = Path(tempfile.mkdtemp(prefix="cd4ml-bench-embedded-"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_TRACKING"))},
        "CD4ML_HOME": str(home),
        "CD4ML_SPECS_DIR": str(specs),
        "CD4ML_AIRFLOW_PORT": str(free_port()),
        "CD4ML_MLFLOW_PORT": str(free_port()),
        "CD4ML_SERVICE_PORT": str(free_port()),
        "CD4ML_PARALLELISM": str(SLOTS),
        "CD4ML_START_TIMEOUT": "600",
    }
    try:
        subprocess.run([str(BIN / "cd4ml-dev"), "stack", "up", "--no-demo"], env=env, check=True, timeout=600,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        url = f"http://127.0.0.1:{env['CD4ML_AIRFLOW_PORT']}"
        password = json.loads((home / "secrets.json").read_text())["admin_password"]
        token = http_json(f"{url}/auth/token", body={"username": "admin", "password": password})[
            "access_token"
        ]
        yield Stack("embedded LocalExecutor", url, token, home / "data")
    finally:
        subprocess.run(
            [str(BIN / "cd4ml-dev"), "stack", "down"], env=env, timeout=180, stdout=subprocess.DEVNULL
        )
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def celery(specs: Path, workers: int) -> Iterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="cd4ml-bench-celery-"))
    topo = LocalTopology(
        root, workers=workers, settings={"AIRFLOW_WORKER_CONCURRENCY": str(SLOTS), "MLFLOW_WORKERS": "1"},
        mounts={"/opt/cd4ml/include/specs": specs},
    )  # fmt: skip
    try:
        topo.start(timeout=600)
        password = topo.values["AIRFLOW_ADMIN_PASSWORD"]
        token = http_json(f"{topo.airflow_url}/auth/token", body={"username": "admin", "password": password})[
            "access_token"
        ]
        yield Stack(f"CeleryExecutor, {workers} worker{'s' if workers > 1 else ''}", topo.airflow_url, token,
                    topo.data_dir)  # fmt: skip
    finally:
        topo.stop()
        shutil.rmtree(root, ignore_errors=True)


def runs(stack: Stack, dag_id: str) -> list[dict[str, Any]]:
    return http_json(f"{stack.airflow_url}/api/v2/dags/{dag_id}/dagRuns?limit=100", token=stack.token)[
        "dag_runs"
    ]


def wait_idle(stack: Stack, models: list[str], timeout: float = 600) -> None:
    """DAGs parsed and the stack's own first runs (nightly slot, monitor) finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            dags = {d["dag_id"] for d in http_json(f"{stack.airflow_url}/api/v2/dags?limit=100",
                                                   token=stack.token)["dags"]}  # fmt: skip
        except urllib.error.URLError:
            dags = set()
        wanted = {f"{m}__{kind}" for m in models for kind in ("train", "monitor")}
        if wanted <= dags:
            states = [r["state"] for d in wanted for r in runs(stack, d)]
            if all(s in {"success", "failed"} for s in states):
                return
        time.sleep(2)
    raise TimeoutError(f"{stack.label}: not idle within {timeout}s")


def drive(stack: Stack, models: list[str], batches: int, rows: int) -> dict[str, Any]:
    """Land and train batch after batch per model; all models at once. Returns the runs it made."""

    def land_and_trigger(model: str, batch: int) -> str:
        frame = generate_churn(rows, seed=100 * models.index(model) + batch, batch=batch)
        write_batch(frame, stack.data_dir / model / "landing", f"{model}_batch{batch:02d}.csv")
        run = http_json(f"{stack.airflow_url}/api/v2/dags/{model}__train/dagRuns", token=stack.token,
                        body={"logical_date": None, "conf": {"reason": f"bench batch {batch}"}})  # fmt: skip
        return str(run["dag_run_id"])

    started = time.time()
    current = {m: (1, land_and_trigger(m, 1)) for m in models}
    done: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    while current:
        time.sleep(0.5)
        for model, (batch, run_id) in list(current.items()):
            run = http_json(
                f"{stack.airflow_url}/api/v2/dags/{model}__train/dagRuns/{run_id}", token=stack.token
            )
            if run["state"] not in {"success", "failed"}:
                continue
            done[model].append(run)
            if batch < batches:
                current[model] = (batch + 1, land_and_trigger(model, batch + 1))
            else:
                del current[model]
    ended = time.time()
    return {"started": started, "ended": ended, "runs": done}


def breakdown(stack: Stack, models: list[str], driven: dict[str, Any]) -> dict[str, Any]:
    work, schedule, dispatch, per_run, hosts = [], [], [], [], {}
    per_task: dict[str, list[float]] = {}
    deployed = 0
    for model in models:
        tis = http_json(f"{stack.airflow_url}/api/v2/dags/{model}__train/dagRuns/~/taskInstances?limit=1000",
                        token=stack.token)["task_instances"]  # fmt: skip
        for run in driven["runs"][model]:
            mine = sorted(
                (t for t in tis if t["dag_run_id"] == run["dag_run_id"] and t["state"] == "success"),
                key=lambda t: ts(t["start_date"]) or 0,
            )
            previous_end = ts(run["start_date"])
            for t in mine:
                queued, start, end = ts(t["queued_when"]), ts(t["start_date"]), ts(t["end_date"])
                assert start is not None and end is not None and previous_end is not None
                work.append(end - start)
                per_task.setdefault(t["task_id"], []).append(end - start)
                if queued is not None:
                    schedule.append(max(0.0, queued - previous_end))
                    dispatch.append(max(0.0, start - queued))
                hosts[t["hostname"]] = hosts.get(t["hostname"], 0) + 1
                previous_end = end
            per_run.append((ts(run["end_date"]) or 0) - (ts(run["start_date"]) or 0))
            deployed += any(t["task_id"] == "deploy_champion" for t in mine)
    wall = driven["ended"] - driven["started"]
    return {
        "stack": stack.label,
        "runs": sum(len(r) for r in driven["runs"].values()),
        "failed_runs": sum(r["state"] != "success" for rs in driven["runs"].values() for r in rs),
        "wall_s": wall,
        "run_wall_median_s": statistics.median(per_run),
        "task_work_s": sum(work),
        "schedule_gap_s": sum(schedule),
        "dispatch_gap_s": sum(dispatch),
        "tasks": len(work),
        "dispatch_gap_median_s": statistics.median(dispatch) if dispatch else None,
        "schedule_gap_median_s": statistics.median(schedule) if schedule else None,
        "tasks_per_host": hosts,
        "task_work_median_s": {k: round(statistics.median(v), 2) for k, v in per_task.items()},
        # Same data, same seeds: every stack should promote and deploy in the same runs.
        "runs_that_deployed": deployed,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    models = [f"bench{chr(ord('a') + i)}" for i in range(args.models)]
    specs = Path(tempfile.mkdtemp(prefix="cd4ml-bench-specs-"))
    write_specs(specs, models)
    stacks: list[Callable[[], Any]] = [
        lambda: embedded(specs),
        lambda: celery(specs, 1),
        lambda: celery(specs, 2),
    ]
    results = []
    for make in stacks:
        t0 = time.monotonic()
        with make() as stack:
            up = time.monotonic() - t0
            wait_idle(stack, models)
            result = breakdown(stack, models, drive(stack, models, args.batches, args.rows))
            result["startup_s"] = up
            results.append(result)
            print(json.dumps(result, indent=1), flush=True)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "scale.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(
        f"\n{args.models} models x {args.batches} batches x {args.rows} rows, {SLOTS} task slots per executor"
    )
    print(
        "| stack | wall (s) | median run (s) | task work (s) | schedule gaps (s) | dispatch gaps (s) | "
        "median dispatch (s) | tasks per host |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['stack']} | {r['wall_s']:.1f} | {r['run_wall_median_s']:.1f} | {r['task_work_s']:.1f} | "
            f"{r['schedule_gap_s']:.1f} | {r['dispatch_gap_s']:.1f} | {r['dispatch_gap_median_s']:.2f} | "
            f"{r['tasks_per_host']} |"
        )
    shutil.rmtree(specs, ignore_errors=True)


if __name__ == "__main__":
    main()
