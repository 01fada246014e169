"""`LocalTopology`: the one object tests and benchmarks hold, composed of one part per job."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cd4ml.core.settings import PROJECT_ROOT
from cd4ml_dev.scale.common import PREFIX_STEM
from cd4ml_dev.scale.health import HealthChecks
from cd4ml_dev.scale.lease import ProvidedLease
from cd4ml_dev.scale.mapping import ComposeMapping
from cd4ml_dev.scale.plan import Process, plan_processes
from cd4ml_dev.scale.queries import TopologyQueries
from cd4ml_dev.scale.supervisor import Supervisor


@dataclass
class LocalTopology:
    """The compose services as local processes. Use as a context manager: stop() always runs.

    `mapping` decides ports and paths, `lease` holds the private databases and Redis db,
    `supervisor` runs the processes, `queries` answers tests; this class only sequences them.
    """

    root: Path
    workers: int = 2
    compose_file: Path = PROJECT_ROOT / "docker-compose.yaml"
    # Compose variables (the knobs), e.g. MLFLOW_WORKERS.
    settings: Mapping[str, str] = field(default_factory=dict)
    project: Path = PROJECT_ROOT
    # Extra bind mounts, as a compose override file would add: container path -> local path.
    mounts: Mapping[str, Path] = field(default_factory=dict)
    # The owning pid in the name lets a later run tell a dead run's leftovers from a live one's.
    prefix: str = field(default_factory=lambda: f"{PREFIX_STEM}{os.getpid()}_{secrets.token_hex(3)}")

    def __post_init__(self) -> None:
        self.root = self.root.resolve()
        self.mapping = ComposeMapping(
            self.root, self.compose_file, self.settings, self.project, self.mounts, self.prefix
        )
        self.lease = ProvidedLease(self.prefix, self.mapping.databases)
        health = HealthChecks(self.mapping.services, self.lease.sql)
        self.supervisor = Supervisor(self.root, self.mapping.services, health)
        self.queries = TopologyQueries(self.mapping, self.lease, self.supervisor)

    def start(self, timeout: float = 240) -> None:
        """Lease the databases, lay out the image's files, start everything and wait until healthy."""
        since = time.monotonic()
        self.lease.acquire()
        assert self.lease.redis_db is not None  # acquire() raises when it cannot claim one
        self.mapping.build_image_files()
        processes = plan_processes(self.mapping, self.workers, self.lease.redis_db)
        self.supervisor.run(processes, timeout, since)

    def stop(self, grace: float = 5) -> None:
        """Stop every process group, then drop the databases and flush the Redis db. Idempotent."""
        try:
            self.supervisor.stop(grace)
        finally:
            self.lease.release()

    def __enter__(self) -> LocalTopology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what callers hold on to ---------------------------------------------------------------------

    @property
    def values(self) -> dict[str, str]:
        """The compose variables this run used, generated secrets included."""
        return self.mapping.values

    @property
    def redis_db(self) -> int | None:
        return self.lease.redis_db

    @property
    def processes(self) -> list[Process]:
        return self.supervisor.processes

    @property
    def events(self) -> list[tuple[float, str, str]]:
        return self.supervisor.events

    def check_alive(self) -> None:
        self.supervisor.check_alive()

    def log_tail(self, name: str, lines: int = 30) -> str:
        return self.supervisor.log_tail(name, lines)

    def sql(
        self, query: str, params: tuple[Any, ...] = (), database: str = "airflow"
    ) -> list[tuple[Any, ...]]:
        return self.lease.sql(query, params, database)

    @property
    def airflow_url(self) -> str:
        return self.queries.airflow_url

    @property
    def mlflow_url(self) -> str:
        return self.queries.mlflow_url

    @property
    def service_url(self) -> str:
        return self.queries.service_url

    @property
    def data_dir(self) -> Path:
        return self.queries.data_dir

    def task_timeline(self, dag_id: str) -> list[dict[str, Any]]:
        return self.queries.task_timeline(dag_id)

    def worker_hostnames(self) -> list[str]:
        return self.queries.worker_hostnames()


@contextmanager
def running(root: Path, **kwargs: Any) -> Iterator[LocalTopology]:
    """Start the topology; always stop it and remove its databases, even if start-up fails."""
    topo = LocalTopology(root, **kwargs)
    try:
        topo.start()
        yield topo
    finally:
        topo.stop()
