"""Batch scoring (`<model>__score`): CSV/Parquet files or folders scored by the champion, in chunks.

    score/<file or folder>  ->  scored/runs/<run key>/<sha16>__<name>/predictions.parquet (+ .csv)
                                                                   rejects.parquet (+ .csv)
                                                                   manifest.json
                                scored/runs/<run key>/run.json     the run's record
                            ->  scored/inputs/<sha16>__<name>      the input, once scored
                            or  scored/quarantine/<sha16>__<name>  + .reason.txt/.json: unreadable

The champion is loaded once per run as the prediction service loads it (`serving.models.load_slot`:
skops with the allow-list, sanity-checked on its input example; with a signing key, a champion
without cd4ml's record is refused as the service refuses it). Rows are checked as the service checks
a request (`serving.payload`): a missing feature column makes the whole input unreadable; a value of
the wrong type or a non-finite number rejects its row, with the reason, into the rejects file, and
the other rows are scored. Missing values are allowed (the pipeline imputes them), and a
categorical value is the text `tables.category_text` gives it, so a row gets the answer the service
would give for it. CSV cells are text: a number-looking cell is a number (for a categorical, its
number's text, as pandas reads an integer-coded column for training).

Memory is bounded by `scoring.chunk_rows`, not by the file: inputs are read with pyarrow in chunks
(Parquet row batches; CSV streamed, and re-read with Python's csv module only when a line has the
wrong number of fields, so that exactly that line is rejected and every row keeps its number), and
each chunk's predictions are appended to the outputs before the next is read.

Idempotent on retry: each input is written to a temporary directory that is renamed into place
whole, its manifest first written inside it; the input leaves score/ only after that. A retried run
finds what its earlier try finished (by the run key and the input's sha256), scores the rest with
the same pinned version, and never writes an output twice. Nothing is deleted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cd4ml.core.errors import Cd4mlError, DataError
from cd4ml.core.paths import ModelPaths
from cd4ml.data.landing import HASH_PREFIX, file_sha256

if TYPE_CHECKING:  # the Models view and the score DAG's trigger import this module: keep it light
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from cd4ml.core.settings import Settings
    from cd4ml.core.spec import ModelSpec
    from cd4ml.serving.models import Slot

log = logging.getLogger(__name__)

CSV_SUFFIXES = {".csv"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
DATA_SUFFIXES = CSV_SUFFIXES | PARQUET_SUFFIXES
MANIFEST = "manifest.json"
PREDICTIONS = "predictions.parquet"
REJECTS = "rejects.parquet"
XCOM_INPUTS = 50  # inputs listed in a run's XCom (the record lists all)
# The cells pandas' read_csv reads as missing (its default na_values): training reads landed CSV
# files with pandas, so a scored CSV means the same by them.
CSV_NULLS = (
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
)  # fmt: skip
_CSV_BLOCK_BYTES = 4 << 20  # pyarrow's CSV block; chunks are re-cut to `chunk_rows`


class BatchScoringError(Cd4mlError):
    """A run could not score anything (no champion, a refused champion, every input unreadable)."""


class UnreadableInputError(DataError):
    """An input cannot be scored at all (its file type, its bytes, a missing column): quarantined."""


class _MalformedCsvError(Exception):
    """A CSV line has the wrong number of fields: the file is re-read line by line."""


# -- what the run finds in score/ ------------------------------------------------------------------


def _visible(name: str) -> bool:
    # As the landing zone: dot-files and *.part / *.tmp are still being written. `_SUCCESS` and the
    # like are markers that Spark and Hadoop writers leave in a folder of parts.
    return not name.startswith((".", "_")) and not name.endswith((".part", ".tmp", ".crc"))


def scan_inputs(directory: str | Path) -> dict[str, tuple[int, int]]:
    """Name -> (size, newest mtime_ns) of every visible file and folder in `directory`: what the
    score watcher compares between two polls (a folder counts as the sum of its files)."""
    out: dict[str, tuple[int, int]] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return out
    for entry in entries:
        if not _visible(entry.name):
            continue
        if entry.is_file():
            st = entry.stat()
            out[entry.name] = (st.st_size, st.st_mtime_ns)
        elif entry.is_dir():
            size, newest = 0, entry.stat().st_mtime_ns
            for part in Path(entry.path).rglob("*"):
                if part.is_file():
                    st = part.stat()
                    size, newest = size + st.st_size, max(newest, st.st_mtime_ns)
            out[entry.name] = (size, newest)
    return out


@dataclass(frozen=True)
class ScoreInput:
    """One thing to score: a file, or a folder whose data files (`parts`, relative) are one table."""

    name: str
    path: str
    parts: tuple[str, ...]  # a folder's data files, relative to `path`; (name,) for a file
    sha256: str
    size: int
    movable: bool = True  # in score/ (moved when done); False for a path given to the run
    ignored: tuple[str, ...] = ()  # a folder's other files (README, schema.json): not scored, not hashed

    @property
    def stored_name(self) -> str:
        return f"{self.sha256[:HASH_PREFIX]}__{self.name}"

    @property
    def is_folder(self) -> bool:
        return Path(self.path).is_dir()

    def part_path(self, part: str) -> Path:
        return Path(self.path) / part if self.is_folder else Path(self.path)


def describe_input(path: Path, *, movable: bool = True) -> ScoreInput:
    """A file or folder as an input: its parts and the sha256 of its bytes (a folder's: of its data
    parts' names and hashes, so the same parts give the same hash wherever they lie)."""
    if not path.is_dir():
        return ScoreInput(path.name, str(path), (path.name,), file_sha256(path), path.stat().st_size, movable)
    files = sorted(
        str(p.relative_to(path)) for p in path.rglob("*")
        if p.is_file() and all(_visible(n) for n in p.relative_to(path).parts)
    )  # fmt: skip
    parts = [f for f in files if Path(f).suffix.lower() in DATA_SUFFIXES]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(f"{part}\0{file_sha256(path / part)}\n".encode())
    size = sum((path / part).stat().st_size for part in parts)
    ignored = tuple(f for f in files if f not in parts)
    return ScoreInput(path.name, str(path), tuple(parts), digest.hexdigest(), size, movable, ignored)


def find_inputs(score_dir: Path) -> list[Path]:
    """Every file and folder waiting in score/, by name (hashed when its turn comes)."""
    if not score_dir.is_dir():
        return []
    return sorted(p for p in score_dir.iterdir() if _visible(p.name) and (p.is_file() or p.is_dir()))


# -- the records a run writes ----------------------------------------------------------------------


@dataclass(frozen=True)
class InputResult:
    """What scoring one input produced (its manifest.json)."""

    name: str
    sha256: str
    stored_name: str
    version: str
    run_id: str
    rows: int  # data rows read, well-formed or not
    scored: int
    rejected: int
    seconds: float
    chunks: int
    output_dir: str
    predictions: str | None  # None when no row could be scored
    rejects: str | None  # None when no row was rejected
    csv: bool
    problems: dict[str, dict[str, Any]] = field(default_factory=dict)  # column -> {"rows", "example"}
    ignored_files: list[str] = field(default_factory=list)  # non-data files inside a folder

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputResult:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class QuarantinedInput:
    name: str
    sha256: str
    reason: str
    path: str  # where it is now (scored/quarantine/..., or where it was given for a path input)


@dataclass(frozen=True)
class BatchRun:
    """One `<model>__score` run: what it scored, rejected and quarantined, with which version."""

    model: str
    run_id: str
    run_time: str
    trigger: str
    version: str | None
    outcome: str  # "scored", "failed" or "nothing to score"
    inputs: list[InputResult]
    quarantined: list[QuarantinedInput]
    rows_scored: int
    rows_rejected: int
    seconds: float
    error: str = ""
    record: str | None = None  # run.json, once written

    @property
    def rows_per_second(self) -> float | None:
        return self.rows_scored / self.seconds if self.seconds > 0 and self.rows_scored else None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows_per_second"] = self.rows_per_second
        return out

    def to_xcom(self) -> dict[str, Any]:
        """Small and JSON-able: the figures, and at most XCOM_INPUTS inputs (run.json has them all)."""
        out = self.as_dict()
        keep = ("name", "sha256", "rows", "scored", "rejected", "predictions", "rejects", "problems")
        out["inputs"] = [{k: i[k] for k in keep} for i in out["inputs"][:XCOM_INPUTS]]
        out["quarantined"] = out["quarantined"][:XCOM_INPUTS]
        return out


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)


def list_runs(paths: ModelPaths) -> list[dict[str, Any]]:
    """Every recorded batch run (run.json), newest first; an unreadable record is skipped."""
    out = []
    for path in paths.score_run_records():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict):
            out.append(record)
    return sorted(out, key=lambda r: (str(r.get("run_time", "")), str(r.get("run_id", ""))), reverse=True)


# -- checking rows as the service does --------------------------------------------------------------


@dataclass
class Checked:
    """One chunk after the row checks: the good rows as the model's input frame, and the problems."""

    frame: pd.DataFrame  # good rows only, the schema's columns in its order (as `Slot.frame`)
    good: np.ndarray  # bool per chunk row
    problems: dict[int, list[tuple[str, str]]]  # chunk row -> [(column, problem)]


def _decoded(column: Any) -> Any:
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column


def _numbers_from_text(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """CSV cells -> float64 (NaN where missing) and the mask of cells that are no number."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    trimmed = pc.utf8_trim_whitespace(values)
    try:
        numbers = pc.cast(trimmed, pa.float64()).to_numpy(zero_copy_only=False)
        return numbers, np.zeros(len(values), dtype=bool)
    except pa.ArrowInvalid:
        pass  # at least one cell is no number: find which, the slow way
    text = pd.Series(trimmed.to_numpy(zero_copy_only=False), dtype=object)
    numbers = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)
    present = text.notna().to_numpy()
    spelled_nan = text.str.lower().isin(["nan", "+nan", "-nan"]).to_numpy()
    suspects = np.flatnonzero(present & np.isnan(numbers) & ~spelled_nan)
    bad = np.zeros(len(values), dtype=bool)
    for i in suspects:  # few: pandas gives up on a literal that overflows ('1e400'), Python does not
        try:
            numbers[i] = float(text.iat[i])
        except ValueError:
            bad[i] = True
    return numbers, bad


Faults = list[tuple["np.ndarray", str]]  # (mask of bad rows, problem text with {value})


def _numeric(column: Any, from_text: bool) -> tuple[np.ndarray, Faults]:
    """A numeric feature: float64 values (NaN = missing) and what is wrong where, as the service
    says it: a number, finite; nothing else is cast (CSV cells are text, so there a number's text
    is its number)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    t = column.type
    n = len(column)
    textual = pa.types.is_string(t) or pa.types.is_large_string(t)
    faults: Faults = []
    if pa.types.is_null(t):
        return np.full(n, np.nan), faults
    if from_text and textual:
        numbers, not_number = _numbers_from_text(column)
        faults.append((not_number, "expected a number, got {value!r}"))
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        numbers = pc.cast(column, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    else:  # bool, text in a typed file, dates, lists: the service refuses them too
        present = column.is_valid().to_numpy(zero_copy_only=False)
        name = "str" if textual else str(t)
        return np.full(n, np.nan), [(present, f"expected a number, got {name} {{value!r}}")]
    faults.append((np.isinf(numbers), "expected a finite number, got {value!r}"))
    return numbers, faults


def _category(value: Any, from_text: bool) -> Any:
    import math

    from cd4ml.data.tables import category_text

    if from_text and isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            return value
        if not math.isfinite(number):
            return value
        # An integer literal keeps every digit (float would round a 20-digit code).
        return str(int(text)) if text.lstrip("+-").isdigit() else category_text(number)
    return category_text(value)


def _categorical(column: Any, from_text: bool) -> tuple[np.ndarray, Faults]:
    """A categorical feature: object values (None = missing; the text `category_text` gives) and
    what is wrong where (per the service: text, an integer code or a finite number)."""
    import math

    import numpy as np
    import pyarrow as pa

    t = column.type
    n = len(column)
    if pa.types.is_null(t):
        return np.full(n, None, dtype=object), []
    plain = (
        pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
        or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)
    )  # fmt: skip
    if not plain:
        present = column.is_valid().to_numpy(zero_copy_only=False)
        why = f"expected a category (text or an integer code), got {t} {{value!r}}"
        return np.full(n, None, dtype=object), [(present, why)]
    # Few distinct values per column: convert each once, then spread them by index.
    encoded = column.dictionary_encode()
    uniques = encoded.dictionary.to_pylist()
    converted = np.empty(len(uniques) + 1, dtype=object)
    broken = np.zeros(len(uniques) + 1, dtype=bool)
    for i, value in enumerate(uniques):
        if isinstance(value, float) and not math.isfinite(value):
            broken[i] = True  # NaN or inf as a category: the service refuses it too
        else:
            converted[i] = _category(float(value) if pa.types.is_decimal(t) else value, from_text)
    idx = encoded.indices.fill_null(len(uniques)).to_numpy(zero_copy_only=False)  # nulls: the last slot
    return converted[idx], [(broken[idx], "expected a category (text or an integer code), got {value!r}")]


def check_chunk(numerical: tuple[str, ...], categorical: tuple[str, ...], table: pa.Table, *,
                from_text: bool) -> Checked:  # fmt: skip
    """Check one chunk's feature columns as `serving.payload.check` checks a request's rows."""
    import numpy as np
    import pandas as pd

    n = table.num_rows
    good = np.ones(n, dtype=bool)
    problems: dict[int, list[tuple[str, str]]] = {}
    columns: dict[str, np.ndarray] = {}
    for name, is_num in [(c, True) for c in numerical] + [(c, False) for c in categorical]:
        column = _decoded(table.column(name))
        values, faults = _numeric(column, from_text) if is_num else _categorical(column, from_text)
        columns[name] = values
        for bad, why in faults:
            if not bad.any():
                continue
            good &= ~bad
            idx = np.flatnonzero(bad)
            shown = column.take(idx).to_pylist()
            for i, value in zip(idx.tolist(), shown, strict=True):
                problems.setdefault(i, []).append((name, why.format(value=value)[:200]))
    frame = pd.DataFrame({name: values[good] for name, values in columns.items()})
    for name in numerical:  # as Slot.frame: numbers as float64 even when none are left
        frame[name] = frame[name].astype(float)
    return Checked(frame, good, problems)


# -- the champion -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scorer:
    """The champion as loaded for the run: its answers per row, as the service gives them."""

    slot: Slot

    @property
    def version(self) -> str:
        return self.slot.version

    @property
    def numerical(self) -> tuple[str, ...]:
        return self.slot.schema.numerical

    @property
    def categorical(self) -> tuple[str, ...]:
        return self.slot.schema.categorical

    def output_names(self) -> list[str]:
        from cd4ml.core.spec import SCORING_PROBABILITY_PREFIX
        from cd4ml.data.tables import category_text

        classes = self.slot.classes or []
        return ["prediction"] + [f"{SCORING_PROBABILITY_PREFIX}{category_text(c)}" for c in classes]

    def predict(self, frame: pd.DataFrame) -> dict[str, Any]:
        """`prediction` (a label or a number) and, for a classifier with probabilities, one
        `probability_<class>` column per class: the service's `predictions` and `probabilities`."""
        import numpy as np
        from sklearn.pipeline import Pipeline

        model = self.slot.model
        if isinstance(model, Pipeline) and len(model.steps) > 1:
            # The preprocessing once for both answers: Pipeline.predict would repeat it per call.
            x, estimator = model[:-1].transform(frame), model[-1]
        else:
            x, estimator = frame, model
        if self.slot.classes is None:
            return {"prediction": estimator.predict(x)}
        proba = estimator.predict_proba(x)
        fast = self.slot.fast
        if fast is not None and fast.classes is not None:
            # The service answers through its fast path: the likeliest class, from the same
            # probabilities (one pass of the model instead of two: most of the time of a batch).
            labels = fast.classes[np.argmax(proba, axis=1)]
        else:
            labels = estimator.predict(x)
        out: dict[str, Any] = {"prediction": labels}
        for j, name in enumerate(self.output_names()[1:]):
            out[name] = proba[:, j]
        return out


def load_scorer(settings: Settings, model: str, version: str, signing_key: str | None) -> Scorer:
    """The version loaded as the service loads it; `BatchScoringError` if it must not score."""
    from cd4ml import registry
    from cd4ml.core.errors import is_transient
    from cd4ml.serving.models import load_slot

    client = registry.client(settings.mlflow_tracking_uri)
    mv = client.get_model_version(model, version)
    if signing_key:
        problem = registry.signature_problem(signing_key, model, version, dict(mv.tags or {}))
        if problem:
            raise BatchScoringError(
                f"{model}: champion points to version {version}, which cd4ml did not promote: {problem}. "
                f"Batch scoring refuses it as the prediction service does; promote through {model}__train "
                f"or {model}__rollback (they sign the record)"
            )
    try:
        return Scorer(load_slot(settings, model, mv))
    except Exception as err:
        if is_transient(err):
            raise
        raise BatchScoringError(
            f"{model}: champion version {version} cannot be loaded for scoring: {type(err).__name__}: {err}"
        ) from err


# -- reading inputs in chunks ------------------------------------------------------------------------


@dataclass
class Chunk:
    table: pa.Table  # the needed columns; CSV: text
    rows: np.ndarray  # each row's 0-based number among the input's data rows
    part: str  # the file it came from (a folder's part, relative)
    from_text: bool
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (row, why): CSV lines not read


def _rechunk(batches: Iterable[Any], size: int) -> Iterator[pa.Table]:
    import pyarrow as pa

    held: list[Any] = []
    count = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        held.append(batch)
        count += batch.num_rows
        while count >= size:
            table = pa.Table.from_batches(held)
            yield table.slice(0, size)
            rest = table.slice(size)
            held, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(held)


def _csv_header(path: Path) -> list[str]:
    if path.stat().st_size == 0:
        raise UnreadableInputError("the file is empty (0 bytes)")
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh), [])
    except UnicodeDecodeError as err:
        raise UnreadableInputError(f"not UTF-8 text ({err}); re-export the file as UTF-8") from None
    except csv.Error as err:
        raise UnreadableInputError(f"malformed CSV header: {err}") from None
    if not header:
        raise UnreadableInputError("no header row")
    return header


def _check_header(names: list[str]) -> None:
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UnreadableInputError(f"duplicate column names {duplicated}")
    if len(names) == 1 and any(sep in names[0] for sep in (";", "\t", "|")):
        raise UnreadableInputError(
            f"found a single column {names[0][:80]!r}; the file looks delimited by something other than "
            "commas (CSV files are UTF-8, comma-separated, with a header row)"
        )


def _csv_chunks(path: Path, part: str, columns: list[str], size: int, first_row: int) -> Iterator[Chunk]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pcsv

    options = pcsv.ConvertOptions(
        include_columns=columns, column_types=dict.fromkeys(columns, pa.string()),
        strings_can_be_null=True, null_values=list(CSV_NULLS),
    )  # fmt: skip
    row = first_row
    reader = None
    try:
        # Opening reads the first block: a malformed line there fails here already.
        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
                               convert_options=options)  # fmt: skip
        for table in _rechunk(reader, size):
            yield Chunk(table, np.arange(row, row + table.num_rows), part, from_text=True)
            row += table.num_rows
    except pa.ArrowInvalid as err:
        text = str(err)
        if "CSV parse error" in text and "Expected" in text:
            raise _MalformedCsvError(text) from None
        if "UTF8" in text or "UTF-8" in text:
            raise UnreadableInputError(
                f"not UTF-8 text ({text[:200]}); re-export the file as UTF-8"
            ) from None
        raise UnreadableInputError(f"not a readable CSV file: {text[:300]}") from None
    finally:
        if reader is not None:
            reader.close()


def _csv_chunks_by_line(
    path: Path, part: str, columns: list[str], size: int, first_row: int
) -> Iterator[Chunk]:
    """The slow reader for a CSV with malformed lines: a line with the wrong number of fields is a
    rejected row (numbered like the others), every other row is read as the fast reader reads it."""
    nulls = set(CSV_NULLS)
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            index = [header.index(c) for c in columns]
            width = len(header)
            values: list[list[str | None]] = [[] for _ in columns]
            numbers: list[int] = []
            malformed: list[tuple[int, str]] = []
            row = first_row
            for fields in reader:
                if not fields:
                    continue  # a blank line: pyarrow skips it too, and it is no row
                if len(fields) != width:
                    malformed.append(
                        (row, f"line {reader.line_num} has {len(fields)} fields; the header has {width}")
                    )
                else:
                    for j, i in enumerate(index):
                        cell = fields[i]
                        values[j].append(None if cell in nulls else cell)
                    numbers.append(row)
                row += 1
                if len(numbers) + len(malformed) >= size:
                    yield _text_chunk(columns, values, numbers, part, malformed)
                    values, numbers, malformed = [[] for _ in columns], [], []
            if numbers or malformed:
                yield _text_chunk(columns, values, numbers, part, malformed)
    except UnicodeDecodeError as err:
        raise UnreadableInputError(f"not UTF-8 text ({err}); re-export the file as UTF-8") from None
    except csv.Error as err:
        raise UnreadableInputError(f"malformed CSV: {err}") from None


def _text_chunk(columns: list[str], values: list[list[str | None]], numbers: list[int], part: str,
                malformed: list[tuple[int, str]]) -> Chunk:  # fmt: skip
    import numpy as np
    import pyarrow as pa

    table = pa.table({c: pa.array(v, type=pa.string()) for c, v in zip(columns, values, strict=True)})
    return Chunk(table, np.asarray(numbers, dtype=np.int64), part, True, malformed)


def _parquet_names(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise UnreadableInputError(f"not a readable Parquet file: {err}") from None


def _parquet_chunks(path: Path, part: str, columns: list[str], size: int, first_row: int) -> Iterator[Chunk]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = first_row
    try:
        with pq.ParquetFile(path) as pf:
            for batch in pf.iter_batches(batch_size=size, columns=columns):
                table = pa.Table.from_batches([batch])
                yield Chunk(table, np.arange(row, row + table.num_rows), part, from_text=False)
                row += table.num_rows
    except (pa.ArrowException, OSError) as err:
        raise UnreadableInputError(f"not a readable Parquet file: {err}") from None


def _names(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return _csv_header(path)
    if suffix in PARQUET_SUFFIXES:
        return _parquet_names(path)
    raise UnreadableInputError(
        f"unsupported file type {suffix or '(none)'!r}; score .csv or .parquet files (or a folder of them)"
    )


# -- writing outputs ----------------------------------------------------------------------------------


class _Outputs:
    """predictions.parquet and rejects.parquet (+ .csv) of one input, appended chunk by chunk."""

    def __init__(self, directory: Path, csv_too: bool) -> None:
        self.directory = directory
        self.csv_too = csv_too
        self.writers: dict[str, list[Any]] = {}
        self.schemas: dict[str, Any] = {}

    def append(self, name: str, table: pa.Table) -> None:
        import pyarrow as pa
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        if name not in self.writers:
            self.schemas[name] = table.schema
            writers: list[Any] = [pq.ParquetWriter(self.directory / f"{name}.parquet", table.schema)]
            if self.csv_too:
                writers.append(pcsv.CSVWriter(self.directory / f"{name}.csv", table.schema))
            self.writers[name] = writers
        elif table.schema != self.schemas[name]:
            try:
                table = table.cast(self.schemas[name])
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise UnreadableInputError(
                    f"the parts disagree on column types ({err}); write every part with the same schema"
                ) from None
        for writer in self.writers[name]:
            writer.write_table(table)

    def close(self) -> None:
        for writers in self.writers.values():
            for writer in writers:
                writer.close()

    def written(self, name: str) -> str | None:
        return str(self.directory / f"{name}.parquet") if name in self.writers else None


def _constant(value: str, n: int) -> Any:
    import pyarrow as pa

    return pa.repeat(pa.scalar(value, pa.string()), n)


# -- scoring one input ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFacts:
    model: str
    run_id: str
    keep_columns: tuple[str, ...]
    chunk_rows: int
    csv: bool


def _missing_columns(spec: ModelSpec, scorer: Scorer, keep: tuple[str, ...], names: list[str]) -> str | None:
    def setting(column: str) -> str:
        if column in keep:
            return "scoring.keep_columns"
        if column in spec.numerical:
            return "features.numerical"
        if column in spec.categorical:
            return "features.categorical"
        return "an input of the champion's signature, from the spec it was trained with"

    needed = [*scorer.numerical, *scorer.categorical, *keep]
    missing = [c for c in dict.fromkeys(needed) if c not in names]
    if not missing:
        return None
    listed = ", ".join(f"{c!r} ({setting(c)})" for c in missing)
    return (
        f"missing column(s) {listed}; champion version {scorer.version} takes "
        f"{len(scorer.numerical) + len(scorer.categorical)} feature columns as input"
    )


def _chunks(inp: ScoreInput, columns: list[str], size: int, slow: set[str]) -> Iterator[Chunk]:
    row = 0
    for part in inp.parts:
        path = inp.part_path(part)
        if path.suffix.lower() in PARQUET_SUFFIXES:
            reader = _parquet_chunks(path, part, columns, size, row)
        elif part in slow:
            reader = _csv_chunks_by_line(path, part, columns, size, row)
        else:
            reader = _csv_chunks(path, part, columns, size, row)
        for chunk in reader:
            yield chunk
            row = int(chunk.rows[-1]) + 1 if len(chunk.rows) else row
            if chunk.malformed:
                row = max(row, max(r for r, _ in chunk.malformed) + 1)


def score_input(
    spec: ModelSpec, scorer: Scorer, inp: ScoreInput, facts: RunFacts, out_dir: Path
) -> InputResult:
    """Score one input into `out_dir` (created here, whole or not at all) and return its manifest.

    Raises UnreadableInputError (nothing left behind) when the input cannot be scored at all.
    """
    if inp.is_folder and not inp.parts:
        raise UnreadableInputError("a folder with no .csv or .parquet file in it")
    for part in inp.parts:
        names = _names(inp.part_path(part))
        _check_header(names)
        missing = _missing_columns(spec, scorer, facts.keep_columns, names)
        if missing:
            raise UnreadableInputError(f"{part}: {missing}" if inp.is_folder else missing)
    slow: set[str] = set()
    while True:
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # an earlier try's half-written outputs
        tmp.mkdir(parents=True)
        try:
            result = _score_chunks(scorer, inp, facts, tmp, slow, out_dir)
            break
        except _MalformedCsvError:
            # Only the fast reader raises this; the file is read again line by line, from the top.
            slow |= {p for p in inp.parts if Path(p).suffix.lower() in CSV_SUFFIXES}
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    result = InputResult(**{**result.as_dict(), "ignored_files": list(inp.ignored)})
    _write_json(tmp / MANIFEST, result.as_dict())
    os.replace(tmp, out_dir)  # the input's outputs appear whole, at once
    return result


def _score_chunks(scorer: Scorer, inp: ScoreInput, facts: RunFacts, tmp: Path, slow: set[str],
                  out_dir: Path) -> InputResult:  # fmt: skip
    import numpy as np
    import pyarrow as pa

    started = time.perf_counter()
    keep = list(facts.keep_columns)
    features = [*scorer.numerical, *scorer.categorical]
    columns = list(dict.fromkeys([*features, *keep]))
    outputs = _Outputs(tmp, facts.csv)
    rows = scored = rejected = chunks = 0
    problems: dict[str, dict[str, Any]] = {}
    try:
        for chunk in _chunks(inp, columns, facts.chunk_rows, slow):
            chunks += 1
            checked = check_chunk(
                scorer.numerical, scorer.categorical, chunk.table, from_text=chunk.from_text
            )
            n_good = int(checked.good.sum())
            rows += chunk.table.num_rows + len(chunk.malformed)
            if n_good:
                answers = scorer.predict(checked.frame)
                good_idx = np.flatnonzero(checked.good)
                table = pa.table({
                    "row": pa.array(chunk.rows[good_idx], pa.int64()),
                    "input_file": _constant(chunk.part, n_good),
                    **{c: _decoded(chunk.table.column(c).take(good_idx)) for c in keep},
                    **{name: pa.array(values) for name, values in answers.items()},
                    "model_version": _constant(scorer.version, n_good),
                    "run_id": _constant(facts.run_id, n_good),
                    "input_sha256": _constant(inp.sha256, n_good),
                })  # fmt: skip
                outputs.append("predictions", table)
                scored += n_good
            bad = _rejects(chunk, checked, keep, problems)
            if bad is not None:
                outputs.append("rejects", bad)
                rejected += bad.num_rows
    finally:
        outputs.close()
    return InputResult(
        name=inp.name, sha256=inp.sha256, stored_name=inp.stored_name, version=scorer.version,
        run_id=facts.run_id, rows=rows, scored=scored, rejected=rejected,
        seconds=round(time.perf_counter() - started, 3), chunks=chunks, output_dir=str(out_dir),
        predictions=_final(outputs.written("predictions"), tmp, out_dir),
        rejects=_final(outputs.written("rejects"), tmp, out_dir), csv=facts.csv, problems=problems,
    )  # fmt: skip


def _final(written: str | None, tmp: Path, out_dir: Path) -> str | None:
    return str(out_dir / Path(written).relative_to(tmp)) if written else None


def _rejects(
    chunk: Chunk, checked: Checked, keep: list[str], problems: dict[str, dict[str, Any]]
) -> pa.Table | None:
    """The chunk's rejected rows: number, file, the columns at fault, why, and the kept columns."""
    import numpy as np
    import pyarrow as pa

    if not checked.problems and not chunk.malformed:
        return None
    ordered = sorted(checked.problems)
    rows = [int(chunk.rows[i]) for i in ordered] + [r for r, _ in chunk.malformed]
    columns = [", ".join(c for c, _ in checked.problems[i]) for i in ordered] + [None] * len(chunk.malformed)
    reasons = ["; ".join(f"{c}: {p}" for c, p in checked.problems[i]) for i in ordered]
    reasons += [why for _, why in chunk.malformed]
    for i in ordered:
        for column, problem in checked.problems[i]:
            seen = problems.setdefault(column, {"rows": 0, "example": problem})
            seen["rows"] += 1
    if chunk.malformed:
        seen = problems.setdefault("(malformed line)", {"rows": 0, "example": chunk.malformed[0][1]})
        seen["rows"] += len(chunk.malformed)
    n = len(rows)
    kept = {}
    for c in keep:
        values = chunk.table.column(c).take(np.asarray(ordered, dtype=np.int64))
        kept[c] = pa.concat_arrays([_decoded(values), pa.nulls(len(chunk.malformed), _decoded(values).type)])
    return pa.table({
        "row": pa.array(rows, pa.int64()),
        "input_file": _constant(chunk.part, n),
        **kept,
        "columns": pa.array(columns, pa.string()),
        "reason": pa.array(reasons, pa.string()),
    }).sort_by("row")  # fmt: skip


# -- one run -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringRun:
    """Where one scoring run keeps its state, and what it records."""

    paths: ModelPaths
    model: str
    run_id: str
    run_time: str
    trigger: str

    @property
    def key(self) -> str:
        from cd4ml.steps.pipeline import run_key

        return run_key(self.run_id)

    @property
    def dir(self) -> Path:
        return self.paths.score_run_dir(self.key)

    @property
    def quarantined_dir(self) -> Path:
        return self.dir / "quarantined"  # one marker per input this run quarantined

    def pinned(self) -> str | None:
        state = self.paths.score_run_state(self.key)
        return str(json.loads(state.read_text(encoding="utf-8"))["version"]) if state.exists() else None

    def pin(self, version: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.paths.score_run_state(self.key), {"version": version})

    def earlier(self) -> tuple[list[InputResult], list[QuarantinedInput]]:
        """What earlier tries of this run finished (outputs renamed into place, quarantines recorded);
        a `.<name>.tmp` directory is an output that was never finished."""
        done = [
            InputResult.from_dict(json.loads(p.read_text(encoding="utf-8")))
            for p in sorted(self.dir.glob(f"*/{MANIFEST}"))
            if not p.parent.name.startswith(".")
        ]
        quarantined = [
            QuarantinedInput(**json.loads(p.read_text(encoding="utf-8")))
            for p in sorted(self.quarantined_dir.glob("*.json"))
        ]
        return done, quarantined

    def record(self, version: str | None, done: list[InputResult], quarantined: list[QuarantinedInput],
               seconds: float, error: str = "") -> BatchRun:  # fmt: skip
        path = self.paths.score_run_record(self.key)
        run = BatchRun(
            model=self.model, run_id=self.run_id, run_time=self.run_time, trigger=self.trigger,
            version=version, outcome="failed" if error else "scored", inputs=done, quarantined=quarantined,
            rows_scored=sum(r.scored for r in done), rows_rejected=sum(r.rejected for r in done),
            seconds=round(seconds, 3), error=error, record=str(path),
        )  # fmt: skip
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(path, run.as_dict())
        return run

    def quarantine(self, inp: ScoreInput, reason: str) -> QuarantinedInput:
        """Record why, then move the input aside with its reason files (never deleted, never lost)."""
        text = f"{inp.name} could not be scored: {reason}"
        marker = self.quarantined_dir / f"{inp.stored_name}.json"
        marker.parent.mkdir(parents=True, exist_ok=True)
        record = QuarantinedInput(inp.name, inp.sha256, text, inp.path)
        _write_json(marker, asdict(record))
        if not inp.movable:
            return record
        target = _move_aside(self.paths.score_quarantine, inp)
        target.with_name(target.name + ".reason.txt").write_text(
            text + "\nFix it and drop it into score/ again.\n", encoding="utf-8"
        )
        details = {"file": inp.name, "sha256": inp.sha256, "reason": text, "run_id": self.run_id}
        _write_json(target.with_name(target.name + ".reason.json"), details)
        record = QuarantinedInput(inp.name, inp.sha256, text, str(target))
        _write_json(marker, asdict(record))
        return record


def _move_aside(directory: Path, inp: ScoreInput) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target, n = directory / inp.stored_name, 1
    while target.exists():
        target, n = directory / f"{inp.stored_name}.{n}", n + 1
    os.replace(inp.path, target)
    return target


def champion_scorer(
    settings: Settings, model: str, signing_key: str | None
) -> Callable[[ScoringRun], Scorer]:
    """The default `champion` of `score_pending`: the version the run pinned on its first try, else
    the `champion` alias now (then pinned, so a retry after the alias moved scores with the same)."""

    def load(run: ScoringRun) -> Scorer:
        from cd4ml import registry

        version = run.pinned()
        if version is None:
            client = registry.client(settings.mlflow_tracking_uri)
            mv = registry.version_by_alias(client, model, registry.CHAMPION)
            if mv is None:
                raise BatchScoringError(
                    f"{model}: no champion yet, so nothing was scored; the inputs stay in score/ and the "
                    f"next run scores them (train one with {model}__train)"
                )
            version = str(mv.version)
            run.pin(version)
        return load_scorer(settings, model, version, signing_key)

    return load


def score_pending(
    spec: ModelSpec,
    settings: Settings,
    *,
    run_id: str,
    run_time: str,
    trigger: str,
    signing_key: str | None = None,
    source: str | None = None,
    champion: Callable[[ScoringRun], Scorer] | None = None,
) -> BatchRun:
    """The `score_files` step: score everything waiting in score/ (or the file or folder `source`,
    scored where it is and not moved) with the champion, and record the run.

    `champion` gives the scorer (default `champion_scorer`: the champion, loaded as the service
    loads it and refused without cd4ml's record when `signing_key`, the service's admin token, is
    given). Raises BatchScoringError (not retried) when there is no champion to score with, the
    champion is refused, or inputs were found and not one row could be scored; the run record is
    written first. A run that finds nothing to score records nothing.
    """
    paths = ModelPaths.for_model(settings, spec.name)
    run = ScoringRun(paths, spec.name, run_id, run_time, trigger)
    if source:
        given = Path(source)
        if not given.is_absolute() or not given.exists():
            raise BatchScoringError(f"{spec.name}: {source!r} (the run's path) is no existing absolute path")
        waiting = [given]
    else:
        waiting = find_inputs(paths.score)
    done, quarantined = run.earlier()
    if not waiting and not done and not quarantined:
        log.info("%s: nothing waits in %s; nothing to score", spec.name, paths.score)
        return BatchRun(spec.name, run_id, run_time, trigger, None, "nothing to score", [], [], 0, 0, 0.0)
    started = time.perf_counter()
    try:
        scorer = (champion or champion_scorer(settings, spec.name, signing_key))(run)
    except BatchScoringError as err:
        run.record(run.pinned(), done, quarantined, time.perf_counter() - started, str(err))
        raise
    facts = RunFacts(spec.name, run_id, tuple(spec.scoring.keep_columns), spec.scoring.chunk_rows,
                     spec.scoring.csv)  # fmt: skip
    finished = {(r.sha256, r.name) for r in done}
    for path in waiting:
        inp = describe_input(path, movable=source is None)
        out_dir = run.dir / inp.stored_name
        if (out_dir / MANIFEST).exists():
            # An earlier try scored it and stopped before moving it: only the move is left.
            if (inp.sha256, inp.name) not in finished:
                done.append(
                    InputResult.from_dict(json.loads((out_dir / MANIFEST).read_text(encoding="utf-8")))
                )
        else:
            try:
                result = score_input(spec, scorer, inp, facts, out_dir)
            except UnreadableInputError as err:
                quarantined = [q for q in quarantined if (q.sha256, q.name) != (inp.sha256, inp.name)]
                quarantined.append(run.quarantine(inp, str(err)))
                log.warning("%s: %s", spec.name, quarantined[-1].reason)
                continue
            done.append(result)
            log.info("%s: %s: %d rows scored, %d rejected (version %s) -> %s", spec.name, inp.name,
                     result.scored, result.rejected, scorer.version, out_dir)  # fmt: skip
        if inp.movable:
            _move_aside(paths.scored_inputs, inp)
    seconds = time.perf_counter() - started
    if any(r.scored for r in done):
        return run.record(scorer.version, done, quarantined, seconds)
    why = [q.reason for q in quarantined]
    why += [f"{r.name}: all {r.rejected} rows rejected, e.g. {_first_problem(r)}" for r in done if r.rejected]
    why += [f"{r.name}: no data rows" for r in done if not r.rows]
    error = f"{spec.name}: nothing could be scored (version {scorer.version}):\n" + "\n".join(
        f"- {w}" for w in why
    )
    run.record(scorer.version, done, quarantined, seconds, error)
    raise BatchScoringError(error)


def _first_problem(result: InputResult) -> str:
    for column, seen in result.problems.items():
        return f"{column}: {seen['example']} ({seen['rows']} rows)"
    return "?"
