"""The scaffolding the benchmark scripts share, kept once so that they all measure on the same set-up.

A benchmark that serves a model needs a throw-away cd4ml home whose specs/ holds a copy of the demo
churn spec, a real one-worker MLflow server on a free port, a champion trained by the pipeline, the
servers it measures started in sessions of their own, and, whatever fails, every one of them stopped
and the home deleted. `Bench` is that run; `start`, `stop` and `tree_rss_mb` are the process helpers;
`request_bodies` the requests the services are timed on; `write_result` puts the figures where
BENCHMARKS.md and `plot.py` read them (benchmarks/out/<name>.json).

The scripts run as `python benchmarks/bench_x.py`, so they import this as a sibling module
(`from benchkit import Bench`). Only the standard library is imported at the top: the scripts' child
processes that measure their own peak RSS import this module too, and psutil or cd4ml loaded here
would count in their figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The venv's bin/: `cd4ml`, `mlflow` and (for `mlflow models serve`) `uvicorn` are run from it.
BIN = Path(sys.executable).parent
DEMO_SPEC = REPO / "include" / "specs" / "churn.yaml"
OUT = REPO / "benchmarks" / "out"
RUN_TIME = "2026-01-01T00:00:00+00:00"
# Exported to this process too, so that its own get_settings() and MLflow clients use the run's home.
EXPORTED = ("CD4ML_HOME", "CD4ML_SPECS_DIR", "MLFLOW_TRACKING_URI")


def start(cmd: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`cmd` in a session of its own, so that `stop` reaches its whole tree (uvicorn's and MLflow's
    workers); its output goes to `log`, which the scripts show when a server does not come up."""
    return subprocess.Popen(
        cmd, env=dict(env), stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process's group and wait for it: a service flushes its prediction log and its
    last span batch on SIGTERM, which some benchmarks count. A tree still up after 60 s is killed, and
    one already gone is no error, so that a teardown always gets to the next process and the home."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its children, in MiB: a server's memory is its whole tree's."""
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def dataframe_split(frame: Any) -> bytes:
    """A request body in the `dataframe_split` format, which our service and MLflow's both take."""
    return json.dumps({"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}).encode()


def request_bodies(spec: Any) -> tuple[bytes, bytes]:
    """The 1-row and 100-row bodies the serving benchmarks time: rows of another batch and seed than
    the training data, the same in every benchmark so that their figures compare."""
    from cd4ml.ml.training import features
    from cd4ml_dev.datagen import generate_churn

    rows = features(spec, generate_churn(100, seed=42, batch=2))
    return dataframe_split(rows.head(1)), dataframe_split(rows)


def train(spec_path: Path, rows: int = 20_000, seed: int = 41, run_id: str = "bench") -> dict[str, Any]:
    """`rows` rows of demo data landed and one pipeline run on them, which must promote: the champion
    the benchmark serves. Reads the home and MLflow server from the environment (`Bench` exports
    them), so a script's child process can train too."""
    from cd4ml.core.settings import get_settings
    from cd4ml.core.spec import load_spec
    from cd4ml.steps.pipeline import run_training
    from cd4ml_dev.datagen import generate_churn, write_batch

    settings = get_settings()
    spec = load_spec(spec_path)
    write_batch(generate_churn(rows, seed=seed), settings.model_dir(spec.name) / "landing", "w0.csv")
    trained = run_training(spec, settings, run_id=run_id, run_time=RUN_TIME, deploy=False)
    assert trained["promoted"], trained
    return trained


def write_result(name: str, results: Any) -> Path:
    """benchmarks/out/<name>.json, where BENCHMARKS.md's figures and plot.py are read from."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def status_mb(field: str, pid: str = "self") -> float:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def reset_peak() -> float:
    """Reset this process's peak RSS (VmHWM) to its current RSS and return that (MiB). ru_maxrss
    would not do: Linux keeps it across exec, so a child would start at its parent's peak."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mb("VmRSS")


class Bench:
    """One benchmark run's temp home and the processes it started, torn down on leaving the `with`
    (or by `close`, for a script with more of its own to tear down first).

    `env` is what the servers run with: this environment, the venv's bin/ first on PATH (`mlflow
    models serve` execs `uvicorn` from PATH), the home, its specs/ and the run's MLflow server. A
    script may add to it before it starts anything. Leaving the `with` stops every process still
    running (the last started first, MLflow last) and deletes the home unless CD4ML_BENCH_KEEP=1
    (then it says where the home is)."""

    def __init__(self, name: str, model: str = "bench", spec_text: str | None = None) -> None:
        self.home = Path(tempfile.mkdtemp(prefix=f"cd4ml-bench-{name}-"))
        self.specs = self.home / "specs"
        self.specs.mkdir()
        self.spec_path = self.specs / f"{model}.yaml"
        self.spec_path.write_text(DEMO_SPEC.read_text() if spec_text is None else spec_text)
        from cd4ml_dev.netutil import free_port

        self.mlflow_port = free_port()
        self.tracking_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.env: dict[str, str] = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "CD4ML_HOME": str(self.home),
            "CD4ML_SPECS_DIR": str(self.specs),
            "MLFLOW_TRACKING_URI": self.tracking_uri,
        }
        os.environ.update({k: self.env[k] for k in EXPORTED})
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Bench:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process still running and delete the home (keep it with CD4ML_BENCH_KEEP=1)."""
        self.stop_all()
        if os.environ.get("CD4ML_BENCH_KEEP") != "1":
            shutil.rmtree(self.home, ignore_errors=True)
        else:
            print("kept", self.home)

    def spawn(
        self, cmd: list[str], log: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """`start`, with `env` (the run's own by default), and stopped on leaving the `with`."""
        proc = start(cmd, self.env if env is None else env, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop a process `spawn` started, before the run ends (one server measured after another)."""
        self.procs.remove(proc)
        stop(proc)

    def stop_all(self) -> None:
        """Every process still running, the last started first, so MLflow outlives the services."""
        while self.procs:
            self.stop(self.procs[-1])

    def start_mlflow(self, timeout: float = 120.0) -> None:
        """The run's MLflow server (SQLite and artifacts in the home), answering before this returns.
        Its job runner is off: no worker processes beside it take cores from what is measured."""
        from cd4ml_dev.netutil import local_mlflow_server, wait_http

        env = {**self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.spawn(local_mlflow_server(BIN, self.home, self.mlflow_port), self.home / "mlflow.log", env)
        wait_http(f"{self.tracking_uri}/health", timeout)

    def train(self, rows: int = 20_000, seed: int = 41, run_id: str = "bench") -> dict[str, Any]:
        """`train` on the run's spec."""
        return train(self.spec_path, rows, seed, run_id)
