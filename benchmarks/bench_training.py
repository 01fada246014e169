"""Training-pipeline benchmarks, side by side in one run (results: BENCHMARKS.md).

1. Orchestration overhead: the same 200k-row batch through `<model>__train` on the real embedded
   stack (scheduler, LocalExecutor, triggerer) vs the same cd4ml steps (validate, train, evaluate,
   register, promote, deploy + smoke test) in one plain Python process.
2. DAG parse time of every file in dags/, vs a "naive" DAG file that imports the ML stack at top level.
3. Landing -> registered champion latency for a 10k-row file on the running stack, vs the plain
   process on the same file.

Usage: .venv/bin/python benchmarks/bench_training.py [--rows 200000] [--reps 2]
Starts its own stack on free ports in a temp dir and stops it afterwards.
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
import textwrap
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import yaml

from cd4ml_dev.netutil import free_port

REPO = Path(__file__).resolve().parents[1]

BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))


def http_json(url: str, *, token: str | None = None, body: dict | None = None, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(
        req, data=json.dumps(body).encode() if body else None, timeout=timeout
    ) as resp:
        return json.loads(resp.read())


def parse_ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def write_spec(specs: Path, name: str) -> None:
    raw = yaml.safe_load((REPO / "include/specs/churn.yaml").read_text())
    raw["validation"]["max_rows"] = None
    (specs / f"{name}.yaml").write_text(yaml.safe_dump(raw))


def parse_times(reps: int) -> list[dict]:
    """Import each DAG file in a fresh interpreter that already has airflow.sdk loaded, like the
    dag-processor does; the naive variant adds the top-level imports a first draft usually has."""
    naive = Path(tempfile.mkdtemp()) / "naive_dag.py"
    naive.write_text(
        (REPO / "dags/cd4ml_models.py").read_text()
        + "\nimport great_expectations, mlflow, pandas, sklearn.ensemble  # noqa: E401\n"
    )
    files = [*sorted((REPO / "dags").glob("*.py")), naive]
    probe = textwrap.dedent(
        """
        import runpy, sys, time
        import airflow.sdk  # noqa: F401  (the processor has it loaded already)
        t = time.perf_counter(); runpy.run_path(sys.argv[1]); print(time.perf_counter() - t)
        """
    )
    rows = []
    for path in files:
        samples = []
        for _ in range(reps):
            out = subprocess.run(
                [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True
            )
            samples.append(float(out.stdout.strip().splitlines()[-1]))
        rows.append({"file": path.name, "median_s": statistics.median(samples), "max_s": max(samples)})
    return rows


class Stack:
    def __init__(self, home: Path, specs: Path) -> None:
        self.home = home
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
            "CD4ML_HOME": str(home),
            "CD4ML_SPECS_DIR": str(specs),
            "CD4ML_AIRFLOW_PORT": str(free_port()),
            "CD4ML_MLFLOW_PORT": str(free_port()),
            "CD4ML_SERVICE_PORT": str(free_port()),
        }
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.base = f"http://127.0.0.1:{self.env['CD4ML_AIRFLOW_PORT']}"
        self.mlflow = f"http://127.0.0.1:{self.env['CD4ML_MLFLOW_PORT']}"
        self.service = f"http://127.0.0.1:{self.env['CD4ML_SERVICE_PORT']}"

    def up(self) -> None:
        subprocess.run(
            [BIN / "cd4ml-dev", "stack", "up", "--no-demo"],
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        password = json.loads((self.home / "secrets.json").read_text())["admin_password"]
        self.token = http_json(f"{self.base}/auth/token", body={"username": "admin", "password": password})[
            "access_token"
        ]

    def down(self) -> None:
        subprocess.run(
            [BIN / "cd4ml-dev", "stack", "down"], env=self.env, check=False, stdout=subprocess.DEVNULL
        )

    def runs(self, dag_id: str) -> list[dict]:
        try:
            return http_json(f"{self.base}/api/v2/dags/{dag_id}/dagRuns", token=self.token)["dag_runs"]
        except urllib.error.HTTPError as err:
            if err.code == 404:  # not parsed yet
                return []
            raise

    def wait_idle(self, dag_id: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.runs(dag_id)
            if runs and all(r["state"] in {"success", "failed"} for r in runs):
                return
            time.sleep(1)
        raise TimeoutError(dag_id)

    def champion(self, model: str) -> dict | None:
        try:
            return http_json(
                f"{self.mlflow}/api/2.0/mlflow/registered-models/alias?name={model}&alias=champion"
            )
        except urllib.error.HTTPError:
            return None


def through_dag(stack: Stack, model: str, frame, name: str) -> dict:
    from cd4ml_dev.datagen import write_batch

    before = {r["dag_run_id"] for r in stack.runs(f"{model}__train")}
    landed = time.time()
    write_batch(frame, stack.home / "data" / model / "landing", name)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        new = [r for r in stack.runs(f"{model}__train") if r["dag_run_id"] not in before]
        if new and new[0]["state"] in {"success", "failed"} and stack.champion(model):
            run = new[0]
            champion_seen = time.time()
            assert run["state"] == "success", run
            return {
                "land_to_run_start_s": parse_ts(run["start_date"]) - landed,
                "run_wall_s": parse_ts(run["end_date"]) - parse_ts(run["start_date"]),
                "land_to_champion_s": champion_seen - landed,
            }
        time.sleep(0.5)
    raise TimeoutError(f"{model}: no finished run")


def plain_process(stack: Stack, model: str, frame, name: str) -> dict:
    from cd4ml_dev.datagen import write_batch

    write_batch(frame, stack.home / "plain_data" / model / "landing", name)
    code = (
        "from cd4ml.steps.pipeline import run_training; from cd4ml.core.settings import get_settings; "
        "from cd4ml.core.spec import load_spec; s = get_settings(); "
        f"print(run_training(load_spec(s.specs_dir / '{model}.yaml'), s, run_id='plain', "
        "run_time='2026-01-01T00:00:00+00:00'))"
    )
    secrets = json.loads((stack.home / "secrets.json").read_text())
    env = {
        **stack.env,
        "CD4ML_DATA_DIR": str(stack.home / "plain_data"),
        "MLFLOW_TRACKING_URI": stack.mlflow,
        "CD4ML_SERVICE_URL": stack.service,
        "CD4ML_SERVICE_ADMIN_TOKEN": secrets["service_admin_token"],
    }
    t = time.time()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return {"wall_s": time.time() - t}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    from cd4ml_dev.datagen import generate_churn

    out_dir = REPO / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"rows": args.rows, "reps": args.reps, "cpus": os.cpu_count()}
    results["parse"] = parse_times(5)
    print(json.dumps(results["parse"], indent=1), flush=True)

    home = Path(tempfile.mkdtemp(prefix="cd4ml-bench-"))
    # One specs dir (the prediction service serves every model, so both paths deploy); the plain
    # process keeps its data in a data root no landing watcher looks at.
    specs = home / "specs"
    specs.mkdir()
    names = [f"bench_dag_{i}" for i in range(args.reps)] + [f"bench_py_{i}" for i in range(args.reps)]
    for name in [*names, "latency_dag", "latency_py"]:
        write_spec(specs, name)
    stack = Stack(home, specs)
    try:
        stack.up()
        for name in [*names, "latency_dag", "latency_py"]:
            stack.wait_idle(f"{name}__train")
        big = generate_churn(args.rows, seed=21)
        small = generate_churn(10_000, seed=22)
        results["orchestration"] = []
        for i in range(args.reps):
            dag = through_dag(stack, f"bench_dag_{i}", big, "big.csv")
            plain = plain_process(stack, f"bench_py_{i}", big, "big.csv")
            results["orchestration"].append({"dag": dag, "plain": plain})
            print(json.dumps(results["orchestration"][-1]), flush=True)
        results["latency_10k"] = {
            "dag": through_dag(stack, "latency_dag", small, "small.csv"),
            "plain": plain_process(stack, "latency_py", small, "small.csv"),
        }
        print(json.dumps(results["latency_10k"]), flush=True)
    finally:
        stack.down()
        shutil.rmtree(home, ignore_errors=True)
    (out_dir / "training.json").write_text(json.dumps(results, indent=2))
    print(report(results))


def report(r: dict) -> str:
    lines = ["| DAG file | median import (s) | max (s) |", "|---|---|---|"]
    lines += [f"| {p['file']} | {p['median_s']:.3f} | {p['max_s']:.3f} |" for p in r["parse"]]
    head = f"| {r['rows']:,} rows | DAG run wall (s) | land -> champion (s) | plain process (s) | ratio |"
    lines += ["", head, "|---|---|---|---|---|"]
    for i, o in enumerate(r["orchestration"]):
        ratio = o["dag"]["run_wall_s"] / o["plain"]["wall_s"]
        lines.append(
            f"| rep {i + 1} | {o['dag']['run_wall_s']:.1f} | {o['dag']['land_to_champion_s']:.1f} | "
            f"{o['plain']['wall_s']:.1f} | {ratio:.2f}x |"
        )
    lat = r["latency_10k"]
    lines += ["", "| 10k rows | land -> run start (s) | run wall (s) | land -> champion (s) | plain (s) |",
              "|---|---|---|---|---|",
              f"| | {lat['dag']['land_to_run_start_s']:.1f} | {lat['dag']['run_wall_s']:.1f} | "
              f"{lat['dag']['land_to_champion_s']:.1f} | {lat['plain']['wall_s']:.1f} |"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
