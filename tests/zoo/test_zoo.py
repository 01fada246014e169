"""Every dataset in the zoo through the real pipeline, with the spec a user would write and
default validation settings.

For each zoo file: land the first batch and run training (validation with GX, training, MLflow
registry, promotion, rollout to the real prediction service); then land every later batch and run
again. It must hold that no batch is quarantined, a champion is registered and served over HTTP
and answers rows of the last batch, and the champion's holdout score equals what plain
scikit-learn computes for the same estimator fitted on the same training snapshot. Large tables are
capped by their `rows:` here; CD4ML_SOAK=1 lands them whole.
"""

from __future__ import annotations

import inspect
import json
import math
import time
import traceback
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from sklearn import metrics
from sklearn.base import BaseEstimator
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from cd4ml import registry
from cd4ml.core.errors import Cd4mlError
from cd4ml.core.settings import Settings, get_settings
from cd4ml.core.spec import ModelSpec, load_spec
from cd4ml.data import landing
from cd4ml.data.tables import read_table
from cd4ml.ml.training import features, load_estimator_class
from cd4ml.steps.pipeline import run_training
from cd4ml_dev.datagen import write_batch
from tests.conftest import SERVICE_MAX_ROWS
from tests.zoo.conftest import machine
from tests.zoo.loader import ZooCase, all_cases, load_table, soak, split_batches

CASES = all_cases()
SCORE_TOLERANCE = 1e-9


# -- plain scikit-learn: the reference the champion is held to -------------------------------------


def plain_pipeline(spec: ModelSpec) -> Pipeline:
    """The estimator the spec names, behind textbook preprocessing (median-impute + scale numbers,
    impute a constant + one-hot categories, unknown categories ignored), written out with sklearn
    directly rather than through cd4ml."""
    cls: type[BaseEstimator] = load_estimator_class(spec.estimator.class_path)
    params = dict(spec.estimator.params)
    if "random_state" in inspect.signature(cls).parameters:
        params.setdefault("random_state", spec.seed)
    transformers: list[tuple[str, Any, list[str]]] = []
    if spec.numerical:
        transformers.append(
            (
                "num",
                Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())]),
                spec.numerical,
            )
        )
    if spec.categorical:
        transformers.append(
            (
                "cat",
                Pipeline(
                    [
                        ("impute", SimpleImputer(strategy="constant", fill_value="__missing__")),
                        ("onehot", OneHotEncoder(handle_unknown="ignore", sparse_output=False)),
                    ]
                ),
                spec.categorical,
            )
        )
    return Pipeline([("preprocess", ColumnTransformer(transformers)), ("model", cls(**params))])


def plain_category(value: Any) -> Any:
    """The documented rule for categories, written here on its own: text, and integral numbers as
    integer codes (a column coded 1/2 that a CSV reader returns as 1.0/2.0 is still "1"/"2")."""
    if pd.isna(value):
        return value
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def plain_features(spec: ModelSpec, frame: pd.DataFrame) -> pd.DataFrame:
    """Numbers as floats (booleans become 0/1), categories as text, missing stays missing."""
    out = pd.DataFrame(index=frame.index)
    for col in spec.numerical:
        out[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    for col in spec.categorical:
        out[col] = frame[col].map(plain_category).astype(object)
    return out


def sklearn_score(spec: ModelSpec, model: Pipeline, holdout: pd.DataFrame) -> float:
    x, y = plain_features(spec, holdout), holdout[spec.target].to_numpy()
    name = spec.metric.name
    if name == "rmse":
        return float(metrics.root_mean_squared_error(y, model.predict(x)))
    if name == "mae":
        return float(metrics.mean_absolute_error(y, model.predict(x)))
    if name == "r2":
        return float(metrics.r2_score(y, model.predict(x)))
    classes = list(model.classes_)
    binary = len(classes) == 2
    if name == "accuracy":
        return float(metrics.accuracy_score(y, model.predict(x)))
    if name == "balanced_accuracy":
        return float(metrics.balanced_accuracy_score(y, model.predict(x)))
    if name == "f1":
        average = spec.metric.average or ("binary" if binary else "macro")
        positive = {"pos_label": classes[-1]} if average == "binary" else {}
        return float(metrics.f1_score(y, model.predict(x), average=average, **positive))
    proba = model.predict_proba(x)
    if name == "log_loss":
        return float(metrics.log_loss(y, proba, labels=classes))
    if name == "roc_auc":
        if binary:
            return float(metrics.roc_auc_score(y == classes[-1], proba[:, 1]))
        average = spec.metric.average or "macro"
        return float(metrics.roc_auc_score(y, proba, multi_class="ovr", average=average, labels=classes))
    raise AssertionError(f"the zoo has no sklearn reference for metric {name!r}")


# -- the pipeline, batch by batch ------------------------------------------------------------------


def land(case: ZooCase, settings: Settings, spec: ModelSpec, batches: list[tuple[int, pd.DataFrame]]) -> None:
    for number, batch in batches:
        write_batch(batch, settings.model_dir(spec.name) / "landing", f"batch_{number:02d}.{case.format}")


def train(spec: ModelSpec, settings: Settings, run: int) -> dict[str, Any]:
    try:
        return run_training(
            spec,
            settings,
            run_id=f"zoo_{spec.name}_{run}",
            run_time=f"2026-01-{run:02d}T00:00:00+00:00",
            deploy=True,
        )
    except Cd4mlError as err:
        quarantine = settings.model_dir(spec.name) / "quarantine"
        reasons = sorted(p.read_text() for p in quarantine.glob("*.reason.txt"))
        raise AssertionError(
            f"{spec.name}: run {run} failed: {err}" + "".join(f"\n--- quarantined:\n{r}" for r in reasons)
        ) from err


def quarantined(settings: Settings, spec: ModelSpec) -> dict[str, str]:
    quarantine = settings.model_dir(spec.name) / "quarantine"
    return {
        p.name.removesuffix(".reason.txt"): p.read_text() for p in sorted(quarantine.glob("*.reason.txt"))
    }


def served_rows(spec: ModelSpec, last_file: Path) -> pd.DataFrame:
    """Rows of the last landed batch as a client would send them (the file read back, as cd4ml reads
    it), evenly spaced and at most one request's worth."""
    frame = read_table(last_file)
    keep = np.unique(np.linspace(0, len(frame) - 1, min(len(frame), SERVICE_MAX_ROWS)).round().astype(int))
    return frame.iloc[keep].reset_index(drop=True)


def predict_over_http(url: str, model: str, rows: pd.DataFrame) -> httpx.Response:
    body = {"dataframe_records": json.loads(rows.to_json(orient="records"))}
    return httpx.post(f"{url}/v1/models/{model}/predict", json=body, timeout=60)


def wait_served(url: str, model: str, version: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    meta: dict[str, Any] = {}
    while time.monotonic() < deadline:
        resp = httpx.get(f"{url}/v1/models/{model}", timeout=10)
        meta = resp.json()
        if resp.status_code == 200 and str(meta.get("version")) == version:
            return meta
        time.sleep(0.2)
    raise AssertionError(f"{model}: the service does not serve champion version {version}: {meta}")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_dataset_trains_serves_and_matches_plain_sklearn(
    case: ZooCase,
    deploy_env: dict[str, str],
    shared_specs: Path,
    zoo_results: dict[str, dict[str, Any]],
) -> None:
    spec_path = shared_specs / f"{case.name}.yaml"
    spec_path.write_text(case.spec_yaml())
    spec = load_spec(spec_path)
    settings = get_settings()
    frame, stats = load_table(case)
    batches = split_batches(frame, case.batches)
    record: dict[str, Any] = {
        "source": case.label,
        "task": spec.task,
        "classes": int(frame[spec.target].nunique()) if spec.task == "classification" else None,
        "metric": spec.metric.name + (f" ({spec.metric.average})" if spec.metric.average else ""),
        "estimator": spec.estimator.class_path.rsplit(".", 1)[-1],
        "covers": case.covers,
        "mode": "full" if soak() or case.rows is None or stats["rows_source"] <= case.rows else "capped",
        "rows_cap": case.rows,
        "batches": len(batches),
        "batch_rows": [len(b) for b in batches],
        "load_1min_at_start": machine()["load_1min"],
        **stats,
        "outcome": "failed",
    }
    zoo_results[case.name] = record
    started = time.perf_counter()
    try:
        land(case, settings, spec, [(1, batches[0])])
        first = train(spec, settings, 1)
        # A first batch too small to judge a model on (promotion.min_holdout_rows) is accepted and
        # trained on, but serves nothing yet: the champion then comes with the later batches.
        if first.get("promoted"):
            record["seconds_to_first_champion"] = round(time.perf_counter() - started, 1)
        record["first_run"] = {k: first.get(k) for k in ("promoted", "version", "why")}

        land(case, settings, spec, list(enumerate(batches[1:], start=2)))
        second = train(spec, settings, 2)
        record["seconds_total"] = round(time.perf_counter() - started, 1)
        record.setdefault("seconds_to_first_champion", record["seconds_total"])
        record["second_run"] = {k: second.get(k) for k in ("promoted", "version", "why")}

        zone = landing.Zone(settings.model_dir(spec.name))
        rejected = quarantined(settings, spec)
        record["accepted"] = len(landing.list_accepted(zone))
        record["quarantined"] = len(rejected)
        record["quarantine_reasons"] = rejected
        assert not rejected, f"{case.name}: real batches were quarantined:\n" + "\n".join(rejected.values())
        assert record["accepted"] == len(batches)

        client = registry.client(settings.mlflow_tracking_uri)
        champion = registry.version_by_alias(client, spec.name, registry.CHAMPION)
        assert champion is not None, f"{case.name}: no champion registered"
        record["champion_version"] = str(champion.version)
        evidence = registry.read_evidence(client, spec.name, champion).decision
        train_snapshot = registry.reference_frame(client, spec.name, champion, "train")
        holdout = registry.reference_frame(client, spec.name, champion, "holdout")
        record["rows_train"], record["rows_holdout"] = len(train_snapshot), len(holdout)

        plain = plain_pipeline(spec).fit(plain_features(spec, train_snapshot), train_snapshot[spec.target])
        reference = sklearn_score(spec, plain, holdout)
        record["cd4ml_score"], record["sklearn_score"] = evidence["challenger_score"], reference
        assert math.isclose(evidence["challenger_score"], reference, rel_tol=0, abs_tol=SCORE_TOLERANCE), (
            f"{case.name}: champion's holdout {spec.metric.name} {evidence['challenger_score']!r} "
            f"!= plain scikit-learn {reference!r}"
        )

        url = deploy_env["url"]
        wait_served(url, spec.name, str(champion.version))
        (last_file,) = zone.accepted.glob(f"*__batch_{len(batches):02d}.{case.format}")
        rows = served_rows(spec, last_file)
        resp = predict_over_http(url, spec.name, features(spec, rows))
        assert resp.status_code == 200, (
            f"{case.name}: the service refused rows of the last batch: {resp.text}"
        )
        answer = resp.json()
        assert answer["version"] == str(champion.version)
        expected = plain.predict(plain_features(spec, rows)).tolist()
        record["served_rows"] = len(expected)
        if spec.task == "classification":
            assert answer["predictions"] == expected
        else:
            np.testing.assert_allclose(answer["predictions"], expected, rtol=1e-9, atol=1e-9)
        record["outcome"] = "passed"
    except BaseException as err:
        record["error"] = "".join(traceback.format_exception_only(err)).strip()[-2000:]
        raise
    finally:
        record.setdefault("seconds_total", round(time.perf_counter() - started, 1))
