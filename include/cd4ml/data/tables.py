"""Reading landed files into DataFrames, with errors that say what is wrong with the file."""

from __future__ import annotations

import csv
import io
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cd4ml.core.errors import DataReadError

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_NUMBER = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV (UTF-8, comma-separated, header row) or Parquet file."""
    suffix = path.suffix.lower()
    if suffix in {".parquet", ".pq"}:
        return _read_parquet(path)
    if suffix == ".csv":
        return _read_csv(path)
    raise DataReadError(
        f"{path.name}: unsupported file type {suffix or '(none)'!r}; land .csv or .parquet files"
    )


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow as pa

    try:
        frame = pd.read_parquet(path)
    # Arbitrary bytes can fail deep inside pyarrow or in pandas' metadata handling in many ways;
    # all of them mean the same thing to whoever landed the file.
    except (pa.ArrowException, OSError, ValueError, TypeError, KeyError, IndexError) as err:
        raise DataReadError(f"{path.name}: not a readable Parquet file: {err}") from None
    duplicated = sorted({str(c) for c in frame.columns if list(frame.columns).count(c) > 1})
    if duplicated:
        raise DataReadError(f"{path.name}: duplicate column names {duplicated}")
    return frame


def _read_csv(path: Path) -> pd.DataFrame:
    if path.stat().st_size == 0:
        raise DataReadError(f"{path.name}: the file is empty (0 bytes)")
    raw = path.read_bytes()
    if raw.startswith(_UTF16_BOMS):
        raise DataReadError(f"{path.name}: UTF-16 text, not UTF-8; re-export the file as UTF-8")
    if b"\x00" in raw[:65536]:
        raise DataReadError(f"{path.name}: contains NUL bytes; this is not a CSV text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataReadError(
            f"{path.name}: not UTF-8 text (invalid byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "re-export the file as UTF-8"
        ) from None
    _check_rows(path.name, raw, text)
    try:
        with warnings.catch_warnings():
            # pandas only warns when it drops fields; a dropped value is a broken file here.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            # index_col=False: rows with one field more than the header must not silently become an
            # index (which would shift every value one column to the left).
            frame = pd.read_csv(io.BytesIO(raw), encoding="utf-8", index_col=False)
    except pd.errors.ParserWarning as warning:
        raise DataReadError(f"{path.name}: malformed CSV: {warning}") from None
    except pd.errors.EmptyDataError:
        raise DataReadError(f"{path.name}: no header row and no data") from None
    except (pd.errors.ParserError, ValueError) as err:
        raise DataReadError(f"{path.name}: malformed CSV: {str(err).strip()}") from None
    if frame.shape[1] == 1 and any(sep in str(frame.columns[0]) for sep in (";", "\t", "|")):
        raise DataReadError(
            f"{path.name}: found a single column {str(frame.columns[0])[:80]!r}; "
            "the file looks delimited by something other than commas"
        )
    return _overflowed_numbers(frame)


def _overflowed_numbers(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns pandas left as text only because a literal overflows float64 ('1e400') become numbers.

    pandas' CSV parser gives up on a whole column at one such literal; the column is numeric, and its
    overflowed values are infinite, which validation rejects by name and count rather than as a
    column of "wrong type".
    """
    for col in frame.select_dtypes(include="object").columns:
        values = frame[col].dropna()
        if values.empty or not all(isinstance(v, str) and _NUMBER.match(v) for v in values):
            continue
        numbers = values.map(float)
        if any(math.isinf(x) for x in numbers):
            frame[col] = frame[col].map(lambda v: v if pd.isna(v) else float(v)).astype("float64")
    return frame


def _check_rows(name: str, raw: bytes, text: str) -> None:
    """Every row has as many fields as the header, and header names are unique.

    pandas fills short rows with nulls and may turn one extra field into an index; both hide a
    broken (often truncated) file behind plausible-looking data. Unquoted files are checked with a
    byte count first, so the row-by-row pass only runs when something is off (or when quotes make
    commas ambiguous).
    """
    first_line = text.lstrip("\ufeff").split("\n", 1)[0].rstrip("\r")
    if not first_line.strip():
        return  # no header: pandas reports it
    if "," not in first_line and any(sep in first_line for sep in (";", "\t", "|")):
        raise DataReadError(
            f"{name}: the header {first_line[:80]!r} has no commas; "
            "the file looks delimited by something other than commas"
        )
    quoted = b'"' in raw
    if not quoted:
        header = first_line.split(",")
        lines = raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)
        if raw.count(b",") == (len(header) - 1) * lines:
            _check_header(name, header)
            return
    try:
        reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
        header = next(reader)
        _check_header(name, header)
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line: pandas skips it too
            if len(row) != len(header):
                last = reader.line_num == _physical_lines(text)
                if last and not text.endswith("\n") and len(row) < len(header):
                    raise DataReadError(
                        f"{name}: truncated CSV: the last line ({reader.line_num}) has {len(row)} of "
                        f"{len(header)} fields and the file ends mid-row"
                    )
                raise DataReadError(
                    f"{name}: malformed CSV: line {reader.line_num} has {len(row)} fields; "
                    f"the header has {len(header)}"
                )
    except csv.Error as err:
        raise DataReadError(f"{name}: malformed CSV: {err}") from None


def _physical_lines(text: str) -> int:
    return text.count("\n") + (0 if text.endswith("\n") else 1)


def _check_header(name: str, header: list[str]) -> None:
    names = [h.strip() for h in header]
    duplicated = sorted({h for h in names if h and names.count(h) > 1})
    if duplicated:
        raise DataReadError(f"{name}: duplicate column names in the header: {duplicated}")


def category_text(value: Any) -> Any:
    """How a categorical value is compared everywhere (validation, training, serving): as text.

    Integral numbers render as integers: a CSV batch whose integer-coded column (a month 1-12) has
    one null is read as floats, and "5.0" must stay the category "5" that earlier batches taught the
    model, as must a request's 5 or 5.0. Nulls stay null; booleans and text keep str().
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        number = float(value)
        if math.isnan(number):
            return value
        if number.is_integer() and abs(number) < 2**53:  # beyond 2**53 a float is no exact integer code
            return str(int(number))
        return str(number)
    if value is pd.NA or value is pd.NaT:
        return value
    return str(value)
