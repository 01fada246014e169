"""The zoo's results sink: one record per dataset, merged into the JSON file named by
CD4ML_ZOO_RESULTS (if set), which `benchmarks/zoo_table.py` renders into DATASETS.md."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.zoo.loader import all_cases, every_dataset, soak


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


@pytest.fixture(scope="session")
def zoo_results() -> Iterator[dict[str, dict[str, Any]]]:
    records: dict[str, dict[str, Any]] = {}
    yield records
    target = os.environ.get("CD4ML_ZOO_RESULTS")
    if not target or not records:
        return
    path = Path(target)
    existing: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    datasets = existing.get("datasets", {})
    datasets.update(records)  # a partial run (-k) refreshes only the datasets it ran
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "datasets": dict(sorted(datasets.items())),
    }
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


@pytest.fixture(autouse=True)
def whole_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    """The zoo holds each champion to a plain scikit-learn fit on its stored training snapshot, which
    must then be the whole training set: under `make soak` the largest tables pass the default
    CD4ML_SNAPSHOT_MAX_ROWS (200,000), above which a version stores a sample."""
    if soak():
        monkeypatch.setenv("CD4ML_SNAPSHOT_MAX_ROWS", str(50_000_000))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` trains the zoo files marked `quick: true` (a spread of tasks, metrics, formats and
    data shapes); the rest are skipped with a pointer to the targets that run them."""
    if every_dataset():
        return
    slow = {case.name for case in all_cases() if not case.quick}
    skip = pytest.mark.skip(reason="zoo dataset not marked quick: runs in `make test-zoo` and `make soak`")
    for item in items:
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("case") if callspec is not None else None
        if item.path.name == "test_zoo.py" and getattr(case, "name", None) in slow:
            item.add_marker(skip)
