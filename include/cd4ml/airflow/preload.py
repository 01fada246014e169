"""Pre-import the ML stack in the Airflow processes that fork task processes.

LocalExecutor workers are forked from the scheduler, and each task is forked from a worker, so a
module imported once in the scheduler is already loaded in every task: no task pays the ~4 s it
takes to import pandas, scikit-learn, MLflow and Great Expectations on these cores. DAG parsing
(the dag-processor) and the API server are left alone and stay light.

Wired in by the `airflow_local_settings.py` that `cd4ml-dev stack up` writes into AIRFLOW_HOME/config.
"""

from __future__ import annotations

import importlib
import sys
import time

MODULES = (
    "pandas",
    "pyarrow.parquet",
    "scipy.stats",
    "sklearn.pipeline",
    "sklearn.compose",
    "sklearn.ensemble",
    "sklearn.linear_model",
    "skops.io",
    "mlflow",
    "mlflow.sklearn",
    "great_expectations",
    "httpx",
    "cd4ml.steps.pipeline",
    "cd4ml.ml.training",
    "cd4ml.data.validation",
    "cd4ml.steps.deploy",
)


def forks_tasks(argv: list[str]) -> bool:
    return argv[1:2] == ["scheduler"] or argv[1:3] == ["celery", "worker"]


def preload() -> float:
    started = time.perf_counter()
    for name in MODULES:
        importlib.import_module(name)
    return time.perf_counter() - started


def preload_if_forking_tasks(argv: list[str] | None = None) -> None:
    if forks_tasks(sys.argv if argv is None else argv):
        seconds = preload()
        print(f"cd4ml: preloaded the ML stack for task processes in {seconds:.1f}s", file=sys.stderr)
