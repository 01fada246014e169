"""The processes that stand in for the compose services: one per service, N for the Celery worker."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cd4ml_dev import compose
from cd4ml_dev.netutil import free_port
from cd4ml_dev.scale.common import IMAGE_AIRFLOW_HOME, PROVIDED, WORKER_SERVICE, ScaleError
from cd4ml_dev.scale.mapping import ComposeMapping


@dataclass
class Process:
    name: str  # replica name, e.g. airflow-worker-2: also its hostname
    service: str
    argv: list[str]
    env: dict[str, str]
    health_url: str | None
    oneshot: bool
    popen: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    healthy: bool = False

    @property
    def started(self) -> bool:
        return self.popen is not None

    @property
    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()


def plan_processes(mapping: ComposeMapping, workers: int, redis_db: int) -> list[Process]:
    """Every process to run, in depends_on order, with its command and environment mapped."""
    services = mapping.services
    dependents_wait_for_exit = {
        dep
        for svc in services.values()
        for dep, cond in svc.depends_on.items()
        if cond == "service_completed_successfully"
    }
    base = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": os.environ.get("HOME", str(mapping.root)),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
        "AIRFLOW_HOME": str(mapping.paths[IMAGE_AIRFLOW_HOME]),
    }
    processes = []
    for name in mapping.order:
        if name in PROVIDED:
            continue
        svc = services[name]
        if not svc.command:
            raise ScaleError(f"service {name} in {mapping.compose_file} has no command")
        map_value = mapping.mapper(name, redis_db)
        own_ports = {cport: local for (s, cport), local in mapping.ports.items() if s == name}
        argv = compose.map_args(svc.command, own_ports=own_ports, map_value=map_value)
        env = {**base, **{k: map_value(v) for k, v in svc.environment.items()}}
        url = compose.health_url(svc)
        health = map_value(url) if url else None
        replicas = workers if name == WORKER_SERVICE else 1
        for i in range(1, replicas + 1):
            replica = f"{name}-{i}"
            # What a container has of its own: its hostname and its network namespace's ports.
            extra = {
                "CD4ML_REPLICA_HOSTNAME": replica,
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "cd4ml_dev.scale.replica_hostname",
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            }
            cmd = list(argv)
            if name == WORKER_SERVICE:
                cmd += ["--celery-hostname", f"{replica}@%h"]
            processes.append(
                Process(replica, name, cmd, {**env, **extra}, health, name in dependents_wait_for_exit)
            )
    return processes
