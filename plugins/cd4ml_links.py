"""cd4ml's Airflow plugin: extra links to what each task made, and a Models view in the UI.

Extra links are global links, evaluated by the API server: each reads the task's own return value
(a small JSON XCom every cd4ml task returns) and builds the URL (MLflow run, model version, GX Data
Docs, Evidently report). Tasks without such a value show no link. The Models view, the reports
and the pipeline metrics are served by a FastAPI app the API server mounts at /cd4ml
(cd4ml.airflow.ui); every route needs an Airflow login.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink


def _mlflow_ui() -> str:
    """The one resolver of MLflow links (CD4ML_MLFLOW_PUBLIC_URL, ...; docs/settings.md)."""
    from cd4ml.core.settings import get_settings

    return get_settings().mlflow_public_url


def _xcom(ti_key: Any, key: str) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(
                key=key,
                run_id=ti_key.run_id,
                dag_ids=ti_key.dag_id,
                task_ids=ti_key.task_id,
                map_indexes=ti_key.map_index,
            ).with_only_columns(XComModel.value)
        ).first()
    if row is None:
        return None
    value = row.value
    return json.loads(value) if isinstance(value, str | bytes) else value


class _FromReturnValue(BaseOperatorLink):
    builders: dict[str, Callable[[str, dict[str, Any]], str | None]] = {}
    # A failed task has no return value; it may leave its artefact under the "report" key instead.
    keys: tuple[str, ...] = ("return_value",)

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        build = self.builders.get(ti_key.task_id)
        if build is None or "__" not in ti_key.dag_id:
            return ""
        for key in self.keys:
            value = _xcom(ti_key, key)
            if isinstance(value, dict):
                return build(ti_key.dag_id.split("__")[0], value) or ""
        return ""


def _version_url(model: str, version: Any) -> str | None:
    return f"{_mlflow_ui()}/#/models/{model}/versions/{version}" if version else None


class MlflowRunLink(_FromReturnValue):
    name = "MLflow run"
    builders = {
        "train_challenger": lambda model, v: (
            f"{_mlflow_ui()}/#/experiments/{v['experiment_id']}/runs/{v['run_id']}"
            if v.get("experiment_id") and v.get("run_id")
            else None
        ),
        "check_drift": lambda model, v: (
            f"{_mlflow_ui()}/#/experiments/{v['experiment_id']}/runs/{v['mlflow_run_id']}"
            if v.get("experiment_id") and v.get("mlflow_run_id")
            else None
        ),
    }


class ModelVersionLink(_FromReturnValue):
    name = "Model version"
    builders = {
        "register_challenger": lambda model, v: _version_url(model, v.get("version")),
        "promote_champion": lambda model, v: _version_url(model, v.get("version")),
        "deploy_champion": lambda model, v: _version_url(model, v.get("version")),
        "roll_back": lambda model, v: _version_url(model, v.get("to")),
        "check_drift": lambda model, v: _version_url(model, v.get("champion_version")),
    }


def _report(model: str, uri: Any) -> str | None:
    from cd4ml.airflow.ui import report_link

    return report_link(model, uri) if isinstance(uri, str) else None


class DataDocsLink(_FromReturnValue):
    name = "Data Docs"
    builders = {"validate_batches": lambda model, v: _report(model, v.get("docs_url"))}
    keys = ("return_value", "report")


class EvidentlyReportLink(_FromReturnValue):
    name = "Evidently report"
    builders = {"check_drift": lambda model, v: _report(model, v.get("report_uri"))}


def _app() -> Any:
    from cd4ml.airflow.ui import create_app

    return create_app()


class Cd4mlPlugin(AirflowPlugin):
    name = "cd4ml"
    global_operator_extra_links = [MlflowRunLink(), ModelVersionLink(), DataDocsLink(), EvidentlyReportLink()]
    fastapi_apps = [{"app": _app(), "url_prefix": "/cd4ml", "name": "cd4ml models and reports"}]
    external_views = [
        {
            "name": "Models",
            "href": "cd4ml/models",
            "destination": "nav",
            "url_route": "cd4ml-models",
            "nav_top_level": True,
        },
        {  # a "Model" tab on each cd4ml DAG: the same view, for that DAG's model only
            "name": "Model",
            "href": "cd4ml/models?dag_id={DAG_ID}",
            "destination": "dag",
            "url_route": "cd4ml-model",
        },
    ]
