"""The shadow runner with a real fitted model (no service, no MLflow): what it logs and counts,
a shadow that throws, a full queue, sampling, and the summary the Models view shows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry
from sklearn.linear_model import LinearRegression, LogisticRegression

from cd4ml.data.shadow_log import read_shadow_log, shadow_summary
from cd4ml.serving.models import Slot
from cd4ml.serving.payload import FeatureSchema
from cd4ml.serving.shadow import ShadowJob, ShadowMetrics, ShadowRunner, agreement


def slot(model: Any, version: str, classifier: bool) -> Slot:
    return Slot(name="m", version=version, run_id="", champion_since="", data_fingerprint="",
                loaded_at=0.0, model=model, schema=FeatureSchema(("x",), ()), classes=None,
                classifier=classifier)  # fmt: skip


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_agreement_counts_equal_labels_and_close_numbers() -> None:
    assert agreement([0, 1, 1], [0, 0, 1], classifier=True) == (2, 0.0)
    agreed, diff = agreement([1.0, 2.0, 3.0], [1.0, 2.5, 3.0 + 1e-12], classifier=False)
    assert agreed == 2 and diff == pytest.approx(0.5)
    assert agreement(["a", "b"], ["a", "c"], classifier=False) == (1, 0.0)


def test_every_copied_request_is_logged_with_both_predictions_and_counted(tmp_path: Path) -> None:
    x = pd.DataFrame({"x": np.arange(20, dtype=float)})
    shadow = slot(LogisticRegression().fit(x, (x["x"] > 9).astype(int)), "2", classifier=True)
    registry = CollectorRegistry()
    runner = ShadowRunner(tmp_path, ShadowMetrics(registry), flush_seconds=0.1)
    runner.start()
    champion_says = [[0], [0], [1]]  # what the champion answered, per request
    for i, (rows, said) in enumerate(zip([[[1.0]], [[15.0]], [[18.0]]], champion_says, strict=True)):
        runner.offer(ShadowJob(shadow, "1", f"r{i}", rows, said), fraction=1.0)
    runner.close()
    frame = read_shadow_log(tmp_path, "m", "2")
    assert list(frame["request_id"]) == ["r0", "r1", "r2"]
    assert [json.loads(p) for p in frame["shadow_predictions"]] == [[0], [1], [1]]
    assert [json.loads(p) for p in frame["champion_predictions"]] == champion_says
    assert list(frame["agreed"]) == [1, 0, 1] and set(frame["champion_version"]) == {"1"}
    assert sample(registry, "cd4ml_shadow_rows_total", model="m", version="2", agreement="agree") == 2
    assert sample(registry, "cd4ml_shadow_rows_total", model="m", version="2", agreement="disagree") == 1
    assert sample(registry, "cd4ml_shadow_requests_total", model="m", version="2", outcome="ok") == 3
    summary = shadow_summary(frame)
    assert (
        summary["requests"] == 3 and summary["errors"] == 0 and summary["agreement"] == pytest.approx(2 / 3)
    )
    assert summary["p99_ms"] is not None and summary["p99_ms"] >= summary["p50_ms"] >= 0


def test_a_shadow_that_throws_is_counted_and_logged_and_a_full_queue_drops(tmp_path: Path) -> None:
    x = np.arange(10, dtype=float).reshape(-1, 1)
    regressor = LinearRegression().fit(x, 2 * x[:, 0])
    registry = CollectorRegistry()
    runner = ShadowRunner(tmp_path, ShadowMetrics(registry), max_queue=2, flush_seconds=0.1)
    broken = slot(regressor, "3", classifier=False)
    broken_rows = [["not a number"]]
    # A shadow answering 1 row where the champion answered 2 is counted as its error, and the
    # runner keeps going (the agreement check used to raise outside the guarded prediction).
    mismatched = ShadowJob(broken, "1", "m0", [[1.0]], [0.0, 0.0])
    # Not started yet: two jobs fill the queue, the third is dropped and counted.
    for i in range(3):
        runner.offer(ShadowJob(broken, "1", f"b{i}", broken_rows, [0.0]), fraction=1.0)
    assert sample(registry, "cd4ml_shadow_requests_total", model="m", version="3", outcome="dropped") == 1
    runner.start()
    runner._queue.put(mismatched)
    runner.close()
    frame = read_shadow_log(tmp_path, "m")
    assert len(frame) == 3 and all(e.startswith("ValueError") for e in frame["error"])
    assert sample(registry, "cd4ml_shadow_requests_total", model="m", version="3", outcome="error") == 3
    summary = shadow_summary(frame)
    assert (
        summary["errors"] == 3
        and summary["agreement"] is None
        and summary["last_error"].startswith("ValueError")
    )


def test_sampling_copies_about_the_fraction_asked_for(tmp_path: Path) -> None:
    x = np.arange(10, dtype=float).reshape(-1, 1)
    shadow = slot(LinearRegression().fit(x, x[:, 0]), "2", classifier=False)
    runner = ShadowRunner(tmp_path, ShadowMetrics(CollectorRegistry()), max_queue=10_000)
    for i in range(2000):
        runner.offer(ShadowJob(shadow, "1", f"r{i}", [[1.0]], [1.0]), fraction=0.25)
    assert 400 <= runner._queue.qsize() <= 600
