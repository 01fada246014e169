# One image for every cd4ml service in docker-compose.yaml: Airflow components, MLflow, workers.
FROM apache/airflow:3.3.2-python3.11
COPY --chown=airflow:root requirements.txt constraints.txt /opt/cd4ml/
RUN pip install --no-cache-dir -c /opt/cd4ml/constraints.txt -r /opt/cd4ml/requirements.txt
COPY --chown=airflow:root pyproject.toml /opt/cd4ml/
COPY --chown=airflow:root include /opt/cd4ml/include
RUN pip install --no-cache-dir --no-deps -e /opt/cd4ml
