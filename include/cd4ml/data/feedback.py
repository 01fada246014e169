"""Ground truth from production: labels (`request_id`, `row`, `outcome`) stored next to the
prediction log and joined to it.

Labels arrive two ways: posted to the service (`POST /v1/models/<model>/feedback`, which calls
`record_labels`) or as files dropped into `feedback/landing/` (CSV or Parquet with columns
`request_id`, `outcome` and optionally `row`; `ingest_label_files` takes them in). Either way they
end as Parquet parts under `feedback/labels/date=<day received>/`, written atomically (temporary
name, then rename), never rewritten.

The store is append-only; meaning is given when reading (`latest_labels`): per (request_id, row)
the label received last wins, so the same label sent twice counts once and a corrected outcome
replaces the earlier one. `labelled_predictions` joins labels to the prediction log on
(request_id, row); the log row carries the model version that answered. A label may arrive any
time after its prediction (days later, after restarts): the join reads the log, not a cache.

Outcomes are kept as given (a number, a text, a boolean); the consumer casts them to the target's
type. Pandas and pyarrow are imported inside functions: DAG files import this module.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cd4ml.core.errors import DataError
from cd4ml.core.paths import LABEL_PART_GLOB, PART_GLOB, PREDICTION_PART_GLOB, ModelPaths
from cd4ml.data import landing

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger(__name__)

REQUEST_ID, ROW, OUTCOME, LABELLED_AT, SOURCE = "request_id", "row", "outcome", "labelled_at", "source"
LABEL_COLUMNS = (REQUEST_ID, ROW, OUTCOME)
MAX_REQUEST_ID = 256  # characters; a longer "id" is a payload pasted into the wrong field
FILE_FORMAT = "columns request_id (text), outcome, optional row (integer >= 0); CSV (UTF-8) or Parquet"
# Logged rows joined at once: the join's memory bound (~200 bytes a row for the demo's 9 features).
JOIN_BATCH_ROWS = 2_000_000
_seq = itertools.count(1)


@dataclass(frozen=True)
class LabelProblem:
    """What is wrong with a set of labels, and in which column (None: the file as a whole)."""

    column: str | None
    problem: str

    def __str__(self) -> str:
        return f"{self.column}: {self.problem}" if self.column else self.problem


class LabelError(DataError):
    def __init__(self, problem: LabelProblem, where: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.problem = problem


@dataclass(frozen=True)
class QuarantinedLabels:
    name: str
    path: str
    reason: str
    column: str | None


@dataclass(frozen=True)
class FeedbackIngest:
    """One pass over `feedback/landing/`: files taken in, files set aside (and why), label rows."""

    accepted: tuple[str, ...] = ()
    quarantined: tuple[QuarantinedLabels, ...] = ()
    rows: int = 0
    unmatched: int = 0  # label rows whose request id the prediction log does not hold (yet)

    def as_dict(self) -> dict[str, Any]:
        return {
            "accepted": list(self.accepted),
            "quarantined": [asdict(q) for q in self.quarantined],
            "rows": self.rows,
            "unmatched": self.unmatched,
        }


# -- writing ------------------------------------------------------------------------------------


def record_labels(paths: ModelPaths, labels: pd.DataFrame, *, source: str, received_at: datetime) -> int:
    """Store labels (columns `request_id`, `outcome`, optional `row`, default 0) as one Parquet part.
    Returns the rows written. Raises `LabelError` naming the column when a label is unusable."""
    import pyarrow as pa

    if received_at.tzinfo is None:
        raise ValueError("received_at must be timezone-aware (UTC)")
    missing = [c for c in (REQUEST_ID, OUTCOME) if c not in labels.columns]
    if missing:
        raise LabelError(LabelProblem(missing[0], "missing column"), source)
    columns: dict[str, Any] = {}
    for name in (REQUEST_ID, ROW):
        if name in labels.columns:
            try:
                columns[name] = pa.Array.from_pandas(labels[name])
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                raise LabelError(LabelProblem(name, f"wrong type: {err}"), source) from None
    columns[OUTCOME] = outcome_array(list(labels[OUTCOME]))
    checked = check_labels(pa.table(columns))
    if isinstance(checked, LabelProblem):
        raise LabelError(checked, source)
    return _write_part(paths, checked, source=source, received_at=received_at)


def outcome_array(values: list[Any]) -> pa.Array:
    """Outcomes as given, in one Parquet type: booleans, integers, numbers or text; a mix of
    numbers and text is kept as text (what each value reads as), so nothing is dropped."""
    import pyarrow as pa

    kinds = {type(v) for v in values if v is not None}
    if kinds <= {bool}:
        return pa.array(values, pa.bool_())
    if kinds <= {int}:
        return pa.array(values, pa.int64())
    if kinds <= {int, float}:
        return pa.array(values, pa.float64())
    if kinds <= {str}:
        return pa.array(values, pa.string())
    return pa.array([None if v is None else str(v) for v in values], pa.string())


def check_labels(table: pa.Table) -> pa.Table | LabelProblem:
    """`table` as the store keeps it (request_id text, row int64, outcome) or the first problem."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for name in (REQUEST_ID, OUTCOME):
        if name not in table.column_names:
            return LabelProblem(name, "missing column")
    if table.num_rows == 0:
        return LabelProblem(None, "no label rows (the file is empty or has only a header)")
    rid = table[REQUEST_ID]
    if pa.types.is_dictionary(rid.type):
        rid = rid.cast(rid.type.value_type)
    if not (pa.types.is_string(rid.type) or pa.types.is_large_string(rid.type)):
        return LabelProblem(REQUEST_ID, f"wrong type {rid.type}; request ids are text")
    rid = rid.cast(pa.string())
    lengths = pc.utf8_length(rid)
    blank = rid.null_count + (pc.sum(pc.equal(lengths, 0)).as_py() or 0)
    if blank:
        return LabelProblem(REQUEST_ID, f"{blank} row(s) have no request id")
    if pc.max(lengths).as_py() > MAX_REQUEST_ID:
        return LabelProblem(REQUEST_ID, f"request ids longer than {MAX_REQUEST_ID} characters")
    if ROW in table.column_names:
        row = table[ROW]
        if not pa.types.is_integer(row.type):
            return LabelProblem(
                ROW, f"wrong type {row.type}; row is the 0-based integer index in the request"
            )
        if row.null_count:
            return LabelProblem(ROW, f"{row.null_count} row(s) have no row index")
        if pc.min(row).as_py() < 0:
            return LabelProblem(ROW, "negative row index; rows count from 0")
        row = row.cast(pa.int64())
    else:
        row = pa.array([0] * table.num_rows, pa.int64())
    outcome = table[OUTCOME]
    if pa.types.is_dictionary(outcome.type):
        outcome = outcome.cast(outcome.type.value_type)
    kind = outcome.type
    scalar = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_string,
              pa.types.is_large_string, pa.types.is_null)  # fmt: skip
    if not any(is_kind(kind) for is_kind in scalar):
        return LabelProblem(OUTCOME, f"wrong type {kind}; an outcome is a number, a text or a boolean")
    if outcome.null_count:
        return LabelProblem(OUTCOME, f"{outcome.null_count} row(s) have no outcome")
    if pa.types.is_floating(kind) and not pc.all(pc.is_finite(outcome)).as_py():
        return LabelProblem(OUTCOME, "outcomes must be finite numbers (found NaN or infinity)")
    if pa.types.is_large_string(kind):
        outcome = outcome.cast(pa.string())
    return pa.table({REQUEST_ID: rid, ROW: row, OUTCOME: outcome})


def _write_part(paths: ModelPaths, table: pa.Table, *, source: str, received_at: datetime) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    at = received_at.astimezone(UTC)
    n = table.num_rows
    table = table.append_column(LABELLED_AT, pa.repeat(pa.scalar(at, pa.timestamp("us", tz="UTC")), n))
    table = table.append_column(SOURCE, pa.repeat(pa.scalar(source, pa.string()), n))
    out_dir = paths.labels_day(at.date())
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"part-{time.time_ns()}-{os.getpid()}-{next(_seq):06d}.parquet"
    tmp = out_dir / f".{name}.tmp"
    pq.write_table(table, tmp)
    tmp.replace(out_dir / name)
    return n


# -- label files --------------------------------------------------------------------------------


def read_label_file(path: Path) -> pa.Table:
    """A landed label file as a table; request ids are read as text (ids of digits keep their
    leading zeros). Raises `LabelError` when the file cannot be read."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    try:
        if suffix in {".parquet", ".pq"}:
            return pq.read_table(path)
        if suffix == ".csv":
            if path.stat().st_size == 0:
                raise LabelError(LabelProblem(None, "the file is empty (0 bytes)"), path.name)
            return pacsv.read_csv(
                path, convert_options=pacsv.ConvertOptions(column_types={REQUEST_ID: pa.string()})
            )
    except (pa.ArrowException, OSError, ValueError) as err:
        kind = "Parquet" if suffix != ".csv" else "CSV (UTF-8, comma-separated, header row)"
        problem = LabelProblem(None, f"not a readable {kind} file: {str(err).strip()[:300]}")
        raise LabelError(problem, path.name) from None
    raise LabelError(
        LabelProblem(None, f"unsupported file type {suffix or '(none)'!r}; drop .csv or .parquet files"),
        path.name,
    )


def ingest_label_files(paths: ModelPaths, *, now: datetime) -> FeedbackIngest:
    """Take in every label file in `feedback/landing/`: each ends in exactly one of
    `feedback/accepted/` (its labels recorded) or `feedback/quarantine/` (with `<name>.reason.json`
    naming the problem and the column). A file whose request ids the prediction log holds none of
    is quarantined too: it belongs to another model, or predictions are not logged. Labels for ids
    the log does not hold are kept (counted as `unmatched`): they join if the ids appear."""
    import pyarrow.compute as pc

    from cd4ml.serving.predlog import logged_request_ids

    zone = paths.feedback_zone
    zone.landing.mkdir(parents=True, exist_ok=True)  # so people find where to drop label files
    zone.accepted.mkdir(parents=True, exist_ok=True)
    zone.quarantine.mkdir(parents=True, exist_ok=True)
    accepted: list[str] = []
    quarantined: list[QuarantinedLabels] = []
    rows = unmatched = 0
    known: Any = None
    seen = landing.accepted_hashes(zone)
    for landed in landing.list_landed(zone):
        try:
            checked = check_labels(read_label_file(Path(landed.path)))
        except LabelError as err:
            checked = err.problem
        if isinstance(checked, LabelProblem):
            quarantined.append(_quarantine(zone, landed, checked, now))
            continue
        if known is None:
            known = logged_request_ids(paths, now=now)
        matched = pc.is_in(checked[REQUEST_ID], value_set=known)
        hits = pc.sum(matched).as_py() or 0
        if hits == 0:
            problem = LabelProblem(
                REQUEST_ID,
                f"none of its {checked.num_rows} request ids is in {paths.root.name}'s prediction log; "
                f"is this the right model's feedback folder, and are predictions logged "
                f"(CD4ML_SERVICE_LOG_PREDICTIONS)?",
            )
            quarantined.append(
                _quarantine(zone, landed, problem, now, setting="CD4ML_SERVICE_LOG_PREDICTIONS")
            )
            continue
        # A file dropped again (same bytes) is accepted again but not recorded twice; recording is
        # idempotent anyway (the same label twice counts once), this only saves the disk.
        if landed.sha256[: landing.HASH_PREFIX] not in seen:
            _write_part(paths, checked, source=f"file:{landed.name}", received_at=now)
            rows += checked.num_rows
            unmatched += checked.num_rows - hits
        stored = landing.accept(
            zone, landed, rows=checked.num_rows, accepted_at=now.isoformat(), run_id="feedback"
        )
        seen[landed.sha256[: landing.HASH_PREFIX]] = Path(stored.path)
        accepted.append(landed.name)
    compact_labels(paths, before=now.astimezone(UTC).date())
    return FeedbackIngest(tuple(accepted), tuple(quarantined), rows, unmatched)


def compact_labels(paths: ModelPaths, *, before: date) -> int:
    """Rewrite each day of the label store before `before` as one part; returns the parts removed.

    Posted labels arrive a few per request, each commit one small part; reading thousands of them
    costs more than their bytes. A day is merged only once no writer adds to it (the service
    writes into the current UTC day). The merged part is renamed into place before the small ones
    go, and keeps their order, so a reader sees every label at every moment (at worst twice, which
    reading collapses). A day whose parts type outcomes differently (1 and "yes") is left as it is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    removed = 0
    days = sorted(d for d in paths.labels.iterdir() if d.is_dir()) if paths.labels.is_dir() else []
    for day_dir in days:
        if ModelPaths.partition_day(day_dir) >= before.isoformat():
            continue
        parts = sorted(day_dir.glob(PART_GLOB))
        if len(parts) < 2:
            continue
        try:
            merged = pa.concat_tables([pq.read_table(p) for p in parts], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            log.info("label parts of %s not merged (outcome types differ): %s", day_dir, err)
            continue
        name = f"{parts[0].stem}-merged-{len(parts)}.parquet"  # sorts where its first part did
        tmp = day_dir / f".{name}.tmp"
        pq.write_table(merged, tmp)
        tmp.replace(day_dir / name)
        for part in parts:
            part.unlink()
        removed += len(parts)
    return removed


def _quarantine(
    zone: ModelPaths,
    landed: landing.LandedFile,
    problem: LabelProblem,
    now: datetime,
    setting: str | None = None,
) -> QuarantinedLabels:
    reason = f"{landed.name}: {problem}. Label files need {FILE_FORMAT}."
    target = landing.quarantine(
        zone,
        landed,
        reason=reason,
        details={"problem": problem.problem, "column": problem.column, "setting": setting,
                 "expected": FILE_FORMAT, "quarantined_at": now.isoformat()},
    )  # fmt: skip
    return QuarantinedLabels(landed.name, str(target), reason, problem.column)


# -- reading ------------------------------------------------------------------------------------


def _all_labels(paths: ModelPaths) -> tuple[pa.Table, pd.Series] | None:
    """Every stored label as join keys (`request_id`, `row`, `labelled_at`, `_label`: its position
    in the store, oldest part first) plus every outcome (a Series indexed by `_label`), or None.

    Outcomes stay out of the Arrow table: parts may type them differently (1 in one, "yes" in
    another), which one Arrow column cannot hold but a pandas column can."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    for attempt in range(3):
        parts = label_parts(paths)
        if not parts:
            return None
        try:
            tables = [pq.read_table(p, columns=[REQUEST_ID, ROW, OUTCOME, LABELLED_AT]) for p in parts]
            break
        except FileNotFoundError:
            # `compact_labels` replaced a day's parts between listing and reading: list again.
            if attempt == 2:
                raise
    types = {t.schema.field(OUTCOME).type for t in tables}
    if len(types) == 1:
        # Chunks, not ChunkedArrays: given those, pa.chunked_array converts value by value in Python.
        chunks = [chunk for t in tables for chunk in t[OUTCOME].chunks]
        outcomes = pa.chunked_array(chunks, type=types.pop()).to_pandas()
    else:
        outcomes = pd.concat([t[OUTCOME].to_pandas().astype(object) for t in tables], ignore_index=True)
    keys = pa.concat_tables([t.select([REQUEST_ID, ROW, LABELLED_AT]) for t in tables])
    keys = keys.append_column("_label", pa.array(np.arange(keys.num_rows, dtype=np.int64)))
    return keys, outcomes


def _last_per_key(table: pa.Table, key: list[str], order: list[str]) -> pa.Table:
    """Per distinct `key`, the row that sorts last by `order`; the result is sorted by key.
    (One sort, then each row is kept unless the next row has the same key.)"""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = table.sort_by([(c, "ascending") for c in [*key, *order]])
    n = table.num_rows
    if n < 2:
        return table
    same: Any = None
    for c in key:
        equal = pc.equal(table[c].slice(1), table[c].slice(0, n - 1))
        same = equal if same is None else pc.and_(same, equal)
    keep = pa.chunked_array([pc.invert(same).combine_chunks(), pa.array([True])])
    return table.filter(keep)


def latest_labels(paths: ModelPaths) -> pd.DataFrame:
    """One label per (request_id, row): the one received last (ties: the one written last)."""
    import pandas as pd

    found = _all_labels(paths)
    if found is None:
        return pd.DataFrame(
            {REQUEST_ID: pd.Series(dtype=object), ROW: pd.Series(dtype="int64"),
             OUTCOME: pd.Series(dtype=object), LABELLED_AT: pd.Series(dtype="datetime64[us, UTC]")}
        )  # fmt: skip
    keys, outcomes = found
    frame = _last_per_key(keys, [REQUEST_ID, ROW], [LABELLED_AT, "_label"]).to_pandas()
    frame[OUTCOME] = outcomes.iloc[frame.pop("_label").to_numpy()].to_numpy()
    return frame[[REQUEST_ID, ROW, OUTCOME, LABELLED_AT]]


def _days(paths: ModelPaths, since: datetime | None, until: datetime | None) -> list[Path]:
    """The prediction log's parts whose day partition can hold times in [since, until)."""
    first = paths.prediction_day(since.astimezone(UTC).date()).name if since else ""
    last = (
        paths.prediction_day((until.astimezone(UTC) - timedelta(microseconds=1)).date()).name
        if until
        else None
    )
    return sorted(
        p for p in paths.predictions.glob(PREDICTION_PART_GLOB)
        if p.parent.name >= first and (last is None or p.parent.name <= last)
    )  # fmt: skip


def _time_mask(table: pa.Table, since: datetime | None, until: datetime | None) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    mask = None
    for bound, op in ((since, pc.greater_equal), (until, pc.less)):
        if bound is not None:
            cond = op(table["ts"], pa.scalar(bound.astimezone(UTC)).cast(table["ts"].type))
            mask = cond if mask is None else pc.and_(mask, cond)
    return mask


def _read_day(parts: list[Path]) -> pa.Table:
    """One day of the log as one table: parts may differ in columns (a new model version with
    other features) and types; parts from before the `row` column get it from their position."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cd4ml.serving.predlog import with_row

    tables = []
    for part in parts:
        table = pq.read_table(part)
        if ROW not in table.column_names:
            table = pa.Table.from_pandas(with_row(table.to_pandas()), preserve_index=False)
        tables.append(table)
    return pa.concat_tables(tables, promote_options="permissive")


def labelled_predictions(
    paths: ModelPaths, *, since: datetime | None = None, until: datetime | None = None
) -> pd.DataFrame:
    """One row per labelled (request_id, row) predicted in [since, until), ordered by
    (request_id, row): the logged features, `prediction`, `model_version` (text), `request_id`,
    `row`, `ts` (prediction time, UTC), `outcome`, `labelled_at`. The label received last counts;
    a request id logged twice joins its latest prediction.

    The join runs in Arrow (a hash join on (request_id, row)) over batches of whole days of the log
    (`JOIN_BATCH_ROWS`), so memory holds one batch plus what matched, not the whole log. Labels
    are made unique after the join, on what matched: a one-day window does not sort a year of labels."""
    import pandas as pd
    import pyarrow as pa

    tail = ["prediction", "model_version", REQUEST_ID, ROW, "ts", OUTCOME, LABELLED_AT]
    found = _all_labels(paths)
    if found is None:
        return pd.DataFrame(columns=tail)
    keys, outcomes = found
    by_day: dict[str, list[Path]] = {}
    for part in _days(paths, since, until):
        by_day.setdefault(part.parent.name, []).append(part)
    matched = []
    pending: list[pa.Table] = []

    def join_pending() -> None:
        # One hash join per batch of days: each join builds its hash table from all the labels,
        # so joining day by day would rebuild it every day.
        if pending:
            log = pa.concat_tables(pending, promote_options="permissive")
            log = log.set_column(log.schema.get_field_index(ROW), ROW, log[ROW].cast(pa.int64()))
            matched.append(log.join(keys, keys=[REQUEST_ID, ROW], join_type="inner"))
            pending.clear()

    for day in sorted(by_day):
        table = _read_day(by_day[day])
        mask = _time_mask(table, since, until)
        pending.append(table if mask is None else table.filter(mask))
        if sum(t.num_rows for t in pending) >= JOIN_BATCH_ROWS:
            join_pending()
    join_pending()
    joined = pa.concat_tables(matched, promote_options="permissive") if matched else None
    matched.clear()
    if joined is None or joined.num_rows == 0:
        return pd.DataFrame(columns=tail)
    joined = _last_per_key(joined, [REQUEST_ID, ROW], ["ts", LABELLED_AT, "_label"])
    label_index = joined["_label"].to_numpy()
    version = joined.schema.get_field_index("model_version")
    joined = joined.set_column(version, "model_version", joined["model_version"].cast(pa.string()))
    features = [c for c in joined.column_names if c not in tail and c != "_label"]
    ordered = joined.select([*features, *tail[:-2], LABELLED_AT])
    del joined
    # Columns in their final order before converting, and Arrow buffers freed while converting:
    # the frame is the only full copy held at the end.
    out = ordered.to_pandas(self_destruct=True, split_blocks=True)
    del ordered
    out.insert(len(out.columns) - 1, OUTCOME, outcomes.iloc[label_index].to_numpy())
    return out


def served_rows(
    paths: ModelPaths, *, since: datetime | None, until: datetime | None, version: str | None = None
) -> int:
    """Rows the service answered (and logged) in [since, until), for one version or all: the
    denominator of label coverage."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = 0
    for part in _days(paths, since, until):
        table = pq.read_table(part, columns=["ts", "model_version"])
        mask = _time_mask(table, since, until)
        if version is not None:
            same = pc.equal(table["model_version"].cast("string"), str(version))
            mask = same if mask is None else pc.and_(mask, same)
        total += table.num_rows if mask is None else (pc.sum(mask).as_py() or 0)
    return total


def label_parts(paths: ModelPaths) -> list[Path]:
    """Every stored label part, oldest day first (for readers keeping a watermark)."""
    return sorted(paths.labels.glob(LABEL_PART_GLOB)) if paths.labels.is_dir() else []
