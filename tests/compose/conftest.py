"""docker-compose.yaml under a real Docker engine (`make test-compose`).

These tests start containers, so they run only when asked: `make test-compose` sets
CD4ML_COMPOSE_TEST=1 after it has started the engine and built the images.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "compose: docker-compose.yaml under a real engine (make test-compose)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CD4ML_COMPOSE_TEST") == "1":
        return
    skip = pytest.mark.skip(reason="starts Docker containers: run with `make test-compose`")
    for item in items:
        if "tests/compose/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(skip)
