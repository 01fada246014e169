"""Ground truth from production: `POST /v1/models/<model>/feedback` (placeholder, being built)."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CollectorRegistry

from cd4ml.core.settings import Settings
from cd4ml.serving.predlog import PredictionLog


def feedback_router(
    settings: Settings,
    *,
    max_body_bytes: int,
    max_rows: int,
    predlog: PredictionLog,
    registry: CollectorRegistry,
) -> APIRouter:
    """The feedback endpoints, mounted by `create_app` next to predict."""
    return APIRouter()
