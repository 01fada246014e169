"""Any feature mix trains, registers, deploys and serves over HTTP: numeric-only, categorical-only and
single-column specs, multiclass string targets, on the service's fast path and on its sklearn path.

Regression tests for issue 11: a multiclass target with `f1` failed after fitting ("this metric needs
a binary target"), and a numeric-only model was refused by the service ("'OneHotEncoder' object has
no attribute 'categories_'"). Each case goes through `cd4ml.steps.pipeline.run_training` (validation,
training, champion/challenger, registry, deploy with smoke test) against the session's real MLflow
server and prediction service, then asks the service for predictions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from cd4ml import registry
from cd4ml.core.settings import get_settings
from cd4ml.core.spec import load_spec
from cd4ml.ml.training import features
from cd4ml.steps.pipeline import run_training
from cd4ml_dev.datagen import write_batch

pytestmark = pytest.mark.integration
ROWS = 400
LOGREG = {"class": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 500}}
# predict() draws labels at random (seeded) while predict_proba() is flat, so the fast path, which
# predicts argmax(predict_proba), cannot reproduce it and the service serves through sklearn.
DUMMY_UNIFORM = {"class": "sklearn.dummy.DummyClassifier", "params": {"strategy": "uniform"}}
WEATHER = np.array(["drizzle", "fog", "rain", "snow", "sun"])


def _frame(seed: int) -> pd.DataFrame:
    """Numbers and categories that both carry the targets, with some missing values."""
    rng = np.random.default_rng(seed)
    temp = rng.normal(12, 8, ROWS)
    humidity = rng.uniform(20, 100, ROWS)
    wind = rng.gamma(2.0, 3.0, ROWS)
    city = rng.choice(["oslo", "lima", "pune", "kyiv", "quito"], ROWS)
    season = rng.choice(["winter", "spring", "summer", "autumn"], ROWS)
    code = np.clip(((temp + rng.normal(0, 4, ROWS)) // 8).astype(int) + 1, 0, 4)
    frame = pd.DataFrame({
        "temp": temp.round(2), "humidity": humidity.round(1), "wind": wind.round(2),
        "city": city, "season": season,
        "weather": WEATHER[code],
        "rainy": ((humidity > 60) ^ (city == "lima") ^ (rng.random(ROWS) < 0.1)).astype(int),
        "sales": (3.0 * temp + rng.normal(0, 2, ROWS)).round(3),
        "kind": np.where(season == "winter", "cold", np.where(city == "pune", "hot", "mild")),
    })  # fmt: skip
    frame.loc[frame.index[::17], "temp"] = np.nan
    frame.loc[frame.index[5::23], "city"] = None
    return frame


CASES = {
    # name: (numerical, categorical, target, task, metric, estimator, served on the fast path)
    "mix_num_multiclass_f1": (["temp", "humidity", "wind"], [], "weather", "classification",
                              {"name": "f1"}, LOGREG, True),
    "mix_cat_binary_auc": ([], ["city", "season"], "rainy", "classification",
                           {"name": "roc_auc"}, LOGREG, True),
    "mix_one_num_regression": (["temp"], [], "sales", "regression", {"name": "rmse"},
                               {"class": "sklearn.linear_model.Ridge", "params": {}}, True),
    "mix_one_cat_log_loss": ([], ["season"], "kind", "classification", {"name": "log_loss"},
                             LOGREG, True),
    "mix_num_sklearn_path": (["temp", "humidity"], [], "weather", "classification",
                             {"name": "accuracy"}, DUMMY_UNIFORM, False),
    "mix_cat_sklearn_path": ([], ["city"], "rainy", "classification",
                             {"name": "balanced_accuracy"}, DUMMY_UNIFORM, False),
}  # fmt: skip


def _write_spec(specs: Path, name: str, case: tuple[Any, ...]) -> Path:
    numerical, categorical, target, task, metric, estimator, _ = case
    raw = {
        "task": task,
        "target": target,
        "features": {"numerical": numerical, "categorical": categorical},
        "estimator": estimator,
        "metric": metric,
        "promotion": {"floor": None},
    }
    path = specs / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_feature_mix_trains_deploys_and_serves(
    name: str,
    deploy_env: dict[str, str],
    shared_specs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CD4ML_HOME", str(tmp_path / "home"))  # a private data root per case
    case = CASES[name]
    spec = load_spec(_write_spec(shared_specs, name, case))
    settings = get_settings()
    frame = _frame(seed=len(name))
    columns = spec.columns
    write_batch(frame[columns], settings.model_dir(name) / "landing", "batch0.csv")

    result = run_training(spec, settings, run_id=f"{name}_1", run_time="2026-02-01T00:00:00+00:00")

    assert result["promoted"], result
    assert result["deployment"]["deployed"], result["deployment"]
    version = result["version"]
    url = deploy_env["url"]
    meta = httpx.get(f"{url}/v1/models/{name}", timeout=10).json()
    assert meta["version"] == version
    assert meta["inputs"] == {"numerical": spec.numerical, "categorical": spec.categorical}
    assert meta["fast_path"] is case[-1]

    # The newest rows, with a missing number, a missing category and a category never seen.
    rows = features(spec, frame.tail(30)).reset_index(drop=True)
    if spec.numerical:
        rows.loc[0, spec.numerical[0]] = np.nan
    if spec.categorical:
        rows.loc[1, spec.categorical[0]] = None
        rows.loc[2, spec.categorical[0]] = "atlantis"
    body = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}
    resp = httpx.post(f"{url}/v1/models/{name}/predict", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["version"] == version
    model = registry.load_model(settings.mlflow_tracking_uri, f"models:/{name}/{version}")
    offline = model.predict(rows)
    if spec.task == "regression":
        assert out["predictions"] == pytest.approx(offline.tolist(), rel=1e-9)
        assert "probabilities" not in out
    else:
        assert out["predictions"] == offline.tolist()
        assert out["classes"] == model.classes_.tolist()
        assert np.allclose(out["probabilities"], model.predict_proba(rows), rtol=1e-9, atol=1e-12)

    evidence = registry.read_evidence(registry.client(settings.mlflow_tracking_uri), name, version).decision
    if spec.metric.name in {"f1", "roc_auc"}:
        classes = frame[spec.target].nunique()
        assert evidence["average"] == ("binary" if classes == 2 else "macro")


def test_multiclass_challenger_is_judged_against_the_champion(
    deploy_env: dict[str, str], shared_specs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second run scores both models' probability matrices on the same holdout with the
    paired bootstrap (one-vs-rest AUC, classes as strings), where the first run had no champion."""
    monkeypatch.setenv("CD4ML_HOME", str(tmp_path / "home"))
    name = "mix_multiclass_decide"
    case = (["temp", "humidity"], ["season"], "weather", "classification", {"name": "roc_auc"}, LOGREG, True)
    spec = load_spec(_write_spec(shared_specs, name, case))
    settings = get_settings()
    landing = settings.model_dir(name) / "landing"
    write_batch(_frame(seed=101)[spec.columns], landing, "batch0.csv")
    first = run_training(spec, settings, run_id=f"{name}_1", run_time="2026-02-01T00:00:00+00:00")
    assert first["promoted"] and first["deployment"]["deployed"], first
    write_batch(_frame(seed=102)[spec.columns], landing, "batch1.csv")
    second = run_training(spec, settings, run_id=f"{name}_2", run_time="2026-02-02T00:00:00+00:00")
    version = second["version"]
    evidence = registry.read_evidence(registry.client(settings.mlflow_tracking_uri), name, version).decision
    assert evidence["champion_version"] == first["version"]
    assert evidence["average"] == "macro" and evidence["classes"] == 5
    assert evidence["resamples"] >= 500 and evidence["ci_low"] is not None
    assert 0.5 < evidence["challenger_score"] <= 1 and 0.5 < evidence["champion_score"] <= 1
