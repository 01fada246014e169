# One image for every cd4ml service in docker-compose.yaml: the Airflow components, the Celery
# workers, MLflow and the prediction service. Same pins as the local venv (constraints.txt).
#
# BASE_IMAGE is any Debian bookworm image with Python 3.11 and `python3 -m venv`: the official
# python:3.11-slim-bookworm by default; scripts/compose/build-images.sh passes a locally built one
# where no registry is reachable. WHEELHOUSE_URL: a pip --find-links page to install from offline
# instead of the package index (build-images.sh serves its wheelhouse on 127.0.0.1 during the build,
# so the wheels never become a layer and the venv is built where it stays: one stage, no 1.5 GB copy).
ARG BASE_IMAGE=python:3.11-slim-bookworm

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
COPY requirements.txt constraints.txt /opt/cd4ml/
ARG WHEELHOUSE_URL=""
RUN set -eu; python3 -m venv /opt/venv; \
    if [ -n "$WHEELHOUSE_URL" ]; then \
      host=$(echo "$WHEELHOUSE_URL" | sed -E 's#^[a-z]+://([^/:]+).*#\1#'); \
      src="--no-index --find-links $WHEELHOUSE_URL --trusted-host $host"; \
    else src=""; fi; \
    /opt/venv/bin/pip install --quiet --no-cache-dir $src -c /opt/cd4ml/constraints.txt \
        -r /opt/cd4ml/requirements.txt "setuptools>=68"
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
