"""The prediction log: every request's features, predictions, model version and time, written off
the request path to partitioned Parquet under `<data root>/<model>/predictions/date=YYYY-MM-DD/`.

Requests only `put_nowait` into a bounded queue; a writer thread batches and writes parts
atomically (temp name, then rename). On clean shutdown the queue is drained and flushed. When the
queue is full (the disk cannot keep up), entries are dropped and counted, never blocking a request.

Each logged row carries `request_id` and `row` (its 0-based index inside the request), the key that
ground truth (`cd4ml.data.feedback`) joins on. Parts written before `row` existed are read as if it
were there: rows of one request are contiguous in a part, so `row` is the position within it.

Feedback must know whether a request id was served, long after the fact and across restarts,
without reading the whole log per request. Two levels answer it:
- `PredictionLog.lookup`: a bounded in-memory index of the most recent requests (filled when a
  request is queued, so an id is known the moment its answer leaves the service);
- `find_requests`: per day, `request_index.parquet` holds that day's request ids sorted, with their
  row count and version. Sorted ids give each row group a narrow min/max range, so Parquet's
  statistics let a lookup read one footer and about one row group per day. A day's index is
  brought up to date incrementally (only parts it has not seen are read); once a day is over by
  `SEALED_AFTER`, nothing writes into it any more and its index is trusted without listing it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cd4ml.core.paths import PART_GLOB, PREDICTION_PART_GLOB, ModelPaths

log = logging.getLogger(__name__)

# A day partition only receives parts while entries queued before midnight drain (seconds); after
# this long past its end, a day's request index covers it for good.
SEALED_AFTER = timedelta(hours=1)
INDEX_ROW_GROUP = 16_384  # ids per row group of a request index: what one lookup reads per day
_INDEX_PARTS_KEY = b"cd4ml.parts"  # Parquet metadata: the part names an index covers
_INDEX_SEALED_KEY = b"cd4ml.sealed"
REFRESH_SECONDS = 10.0  # an open day's index takes in new parts at most this often (see find_requests)


@dataclass(frozen=True)
class Served:
    """What the log knows about one request id: how many rows it carried, which version answered."""

    rows: int
    version: str


@dataclass(frozen=True)
class Entry:
    model: str
    version: str
    at: float
    request_id: str
    columns: tuple[str, ...]
    rows: list[list[Any]]
    predictions: list[Any]


class RecentIds:
    """The request ids a log took lately, per model, with what was served: bounded, oldest out first
    (~150 bytes an id). `since` says from when it holds every id taken: its start, or just after its
    last eviction (an evicted id is on disk within a flush or two). A day index written before that
    may lack ids memory does not have (this process before a restart, or evicted ones): see
    `find_requests`."""

    def __init__(self, limit: int, *, evicted_on_disk_within: float) -> None:
        self.limit = limit
        self.grace = evicted_on_disk_within
        self.since = time.time()
        self._ids: OrderedDict[tuple[str, str], Served] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, model: str, request_id: str, served: Served) -> None:
        with self._lock:
            known = self._ids.pop((model, request_id), None)
            if known is not None and known.rows > served.rows:  # an id reused: any row it had stays valid
                served = Served(known.rows, served.version)
            self._ids[(model, request_id)] = served
            while len(self._ids) > self.limit:
                self._ids.popitem(last=False)
                self.since = time.time() + self.grace

    def forget(self, keys: Iterable[tuple[str, str]]) -> None:
        with self._lock:
            for key in keys:
                self._ids.pop(key, None)

    def split(self, model: str, request_ids: Iterable[str]) -> tuple[dict[str, Served], set[str]]:
        """(what memory holds of `request_ids`, the ids it does not hold)."""
        found: dict[str, Served] = {}
        missing: set[str] = set()
        with self._lock:
            for rid in request_ids:
                served = self._ids.get((model, rid))
                if served is None:
                    missing.add(rid)
                else:
                    found[rid] = served
        return found, missing


class PredictionLog:
    def __init__(
        self,
        data_dir: Path,
        *,
        max_queue: int = 10_000,
        flush_rows: int = 5_000,
        flush_seconds: float = 1.0,
        max_recent: int = 200_000,
        shared: bool = False,
    ):
        self.data_dir = data_dir
        # One of several service processes writing the same log: another process may have served the
        # ids this one's memory lacks; `others_written_through` (set by `workers.Fleet.build`) says until when
        # every process has written what it was given (epoch seconds), so a lookup waits for that.
        self.shared = shared
        self.others_written_through: Callable[[], float] | None = None
        self.written_through = time.time()  # every entry put before this time is on disk
        self._recent = RecentIds(max_recent, evicted_on_disk_within=2 * flush_seconds)
        self._disk_lock = threading.Lock()
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
        except queue.Full:
            self.dropped += len(entry.rows)
            return False
        self._recent.remember(entry.model, entry.request_id, Served(len(entry.rows), entry.version))
        return True

    def lookup(self, model: str, request_ids: Iterable[str]) -> dict[str, Served]:
        """Which of `request_ids` this log holds for `model`: recent ones from memory, the rest from
        the day indexes on disk (reads files: call it off the event loop)."""
        asked = time.time()
        found, missing = self._recent.split(model, request_ids)
        if missing:
            # One disk lookup at a time: two would bring the same open day's index up to date twice.
            with self._disk_lock:
                on_disk = find_requests(
                    ModelPaths.in_data_dir(self.data_dir, model), missing, memory_since=self._recent.since
                )
            missing -= on_disk.keys()
            if missing and self.shared and self._others_caught_up(asked):
                # Perhaps served by another process a moment ago: on disk now that it has flushed.
                with self._disk_lock:
                    on_disk |= find_requests(
                        ModelPaths.in_data_dir(self.data_dir, model), missing, refresh_seconds=0.0
                    )
            for rid, served in on_disk.items():  # the next label for the same request stays in memory
                self._recent.remember(model, rid, served)
            found.update(on_disk)
        return found

    def _others_caught_up(self, since: float) -> bool:
        """Wait until every process has written what it was given before `since` (usually within a
        quarter second; a process whose disk lags is waited for up to a few flush periods)."""
        if self.others_written_through is None:
            return False
        deadline = time.monotonic() + 4 * self.flush_seconds + 2.0
        while self.others_written_through() < since:
            if time.monotonic() > deadline:
                log.warning("other service processes have not flushed their prediction logs; "
                            "looking up what is on disk")  # fmt: skip
                break
            time.sleep(0.05)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Drain everything queued so far, then stop."""
        self._stop.set()
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        pending: list[Entry] = []
        rows = 0
        last = time.monotonic()
        while True:
            mark = time.time()  # every entry put before it is in `pending` or in the queue
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
            if not pending and self.queue.empty():
                self.written_through = mark
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
            frame["row"] = [i for e in group for i in range(len(e.rows))]
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
                self._recent.forget(
                    (e.model, e.request_id) for e in group
                )  # never logged, so feedback for them could never join
                log.error("prediction log write failed for %s: %s", model, err)


def read_predictions(data_dir: Path, model: str, since: datetime | None = None) -> Any:
    """What was logged for a model; with `since`, day partitions before that day are not read."""
    import pandas as pd

    paths = ModelPaths.in_data_dir(data_dir, model)
    first_day = paths.prediction_day(since).name if since else ""
    parts = sorted(p for p in paths.predictions.glob(PREDICTION_PART_GLOB) if p.parent.name >= first_day)
    if not parts:
        return pd.DataFrame()
    return pd.concat([with_row(pd.read_parquet(p)) for p in parts], ignore_index=True)


def with_row(frame: Any) -> Any:
    """A part written before the `row` column existed gets it: the position inside its request
    (a request's rows are written together, in order, into one part)."""
    if "row" not in frame.columns and "request_id" in frame.columns:
        frame["row"] = frame.groupby("request_id", sort=False).cumcount().astype("int64")
    return frame


# -- the per-day request index --------------------------------------------------------------------


def prediction_days(paths: ModelPaths) -> list[str]:
    """Every day the log has a partition for, newest first."""
    if not paths.predictions.is_dir():
        return []
    days = (ModelPaths.partition_day(d) for d in paths.predictions.iterdir() if d.is_dir())
    return sorted((d for d in days if d), reverse=True)


def _sealed(day: str, now: datetime) -> bool:
    end = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1)
    return now >= end + SEALED_AFTER


def request_index(paths: ModelPaths, day: str, *, now: datetime | None = None) -> Path | None:
    """The day's request index, brought up to date first unless the day is sealed. None when the
    day has no parts. Incremental: only parts the index has not covered yet are read."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    now = now or datetime.now(UTC)
    index = paths.prediction_index(day)
    covered: set[str] = set()
    old: Any = None
    if index.exists():
        meta = pq.read_metadata(index).metadata or {}
        if meta.get(_INDEX_SEALED_KEY) == b"1":
            return index
        covered = set(json.loads(meta.get(_INDEX_PARTS_KEY, b"[]")))
        old = pq.read_table(index)
    parts = sorted(p.name for p in paths.prediction_day(day).glob(PART_GLOB))
    new = [name for name in parts if name not in covered]
    sealed = _sealed(day, now)
    if not new and not (sealed and old is not None):
        return index if old is not None else None
    tables = [] if old is None else [old]
    for name in new:
        part = pq.read_table(paths.prediction_day(day) / name, columns=["request_id", "model_version"])
        counted = part.group_by("request_id", use_threads=False).aggregate(
            [([], "count_all"), ("model_version", "last")]
        )
        tables.append(
            pa.table({
                "request_id": counted["request_id"].cast(pa.string()),
                "rows": counted["count_all"].cast(pa.int64()),
                "model_version": counted["model_version_last"].cast(pa.string()),
            })
        )  # fmt: skip
    merged = pa.concat_tables(tables)
    if len(tables) > 1:
        # An id in several parts (a client reusing its request id): its largest request bounds
        # `row`, the newest part names the version.
        grouped = merged.group_by("request_id", use_threads=False).aggregate(
            [("rows", "max"), ("model_version", "last")]
        )
        merged = pa.table({
            "request_id": grouped["request_id"],
            "rows": grouped["rows_max"],
            "model_version": grouped["model_version_last"],
        })  # fmt: skip
    merged = merged.take(pc.sort_indices(merged, sort_keys=[("request_id", "ascending")]))
    metadata = {_INDEX_PARTS_KEY: json.dumps(parts).encode()}
    if sealed:
        metadata = {_INDEX_SEALED_KEY: b"1"}  # never listed again, so the parts list is not kept
    merged = merged.replace_schema_metadata(metadata)
    tmp = index.with_name(f".{index.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    pq.write_table(merged, tmp, row_group_size=INDEX_ROW_GROUP)
    tmp.replace(index)
    return index


def find_requests(
    paths: ModelPaths,
    request_ids: Iterable[str],
    *,
    now: datetime | None = None,
    refresh_seconds: float = REFRESH_SECONDS,
    memory_since: float = 0.0,
) -> dict[str, Served]:
    """Which of `request_ids` the log on disk holds, newest day first (an id logged on several days
    is reported as its newest request). Reads one footer and the matching row groups per day.

    A day's index is brought up to date only for ids it does not hold, and at most once every
    `refresh_seconds` for a day still being written: ids logged since are in the caller's memory,
    and a stream of unknown ids cannot make every request rewrite the index. That holds only for an
    index written after `memory_since` (epoch seconds: since when the caller remembers every id it
    logged); an older one is brought up to date whatever its age, or a service restarted a moment
    after an index refresh would call the ids it served just before the restart unknown."""
    import pyarrow.parquet as pq

    now = now or datetime.now(UTC)
    wanted = set(request_ids)
    found: dict[str, Served] = {}

    def look(index: Path) -> None:
        hits = pq.read_table(index, filters=[("request_id", "in", sorted(wanted))]).to_pylist()
        for hit in hits:
            found[hit["request_id"]] = Served(int(hit["rows"]), str(hit["model_version"]))
            wanted.discard(hit["request_id"])

    for day in prediction_days(paths):
        if not wanted:
            break
        index = paths.prediction_index(day)
        if index.exists():
            look(index)
            written = index.stat().st_mtime
            fresh = written >= memory_since and time.time() - written < refresh_seconds
            if not wanted or fresh or _is_sealed(index):
                continue
        if request_index(paths, day, now=now) is not None:
            look(index)
    return found


def _is_sealed(index: Path) -> bool:
    import pyarrow.parquet as pq

    return (pq.read_metadata(index).metadata or {}).get(_INDEX_SEALED_KEY) == b"1"


def logged_request_ids(paths: ModelPaths, *, now: datetime | None = None) -> Any:
    """Every request id in the log (a pyarrow array, possibly with repeats across days)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = []
    for day in prediction_days(paths):
        index = request_index(paths, day, now=now)
        if index is not None:
            arrays.append(pq.read_table(index, columns=["request_id"])["request_id"].combine_chunks())
    return pa.concat_arrays(arrays) if arrays else pa.array([], pa.string())
