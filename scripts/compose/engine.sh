#!/usr/bin/env bash
# Makes sure a Docker engine answers on this machine, and stops only what this script started.
#
#   scripts/compose/engine.sh start   # install docker.io if missing, start dockerd if not running
#   scripts/compose/engine.sh stop    # stop dockerd only if `start` started it (pid file below)
#
# The engine runs with --bridge=none and without iptables: these machines have no NAT for
# containers. Containers on a compose (user-defined) network still reach each other by name, and
# builds that need the network use `docker build --network host`.
set -euo pipefail

STATE_DIR=${CD4ML_COMPOSE_STATE:-$(cd "$(dirname "$0")/../.." && pwd)/.cd4ml/compose}
PID_FILE=$STATE_DIR/dockerd.pid
LOG_FILE=$STATE_DIR/dockerd.log
WAIT_SECONDS=${CD4ML_ENGINE_WAIT:-60}

die() { echo "engine.sh: $*" >&2; exit 1; }

sudo_cmd() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

engine_answers() { docker info >/dev/null 2>&1; }

install_engine() {
  command -v apt-get >/dev/null || die "no Docker engine and no apt-get to install Debian's docker.io: install Docker, then rerun"
  echo "engine.sh: installing Debian's docker.io and debootstrap" >&2
  sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive sudo_cmd apt-get install -y -qq docker.io debootstrap >/dev/null
}

start() {
  mkdir -p "$STATE_DIR"
  if engine_answers; then
    echo "engine.sh: a Docker engine is already running; leaving it alone" >&2
    return 0
  fi
  command -v dockerd >/dev/null && command -v debootstrap >/dev/null || install_engine
  [ "$(id -u)" = 0 ] || die "starting dockerd needs root (run as root, or start your own engine first)"
  # setsid: the engine must outlive this shell and make's process group.
  setsid dockerd --iptables=false --ip-forward=false --bridge=none \
    --pidfile "$STATE_DIR/dockerd.real.pid" >"$LOG_FILE" 2>&1 < /dev/null &
  echo $! >"$PID_FILE"
  for _ in $(seq "$WAIT_SECONDS"); do
    engine_answers && { echo "engine.sh: dockerd started (pid $(cat "$PID_FILE"), log $LOG_FILE)" >&2; return 0; }
    kill -0 "$(cat "$PID_FILE")" 2>/dev/null || { tail -20 "$LOG_FILE" >&2; rm -f "$PID_FILE"; die "dockerd exited at start-up (log above: $LOG_FILE)"; }
    sleep 1
  done
  tail -20 "$LOG_FILE" >&2
  die "dockerd did not answer within ${WAIT_SECONDS}s (CD4ML_ENGINE_WAIT); log: $LOG_FILE"
}

stop() {
  if [ ! -f "$PID_FILE" ]; then
    echo "engine.sh: this script did not start the running engine (no $PID_FILE); leaving it alone" >&2
    return 0
  fi
  pid=$(cat "$PID_FILE")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && die "dockerd (pid $pid) still runs 30 s after SIGTERM"
  fi
  rm -f "$PID_FILE"
  echo "engine.sh: stopped the dockerd this script started (pid $pid)" >&2
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) die "usage: $0 start|stop" ;;
esac
