"""The DAG factory: one set of DAGs per model spec, a broken spec reported without hiding the others."""

from __future__ import annotations

import logging
from pathlib import Path

from airflow.sdk import DAG

from cd4ml.core.settings import Settings, get_settings
from cd4ml.core.spec import load_specs, spec_files

log = logging.getLogger(__name__)


def build_dags(settings: Settings | None = None) -> dict[str, DAG]:
    """Every valid spec's DAGs, by dag_id. Broken specs are skipped here (see `spec_errors`)."""
    from cd4ml.airflow.monitor_dag import build_monitor_dag
    from cd4ml.airflow.retract_dag import build_retract_dag
    from cd4ml.airflow.rollback_dag import build_rollback_dag
    from cd4ml.airflow.score_dag import build_score_dag
    from cd4ml.airflow.train_dag import build_train_dag

    settings = settings or get_settings()
    specs, errors = load_specs(spec_files(settings.specs_dir))
    for path, err in errors.items():
        log.error("Skipping the DAGs of %s: %s", path, err)
    dags: dict[str, DAG] = {}
    for spec in specs:
        built_dags = (
            build_train_dag(spec, settings),
            build_monitor_dag(spec, settings),
            build_rollback_dag(spec, settings),
            build_retract_dag(spec, settings),
            build_score_dag(spec, settings),
        )
        for built in built_dags:
            dags[built.dag_id] = built
    return dags


def spec_errors(settings: Settings | None = None) -> dict[Path, str]:
    settings = settings or get_settings()
    if not settings.specs_dir.is_dir():
        return {
            settings.specs_dir: f"{settings.specs_dir}: the specs directory does not exist (CD4ML_SPECS_DIR)"
        }
    _, errors = load_specs(spec_files(settings.specs_dir))
    return {path: str(err) for path, err in errors.items()}
