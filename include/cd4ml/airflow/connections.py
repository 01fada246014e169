"""The Airflow connections cd4ml reads: where the prediction service is, and its admin token.

`cd4ml_service` (any conn type, `http` reads best): `host` is the service's host or a full URL,
`schema` the scheme (default http), `port`, `password` the admin token of `/admin/reload`, extra
`wait_seconds` how long a deploy waits for the service to switch. Without the connection (a task
run where nobody defined it), the settings decide: CD4ML_SERVICE_URL, CD4ML_SERVICE_ADMIN_TOKEN,
CD4ML_DEPLOY_WAIT_SECONDS, as for `cd4ml train` without Airflow.

    AIRFLOW_CONN_CD4ML_SERVICE='{"conn_type": "http", "host": "prediction-service", "port": 8000,
                                 "password": "<token>"}'
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cd4ml.core.errors import Cd4mlError
from cd4ml.core.settings import get_settings

if TYPE_CHECKING:
    from cd4ml.steps.deploy import ServiceEndpoint

log = logging.getLogger(__name__)
SERVICE_CONN_ID = "cd4ml_service"


class ConnectionConfigError(Cd4mlError):
    """A cd4ml Airflow connection is defined but cannot be used; the message names the field."""


def endpoint_from_connection(conn: Any, *, default_wait_seconds: float) -> ServiceEndpoint:
    """The service endpoint a connection describes (pure: any object with Connection's fields)."""
    from cd4ml.steps.deploy import ServiceEndpoint

    host = (conn.host or "").strip()
    if not host:
        raise ConnectionConfigError(
            f"Airflow connection '{SERVICE_CONN_ID}' has no host: set it to the prediction service "
            "(e.g. host 'prediction-service', port 8000, or host 'http://prediction-service:8000')"
        )
    if "://" in host:
        url = host
    else:
        url = f"{conn.schema or 'http'}://{host}" + (f":{conn.port}" if conn.port else "")
    extra = conn.extra_dejson or {}
    try:
        wait = float(extra.get("wait_seconds", default_wait_seconds))
    except (TypeError, ValueError):
        raise ConnectionConfigError(
            f"Airflow connection '{SERVICE_CONN_ID}': extra wait_seconds={extra.get('wait_seconds')!r} "
            "is not a number of seconds"
        ) from None
    return ServiceEndpoint(url=url.rstrip("/"), admin_token=conn.password or None, wait_seconds=wait)


def service_endpoint() -> ServiceEndpoint:
    """The prediction service as tasks reach it: the `cd4ml_service` connection, else the settings."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    from cd4ml.steps.deploy import ServiceEndpoint

    settings = get_settings()
    try:
        conn = BaseHook.get_connection(SERVICE_CONN_ID)
    except AirflowNotFoundException:
        log.info("cd4ml: no '%s' connection; the service is %s (CD4ML_SERVICE_URL)", SERVICE_CONN_ID,
                 settings.service_url)  # fmt: skip
        return ServiceEndpoint(
            url=settings.service_url,
            admin_token=settings.service_admin_token,
            wait_seconds=settings.deploy_wait_seconds,
        )
    return endpoint_from_connection(conn, default_wait_seconds=settings.deploy_wait_seconds)
