# Airflow imports this module in every component (the embedded stack copies it into
# $AIRFLOW_HOME/config; the Dockerfile into /opt/airflow/config). Only the components that fork task
# processes preload the ML stack: the scheduler with LocalExecutor, Celery workers.
# See cd4ml/airflow/preload.py.
import os
import sys

from cd4ml.airflow.preload import preload_if_forking_tasks

# With CeleryExecutor the scheduler only queues tasks; preloading there costs a core for nothing.
if not (sys.argv[1:2] == ["scheduler"] and os.environ.get("AIRFLOW__CORE__EXECUTOR") == "CeleryExecutor"):
    preload_if_forking_tasks()
