"""Small builders shared by the tests: specs derived from the demo spec, and demo batches."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO_SPEC = REPO / "include" / "specs" / "churn.yaml"
SOAK = os.environ.get("CD4ML_SOAK") == "1"
# A long variant of a story `make test` already covers another way: run by `make soak` (CD4ML_SOAK=1).
soak_only = pytest.mark.skipif(not SOAK, reason="long variant: make soak (CD4ML_SOAK=1)")


def spec_dict(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(DEMO_SPEC.read_text())
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return raw


def write_spec(specs_dir: Path, name: str, **overrides: Any) -> Path:
    path = specs_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec_dict(**overrides), sort_keys=False))
    return path


WEAK = {"class": "sklearn.dummy.DummyClassifier", "params": {"strategy": "prior"}}
LOGREG = {"class": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 500}}


def make_champion(
    client: Any, model: str, version: str | int, when: str = "2026-01-01T00:00:00+00:00"
) -> None:
    """Move `champion` by hand as cd4ml's promotion does: with its champion record signed by the
    admin token the test services hold (a service with a token serves no unsigned champion)."""
    from cd4ml import registry
    from tests.conftest import SERVICE_TOKEN

    signed = registry.champion_signature(SERVICE_TOKEN, model, str(version), when)
    client.set_model_version_tag(model, str(version), registry.SIGNATURE_TAG, signed)
    client.set_registered_model_alias(model, registry.CHAMPION, str(version))


def wait_for(
    check: Callable[[], Any], what: str = "condition", timeout: float = 60.0, every: float = 0.25
) -> Any:
    """`check()`'s first truthy value, polled every `every` s; a TimeoutError naming `what` after
    `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


@contextmanager
def sqlite_mlflow(root: Path) -> Iterator[str]:
    """MLFLOW_TRACKING_URI set to a SQLite store in `root` (creating its schema costs seconds: share it
    per module, one model per test), with `root` as the working directory, where MLflow's default
    artifact root is."""
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        yield uri
