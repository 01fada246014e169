"""The landing-zone event trigger, run on a real directory with a real event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cd4ml.airflow.triggers import LandingZoneTrigger


class Events:
    """Consumes the trigger in a background task, so waiting with a timeout never cancels it."""

    def __init__(self, trigger: LandingZoneTrigger) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.ensure_future(self._pump(trigger))

    async def _pump(self, trigger: LandingZoneTrigger) -> None:
        async for event in trigger.run():
            await self.queue.put(event)

    async def next(self, timeout: float = 2.0):
        """The next event; a trigger that crashed or stopped is a failure, never a quiet timeout."""
        getter = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait(
            {getter, self.task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if getter in done:
            return getter.result()
        getter.cancel()
        self.assert_running()
        raise TimeoutError(f"no event within {timeout} s")

    def assert_running(self) -> None:
        if self.task.done():
            error = self.task.exception()
            raise AssertionError(f"the trigger stopped watching: {error!r}") from error

    def stop(self) -> None:
        self.task.cancel()


def test_fires_once_per_complete_new_file_and_ignores_partial_ones(tmp_path: Path) -> None:
    async def scenario() -> list[list[str]]:
        gen = Events(LandingZoneTrigger(directory=str(tmp_path), poke_interval=0.05))
        seen = []
        (tmp_path / ".a.csv.part").write_text("half written")
        (tmp_path / "b.tmp").write_text("half written")
        (tmp_path / "a.csv").write_text("x\n1\n")
        seen.append((await gen.next()).payload["files"])
        # Same files still there: no new event.
        try:
            await gen.next(timeout=0.5)
            seen.append(["unexpected"])
        except TimeoutError:
            pass
        (tmp_path / "c.csv").write_text("x\n2\n")
        seen.append((await gen.next()).payload["files"])
        gen.stop()
        return seen

    assert asyncio.run(scenario()) == [["a.csv"], ["c.csv"]]


def test_a_relanded_file_fires_again_after_it_left(tmp_path: Path) -> None:
    async def scenario() -> int:
        gen = Events(LandingZoneTrigger(directory=str(tmp_path), poke_interval=0.05))
        (tmp_path / "a.csv").write_text("x\n1\n")
        await gen.next()
        (tmp_path / "a.csv").unlink()  # the run moved it away
        await asyncio.sleep(0.2)
        (tmp_path / "a.csv").write_text("x\n1\n")
        event = await gen.next()
        gen.stop()
        return len(event.payload["files"])

    assert asyncio.run(scenario()) == 1


def test_missing_directory_is_watched_until_it_appears(tmp_path: Path) -> None:
    """A model whose landing/ is not made yet: no event, no crash, and the first file still fires."""
    zone = tmp_path / "nope"

    async def scenario() -> list[str]:
        gen = Events(LandingZoneTrigger(directory=str(zone), poke_interval=0.05))
        with pytest.raises(TimeoutError):
            await gen.next(timeout=0.3)
        gen.assert_running()
        zone.mkdir()
        (zone / "a.csv").write_text("x\n1\n")
        event = await gen.next()
        gen.stop()
        return list(event.payload["files"])

    assert asyncio.run(scenario()) == ["a.csv"]


def test_serializes_to_its_import_path() -> None:
    path, kwargs = LandingZoneTrigger(directory="/d", poke_interval=3.0).serialize()
    assert path == "cd4ml.airflow.triggers.LandingZoneTrigger"
    assert kwargs == {"directory": "/d", "poke_interval": 3.0}
