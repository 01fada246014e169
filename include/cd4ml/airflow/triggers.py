"""An event trigger that watches a model's landing zone for new, completely written files."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

Signature = tuple[str, int, int]  # name, size, mtime_ns


def scan(directory: str) -> dict[str, tuple[int, int]]:
    """Visible, finished data files: dot-files and *.part / *.tmp are still being written."""
    out: dict[str, tuple[int, int]] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return out
    for entry in entries:
        name = entry.name
        if name.startswith(".") or name.endswith((".part", ".tmp")) or not entry.is_file():
            continue
        st = entry.stat()
        out[name] = (st.st_size, st.st_mtime_ns)
    return out


class LandingZoneTrigger(BaseEventTrigger):
    """Fires once per new file set, when a file's size and mtime are unchanged across two polls.

    Unlike `FileDeleteTrigger` it deletes nothing: the training run moves each file to accepted/ or
    quarantine/. It remembers what it fired for while the files stay in landing/, so a long run
    does not cause a storm of events; after a triggerer restart it fires once more for files still
    waiting, which the idempotent collect step absorbs.
    """

    def __init__(self, directory: str, poke_interval: float = 2.0) -> None:
        super().__init__()
        self.directory = directory
        self.poke_interval = poke_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"directory": self.directory, "poke_interval": self.poke_interval},
        )

    def scan(self) -> dict[str, tuple[int, int]]:
        """What is waiting: name -> (size, mtime_ns); a subclass may watch other things."""
        return scan(self.directory)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        previous: dict[str, tuple[int, int]] = {}
        fired: set[Signature] = set()
        while True:
            current = await asyncio.to_thread(self.scan)
            stable = {(n, *sig) for n, sig in current.items() if previous.get(n) == sig}
            new = stable - fired
            if new:
                fired |= new
                names = sorted(n for n, _, _ in new)
                self.log.info("Waiting in %s: %s", self.directory, names)
                yield TriggerEvent({"directory": self.directory, "files": names})
            fired &= {(n, *sig) for n, sig in current.items()}
            previous = current
            await asyncio.sleep(self.poke_interval)


class ScoreZoneTrigger(LandingZoneTrigger):
    """Fires when a file or folder in score/ has kept its size and mtime across two polls.

    As `LandingZoneTrigger`, but a folder of parts counts too (its size and newest mtime over every
    file inside); it deletes nothing: the scoring run moves what it scored.
    """

    def scan(self) -> dict[str, tuple[int, int]]:
        from cd4ml.steps.batch_score import scan_inputs

        return scan_inputs(self.directory)
