"""The shared state of several service processes (`cd4ml.serving.workers`): what every process's
published state says together, and how a process follows the others' commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cd4ml.serving.models import StagingRefusedError
from cd4ml.serving.workers import (
    LIVE_SECONDS,
    STAGING_WAIT,
    Board,
    WorkerSync,
    everywhere,
    merged_canary,
    readiness,
    refused,
    staging_outcome,
)


def state(pid: int, serving: dict[str, str], known: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"pid": pid, "at": time.time(), "known": known or sorted(serving), "serving": serving, **extra}


def test_ready_only_when_every_expected_process_serves_every_model() -> None:
    both = [state(1, {"a": "2", "b": "1"}), state(2, {"a": "2", "b": "1"})]
    assert readiness(both, 2)["ready"]
    assert not readiness(both[:1], 2)["ready"]  # one process missing
    lagging = [both[0], state(2, {"a": "2"}, known=["a", "b"])]
    out = readiness(lagging, 2)
    assert not out["ready"] and out["waiting_for_champion"] == ["b"] and out["ready_processes"] == 1
    assert not readiness([], 1)["ready"]
    broken = [state(1, {"a": "1"}, last_poll_error="ConnectionError: mlflow")]
    assert readiness(broken, 1)["last_poll_error"] == "ConnectionError: mlflow"


def test_a_staged_version_counts_only_once_every_process_holds_it() -> None:
    states = [state(1, {"a": "1"}, staged={"a": "2"}), state(2, {"a": "1"}, staged={})]
    assert everywhere(states, "staged", "a", 2) is None
    states[1]["staged"] = {"a": "2"}
    assert everywhere(states, "staged", "a", 2) == "2"
    assert everywhere(states[:1], "staged", "a", 2) is None  # fewer processes than expected


def test_refusals_of_any_process_are_reported() -> None:
    states = [
        state(1, {"a": "1"}, refused={"a/3": "sanity check failed", "ab/4": "other model"}),
        state(2, {"a": "1"}, unrecorded={"a": ["5", "no signed record"]}),
    ]
    assert refused(states, "a") == {"3": "sanity check failed", "5": "no signed record"}


def canary(version: str, requests: int, micros: list[int], since: float) -> dict[str, Any]:
    side = {"requests": requests, "errors": 0, "micros": micros}
    return {"version": version, "champion_version": "1", "since": since, "fraction": 0.5, "sticky_key": None,
            "arms": {"champion": side, "canary": side}}  # fmt: skip


def test_a_canary_is_judged_on_every_process_that_runs_it() -> None:
    fast, slow = [1000] * 100, [50_000] * 100  # 1 ms on one process, 50 ms on the other
    states = [
        state(1, {"a": "1"}, canary={"a": canary("2", 100, fast, since=10.0)}),
        state(2, {"a": "1"}, canary={"a": canary("2", 100, slow, since=5.0)}),
    ]
    merged = merged_canary(states, "a", 2)
    assert merged is not None and merged["processes"] == 2 and merged["since"] == 5.0
    assert merged["arms"]["canary"]["requests"] == 200
    assert merged["arms"]["canary"]["p99_ms"] == 50.0  # the slow process's tail is the canary's
    assert merged["arms"]["canary"]["p50_ms"] in (1.0, 50.0)
    # A process missing (restarting) leaves its share out: the canary does not vanish, or the deploy
    # step would read "the alias moved" and end it.
    alone = merged_canary(states[:1], "a", 2)
    assert alone is not None and alone["processes"] == 1 and alone["arms"]["canary"]["requests"] == 100
    # Processes following different canaries (the alias just moved): the one most of them run.
    third = state(3, {"a": "1"}, canary={"a": canary("3", 7, slow, since=20.0)})
    mixed = merged_canary([*states, third], "a", 3)
    assert mixed is not None and mixed["version"] == "2" and mixed["arms"]["canary"]["requests"] == 200
    assert merged_canary([state(1, {"a": "1"}), state(2, {"a": "1"})], "a", 2) is None


def test_staging_answers_once_all_staged_or_one_could_not() -> None:
    states = [state(1, {"a": "1"}, staged={"a": "2"}), state(2, {"a": "1"}, staged={})]
    assert staging_outcome(states, "a", "2", 2, "s1") is None

    def failed(status: int, error: str, version: str = "2", stamp: str = "s1") -> dict[str, Any]:
        return {"a": {"version": version, "stamp": stamp, "status": status, "error": error}}

    states[1]["staging_errors"] = failed(503, "MLflow unreachable")
    assert staging_outcome(states, "a", "2", 2, "s1") is None  # transient: that process tries again
    states[1]["staging_errors"] = failed(422, "sanity check failed", stamp="s0")
    assert staging_outcome(states, "a", "2", 2, "s1") is None  # an earlier PUT's failure: not this one's
    states[1]["staging_errors"] = failed(422, "sanity check failed")
    assert staging_outcome(states, "a", "2", 2, "s1") == (422, "worker 2: sanity check failed")
    states[1]["staging_errors"] = failed(422, "an older version", version="1")
    states[1]["staged"] = {"a": "2"}
    assert staging_outcome(states, "a", "2", 2, "s1") == (200, "")


def test_the_board_counts_running_processes_that_published_lately(tmp_path: Path) -> None:
    board = Board(tmp_path, expected=2)
    board.prepare()
    board.publish(state(os.getpid(), {"a": "1"}))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    dead = int(gone.stdout)
    board.publish(state(dead, {"a": "1"}))  # published a moment ago, but the process has exited
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        board.publish(state(hung.pid, {"a": "1"}) | {"at": time.time() - LIVE_SECONDS - 1})
        assert [s["pid"] for s in board.live()] == [os.getpid()]
        assert not (board.workers_dir / f"{dead}.json").exists()  # a stopped process's file goes
        assert (board.workers_dir / f"{hung.pid}.json").exists()  # a silent one may come back
    finally:
        hung.kill()
        hung.wait()
    board.withdraw(os.getpid())
    assert board.live() == []


class Fake:
    """A process's own store, as WorkerSync drives it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail: Exception | None = None
        self.held: set[str] = set()

    def stage(self, model: str, version: str) -> None:
        self.calls.append(("stage", model, version))
        if self.fail is not None:
            raise self.fail

    def sync(self, board: Board) -> WorkerSync:
        return WorkerSync(
            board, state=lambda: {"known": ["a"], "serving": {}}, stage=self.stage,
            unstage=lambda m: self.calls.append(("unstage", m)),
            reload=lambda: self.calls.append(("reload",)), in_use=lambda m: self.held,
        )  # fmt: skip


def test_a_process_follows_each_command_once(tmp_path: Path) -> None:
    board = Board(tmp_path, expected=2)
    board.prepare()
    board.command("reload", None, {})  # before this process started: history
    fake = Fake()
    sync = fake.sync(board)
    sync.start()
    sync.stop()  # the threads are not needed: follow() is called by hand below
    sync.follow()
    assert fake.calls == []

    board.command("staging", "a", {"version": "2"})
    board.command("reload", None, {})
    sync.follow()
    sync.follow()  # the same commands again: nothing more
    assert fake.calls == [("reload",), ("stage", "a", "2")]

    fake.calls.clear()
    fake.fail = ConnectionError("mlflow down")  # transient: tried again a little later
    sent = board.command("staging", "a", {"version": "3"})
    sync.follow()
    assert sync.staging_errors["a"]["status"] == 503 and sync.staging_errors["a"]["stamp"] == sent["stamp"]
    sync.follow()  # not at once: after RETRY_SECONDS
    assert fake.calls == [("stage", "a", "3")]
    sync._retry_at.clear()
    fake.fail = StagingRefusedError("sanity check failed")
    sync.follow()
    assert sync.staging_errors["a"] == {"version": "3", "stamp": sent["stamp"], "status": 422,
                                        "error": "sanity check failed"}  # fmt: skip
    sync.follow()  # refused for good: not tried again
    assert fake.calls == [("stage", "a", "3")] * 2

    fake.calls.clear()
    fake.fail = None
    sync.order("reload", None, {})  # this process's own command: it acted itself, its follower skips it
    sync.follow()
    assert fake.calls == []
    fake.held = {"4"}  # already live here: a current command is still followed (as one process does)
    board.command("staging", "a", {"version": "4"})
    sync.follow()
    assert fake.calls == [("stage", "a", "4")]
    fake.calls.clear()
    late = board.command("staging", "a", {"version": "4"}) | {"at": time.time() - 3 * STAGING_WAIT}
    (board.commands_dir / "staging.a.json").write_text(json.dumps(late))
    sync.follow()  # an old command for a version this process serves: promoted meanwhile, not loaded
    assert fake.calls == []
    board.command("staging", "a", {"version": None})
    sync.follow()
    assert fake.calls == [("unstage", "a")]


@pytest.mark.parametrize("workers, state_dir, expected", [(1, "s", False), (2, None, False), (2, "s", True)])
def test_a_board_only_for_several_processes_with_a_state_folder(
    workers: int, state_dir: str | None, expected: bool, tmp_path: Path
) -> None:
    from cd4ml.core.settings import Settings

    settings = Settings(
        service_workers=workers, service_state_dir=tmp_path / state_dir if state_dir else None
    )
    assert (Board.from_settings(settings) is not None) is expected
