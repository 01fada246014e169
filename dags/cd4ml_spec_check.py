"""Surfaces broken model specs as an Airflow import error that names the file and the field.

This file defines no DAG when every spec is valid. When one is broken, importing it fails with the
spec errors, which the Airflow UI lists under "DAG Import Errors"; the other models' DAGs still
load from `cd4ml_models.py`.
"""

from __future__ import annotations

from cd4ml.airflow.factory import spec_errors
from cd4ml.core.errors import SpecError

_errors = spec_errors()
if _errors:
    raise SpecError("Broken cd4ml model spec(s); their DAGs are not loaded:\n" + "\n".join(_errors.values()))
