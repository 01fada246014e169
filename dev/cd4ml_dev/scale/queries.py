"""What tests and benchmarks ask a running topology: its URLs, its data directory, where tasks ran."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cd4ml_dev.scale.common import WORKER_SERVICE
from cd4ml_dev.scale.lease import ProvidedLease
from cd4ml_dev.scale.mapping import ComposeMapping
from cd4ml_dev.scale.supervisor import Supervisor


class TopologyQueries:
    """Read-only views of one run, through its mapping, its databases and its processes."""

    def __init__(self, mapping: ComposeMapping, lease: ProvidedLease, supervisor: Supervisor) -> None:
        self.mapping = mapping
        self.lease = lease
        self.supervisor = supervisor

    @property
    def airflow_url(self) -> str:
        return self.mapping.endpoint("airflow-api-server", 8080)

    @property
    def mlflow_url(self) -> str:
        return self.mapping.endpoint("mlflow", 5000)

    @property
    def service_url(self) -> str:
        return self.mapping.endpoint("prediction-service", 8000)

    @property
    def data_dir(self) -> Path:
        return self.mapping.local_path(
            self.mapping.services["airflow-scheduler"].environment["CD4ML_DATA_DIR"]
        )

    def task_timeline(self, dag_id: str) -> list[dict[str, Any]]:
        """Every task try of a DAG from the metadata DB: where it ran, when it was queued, ran, ended."""
        rows = self.lease.sql(
            "SELECT run_id, task_id, hostname, state, queued_dttm, start_date, end_date "
            "FROM task_instance WHERE dag_id = %s ORDER BY start_date NULLS LAST",
            (dag_id,),
        )
        keys = ("run_id", "task_id", "hostname", "state", "queued", "start", "end")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def worker_hostnames(self) -> list[str]:
        return [p.name for p in self.supervisor.processes if p.service == WORKER_SERVICE]
