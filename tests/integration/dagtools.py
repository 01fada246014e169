"""Helpers for dag.test() runs: land data, run a DAG, read back aliases and versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from cd4ml import registry
from cd4ml_dev.datagen import write_batch


def land(env: dict[str, Any], model: str, name: str, frame) -> Path:
    return write_batch(frame, env["data"] / model / "landing", name)


def run(env: dict[str, Any], model: str, **conf: Any) -> dict[str, str]:
    return run_dag(f"{model}__train", {"reason": "integration test", **conf})


def run_dag(dag_id: str, conf: dict[str, Any]) -> dict[str, str]:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags"))
    assert not bag.import_errors, bag.import_errors
    dag_run = bag.dags[dag_id].test(run_conf=conf)
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    states["__run__"] = str(dag_run.state)
    states["__run_id__"] = dag_run.run_id
    return states


def served(env: dict[str, Any], model: str) -> str | None:
    resp = httpx.get(f"{env['service']}/v1/models/{model}", timeout=10)
    return str(resp.json()["version"]) if resp.status_code == 200 else None


def champion(env: dict[str, Any], model: str) -> str | None:
    mv = registry.version_by_alias(env["mlflow"], model, registry.CHAMPION)
    return str(mv.version) if mv else None


def versions(env: dict[str, Any], model: str) -> list:
    return sorted(env["mlflow"].search_model_versions(f"name = '{model}'"), key=lambda v: int(v.version))


def task_tries(run_id: str, dag_id: str) -> dict[str, int]:
    """How many times each task of a run was tried (1 = never retried)."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=dag_id, run_id=run_id).all()
        return {ti.task_id: ti.try_number for ti in tis}


def queued_training_runs(model: str) -> int:
    """Asset events queued for `<model>__train`: a training run the scheduler would start."""
    from airflow.models.asset import AssetDagRunQueue
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(AssetDagRunQueue)
                .where(AssetDagRunQueue.target_dag_id == f"{model}__train")
            )
            or 0
        )  # fmt: skip
