"""Local processes run the way compose runs containers: in depends_on order, watched, stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path

from cd4ml_dev import compose
from cd4ml_dev.scale.common import PROVIDED, ScaleError
from cd4ml_dev.scale.health import HealthChecks
from cd4ml_dev.scale.plan import Process


class Supervisor:
    """Starts each process once its depends_on conditions hold, and stops every process group."""

    def __init__(self, root: Path, services: Mapping[str, compose.Service], health: HealthChecks) -> None:
        self.root = root
        self.logs = root / "logs"
        self.services = services
        self.health = health
        self.processes: list[Process] = []
        self.events: list[tuple[float, str, str]] = []  # (seconds since run's `since`, process, what)
        self._t0 = time.monotonic()

    def _event(self, proc: Process, what: str) -> None:
        self.events.append((round(time.monotonic() - self._t0, 1), proc.name, what))

    def _start(self, proc: Process) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        proc.log = (self.logs / f"{proc.name}.log").open("ab")
        proc.popen = subprocess.Popen(
            proc.argv, env=proc.env, cwd=self.root, stdout=proc.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self._event(proc, "started")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _condition_met(self, service: str, condition: str) -> bool:
        if service in PROVIDED:
            return True  # checked (and private databases created) before anything starts
        replicas = [p for p in self.processes if p.service == service]
        if condition == "service_completed_successfully":
            return all(p.exit_code == 0 for p in replicas)
        if condition == "service_healthy":
            return all(p.started and p.healthy for p in replicas)
        return all(p.started for p in replicas)

    def check_alive(self) -> None:
        """Raise, with its log, if a long-running process has exited (compose would restart it)."""
        for proc in self.processes:
            code = proc.exit_code
            if code is not None and (code != 0 or not proc.oneshot):
                raise ScaleError(
                    f"{proc.name} exited with code {code}: {' '.join(proc.argv)}\n{self.log_tail(proc.name)}"
                )

    def run(self, processes: list[Process], timeout: float, since: float) -> None:
        """Start `processes` and return once every one is healthy (or, if one-shot, done)."""
        self._t0 = since
        self.processes = processes
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            for proc in self.processes:
                was = proc.healthy or proc.exit_code == 0
                self.health.probe(proc)
                if not was and (proc.healthy or proc.exit_code == 0):
                    self._event(proc, "healthy" if proc.healthy else "completed")
                if not proc.started:
                    deps = self.services[proc.service].depends_on
                    if all(self._condition_met(d, c) for d, c in deps.items()):
                        self._start(proc)
            if all((p.exit_code == 0) if p.oneshot else p.healthy for p in self.processes):
                return
            if time.monotonic() > deadline:
                waiting = [p.name for p in self.processes if not (p.healthy or p.exit_code == 0)]
                raise ScaleError(f"not up within {timeout:.0f}s: {waiting}; logs in {self.logs}")
            time.sleep(0.3)

    def stop(self, grace: float = 5) -> None:
        """SIGTERM every process group, SIGKILL what is left after `grace` seconds. Idempotent."""
        running = [p for p in self.processes if p.popen is not None and p.exit_code is None]
        for proc in running:
            assert proc.popen is not None
            with suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in running:
            assert proc.popen is not None
            with suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            # Children (task processes, pool workers) share the group; none may outlive the run.
            with suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)
        for proc in self.processes:
            if proc.log:
                proc.log.close()
