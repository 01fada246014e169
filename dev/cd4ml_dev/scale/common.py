"""What every part of the local topology shares: the machine's own services and the image's paths."""

from __future__ import annotations

import os

from cd4ml.core.errors import Cd4mlError

# Run by the machine, not by us: service name -> (local host, port).
PROVIDED = {"postgres": ("127.0.0.1", 5432), "redis": ("127.0.0.1", 6379)}
PG_ADMIN_USER = "postgres"
# What the Dockerfile puts where: the image's AIRFLOW_HOME and the cd4ml source tree.
IMAGE_AIRFLOW_HOME = "/opt/airflow"
IMAGE_PROJECT = "/opt/cd4ml"
WORKER_SERVICE = "airflow-worker"
# Every run's databases and Redis claim start with this, followed by the owning process id.
PREFIX_STEM = "cd4ml_scale_"


class ScaleError(Cd4mlError):
    """The local topology did not come up (the message names the process and its log)."""


def replica_hostname() -> str:
    """Airflow's `hostname_callable` for processes that stand in for a container."""
    import socket

    return os.environ.get("CD4ML_REPLICA_HOSTNAME") or socket.getfqdn()
