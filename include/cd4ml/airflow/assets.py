"""The assets that connect cd4ml's DAGs, declared once. Other DAGs refer to them through here."""

from __future__ import annotations

from pathlib import Path

from airflow.sdk import Asset, AssetWatcher

from cd4ml.airflow.triggers import LandingZoneTrigger, ScoreZoneTrigger
from cd4ml.core.paths import ModelPaths
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec


def _watched(
    name: str, watcher: str, directory: Path, trigger: type[LandingZoneTrigger], spec: ModelSpec
) -> Asset:
    """An asset updated when something settles in `directory` (watched by the triggerer)."""
    return Asset(
        name=f"{spec.name}.{name}",
        uri=f"file://{directory}",
        watchers=[
            AssetWatcher(
                name=f"{spec.name}_{watcher}_watcher",
                trigger=trigger(directory=str(directory), poke_interval=spec.schedule.landing_poll_seconds),
            )
        ],
    )


def new_data(spec: ModelSpec, settings: Settings) -> Asset:
    """Updated when a file lands in the model's landing zone."""
    landing = ModelPaths.for_model(settings, spec.name).landing
    return _watched("new_data", "landing", landing, LandingZoneTrigger, spec)


def score_requested(spec: ModelSpec, settings: Settings) -> Asset:
    """Updated when a file or folder of parts lands in the model's score/ folder (`<model>__score`)."""
    score = ModelPaths.for_model(settings, spec.name).score
    return _watched("score_requested", "score", score, ScoreZoneTrigger, spec)


def drift_detected(spec: ModelSpec) -> Asset:
    """Emitted by `<model>__monitor` when drift crosses the spec's threshold."""
    return Asset(name=f"{spec.name}.drift_detected", uri=f"cd4ml://{spec.name}/drift_detected")
