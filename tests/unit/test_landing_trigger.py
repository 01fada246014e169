"""The landing-zone event trigger, run on a real directory with a real event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

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
        return await asyncio.wait_for(self.queue.get(), timeout)

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


def test_missing_directory_is_not_an_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        gen = Events(LandingZoneTrigger(directory=str(tmp_path / "nope"), poke_interval=0.05))
        try:
            await gen.next(timeout=0.3)
        except TimeoutError:
            pass
        gen.stop()

    asyncio.run(scenario())


def test_serializes_to_its_import_path() -> None:
    path, kwargs = LandingZoneTrigger(directory="/d", poke_interval=3.0).serialize()
    assert path == "cd4ml.airflow.triggers.LandingZoneTrigger"
    assert kwargs == {"directory": "/d", "poke_interval": 3.0}
