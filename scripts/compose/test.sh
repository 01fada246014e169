#!/usr/bin/env bash
# `make test-compose`: docker-compose.yaml under a real Docker engine, from no engine installed.
# Starts the engine if none answers (and stops it at the end only if it started it here), builds
# the images with the engine's layer cache, then runs tests/compose against one compose project.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
STATE=${CD4ML_COMPOSE_STATE:-$ROOT/.cd4ml/compose}
mkdir -p "$STATE"
started_engine=0
if ! docker info >/dev/null 2>&1; then
  scripts/compose/engine.sh start
  started_engine=1
fi
cleanup() {
  if [ "$started_engine" = 1 ] && [ "${CD4ML_KEEP_ENGINE:-0}" != 1 ]; then scripts/compose/engine.sh stop; fi
}
trap cleanup EXIT
scripts/compose/compose-bin.sh >/dev/null
t0=$(date +%s)
scripts/compose/build-images.sh
echo "test-compose: images built in $(($(date +%s) - t0)) s; cd4ml image $(docker image inspect -f '{{.Size}}' "${CD4ML_IMAGE:-cd4ml:local}" | awk '{printf "%.2f GB", $1/1e9}')"
CD4ML_COMPOSE_TEST=1 "$ROOT/.venv/bin/pytest" tests/compose -p no:cacheprovider -s -q "$@"
