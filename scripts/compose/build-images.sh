#!/usr/bin/env bash
# Builds every image docker-compose.yaml needs without a registry, reusing what already exists:
#   cd4ml-local/debian:bookworm   debootstrap --variant=minbase, imported (only when missing)
#   cd4ml-local/python:3.11       stand-in for python:3.11-slim-bookworm
#   cd4ml-local/postgres:15       stand-in for postgres:16
#   cd4ml-local/redis:7           stand-in for redis:7.2-bookworm
#   ${CD4ML_IMAGE:-cd4ml:local}   ./Dockerfile on cd4ml-local/python:3.11, pip offline from the
#                                 wheelhouse in .cd4ml/compose/wheels (built here from constraints.txt),
#                                 with this checkout's commit (+ -dirty) baked in as CD4ML_CODE_VERSION
# Layers are cached by the engine: a second run with unchanged inputs rebuilds nothing.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
IMAGES=scripts/compose/images
DEBIAN_IMAGE=cd4ml-local/debian:bookworm
CD4ML_IMAGE=${CD4ML_IMAGE:-cd4ml:local}
STATE=${CD4ML_COMPOSE_STATE:-$ROOT/.cd4ml/compose}
WHEELS=$ROOT/.cd4ml/compose/wheels
PIP=${PIP:-$ROOT/.venv/bin/pip}

t0=$(date +%s)
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if ! have_image "$DEBIAN_IMAGE"; then
  rootfs=$(mktemp -d "${TMPDIR:-/tmp}/cd4ml-rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  echo "build-images.sh: debootstrap bookworm -> $DEBIAN_IMAGE" >&2
  debootstrap --variant=minbase bookworm "$rootfs" >"$STATE/debootstrap.log" 2>&1 \
    || { tail -20 "$STATE/debootstrap.log" >&2; echo "build-images.sh: debootstrap failed (log: $STATE/debootstrap.log)" >&2; exit 1; }
  tar -C "$rootfs" -c . | docker import - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
fi

# pip evaluates markers for the host's Python, not the image's: async-timeout (needed by redis below
# Python 3.11.3, i.e. Debian's 3.11.2) is named explicitly so the offline install finds it.
# Keyed by the pins: the wheelhouse is rebuilt only when requirements.txt or constraints.txt change.
key=$(cat requirements.txt constraints.txt scripts/compose/build-images.sh | sha256sum | cut -c1-16)
if [ "$(cat "$WHEELS/.key" 2>/dev/null)" != "$key" ]; then
  echo "build-images.sh: wheelhouse from constraints.txt -> $WHEELS" >&2
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  "$PIP" wheel --quiet --disable-pip-version-check -w "$WHEELS" -c constraints.txt \
    -r requirements.txt "setuptools>=68" async-timeout 2>&1 | grep -v "is ignored" >&2 || true
  ls "$WHEELS"/apache_airflow-*.whl >/dev/null 2>&1 \
    || { echo "build-images.sh: the wheelhouse build failed (no apache_airflow wheel in $WHEELS)" >&2; exit 1; }
  echo "$key" >"$WHEELS/.key"
fi

build() {  # build TAG CONTEXT [ARGS...]: the network only for apt inside the build
  local tag=$1 ctx=$2; shift 2
  echo "build-images.sh: $tag" >&2
  DOCKER_BUILDKIT=0 docker build --quiet --network host --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" \
    -t "$tag" "$@" "$ctx" >/dev/null
}
build cd4ml-local/python:3.11 "$IMAGES/python"
build cd4ml-local/postgres:15 "$IMAGES/postgres"
build cd4ml-local/redis:7 "$IMAGES/redis"
# The commit goes into the image (CD4ML_CODE_VERSION): there is no .git inside to ask.
code_version=${CD4ML_CODE_VERSION:-$(git rev-parse HEAD 2>/dev/null || true)}
if [ -z "${CD4ML_CODE_VERSION:-}" ] && [ -n "$code_version" ] \
    && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  code_version="$code_version-dirty"
fi
[ -n "$code_version" ] || echo "build-images.sh: not a git checkout; the image records the package version" >&2
build "$CD4ML_IMAGE" . --build-arg BASE_IMAGE=cd4ml-local/python:3.11 --build-arg CD4ML_CODE_VERSION="$code_version"
echo "build-images.sh: images ready in $(($(date +%s) - t0)) s" >&2
