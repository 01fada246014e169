"""Reading landed files into DataFrames, with errors that say what is wrong with the file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cd4ml.errors import DataReadError


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
        return pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataReadError(f"{path.name}: not a readable Parquet file: {err}") from None


def _read_csv(path: Path) -> pd.DataFrame:
    if path.stat().st_size == 0:
        raise DataReadError(f"{path.name}: the file is empty (0 bytes)")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise DataReadError(f"{path.name}: contains NUL bytes; this is not a CSV text file")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataReadError(
            f"{path.name}: not UTF-8 text (invalid byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "re-export the file as UTF-8"
        ) from None
    try:
        frame = pd.read_csv(path, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise DataReadError(f"{path.name}: no header row and no data") from None
    except pd.errors.ParserError as err:
        raise DataReadError(f"{path.name}: malformed CSV: {str(err).strip()}") from None
    if frame.shape[1] == 1 and any(sep in str(frame.columns[0]) for sep in (";", "\t", "|")):
        raise DataReadError(
            f"{path.name}: found a single column {str(frame.columns[0])[:80]!r}; "
            "the file looks delimited by something other than commas"
        )
    return frame
