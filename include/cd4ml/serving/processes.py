"""`cd4ml serve --workers N`: N uvicorn processes on one port, each with its own listening socket.

uvicorn's own `workers=N` shares one listening socket between its processes, and whichever process
wakes first takes the connection: measured with 8 keep-alive connections opened together (issue 16's
benchmark), all 8 landed on one of 2 processes in 5 of 28 runs, leaving the other idle. Here every
process binds the port itself with SO_REUSEPORT, so the kernel spreads new connections over the
processes by a hash of each connection's addresses. A process that dies is replaced (its socket
closes with it, so no connection waits on a socket nobody accepts from); one that fails while
starting three times in a row stops the service, with the reason in its log. SIGTERM or SIGINT
stops every process gracefully (each drains its prediction log).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from cd4ml.core.errors import Cd4mlError

log = logging.getLogger(__name__)
APP = "cd4ml.serving.app:create_app"
QUICK_FAILURE_SECONDS = 20.0  # a process that exits this soon after it started failed to start
QUICK_FAILURES = 3  # in a row: the settings or the port are wrong, not the process
HUNG_SECONDS = 20.0  # a process that has published nothing for this long is hung (it does every 0.25 s)


class PortInUseError(Cd4mlError):
    """The service's port is taken (by another program, or a `cd4ml serve` still running)."""


def _address(host: str, port: int) -> tuple[socket.AddressFamily, Any]:
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]  # fmt: skip
    except OSError as err:
        raise PortInUseError(f"cannot listen on {host}:{port}: {err} (CD4ML_SERVICE_HOST)") from None
    return family, address


def _socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family, address = _address(host, port)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise PortInUseError(f"cannot listen on {host}:{port}: {err} (CD4ML_SERVICE_HOST)") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise PortInUseError(f"cannot listen on {host}:{port}: {err.strerror} (CD4ML_SERVICE_PORT)") from None
    return sock


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) that the other processes bind too (SO_REUSEPORT)."""
    return _socket(host, port, reuse_port=True)


def check_free(host: str, port: int) -> None:
    """Fail once, clearly, if anything listens on the port already (an older `cd4ml serve` too: the
    processes' SO_REUSEPORT would otherwise share the port with it)."""
    _socket(host, port, reuse_port=False).close()


def _worker(options: dict[str, Any]) -> None:  # pragma: no cover - runs in the spawned process
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = bind(options["host"], options["port"])
    config = uvicorn.Config(APP, factory=True, **options)
    uvicorn.Server(config).run(sockets=[sock])


def _forget(pid: int | None) -> None:
    """A process that died without shutting down: its live-mode gauges (prometheus_client's
    multiprocess files) must not count any more, as a clean shutdown removes them."""
    if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def _silent_for(reports: Path | None, pid: int | None) -> float:
    """Seconds since process `pid` last published its state (0 until it first has: a process that
    is still loading its models at start-up is not hung)."""
    if reports is None or pid is None:
        return 0.0
    try:
        return time.time() - (reports / f"{pid}.json").stat().st_mtime
    except FileNotFoundError:
        return 0.0


def supervise(workers: int, options: dict[str, Any], reports: Path | None = None) -> int:
    """Run `workers` processes until SIGTERM/SIGINT; the exit status (0, or 1 if they kept failing).

    `reports`: the folder where each process publishes its state (`workers.Board.workers_dir`); a
    process that stopped publishing for `HUNG_SECONDS` (stopped, deadlocked: its socket would keep
    taking its share of new connections) is killed and replaced."""
    check_free(options["host"], options["port"])
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def start() -> tuple[BaseProcess, float]:
        process = context.Process(target=_worker, args=(options,), name="cd4ml-serve", daemon=False)
        process.start()
        return process, time.monotonic()

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    running = [start() for _ in range(workers)]
    log.info("cd4ml serve: %d processes on %s:%s", workers, options["host"], options["port"])
    failures, status = 0, 0
    while not stopping.wait(0.5):
        for i, (process, began) in enumerate(running):
            silent = _silent_for(reports, process.pid) if process.is_alive() else 0.0
            if silent > HUNG_SECONDS:
                log.error("service process %s has not reported for %.0f s: killing it", process.pid, silent)
                process.kill()
                process.join(timeout=10)
            if process.is_alive() or stopping.is_set():
                continue
            if process.exitcode == 0 and stopping.wait(1.0):
                break  # it was stopped with the rest of its process group (SIGTERM to the group)
            quick = time.monotonic() - began < QUICK_FAILURE_SECONDS and process.exitcode != 0
            failures = failures + 1 if quick else 0
            log.warning(
                "service process %s exited (code %s); starting another", process.pid, process.exitcode
            )
            _forget(process.pid)
            if failures >= QUICK_FAILURES:
                log.error("service processes fail at start-up (%d in a row): stopping; see the log above",
                          failures)  # fmt: skip
                stopping.set()
                status = 1
                break
            running[i] = start()
    for process, _ in running:
        if process.is_alive():
            process.terminate()  # SIGTERM: uvicorn shuts down gracefully (a second one does no harm)
    deadline = time.monotonic() + 40
    for process, _ in running:
        process.join(timeout=max(0.1, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    sys.stdout.flush()
    return status
