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
