"""cd4ml model DAGs: `<model>__train`, `__monitor`, `__rollback`, `__retract`, `__score` per model spec.

Specs live in include/specs (or $CD4ML_SPECS_DIR).

Thin on purpose: the DAG factory reads the YAML specs (pydantic, no ML imports) and builds the
DAGs; all ML work happens inside tasks. A broken spec is skipped here and reported as an import
error of `cd4ml_spec_check.py`, so one bad file never takes the other models' DAGs down.
"""

from __future__ import annotations

from cd4ml.airflow.factory import build_dags

globals().update(build_dags())
