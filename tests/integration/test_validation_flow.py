"""Validation through `pipeline.run_training` against the session's real MLflow server.

One time-ordered market (the shape of ggplot2's txhousing): a later year brings a new city and
doubles the market (drift, accepted and recorded on the version) and is trained on; a poisoned
file landed beside it (20 infinite values) is quarantined while the good year trains; a file
scaled x1e6 trains nothing and fails without a retry; a file with infinities accepted by an older
cd4ml stops every run before anything is fitted, naming the file, until it is retracted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from cd4ml import registry
from cd4ml.core.errors import DataError, QuarantinedError
from cd4ml.core.settings import Settings, get_settings
from cd4ml.core.spec import ModelSpec, load_spec
from cd4ml.data import landing
from cd4ml.steps import pipeline
from tests.unit.test_poisoning import CITIES, MARKET, market_year

pytestmark = pytest.mark.integration
MODEL = "market_flow"


@pytest.fixture
def market(deploy_env: dict[str, str], shared_specs: Path) -> tuple[ModelSpec, Settings]:
    raw = yaml.safe_load(MARKET)
    (shared_specs / f"{MODEL}.yaml").write_text(yaml.safe_dump(raw))
    return load_spec(shared_specs / f"{MODEL}.yaml"), get_settings()


def land(settings: Settings, name: str, frame: pd.DataFrame) -> None:
    zone = landing.Zone(settings.model_dir(MODEL)).ensure()
    frame.to_csv(zone.landing / name, index=False)


def train(spec: ModelSpec, settings: Settings, run: int) -> dict[str, Any]:
    return pipeline.run_training(
        spec, settings, run_id=f"flow_{run}", run_time=f"2026-02-{run:02d}T00:00:00+00:00", deploy=False
    )


def test_validation_through_run_training(market: tuple[ModelSpec, Settings]) -> None:
    spec, settings = market
    client = MlflowClient(settings.mlflow_tracking_uri)
    zone = landing.Zone(settings.model_dir(MODEL))

    land(settings, "2000.csv", market_year(2000, CITIES, growth=0.2))
    assert train(spec, settings, 1)["promoted"] is True

    # A later year: a new city and the market doubled (3.5% of volumes above the learned range: drift,
    # which the old 1% rule refused), landed with a poisoned file.
    land(settings, "2001.csv", market_year(2001, [*CITIES, "Odessa"], growth=1.0))
    poisoned = market_year(2001, CITIES, growth=0.2, seed=9)
    poisoned.loc[poisoned.index[:20], "volume"] = np.inf
    land(settings, "2001_export.csv", poisoned)
    train(spec, settings, 2)
    (mv,) = [v for v in client.search_model_versions(f"name='{MODEL}'") if v.version == "2"]
    record = registry.read_evidence(client, MODEL, mv).validation
    assert record["accepted"] == ["2001.csv"] and record["quarantined"] == ["2001_export.csv"]
    assert record["drift"] == {"2001.csv": ["median", "sales", "volume"]}
    reason = next(zone.quarantine.glob("*2001_export.csv.reason.txt")).read_text()
    assert "column 'volume': 20 of 480 rows are not finite numbers" in reason, reason
    snapshot = registry.reference_frame(client, MODEL, mv, "train")
    assert np.isfinite(snapshot[spec.numerical].to_numpy(dtype=float)).all()
    holdout = registry.reference_frame(client, MODEL, mv, "holdout")
    assert "Odessa" in set(holdout["city"]) | set(snapshot["city"])

    # Scaled x1e6: quarantined, nothing trained, and a data error is never retried.
    land(
        settings, "2002.csv", market_year(2002, CITIES, growth=0.2).assign(volume=lambda f: f["volume"] * 1e6)
    )
    with pytest.raises(QuarantinedError) as quarantined:
        train(spec, settings, 3)
    assert not quarantined.value.retryable
    assert "column 'volume': 480 of 480 rows outside [" in str(quarantined.value)
    assert "validation.max_outside_learned_range = 0.01" in str(quarantined.value)
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 2

    # A file an older cd4ml accepted with infinities in it: every run stops before fitting, naming it.
    legacy = market_year(2002, CITIES, growth=0.2, seed=5)
    legacy.loc[legacy.index[:3], "sales"] = -np.inf
    land(settings, "legacy.csv", legacy)
    (landed,) = landing.list_landed(zone)
    landing.accept(zone, landed, rows=len(legacy), accepted_at="2026-02-03T12:00:00+00:00", run_id="old")
    with pytest.raises(DataError) as err:
        train(spec, settings, 4)
    assert "legacy.csv: column 'sales': 3 non-finite values" in str(err.value)
    assert "2001.csv" not in str(err.value) and not err.value.retryable
    landing.retract(zone, "legacy.csv", reason="infinite sales", who="test", when="2026-02-05T00:00:00+00:00")
    assert train(spec, settings, 5).get("trained") is False  # the data is what version 2 was trained on
