"""The web side of cd4ml's Airflow plugin: a FastAPI app the Airflow API server mounts at /cd4ml.

- `GET /cd4ml/models`        the Models view (HTML; shown inside the Airflow UI as a nav entry)
- `GET /cd4ml/api/models`    the same as JSON
- `GET /cd4ml/files/{model}/{path}`  GX Data Docs and Evidently reports under the model's data dir
- `GET /cd4ml/metrics`       pipeline figures for Prometheus

Every route needs an Airflow login (the UI's session cookie or a bearer JWT from /auth/token), as
Airflow's own API does. `/metrics` also takes `Authorization: Bearer $CD4ML_METRICS_TOKEN`, so a
Prometheus server can scrape it with a static credential. MLflow links go to the settings'
public MLflow URL (CD4ML_MLFLOW_PUBLIC_URL), as in the mails.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def airflow_user(request: Request, credentials: Credentials) -> Any:
    """The logged-in Airflow user (401 without a login, 403 with a bad token), as Airflow's API."""
    from airflow.api_fastapi.core_api.security import get_user

    return await get_user(request, None, credentials)


async def metrics_reader(request: Request, credentials: Credentials) -> None:
    from cd4ml.core.settings import get_settings

    token = get_settings().metrics_token or ""
    if token and credentials and hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        return
    await airflow_user(request, credentials)


def _overviews(only: str | None = None) -> tuple[list[Any], list[str], Any]:
    from cd4ml.core.settings import get_settings
    from cd4ml.core.spec import load_specs, spec_files
    from cd4ml.ui.overview import model_overview

    settings = get_settings()
    specs, broken = load_specs(spec_files(settings.specs_dir))
    errors = [str(err) for err in broken.values()]
    overviews = []
    for spec in specs:
        if only and spec.name != only:
            continue
        try:
            overviews.append(model_overview(spec, settings))
        except Exception as err:  # noqa: BLE001 -- one unreachable model must not blank the page for the others
            errors.append(f"{spec.name}: could not read its state: {err}")
    return overviews, errors, settings


def create_app() -> FastAPI:
    app = FastAPI(title="cd4ml", description="cd4ml's Models view, reports and pipeline metrics")
    user = [Depends(airflow_user)]

    @app.get("/models", response_class=HTMLResponse, dependencies=user)
    async def models_page(dag_id: str | None = None) -> HTMLResponse:
        """Every model; with `dag_id` (the per-DAG tab), only that DAG's model."""
        from cd4ml.ui.overview import render_html

        only = dag_id.split("__")[0] if dag_id and "__" in dag_id else None
        overviews, errors, settings = await asyncio.to_thread(_overviews, only)
        return HTMLResponse(render_html(overviews, settings, settings.mlflow_public_url, errors))

    @app.get("/api/models", dependencies=user)
    async def models_json() -> JSONResponse:
        overviews, errors, _ = await asyncio.to_thread(_overviews)
        return JSONResponse({"models": [o.as_dict() for o in overviews], "errors": errors})

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(metrics_reader)])
    async def metrics() -> PlainTextResponse:
        from cd4ml.ui.overview import METRICS_CONTENT_TYPE, prometheus_text

        overviews, _, _ = await asyncio.to_thread(_overviews)
        return PlainTextResponse(prometheus_text(overviews), media_type=METRICS_CONTENT_TYPE)

    @app.get("/files/{model}/{path:path}", dependencies=user)
    async def report_file(model: str, path: str) -> FileResponse:
        from cd4ml.core.paths import ModelPaths
        from cd4ml.core.settings import get_settings

        settings = get_settings()
        root = settings.model_dir(model).resolve()
        target = (root / path).resolve()
        allowed = any(target.is_relative_to(d) for d in ModelPaths(root).report_dirs)
        if not allowed or not target.is_file() or settings.data_dir.resolve() != root.parent:
            raise HTTPException(404, f"no report {path!r} for model {model!r}")
        return FileResponse(target)

    return app


def report_link(model: str, uri: str | None) -> str | None:
    """A report file (file:// URI or path) of `model` as a link into this app, or None."""
    from cd4ml.core.settings import get_settings
    from cd4ml.ui.overview import report_href

    href = report_href(get_settings(), model, uri)
    if href is None:
        return None
    from urllib.parse import urlparse

    from airflow.configuration import conf

    prefix = urlparse(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")
    return f"{prefix}/cd4ml/{href}"
