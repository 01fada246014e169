"""The compose file's health checks, run against local processes instead of containers."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any

from cd4ml_dev import compose
from cd4ml_dev.scale.plan import Process

Sql = Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]


class HealthChecks:
    """HTTP probes are polled; `airflow jobs check` becomes the same query on the metadata DB's job
    table, `celery inspect ping` the same ping through the broker."""

    def __init__(self, services: Mapping[str, compose.Service], sql: Sql) -> None:
        self.services = services
        self.sql = sql

    def probe(self, proc: Process) -> None:
        """Mark `proc` healthy once its service's check passes; a process that is not up is skipped."""
        if proc.healthy or not proc.started or proc.oneshot or proc.exit_code is not None:
            return
        test = " ".join(self.services[proc.service].healthcheck or [])
        if proc.health_url is not None:
            with suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(proc.health_url, timeout=3) as resp:
                    proc.healthy = resp.status == 200
        elif m := re.search(r"jobs check --job-type (\w+)", test):
            # `airflow jobs check --hostname $HOSTNAME`: a live job of that type from this "container".
            rows = self.sql(
                "SELECT count(*) FROM job WHERE job_type = %s AND hostname = %s AND state = 'running' "
                "AND latest_heartbeat > now() - interval '60 seconds'",
                (m.group(1), proc.name),
            )
            proc.healthy = rows[0][0] > 0
        elif "inspect ping" in test:
            # `celery inspect ping -d celery@$HOSTNAME`, through the same broker.
            proc.healthy = self._celery_ping(proc)
        else:
            proc.healthy = True

    @staticmethod
    def _celery_ping(proc: Process) -> bool:
        import socket

        from celery import Celery

        node = f"{proc.name}@{socket.gethostname()}"
        app = Celery(broker=proc.env["AIRFLOW__CELERY__BROKER_URL"])
        try:
            return bool(app.control.ping(destination=[node], timeout=1.0))
        finally:
            app.close()
