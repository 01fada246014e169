"""The assets that connect cd4ml's DAGs, declared once. Other DAGs refer to them through here."""

from __future__ import annotations

from airflow.sdk import Asset, AssetWatcher

from cd4ml.airflow.triggers import LandingZoneTrigger
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec
from cd4ml.data.landing import Zone


def new_data(spec: ModelSpec, settings: Settings) -> Asset:
    """Updated when a file lands in the model's landing zone (watched by the triggerer)."""
    landing = Zone(settings.model_dir(spec.name)).landing
    return Asset(
        name=f"{spec.name}.new_data",
        uri=f"file://{landing}",
        watchers=[
            AssetWatcher(
                name=f"{spec.name}_landing_watcher",
                trigger=LandingZoneTrigger(
                    directory=str(landing), poke_interval=spec.schedule.landing_poll_seconds
                ),
            )
        ],
    )


def drift_detected(spec: ModelSpec) -> Asset:
    """Emitted by `<model>__monitor` when drift crosses the spec's threshold."""
    return Asset(name=f"{spec.name}.drift_detected", uri=f"cd4ml://{spec.name}/drift_detected")
