# One image for every cd4ml service in docker-compose.yaml: the Airflow components, the Celery
# workers, MLflow and the prediction service. Same pins as the local venv (constraints.txt).
#
# BASE_IMAGE is any Debian bookworm image with Python 3.11 and `python3 -m venv`: the official
# python:3.11-slim-bookworm by default; scripts/compose/build-images.sh passes a locally built one
# where no registry is reachable. If .cd4ml/compose/wheels/ holds a wheelhouse (`make wheelhouse`),
# pip installs from it offline; otherwise from the package index.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS deps
RUN python3 -m venv /opt/venv
COPY requirements.txt constraints.txt /opt/cd4ml/
# The glob matches nothing when there is no wheelhouse; constraints.txt keeps the COPY valid.
COPY constraints.txt .cd4ml/compose/wheel[s] /opt/wheelhouse/
RUN set -eu; \
    if ls /opt/wheelhouse/*.whl >/dev/null 2>&1; then src="--no-index --find-links /opt/wheelhouse"; \
    else src="--no-cache-dir"; fi; \
    /opt/venv/bin/pip install --quiet $src -c /opt/cd4ml/constraints.txt \
        -r /opt/cd4ml/requirements.txt "setuptools>=68"

FROM ${BASE_IMAGE}
# curl: the health checks; dumb-init: PID 1 that forwards signals (Celery's warm shutdown).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends curl dumb-init \
    && rm -rf /var/lib/apt/lists/*
# uid 50000, group 0 as in Airflow's image. Named volumes take the owner and mode of the directory
# they cover on first use, so these mount points decide who can write data, artifacts and logs.
RUN useradd --uid 50000 --gid 0 --home-dir /opt/airflow --no-create-home --shell /bin/bash airflow \
    && mkdir -p /data /mlflow-artifacts /opt/airflow/logs /opt/airflow/dags /opt/airflow/plugins \
       /opt/airflow/config /opt/cd4ml \
    && chown -R airflow:0 /data /mlflow-artifacts /opt/airflow /opt/cd4ml \
    && chmod -R g+rwX /data /mlflow-artifacts /opt/airflow /opt/cd4ml
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    AIRFLOW_HOME=/opt/airflow \
    PYTHONUNBUFFERED=1
WORKDIR /opt/airflow
# constraints.txt: the lock whose hash every model version records (cd4ml.lock_hash).
COPY --chown=airflow:0 pyproject.toml constraints.txt /opt/cd4ml/
COPY --chown=airflow:0 include /opt/cd4ml/include
# Editable: compose mounts ./include over /opt/cd4ml/include, so code edits need no rebuild.
RUN pip install --quiet --no-deps --no-index --no-build-isolation -e /opt/cd4ml \
    && rm -rf /opt/cd4ml/build
USER airflow
# Schedulers and Celery workers pre-import the ML stack once, so forked tasks start warm
# (the same committed file the embedded stack copies; see cd4ml/airflow/preload.py).
COPY --chown=airflow:0 config/airflow_local_settings.py /opt/airflow/config/airflow_local_settings.py
COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 plugins /opt/airflow/plugins
# The commit this image was built from (scripts/compose/build-images.sh passes `git rev-parse HEAD`,
# with -dirty for local changes): there is no .git in the image, and every model version records
# it as cd4ml.code_version. Last, so a new commit rebuilds no earlier layer. Compose's development
# mount of ./include can run newer code than this commit; a release image has no such mount.
ARG CD4ML_CODE_VERSION=""
ENV CD4ML_CODE_VERSION=${CD4ML_CODE_VERSION}
LABEL org.opencontainers.image.revision=${CD4ML_CODE_VERSION}
ENTRYPOINT ["/usr/bin/dumb-init", "--"]
CMD ["airflow", "version"]
