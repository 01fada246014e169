"""Where things live. Read from the environment when called, never at import time."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Settings:
    home: Path
    data_dir: Path
    specs_dir: Path
    mlflow_tracking_uri: str
    airflow_url: str = "http://127.0.0.1:8080"

    def model_dir(self, model: str) -> Path:
        return self.data_dir / model


def get_settings() -> Settings:
    home = Path(os.environ.get("CD4ML_HOME", PROJECT_ROOT / ".cd4ml")).resolve()
    data_dir = Path(os.environ.get("CD4ML_DATA_DIR", home / "data")).resolve()
    specs_dir = Path(os.environ.get("CD4ML_SPECS_DIR", PROJECT_ROOT / "include" / "specs")).resolve()
    port = os.environ.get("CD4ML_MLFLOW_PORT", "5000")
    uri = os.environ.get("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    airflow = (
        os.environ.get("CD4ML_AIRFLOW_URL")
        or f"http://127.0.0.1:{os.environ.get('CD4ML_AIRFLOW_PORT', '8080')}"
    )
    return Settings(
        home=home,
        data_dir=data_dir,
        specs_dir=specs_dir,
        mlflow_tracking_uri=uri,
        airflow_url=airflow.rstrip("/"),
    )
