"""Put a real champion in front of the session's prediction service without a DAG run.

The service tests need a served model but not the pipeline that made it: train the demo spec's
pipeline on generated data, log and register it the way `register_challenger` does, move the
`champion` alias, and wait until the service serves it.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from cd4ml import registry
from cd4ml.core.spec import load_spec
from cd4ml.ml import training
from cd4ml_dev.datagen import generate_churn
from tests.helpers import LOGREG, make_champion, write_spec


def serve_champion(name: str, *, specs_dir: Path, tracking_uri: str, service_url: str) -> str:
    spec = load_spec(write_spec(specs_dir, name, estimator=LOGREG))
    frame = generate_churn(400, seed=3)
    model = training.train(spec, frame)
    logged = registry.log_challenger(
        tracking_uri,
        experiment=name,
        run_name="served for a reliability test",
        model=model,
        input_example=training.features(spec, frame.head(5)),
        params={},
        tags={},
        metrics={},
    )
    mlflow_client = registry.client(tracking_uri)
    mv = registry.register_version(mlflow_client, name=name, description="", logged=logged, tags={})
    make_champion(mlflow_client, name, mv.version)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        resp = httpx.get(f"{service_url}/v1/models/{name}", timeout=10)
        if resp.status_code == 200 and resp.json()["version"] == str(mv.version):
            return str(mv.version)
        time.sleep(0.5)
    raise TimeoutError(f"the service did not serve {name} v{mv.version} within 90 s: {resp.text}")
