"""A corpus of broken data files for the demo churn model, built from the demo generator.

Every entry is one way a landed file goes wrong in real life, the bytes of that file, and the words
the quarantine reason must contain so that whoever landed it knows what to fix. Each entry comes
from its own generated batch, so no two files share bytes (a byte-identical file would be
quarantined as a duplicate instead, hiding the problem under test).
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from cd4ml_dev.datagen import generate_churn

ROWS = 300  # well above the demo spec's validation.min_rows (50)


@dataclass(frozen=True)
class Corruption:
    kind: str
    filename: str
    content: bytes
    expect: tuple[str, ...]  # every one of these must appear in the quarantine reason
    stage: Literal["read", "validation"]  # rejected when reading the file, or by the GX suite


def clean_batch(batch: int, rows: int = ROWS, seed: int = 7) -> pd.DataFrame:
    return generate_churn(rows, seed=seed, batch=batch)


def csv_bytes(frame: pd.DataFrame, **kwargs: object) -> bytes:
    return frame.to_csv(index=False, **kwargs).encode("utf-8")  # type: ignore[call-overload]


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def png_bytes() -> bytes:
    """A real (1x1, red) PNG image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def zip_bytes(inner: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data.csv", inner)
    return buf.getvalue()


def _every(frame: pd.DataFrame, n: int) -> pd.Series:
    return pd.Series(np.arange(len(frame)) % n == 0, index=frame.index)


def _cut_mid_row(data: bytes, fraction: float) -> bytes:
    cut = int(len(data) * fraction)
    while data[cut - 1 : cut] in (b"\n", b","):  # end inside a value, not on a boundary
        cut += 1
    return data[:cut]


def _replace_line(data: bytes, line_no: int, new: bytes) -> bytes:
    lines = data.split(b"\n")
    lines[line_no] = new
    return b"\n".join(lines)


Built = tuple[str, bytes, tuple[str, ...], Literal["read", "validation"]]
Builder = Callable[[pd.DataFrame], Built]


def _v(ext: str, content: bytes, *expect: str) -> Built:
    return ext, content, expect, "validation"


def _r(ext: str, content: bytes, *expect: str) -> Built:
    return ext, content, expect, "read"


def _cases() -> dict[str, Builder]:
    def missing_column(f: pd.DataFrame) -> Built:
        return _v("csv", csv_bytes(f.drop(columns=["plan"])), "missing columns ['plan']")

    def renamed_column(f: pd.DataFrame) -> Built:
        g = f.rename(columns={"monthly_charges": "monthly_charge"})
        return _v(
            "csv",
            csv_bytes(g),
            "missing columns ['monthly_charges']",
            "unexpected columns ['monthly_charge']",
        )

    def extra_column(f: pd.DataFrame) -> Built:
        g = f.assign(coupon_code="SPRING")
        return _v("csv", csv_bytes(g), "unexpected columns ['coupon_code']")

    def missing_target(f: pd.DataFrame) -> Built:
        return _v("csv", csv_bytes(f.drop(columns=["churned"])), "missing columns ['churned']")

    def wrong_dtype(f: pd.DataFrame) -> Built:
        g = f.assign(tenure_months=f["tenure_months"].astype(str) + " months")
        return _v("csv", csv_bytes(g), "column 'tenure_months': has type", "expected a numeric type")

    def numbers_as_strings(f: pd.DataFrame) -> Built:
        g = f.assign(monthly_charges=f["monthly_charges"].astype(str))
        return _v(
            "parquet", parquet_bytes(g), "column 'monthly_charges': has type", "expected a numeric type"
        )

    def decimal_comma(f: pd.DataFrame) -> Built:
        g = f.assign(monthly_charges=f["monthly_charges"].map(lambda v: f"{v:.2f}".replace(".", ",")))
        return _v("csv", csv_bytes(g), "column 'monthly_charges': has type", "expected a numeric type")

    def nulls_above_tolerance(f: pd.DataFrame) -> Built:
        g = f.assign(support_calls=f["support_calls"].where(~_every(f, 10)))
        return _v(
            "csv",
            csv_bytes(g),
            "column 'support_calls': 30 of 300 rows are null",
            "at most 2.0% allowed",
            "validation.max_null_fraction = 0.02",
        )

    def out_of_range(f: pd.DataFrame) -> Built:
        g = f.assign(tenure_months=f["tenure_months"].where(~_every(f, 10), -7))
        return _v(
            "csv",
            csv_bytes(g),
            "column 'tenure_months': 30 of 300 rows outside [0, 120]",
            "'-7'",
            "features.numerical[tenure_months].min = 0",
        )

    def infinite_values(f: pd.DataFrame) -> Built:
        g = f.assign(monthly_charges=f["monthly_charges"].where(~_every(f, 50), np.inf))
        return _v("csv", csv_bytes(g), "column 'monthly_charges': 6 of 300 rows are not finite", "inf")

    def few_infinite_values(f: pd.DataFrame) -> Built:
        # 2 of 300 rows: under the 1% that may fall outside a learned range, and still refused.
        g = f.assign(support_calls=f["support_calls"].astype(float).where(~_every(f, 150), -np.inf))
        return _v("parquet", parquet_bytes(g), "column 'support_calls': 2 of 300 rows are not finite", "-inf")

    def overflowing_literal(f: pd.DataFrame) -> Built:
        # '1e400' does not fit a float64: pandas leaves the column as text, cd4ml reads it as inf.
        data = csv_bytes(f)
        lines = data.split(b"\n")
        header = lines[0].split(b",")
        col = header.index(b"monthly_charges")
        for i in (10, 20, 30):
            fields = lines[i].split(b",")
            fields[col] = b"1e400"
            lines[i] = b",".join(fields)
        return _v("csv", b"\n".join(lines), "column 'monthly_charges': 3 of 300 rows are not finite", "inf")

    def column_scaled_by_a_million(f: pd.DataFrame) -> Built:
        g = f.assign(support_calls=f["support_calls"] * 1_000_000)
        return _v(
            "csv",
            csv_bytes(g),
            "column 'support_calls':",
            "rows outside [",
            "validation.max_outside_learned_range = 0.01",
        )

    def column_in_cents(f: pd.DataFrame) -> Built:
        # A unit change (dollars -> cents, x100) is far outside the learned range, not growth.
        g = f.assign(monthly_charges=f["monthly_charges"] * 100)
        return _v(
            "csv",
            csv_bytes(g),
            "column 'monthly_charges':",
            "far outside the range learned from accepted data",
            "validation.max_outside_learned_range = 0.01",
            "validation.far_range_multiple = 10",
        )

    def column_scaled_by_a_thousand(f: pd.DataFrame) -> Built:
        g = f.assign(support_calls=f["support_calls"] * 1000)
        return _v(
            "parquet",
            parquet_bytes(g),
            "column 'support_calls':",
            "far outside the range learned from accepted data",
            "validation.max_outside_learned_range = 0.01",
        )

    def unseen_category(f: pd.DataFrame) -> Built:
        g = f.assign(contract=f["contract"].where(~_every(f, 10), "lifetime"))
        return _v(
            "csv",
            csv_bytes(g),
            "column 'contract': 30 of 300 rows not in the known values",
            "'lifetime'",
            "features.categorical[contract].values",
        )

    def unseen_learned_category(f: pd.DataFrame) -> Built:
        g = f.assign(region=f["region"].where(~_every(f, 10), "atlantis"))
        return _v(
            "csv",
            csv_bytes(g),
            "column 'region': 30 of 300 rows not in the known values",
            "'atlantis'",
            "validation.max_new_category_fraction = 0.05",
        )

    def relabelled_target(f: pd.DataFrame) -> Built:
        g = f.assign(churned=f["churned"].map({0: "no", 1: "yes"}))
        return _v("csv", csv_bytes(g), "column 'churned': 300 of 300 rows not in the known values [0, 1]")

    def constant_target(f: pd.DataFrame) -> Built:
        return _v("csv", csv_bytes(f.assign(churned=0)), "column 'churned': has 1 distinct value(s)")

    def unparseable_timestamps(f: pd.DataFrame) -> Built:
        g = f.assign(event_time=f["event_time"].where(~_every(f, 10), "soon"))
        return _v("csv", csv_bytes(g), "column 'event_time': 30 of 300 rows are not timestamps", "'soon'")

    def duplicate_rows(f: pd.DataFrame) -> Built:
        g = pd.concat([f.iloc[:240], f.iloc[:60]], ignore_index=True)
        return _v(
            "csv",
            csv_bytes(g),
            "table: 120 of 300 rows are duplicated rows",
            "validation.max_excess_duplicate_fraction",
        )

    def export_appended_to_itself(f: pd.DataFrame) -> Built:
        g = pd.concat([f.iloc[:150], f.iloc[:150]], ignore_index=True)
        return _v("csv", csv_bytes(g), "table: 300 of 300 rows are duplicated rows")

    def too_few_rows(f: pd.DataFrame) -> Built:
        return _v(
            "csv",
            csv_bytes(f.iloc[:10]),
            "table: has 10 rows; at least 50 required",
            "validation.min_rows = 50",
        )

    def header_only(f: pd.DataFrame) -> Built:
        return _v("csv", csv_bytes(f.iloc[:0]), "table: has 0 rows; at least 50 required")

    def parquet_other_schema(f: pd.DataFrame) -> Built:
        g = pd.DataFrame({"customer_id": np.arange(len(f)), "amount": f["monthly_charges"], "label": "x"})
        return _v(
            "parquet",
            parquet_bytes(g),
            "missing columns ['age', 'churned',",
            "unexpected columns ['amount', 'customer_id', 'label']",
        )

    def empty_file(f: pd.DataFrame) -> Built:
        return _r("csv", b"", "the file is empty (0 bytes)")

    def blank_lines_only(f: pd.DataFrame) -> Built:
        return _r("csv", b"\n\n   \n\n", "no header row and no data")

    def truncated_csv(f: pd.DataFrame) -> Built:
        return _r("csv", _cut_mid_row(csv_bytes(f), 0.6), "truncated CSV", "file ends mid-row")

    def ragged_row(f: pd.DataFrame) -> Built:
        data = _replace_line(csv_bytes(f), 100, b"1,2,3,4,5,6,7,8,9,10,11")
        return _r("csv", data, "malformed CSV", "line 101 has 11 fields; the header has 9")

    def short_row(f: pd.DataFrame) -> Built:
        data = _replace_line(csv_bytes(f), 50, b"2026-01-01T00:00:00Z,12,50.0,1,40")
        return _r("csv", data, "malformed CSV", "line 51 has 5 fields; the header has 9")

    def every_row_one_field_too_many(f: pd.DataFrame) -> Built:
        # A trailing comma on every data row: pandas would read the first column as an index and
        # shift every value one column to the left.
        lines = csv_bytes(f).rstrip(b"\n").split(b"\n")
        data = b"\n".join([lines[0], *(line + b"," for line in lines[1:])]) + b"\n"
        return _r("csv", data, "malformed CSV", "line 2 has 10 fields; the header has 9")

    def unterminated_quote(f: pd.DataFrame) -> Built:
        lines = csv_bytes(f).split(b"\n")
        lines[200] = b'"' + lines[200]
        return _r("csv", b"\n".join(lines), "malformed CSV")

    def duplicated_header(f: pd.DataFrame) -> Built:
        data = csv_bytes(f).replace(b",region,", b",age,", 1)
        return _r("csv", data, "duplicate column names in the header: ['age']")

    def semicolon_delimited(f: pd.DataFrame) -> Built:
        return _r("csv", csv_bytes(f, sep=";"), "delimited by something other than commas")

    def tab_delimited(f: pd.DataFrame) -> Built:
        return _r("csv", csv_bytes(f, sep="\t"), "delimited by something other than commas")

    def latin1_encoded(f: pd.DataFrame) -> Built:
        g = f.assign(region=f["region"].where(~_every(f, 10), "süd"))
        data = g.to_csv(index=False).encode("latin-1")
        return _r("csv", data, "not UTF-8 text (invalid byte 0xfc")

    def utf16_encoded(f: pd.DataFrame) -> Built:
        return _r("csv", f.to_csv(index=False).encode("utf-16"), "UTF-16 text, not UTF-8")

    def truncated_parquet(f: pd.DataFrame) -> Built:
        data = parquet_bytes(f)
        return _r("parquet", data[: len(data) // 2], "not a readable Parquet file")

    def csv_named_parquet(f: pd.DataFrame) -> Built:
        return _r("parquet", csv_bytes(f), "not a readable Parquet file")

    def png_named_csv(f: pd.DataFrame) -> Built:
        return _r("csv", png_bytes(), "contains NUL bytes; this is not a CSV text file")

    def zip_named_csv(f: pd.DataFrame) -> Built:
        return _r("csv", zip_bytes(csv_bytes(f)), "contains NUL bytes; this is not a CSV text file")

    def png_named_parquet(f: pd.DataFrame) -> Built:
        return _r("parquet", png_bytes() + b"\x00", "not a readable Parquet file")

    def json_file(f: pd.DataFrame) -> Built:
        return _r("json", f.to_json(orient="records").encode(), "unsupported file type '.json'")

    return {fn.__name__: fn for fn in locals().values() if callable(fn)}


def build_corpus(seed: int = 7) -> list[Corruption]:
    out = []
    for batch, (kind, build) in enumerate(sorted(_cases().items()), start=1):
        ext, content, expect, stage = build(clean_batch(batch, seed=seed))
        out.append(Corruption(kind, f"{kind}.{ext}", content, expect, stage))
    return out


def clean_variants(seed: int = 7) -> dict[str, bytes]:
    """Files that differ from the default export but are fine: they must be accepted."""
    base = 1000
    return {
        "plain.csv": csv_bytes(clean_batch(base, seed=seed)),
        "crlf.csv": csv_bytes(clean_batch(base + 1, seed=seed), lineterminator="\r\n"),
        "utf8_bom.csv": b"\xef\xbb\xbf" + csv_bytes(clean_batch(base + 2, seed=seed)),
        "all_quoted.csv": csv_bytes(clean_batch(base + 3, seed=seed), quoting=1),
        "no_final_newline.csv": csv_bytes(clean_batch(base + 4, seed=seed)).rstrip(b"\n"),
        "columns_reordered.csv": csv_bytes(clean_batch(base + 5, seed=seed).iloc[:, ::-1]),
        "batch.parquet": parquet_bytes(clean_batch(base + 6, seed=seed)),
    }
