"""The prediction service under concurrent load while `champion` moves: the short version of
`benchmarks/bench_load.py` (which runs 60 s with 3 swaps under `make soak`).

Real processes: the session's MLflow server and its `cd4ml serve` uvicorn subprocess.
Asserts behaviour only: no failed request, the swap took effect, no request answered by the old
version once the new one answered, and memory stays bounded.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.helpers import LOGREG

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DURATION = 15.0
# Serving a second small model and the prediction log's buffers cost a few MB; a per-request leak
# at ~100 requests/s would not stay under this.
RSS_GROWTH_LIMIT_MB = 150


def bench_module() -> ModuleType:
    if "bench_load" in sys.modules:
        return sys.modules["bench_load"]
    spec = importlib.util.spec_from_file_location("bench_load", REPO / "benchmarks" / "bench_load.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def served_model(
    prediction_service: dict[str, str],
    mlflow_server: str,
    shared_specs: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Any]:
    """Two versions of the bench's model behind the session's service (one fewer service start-up;
    the RSS bound below is on growth, so the other models it already serves do not count)."""
    monkeypatch.setenv("CD4ML_SERVICE_ADMIN_TOKEN", prediction_service["token"])  # its promotions sign
    bench = bench_module()
    from cd4ml.core.spec import load_spec

    spec = load_spec(bench.write_spec(shared_specs, estimator=LOGREG))
    versions = [
        bench.register(mlflow_server, spec, fitted, f"model {i}")
        for i, fitted in enumerate(bench.fit_models(spec, 2, 3000))
    ]
    bench.promote(mlflow_server, spec, versions[0])
    url = prediction_service["url"]
    deadline = time.monotonic() + 90
    while httpx.get(f"{url}/v1/models/{spec.name}", timeout=10).json().get("version") != versions[0]:
        assert time.monotonic() < deadline, f"the service did not serve {spec.name} v{versions[0]} in 90 s"
        time.sleep(0.5)
    return {"bench": bench, "spec": spec, "url": url, "pid": int(prediction_service["pid"]),
            "versions": versions}  # fmt: skip


def test_no_request_fails_while_the_champion_is_swapped_under_load(
    served_model: dict[str, Any], mlflow_server: str
) -> None:
    bench = served_model["bench"]
    old, new = served_model["versions"]
    result = bench.run_load(
        service_url=served_model["url"], service_pid=served_model["pid"], tracking_uri=mlflow_server,
        spec=served_model["spec"], swap_versions=[new], duration=DURATION, concurrency=8,
    )  # fmt: skip
    summary = bench.summarise(result)
    print(bench.report(summary))

    assert summary["requests"] > 100, summary["requests"]
    assert summary["failed"] == 0, summary["failures"]
    (swap,) = result.swaps
    assert swap.version == new and result.initial_version == old
    assert swap.first_served_at is not None, "the service never served the new champion"
    served = {s.version for s in result.samples}
    assert served == {old, new}, served
    # Once the new version answered, every request sent afterwards got the new version.
    assert summary["stale_after_swap"] == 0
    assert summary["rss_samples"] >= DURATION - 2
    assert summary["rss_max_mb"] - summary["rss_start_mb"] < RSS_GROWTH_LIMIT_MB, summary
