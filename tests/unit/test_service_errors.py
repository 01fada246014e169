"""A model that throws is the service's counted 500, not an uncounted stack trace: the 5xx-rate
alert (config/prometheus/rules/cd4ml.rules.yml) reads `cd4ml_requests_total{code="500"}`.

In process, with a real (if mis-fitted) scikit-learn model in the slot: fitted on one feature, served
with a three-column schema, so `predict` raises as a model incompatible with its inputs does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sklearn.linear_model import LogisticRegression

from cd4ml.core.settings import get_settings
from cd4ml.serving.app import create_app
from cd4ml.serving.models import Slot
from cd4ml.serving.payload import FeatureSchema


def test_a_model_that_throws_answers_500_naming_the_model_and_counts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CD4ML_DATA_DIR", str(tmp_path / "data"))
    app = create_app(get_settings())
    broken = LogisticRegression().fit([[0.0], [1.0]], [0, 1])  # one feature; the schema has three
    schema = FeatureSchema(("age", "tenure"), ("plan",))
    store = app.state.store
    store.known_models = ["churn"]
    store.slots["churn"] = Slot(name="churn", version="4", run_id="r", champion_since="", data_fingerprint="",
                                loaded_at=0.0, model=broken, schema=schema, classes=None)  # fmt: skip
    client = TestClient(app, raise_server_exceptions=False)

    resp = client.post("/v1/models/churn/predict", json=[{"age": 30, "tenure": 2.5, "plan": "basic"}])

    assert resp.status_code == 500, resp.text
    assert "model 'churn' version 4 failed to predict: ValueError" in resp.json()["error"]
    metrics = client.get("/metrics").text
    assert 'cd4ml_requests_total{code="500",model="churn",version="4"} 1.0' in metrics
    assert 'cd4ml_request_errors_total{kind="predict_failed",model="churn"} 1.0' in metrics
