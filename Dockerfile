# One image for every cd4ml service in docker-compose.yaml: the Airflow components, the Celery
# workers, MLflow and the prediction service. Same pins as the local venv (constraints.txt).
FROM apache/airflow:3.3.2-python3.11

USER root
# Mount points of the named volumes: a new volume takes the owner and mode of the directory it
# covers, so the containers' user (AIRFLOW_UID, group 0) can write data, artifacts, logs and the login.
RUN mkdir -p /data /mlflow-artifacts /opt/airflow/auth /opt/airflow/logs /opt/cd4ml \
    && chown -R airflow:0 /data /mlflow-artifacts /opt/airflow/auth /opt/airflow/logs /opt/cd4ml \
    && chmod -R g+rwX /data /mlflow-artifacts /opt/airflow/auth /opt/airflow/logs
USER airflow

COPY --chown=airflow:0 requirements.txt constraints.txt /opt/cd4ml/
RUN pip install --no-cache-dir -c /opt/cd4ml/constraints.txt -r /opt/cd4ml/requirements.txt
COPY --chown=airflow:0 pyproject.toml /opt/cd4ml/
COPY --chown=airflow:0 include /opt/cd4ml/include
COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 plugins /opt/airflow/plugins
# Editable: compose mounts ./include over /opt/cd4ml/include, so code edits need no rebuild.
RUN pip install --no-cache-dir --no-deps -e /opt/cd4ml
# Schedulers and Celery workers pre-import the ML stack once, so forked tasks start warm
# (the same airflow_local_settings.py the embedded stack writes; see cd4ml/airflow/preload.py).
RUN mkdir -p /opt/airflow/config && python -c "import pathlib, cd4ml.stack as s; \
pathlib.Path('/opt/airflow/config/airflow_local_settings.py').write_text(s.LOCAL_SETTINGS)"
