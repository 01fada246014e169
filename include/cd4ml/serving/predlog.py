"""The prediction log: every request's features, predictions, model version and time, written off
the request path to partitioned Parquet under `<data root>/<model>/predictions/date=YYYY-MM-DD/`.

Requests only `put_nowait` into a bounded queue; a writer thread batches and writes parts
atomically (temp name, then rename). On clean shutdown the queue is drained and flushed. When the
queue is full (the disk cannot keep up), entries are dropped and counted, never blocking a request.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cd4ml.core.paths import PREDICTION_PART_GLOB, ModelPaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    model: str
    version: str
    at: float
    request_id: str
    columns: tuple[str, ...]
    rows: list[list[Any]]
    predictions: list[Any]


class PredictionLog:
    def __init__(
        self, data_dir: Path, *, max_queue: int = 10_000, flush_rows: int = 5_000, flush_seconds: float = 1.0
    ):
        self.data_dir = data_dir
        self.queue: queue.Queue[Entry] = queue.Queue(maxsize=max_queue)
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.dropped = 0
        self.written_rows = 0
        self._stop = threading.Event()
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="cd4ml-prediction-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, entry: Entry) -> bool:
        try:
            self.queue.put_nowait(entry)
            return True
        except queue.Full:
            self.dropped += len(entry.rows)
            return False

    def close(self, timeout: float = 30.0) -> None:
        """Drain everything queued so far, then stop."""
        self._stop.set()
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        pending: list[Entry] = []
        rows = 0
        last = time.monotonic()
        while True:
            try:
                entry = self.queue.get(timeout=0.2)
                pending.append(entry)
                rows += len(entry.rows)
            except queue.Empty:
                pass
            due = rows >= self.flush_rows or (pending and time.monotonic() - last >= self.flush_seconds)
            stopping = self._stop.is_set() and self.queue.empty()
            if pending and (due or stopping):
                self._write(pending)
                pending, rows, last = [], 0, time.monotonic()
            if stopping:
                return

    def _write(self, entries: list[Entry]) -> None:
        """One DataFrame and one Parquet part per (model, day, columns): the writer thread holds the
        GIL as briefly as possible, so request latency does not notice it."""
        import pandas as pd

        groups: dict[tuple[str, str, tuple[str, ...]], list[Entry]] = {}
        for e in entries:
            day = datetime.fromtimestamp(e.at, UTC).strftime("%Y-%m-%d")
            groups.setdefault((e.model, day, e.columns), []).append(e)
        for (model, day, columns), group in groups.items():
            rows = [row for e in group for row in e.rows]
            frame = pd.DataFrame(rows, columns=list(columns))
            frame["prediction"] = [p for e in group for p in e.predictions]
            frame["model_version"] = [e.version for e in group for _ in e.rows]
            frame["request_id"] = [e.request_id for e in group for _ in e.rows]
            frame["ts"] = pd.to_datetime([e.at for e in group for _ in e.rows], unit="s", utc=True)
            out_dir = ModelPaths.in_data_dir(self.data_dir, model).prediction_day(day)
            out_dir.mkdir(parents=True, exist_ok=True)
            self._seq += 1
            name = f"part-{time.time_ns()}-{os.getpid()}-{self._seq:06d}.parquet"
            tmp = out_dir / f".{name}.tmp"
            try:
                frame.to_parquet(tmp, index=False)
                tmp.replace(out_dir / name)
                self.written_rows += len(frame)
            except (OSError, ValueError) as err:
                self.dropped += len(frame)
                log.error("prediction log write failed for %s: %s", model, err)


def read_predictions(data_dir: Path, model: str, since: datetime | None = None) -> Any:
    """What was logged for a model; with `since`, day partitions before that day are not read."""
    import pandas as pd

    paths = ModelPaths.in_data_dir(data_dir, model)
    first_day = paths.prediction_day(since).name if since else ""
    parts = sorted(p for p in paths.predictions.glob(PREDICTION_PART_GLOB) if p.parent.name >= first_day)
    if not parts:
        return pd.DataFrame()
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
