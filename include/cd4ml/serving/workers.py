"""N processes of the prediction service (`CD4ML_SERVICE_WORKERS`) on one port, answering as one.

`cd4ml.serving.processes` starts N uvicorn processes on one port and each connection reaches one of
them, so whatever a deploy, a probe or Prometheus asks must hold for all of them, whichever answers.
Each worker publishes its state every `TICK` seconds to `<state dir>/workers/<pid>.json` (`Board`),
and any worker answers for all (`Fleet`):

- readiness: ready only while `workers` processes are live (published within `LIVE_SECONDS`) and
  each has every spec'd champion loaded;
- `/v1/models/<m>`: `serving_versions` over every process (a deploy waits until that is one
  version), `staged_version` only once every process staged it, every process's refusals;
- the canary's status: both sides' counts summed and their latencies merged over every process;
- `/metrics`: prometheus_client's multiprocess mode, in `<state dir>/prometheus`.

Admin actions that change a process's memory are commands in `<state dir>/commands/`: the process
that receives the request acts at once, every other one within a tick. A staging PUT answers only
once every live process staged the version (or one refused it); unstaging and reloads follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.registry import Collector

from cd4ml.core.settings import Settings
from cd4ml.serving.canary import ARMS, LATENCY_WINDOW, Arm, CanaryRouting, CanaryState
from cd4ml.serving.models import ModelStore, StagingRefusedError
from cd4ml.serving.predlog import PredictionLog

log = logging.getLogger(__name__)
TICK = 0.25  # seconds between a worker's publications and command checks
LIVE_SECONDS = 5.0  # a worker that has not published for this long is not counted as live
FORGET_SECONDS = 120.0  # a dead worker's state file is removed after this long
COMMAND_TTL = 900.0  # a worker started later does not act on commands older than this
SHARED_SAMPLES = 5_000  # latest canary request times per side each worker shares
STAGING_WAIT = 25.0  # a staging PUT waits this long for every worker (then 503: the deploy retries)
RETRY_SECONDS = 5.0  # a worker retries a staging that failed transiently after this long


def _write_json(path: Path, body: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(body), encoding="utf-8")
    tmp.replace(path)  # readers see the old state or the new one, never half of one


def _running(pid: int) -> bool:
    """Whether process `pid` exists (the workers share a host; a killed one is gone at once)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # gone (a worker stopped) or replaced while read: the next tick has it
    return body if isinstance(body, dict) else None


@dataclass(frozen=True)
class Board:
    """The state folder the service's processes share (one per `cd4ml serve`)."""

    state_dir: Path
    expected: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Board | None:
        """The board of a service run as several processes (`cd4ml serve` sets the folder), else None."""
        if settings.service_workers < 2 or settings.service_state_dir is None:
            return None
        return cls(settings.service_state_dir, settings.service_workers)

    @property
    def workers_dir(self) -> Path:
        return self.state_dir / "workers"

    @property
    def commands_dir(self) -> Path:
        return self.state_dir / "commands"

    @property
    def prometheus_dir(self) -> Path:
        return self.state_dir / "prometheus"

    def prepare(self) -> None:
        for folder in (self.workers_dir, self.commands_dir, self.prometheus_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def reset(self) -> None:
        """Empty the folders of an earlier run (its metric files would add to this run's counters)."""
        import shutil

        for folder in (self.workers_dir, self.commands_dir, self.prometheus_dir):
            shutil.rmtree(folder, ignore_errors=True)
        self.prepare()

    def publish(self, state: dict[str, Any]) -> None:
        _write_json(self.workers_dir / f"{state['pid']}.json", state)

    def withdraw(self, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.workers_dir / f"{pid}.json").unlink()

    def live(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every running worker that published within `LIVE_SECONDS` (a hung one stops publishing),
        by pid; the files of stopped ones go."""
        now = time.time() if now is None else now
        states = []
        for path in sorted(self.workers_dir.glob("*.json")):
            state = _read_json(path)
            if state is None:
                continue
            age = now - float(state.get("at", 0))
            if age <= LIVE_SECONDS and _running(int(state.get("pid", 0))):
                states.append(state)
            elif age > FORGET_SECONDS or not _running(int(state.get("pid", 0))):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return states

    def command(
        self, kind: str, model: str | None, body: dict[str, Any], stamp: str | None = None
    ) -> dict[str, Any]:
        """Write a command for every worker; it carries a fresh stamp, so each acts on it once."""
        body = {**body, "stamp": stamp or uuid.uuid4().hex, "at": time.time()}
        _write_json(self.commands_dir / f"{kind}{'' if model is None else '.' + model}.json", body)
        return body

    def commands(self, kind: str) -> dict[str | None, dict[str, Any]]:
        """model (None for a service-wide command) -> the latest command of `kind`."""
        found: dict[str | None, dict[str, Any]] = {}
        for path in self.commands_dir.glob(f"{kind}*.json"):
            name = path.name.removesuffix(".json")
            if name != kind and not name.startswith(f"{kind}."):
                continue
            body = _read_json(path)
            if body is not None:
                found[None if name == kind else name[len(kind) + 1 :]] = body
        return found


# -- what every worker's state says, together (pure) -------------------------------------------------


def readiness(states: list[dict[str, Any]], expected: int) -> dict[str, Any]:
    """`ready` only when `expected` workers are live and every one serves every spec'd model."""
    waiting = sorted({m for s in states for m in s.get("known", []) if m not in (s.get("serving") or {})})
    ready = [s for s in states if s.get("known") and not set(s["known"]) - set(s.get("serving") or {})]
    return {
        "ready": len(states) >= expected and len(ready) == len(states),
        "expected": expected,
        "live": len(states),
        "ready_processes": len(ready),
        "waiting_for_champion": waiting,
        "last_poll_error": next((s["last_poll_error"] for s in states if s.get("last_poll_error")), None),
    }


def serving_versions(states: list[dict[str, Any]], model: str) -> dict[str, str | None]:
    """pid -> the version of `model` it serves (None: nothing yet)."""
    return {str(s["pid"]): (s.get("serving") or {}).get(model) for s in states}


def everywhere(states: list[dict[str, Any]], key: str, model: str, expected: int) -> str | None:
    """The version every one of `expected` live workers holds under `key` (staged, shadow), else None."""
    held = {(s.get(key) or {}).get(model) for s in states}
    return held.pop() if len(states) >= expected and len(held) == 1 else None


def refused(states: list[dict[str, Any]], model: str) -> dict[str, str]:
    """Versions of `model` any worker refuses, with its reason (unrecorded champions included)."""
    out: dict[str, str] = {}
    for s in states:
        for key, why in (s.get("refused") or {}).items():
            name, _, version = key.rpartition("/")
            if name == model:
                out[version] = why
        unrecorded = (s.get("unrecorded") or {}).get(model)
        if unrecorded:
            out[str(unrecorded[0])] = str(unrecorded[1])
    return out


def merged_canary(states: list[dict[str, Any]], model: str, expected: int) -> dict[str, Any] | None:
    """The canary's snapshot over every live worker that runs it (as `CanaryState.snapshot` gives one
    worker's): counts summed, latencies merged. None when no live worker runs a canary of `model`.

    A worker missing (restarting) or not yet following the alias leaves its share out rather than
    hiding the canary: the deploy step reads "no canary" as the alias moved away and ends it. While
    workers follow different canaries (an alias just moved), the one most of them run counts."""
    parts = [c for s in states if (c := (s.get("canary") or {}).get(model)) is not None]
    if not parts:
        return None
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in parts:
        groups.setdefault((str(c["version"]), str(c["champion_version"])), []).append(c)
    parts = max(groups.values(), key=lambda g: (len(g), max(float(c["since"]) for c in g)))
    arms = {}
    for arm in ARMS:
        merged = Arm(seconds=deque(maxlen=LATENCY_WINDOW * len(parts)))
        for c in parts:
            side = c["arms"][arm]
            merged.requests += int(side["requests"])
            merged.errors += int(side["errors"])
            merged.seconds.extend(us / 1e6 for us in side["micros"])
        arms[arm] = merged.summary()
    since = min(float(c["since"]) for c in parts)
    first = parts[0]
    return {
        "version": first["version"],
        "champion_version": first["champion_version"],
        "since": since,
        "seconds": round(time.time() - since, 3),
        "fraction": first["fraction"],
        "sticky_key": first["sticky_key"],
        "arms": arms,
        "processes": len(parts),
        "expected_processes": expected,
    }


def worker_state(store: ModelStore) -> dict[str, Any]:
    """What one worker publishes about its store (the board adds pid and time)."""
    candidates = store.candidates
    return {
        "known": list(store.known_models),
        "serving": {m: slot.version for m, slot in list(store.slots.items())},
        "staged": {m: slot.version for m, slot in list(candidates.staged.items())},
        "shadow": {m: slot.version for m, slot in list(candidates.shadows.items())},
        "canary": {m: shared_canary(c) for m, c in list(candidates.canaries.items())},
        "refused": {f"{m}/{v}": why for (m, v), why in list(store.refused.items())},
        "unrecorded": {m: list(found) for m, found in list(store.unrecorded.items())},
        "last_poll_error": store.last_poll_error,
    }


def shared_canary(state: CanaryState) -> dict[str, Any]:
    """One worker's canary as it publishes it: counts and its latest request times (microseconds)."""
    snap = state.snapshot()
    arms = {}
    for arm in ARMS:
        side = state.arms[arm]
        with state._lock:
            micros = [round(s * 1e6) for s in list(side.seconds)[-SHARED_SAMPLES:]]
        arms[arm] = {"requests": side.requests, "errors": side.errors, "micros": micros}
    return {key: snap[key] for key in ("version", "champion_version", "since", "fraction", "sticky_key")} | {
        "arms": arms
    }


# -- a worker's side ---------------------------------------------------------------------------------


@dataclass
class WorkerSync:
    """One worker's publisher and command follower (two daemon threads: a long model load while
    following a staging command never delays the publications that say this worker is alive).

    `state` builds what this worker publishes; `stage(model, version)` / `unstage(model)` /
    `reload()` act on this worker's own store; `in_use(model)` are the versions it already holds as
    champion, canary or shadow (an old staging command for one of them is done: promoted meanwhile;
    a current one is followed as one process would, loading a staged copy)."""

    board: Board
    state: Callable[[], dict[str, Any]]
    stage: Callable[[str, str], None]
    unstage: Callable[[str], object]
    reload: Callable[[], None]
    in_use: Callable[[str], set[str]]
    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    staging_errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    _followed: dict[tuple[str, str | None], str] = field(default_factory=dict)
    _retry_at: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.board.prepare()
        # Commands written before this worker started are history, except recent staging ones (a
        # worker restarted during a deploy stages what the others staged).
        for model, cmd in self.board.commands("reload").items():
            self._followed[("reload", model)] = cmd["stamp"]
        self.publish()
        for name, loop in (("publish", self._publish_loop), ("follow", self._follow_loop)):
            thread = threading.Thread(target=loop, name=f"cd4ml-worker-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop publishing and following (a model load in progress finishes on its own: daemon
        threads, not waited for long, so the prediction log drains within the stop timeout)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=1.0)
        self.board.withdraw(self.pid)

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._stop.is_set()

    def publish(self) -> None:
        body = self.state() | {"pid": self.pid, "at": time.time(), "started": self.started}
        body["staging_errors"] = dict(self.staging_errors)
        self.board.publish(body)

    def _publish_loop(self) -> None:
        while not self._stop.wait(TICK):
            try:
                self.publish()
            except Exception:  # a full disk must not stop the next attempt
                log.exception("worker %s could not publish its state", self.pid)

    def _follow_loop(self) -> None:
        while not self._stop.wait(TICK):
            try:
                self.follow()
            except Exception:  # logged; the next tick tries again
                log.exception("worker %s could not follow the service's commands", self.pid)

    def mark_followed(self, kind: str, model: str | None, command: dict[str, Any]) -> None:
        self._followed[(kind, model)] = command["stamp"]

    def order(self, kind: str, model: str | None, body: dict[str, Any]) -> str:
        """A command for every other worker (this one acts on it itself); returns its stamp."""
        stamp = uuid.uuid4().hex
        self._followed[(kind, model)] = stamp  # before it is written: this worker's follower skips it
        self.board.command(kind, model, body, stamp)
        self.publish()
        return stamp

    async def staged_everywhere(
        self, model: str, version: str, stamp: str, wait: float = STAGING_WAIT
    ) -> tuple[int, str]:
        """Once this worker staged `version` (ordered as `stamp` before it began, so the others load
        it meanwhile): (200, "") when every live worker has it; (4xx, why) if one cannot; (503, why)
        if they are not done within `wait`."""
        self.publish()
        deadline = time.monotonic() + wait
        while True:
            states = self.board.live()
            outcome = staging_outcome(states, model, version, self.board.expected, stamp)
            if outcome is not None:
                return outcome
            if time.monotonic() >= deadline:
                have = sum((st.get("staged") or {}).get(model) == version for st in states)
                errors = [(st.get("staging_errors") or {}).get(model) for st in states]
                transient = [e["error"] for e in errors if e and e.get("stamp") == stamp]
                return 503, (
                    f"staged by {have} of {self.board.expected} service processes after {wait:.0f} s "
                    f"({'; '.join(transient[:2]) if transient else 'the others are still loading it'}); "
                    "try again"
                )
            await asyncio.sleep(TICK / 2)

    def _new(self, kind: str) -> Iterator[tuple[str | None, dict[str, Any]]]:
        for model, cmd in self.board.commands(kind).items():
            if self._followed.get((kind, model)) != cmd["stamp"]:
                yield model, cmd

    def follow(self) -> None:
        for model, cmd in self._new("reload"):
            self.mark_followed("reload", model, cmd)
            self.reload()
        for model, cmd in self._new("staging"):
            assert model is not None
            version = cmd.get("version")
            if version is None:
                self.mark_followed("staging", model, cmd)
                self.unstage(model)
                self.publish()
                continue
            age = time.time() - float(cmd["at"])
            # A worker started after the deploy that staged it (within the TTL) stages it too, unless
            # it serves it already (promoted meanwhile); a current command is followed as given.
            if age > COMMAND_TTL or (age > 2 * STAGING_WAIT and version in self.in_use(model)):
                self.mark_followed("staging", model, cmd)
                continue
            if time.monotonic() < self._retry_at.get(model, 0.0):
                continue
            error = {"version": version, "stamp": cmd["stamp"]}
            try:
                self.stage(model, str(version))
            except LookupError as err:
                self.staging_errors[model] = error | {"status": 404, "error": str(err)}
            except Exception as err:  # noqa: BLE001 - reported to the PUT that waits for every worker
                refused = isinstance(err, StagingRefusedError)
                self.staging_errors[model] = error | {
                    "status": 422 if refused else 503,
                    "error": str(err) if refused else f"{type(err).__name__}: {err}",
                }
                if not refused:  # transient (MLflow unreachable): tried again a little later
                    self._retry_at[model] = time.monotonic() + RETRY_SECONDS
                    self.publish()
                    continue
            else:
                self.staging_errors.pop(model, None)
            self.mark_followed("staging", model, cmd)
            self.publish()


def staging_outcome(
    states: list[dict[str, Any]], model: str, version: str, expected: int, stamp: str
) -> tuple[int, str] | None:
    """None while workers are still staging; (200, "") once every live worker (at least `expected`)
    staged `version`; (status, why) when one could not following the command `stamp` (422 refused,
    404 unknown; a transient 503 is retried by that worker, so it is still staging)."""
    for s in states:
        error = (s.get("staging_errors") or {}).get(model)
        if error and error.get("stamp") == stamp and str(error.get("version")) == version:
            if error.get("status") != 503:
                return int(error["status"]), f"worker {s['pid']}: {error['error']}"
    if len(states) >= expected and all((s.get("staged") or {}).get(model) == version for s in states):
        return 200, ""
    return None


@dataclass
class Fleet:
    """The service's view over all its processes, for `create_app` when there are several: this
    process's `WorkerSync`, and every endpoint's answer widened from this process to all of them."""

    board: Board
    sync: WorkerSync

    @classmethod
    def build(
        cls, board: Board, store: ModelStore, canary: CanaryRouting, predlog: PredictionLog,
        refresh_gauges: Callable[[], None],
    ) -> Fleet:  # fmt: skip
        def published() -> dict[str, Any]:
            refresh_gauges()  # this process's own series, collected across processes on /metrics
            return worker_state(store) | {"log_written_through": predlog.written_through}

        def stage(model: str, version: str) -> None:
            store.candidates.stage(model, version)

        sync = WorkerSync(board, published, stage, store.candidates.unstage, store.refresh,
                          store.versions_in_use)  # fmt: skip
        fleet = cls(board, sync)

        def every_canary() -> dict[str, dict[str, Any]]:
            states = board.live()
            merged = {m: merged_canary(states, m, board.expected) for m in store.known_models}
            return {m: c for m, c in merged.items() if c is not None}

        canary.share_across(every_canary)

        def written_through() -> float:  # until when every process's prediction log is on disk
            return min((float(s.get("log_written_through", 0.0)) for s in board.live()), default=0.0)

        predlog.others_written_through = written_through
        return fleet

    def start(self) -> None:
        self.sync.start()

    def stop(self) -> None:
        from prometheus_client import multiprocess

        self.sync.stop()
        multiprocess.mark_process_dead(self.sync.pid)  # its live-mode gauges go with it

    def swapped(self) -> None:
        """This process serves a new champion: the others check MLflow within a tick, not at their
        next poll, so two processes answer different versions for well under a second."""
        if self.sync.running:
            self.sync.order("reload", None, {})

    def ready(self, body: dict[str, Any]) -> dict[str, Any]:
        """This process's readiness `body`, ready only when every process is (and says how many)."""
        fleet = readiness(self.board.live(), self.board.expected)
        return body | {
            "ready": body["ready"] and fleet["ready"],
            "waiting_for_champion": sorted(
                set(body["waiting_for_champion"]) | set(fleet["waiting_for_champion"])
            ),
            "last_poll_error": body["last_poll_error"] or fleet["last_poll_error"],
            "processes": {k: fleet[k] for k in ("expected", "live", "ready_processes")},
        }

    def refused(self, model: str) -> dict[str, str]:
        return refused(self.board.live(), model)

    def model(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        """This process's metadata of `model` plus every process's version (a deploy waits until
        they are one), and a staged or shadow version only once every process holds it."""
        states = self.board.live()
        return body | {
            "serving_versions": serving_versions(states, model),
            "staged_version": everywhere(states, "staged", model, self.board.expected),
            "shadow_version": everywhere(states, "shadow", model, self.board.expected),
        }

    def metrics(self, *extra: Collector) -> bytes:
        """Every process's counters, histograms and gauges, merged (prometheus_client's multiprocess
        collection), plus `extra` collectors that already answer for every process."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        every = CollectorRegistry()
        MultiProcessCollector(every, path=str(self.board.prometheus_dir))
        for collector in extra:
            every.register(collector)
        return generate_latest(every)
