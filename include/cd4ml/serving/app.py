"""The prediction service: FastAPI on uvicorn, serving the `champion` of every model spec.

POST /v1/models/{model}/predict   dataframe_split | dataframe_records | instances | plain records
GET  /v1/models, /v1/models/{model}   what is served: version, run id, champion since, fingerprint
GET  /health/live, /health/ready  (ready = every spec'd model has a champion loaded)
GET  /metrics                     Prometheus (the service's counters, plus process, platform and GC)
POST /admin/reload                check MLflow now (Bearer token: CD4ML_SERVICE_ADMIN_TOKEN)

MLflow scoring protocol (what `mlflow models serve` answers; the model by header or path prefix):
POST /invocations, /v1/models/{model}/invocations   GET /ping, /version
Open Inference Protocol v2 REST (KServe, Triton, MLServer clients):
GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/{model}[/versions/{version}][/ready]
POST /v2/models/{model}[/versions/{version}]/infer

The routes are `cd4ml.serving.routes` (a router per protocol) over the parts wired once in
`cd4ml.serving.service`. Every protocol goes through `cd4ml.serving.scoring.score`: the same
validation, prediction log rows and metrics, and the same OpenTelemetry spans when the OTEL_*
variables name an endpoint (`cd4ml.serving.tracing`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from cd4ml.core.settings import Settings, get_settings
from cd4ml.serving.feedback_api import feedback_router
from cd4ml.serving.routes import mlflow_routes, native_routes, oip_routes
from cd4ml.serving.service import Metrics, Service, ServiceConfig
from cd4ml.serving.tracing import ServiceTracing
from cd4ml.serving.workers import Board

__all__ = ["Metrics", "ServiceConfig", "create_app", "serve"]

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    config: ServiceConfig | None = None,
    tracing: ServiceTracing | None = None,
) -> FastAPI:
    """The service's app for this process: its parts (`Service`), started and stopped with the app,
    and its routes (cd4ml's own, MLflow's scoring protocol, Open Inference Protocol v2, admin, feedback)."""
    settings = settings or get_settings()
    config = config or ServiceConfig.from_settings(settings)
    # Off (no tracer provider) unless an OTLP endpoint is set; a bad OTEL_* value fails here, at start.
    svc = Service(settings, config, tracing or ServiceTracing.from_env(os.environ))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from threadpoolctl import threadpool_limits

        # One request is tiny: OpenMP/BLAS thread pools only add spin-up and contention here.
        limits = threadpool_limits(limits=1)
        await svc.start()
        yield
        await svc.stop()
        limits.restore_original_limits()

    app = FastAPI(title="cd4ml prediction service", version="1", lifespan=lifespan)
    app.state.service = svc
    app.state.store = svc.store
    app.state.predlog = svc.predlog
    app.state.metrics = svc.metrics
    app.state.tracing = svc.tracing
    app.include_router(svc.admin.router())
    app.include_router(
        feedback_router(settings, max_body_bytes=config.max_body_bytes, max_rows=config.max_rows,
                        predlog=svc.predlog, registry=svc.metrics.registry)
    )  # fmt: skip
    for router in (native_routes(svc), mlflow_routes(svc), oip_routes(svc)):
        app.include_router(router)
    return app


def serve(host: str, port: int, workers: int | None = None) -> int:
    """Run the service: one process, or `workers` (default `CD4ML_SERVICE_WORKERS`) processes on one
    port (`cd4ml.serving.processes`) sharing a state folder (`cd4ml.serving.workers`). Returns the
    exit status."""
    import shutil
    import tempfile

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    workers = workers or settings.service_workers
    options: dict[str, Any] = {"host": host, "port": port, "log_level": "warning", "access_log": False,
                               "timeout_graceful_shutdown": 20}  # fmt: skip
    if workers == 1:  # whatever CD4ML_SERVICE_WORKERS says: this process is the whole service
        uvicorn.run(create_app(settings.model_copy(update={"service_workers": 1})), workers=1, **options)
        return 0
    from cd4ml.serving.processes import check_free, supervise

    check_free(host, port)  # before anything is reset: a second `cd4ml serve` must not touch the first
    given = settings.service_state_dir
    state_dir = given or Path(tempfile.mkdtemp(prefix="cd4ml-service-"))
    board = Board(state_dir, workers)
    board.reset()  # a previous run's states and metric files must not count as this run's
    # The workers are spawned: they read these (prometheus_client when it is first imported).
    os.environ["CD4ML_SERVICE_STATE_DIR"] = str(state_dir)
    os.environ["CD4ML_SERVICE_WORKERS"] = str(workers)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(board.prometheus_dir)
    try:
        return supervise(workers, options, board.workers_dir)  # each process on its own socket
    finally:
        if given is None:
            shutil.rmtree(state_dir, ignore_errors=True)
