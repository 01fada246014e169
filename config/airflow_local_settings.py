# Airflow imports this module in every component (the embedded stack copies it into
# $AIRFLOW_HOME/config; the Dockerfile into /opt/airflow/config). Only the components that fork task
# processes preload the ML stack: the scheduler with LocalExecutor, Celery workers.
# See cd4ml/airflow/preload.py.
import os
import sys

from cd4ml.airflow.preload import preload_if_forking_tasks
from cd4ml.core.telemetry import airflow_trace_env

# OpenTelemetry: the standard OTEL_* variables switch Airflow's traces on ([traces] otel_on, read
# right after this module) with the exporter of their protocol; nothing when no endpoint is set.
os.environ.update(airflow_trace_env(os.environ))

# With CeleryExecutor the scheduler only queues tasks; preloading there costs a core for nothing.
if not (sys.argv[1:2] == ["scheduler"] and os.environ.get("AIRFLOW__CORE__EXECUTOR") == "CeleryExecutor"):
    preload_if_forking_tasks()
