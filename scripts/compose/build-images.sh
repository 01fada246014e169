#!/usr/bin/env bash
# Builds every image docker-compose.yaml needs without a registry, reusing what already exists:
#   cd4ml-local/debian:bookworm   debootstrap --variant=minbase, imported (only when missing)
#   cd4ml-local/python:3.11       stand-in for python:3.11-slim-bookworm
#   cd4ml-local/postgres:15       stand-in for postgres:16
#   cd4ml-local/redis:7           stand-in for redis:7.2-bookworm
#   ${CD4ML_IMAGE:-cd4ml:local}   ./Dockerfile on cd4ml-local/python:3.11, pip offline from the
#                                 wheelhouse in .cd4ml/compose/wheels (built here from constraints.txt,
#                                 served to the build on 127.0.0.1),
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

base_image() {  # debootstrap bookworm -> $DEBIAN_IMAGE (network-bound: runs beside the wheelhouse)
  have_image "$DEBIAN_IMAGE" && return 0
  local rootfs
  rootfs=$(mktemp -d "${TMPDIR:-/tmp}/cd4ml-rootfs.XXXXXX")
  echo "build-images.sh: debootstrap bookworm -> $DEBIAN_IMAGE" >&2
  if ! debootstrap --variant=minbase bookworm "$rootfs" >"$STATE/debootstrap.log" 2>&1; then
    rm -rf "$rootfs"; tail -20 "$STATE/debootstrap.log" >&2
    echo "build-images.sh: debootstrap failed (log: $STATE/debootstrap.log)" >&2; return 1
  fi
  tar -C "$rootfs" -c . | docker import - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$rootfs"
}

# pip evaluates markers for the host's Python, not the image's: async-timeout (needed by redis below
# Python 3.11.3, i.e. Debian's 3.11.2) is named explicitly so the offline install finds it.
# Keyed by the pins: the wheelhouse is rebuilt only when requirements.txt or constraints.txt change.
wheelhouse() {
  local key
  key=$(cat requirements.txt constraints.txt scripts/compose/build-images.sh | sha256sum | cut -c1-16)
  [ "$(cat "$WHEELS/.key" 2>/dev/null)" = "$key" ] && return 0
  echo "build-images.sh: wheelhouse from constraints.txt -> $WHEELS" >&2
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  "$PIP" wheel --quiet --disable-pip-version-check -w "$WHEELS" -c constraints.txt \
    -r requirements.txt "setuptools>=68" async-timeout 2>&1 | grep -v "is ignored" >&2 || true
  ls "$WHEELS"/apache_airflow-*.whl >/dev/null 2>&1 \
    || { echo "build-images.sh: the wheelhouse build failed (no apache_airflow wheel in $WHEELS)" >&2; return 1; }
  echo "$key" >"$WHEELS/.key"
}

# Jobs that only wait on the network or the disk run side by side; `wait PID` returns each one's
# status, so a failure in either stops the build with its own message above.
mkdir -p "$STATE"
base_image & base_pid=$!
wheelhouse & wheels_pid=$!
wait "$base_pid" || exit 1
wait "$wheels_pid" || exit 1

build() {  # build TAG CONTEXT [ARGS...]: the network only for apt inside the build
  local tag=$1 ctx=$2; shift 2
  echo "build-images.sh: $tag" >&2
  DOCKER_BUILDKIT=0 docker build --quiet --network host --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" \
    -t "$tag" "$@" "$ctx" >/dev/null
}
# The three stand-ins spend their time in apt downloads: built side by side.
pids=()
for spec in python:3.11:python postgres:15:postgres redis:7:redis; do
  build "cd4ml-local/${spec%:*}" "$IMAGES/${spec##*:}" & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || { echo "build-images.sh: a base image failed (above)" >&2; exit 1; }; done
# The commit goes into the image (CD4ML_CODE_VERSION): there is no .git inside to ask.
code_version=${CD4ML_CODE_VERSION:-$(git rev-parse HEAD 2>/dev/null || true)}
if [ -z "${CD4ML_CODE_VERSION:-}" ] && [ -n "$code_version" ] \
    && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  code_version="$code_version-dirty"
fi
[ -n "$code_version" ] || echo "build-images.sh: not a git checkout; the image records the package version" >&2
# The wheelhouse reaches the build over 127.0.0.1 (the build runs with --network host): the wheels
# never become a layer. A fixed port keeps WHEELHOUSE_URL, and so the pip layer's cache key, stable.
port=${CD4ML_WHEELHOUSE_PORT:-38765}
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "build-images.sh: port $port is taken; set CD4ML_WHEELHOUSE_PORT to a free one" >&2; exit 1
fi
"$ROOT/.venv/bin/python" -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$port" \
  >"$STATE/wheelhouse-http.log" 2>&1 & server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
build "$CD4ML_IMAGE" . --build-arg BASE_IMAGE=cd4ml-local/python:3.11 --build-arg CD4ML_CODE_VERSION="$code_version" \
  --build-arg WHEELHOUSE_URL="http://127.0.0.1:$port/"
echo "build-images.sh: images ready in $(($(date +%s) - t0)) s" >&2
