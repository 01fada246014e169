"""Fixtures for dag.test() runs: the session's MLflow server, prediction service and metadata DB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient


@pytest.fixture
def env(deploy_env: dict[str, str], shared_specs: Path, airflow_db: Path) -> dict[str, Any]:
    """Specs in the dir the session's prediction service watches; data under the session's home."""
    import os

    return {
        "specs": shared_specs,
        "data": Path(os.environ["CD4ML_HOME"]) / "data",
        "mlflow": MlflowClient(os.environ["MLFLOW_TRACKING_URI"]),
        "service": deploy_env["url"],
    }
