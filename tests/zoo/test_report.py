"""benchmarks/zoo_table.py renders what the suite recorded, failures included, and puts a capped
dataset's make-test row beside its full-size row."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.zoo.loader import all_cases

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "zoo_table.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("zoo_table", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "source": "sklearn/iris", "task": "classification", "classes": 3, "metric": "f1", "rows": 150,
        "batches": 2, "accepted": 2, "quarantined": 0, "cd4ml_score": 0.9, "sklearn_score": 0.9,
        "seconds_to_first_champion": 10.0, "seconds_total": 20.0, "outcome": "passed", "mode": "full",
    }  # fmt: skip
    return {**base, **overrides}


def test_the_table_shows_failures_capped_and_full_rows() -> None:
    capped_case = next(c for c in all_cases() if c.rows is not None)
    capped = {
        "machine": {"cpus": 2, "load_1min": 3.0, "python": "3.11", "platform": "linux"},
        "datasets": {
            "iris": _record(outcome="failed", accepted=1, quarantined=1, cd4ml_score=None),
            capped_case.name: _record(mode="capped", rows=capped_case.rows, task="regression",
                                      metric="rmse", cd4ml_score=1.0, sklearn_score=1.0 + 2e-12),
        },
    }  # fmt: skip
    full = {"datasets": {capped_case.name: _record(rows=99_999, task="regression", metric="rmse")}}
    text = _script().render(capped, full)
    iris = next(line for line in text.splitlines() if line.startswith("| iris |"))
    assert "| 1/1 |" in iris and "**FAIL**" in iris and "| f1 (macro) |" in iris
    assert f"| {capped_case.name} (full) |" in text and "| 99,999 |" in text
    assert f"| {capped_case.name} (capped: {capped_case.rows:,} rows) |" in text and "| 2.0e-12 |" in text
    assert "the pipeline runs of all its datasets took 40 s together" in text
    # Every zoo dataset is listed with what it is there for, even without results.
    for case in all_cases():
        assert f"**{case.name}** (`tests/zoo/datasets/{case.name}.yaml`)" in text
