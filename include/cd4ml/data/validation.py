"""Data validation with Great Expectations 1.x: a suite built from the spec and the accepted data.

`learn_reference` and `expectation_configs` are pure; `validate_frame` runs GX (ephemeral, or a
file context under the model's zone so Data Docs are built) and turns its result into sentences a
data owner can act on: each names the spec field that sets the threshold it broke, and its value.

What is learned from accepted data is learned robustly, so that no accepted batch can poison the
reference for the next one:

- numeric ranges come from quantiles of the finite values (the share trimmed is the share a batch
  may put outside a range), widened by `range_tolerance` spans; the accepted extremes count too,
  but never more than `EXTREME_SPANS` spans beyond the quantiles;
- a learned range [lo, hi] has two tiers. Values outside it but within `far_range_multiple` widths
  (hi - lo) of it are drift: time-ordered data with growth (ggplot2 economics, vega stocks) steps
  there every batch, so the batch is accepted, the rows are reported (`ValidationOutcome.drift`,
  the acceptance record) and the range follows once the batch is accepted. Only values beyond
  lo - m*(hi - lo) or hi + m*(hi - lo) count against `max_outside_learned_range`: a column scaled
  x100, x1000 or x1e6 or junk like 1e300 lands there. Refusing moderate steps would starve such
  data: once one batch is refused the reference never moves, so every later batch is refused too;
- non-finite numbers (inf, -inf, overflow) are rejected whatever any tolerance says;
- categorical domains and target classes admit a share of rows with new values
  (`max_new_category_fraction`, plus the share of new values the accepted data itself predicts);
  a two-class target stays binary unless `allow_new_classes` says otherwise, and a new label equal
  to another after case and whitespace folding ('Malignant ' beside 'Malignant') is always refused;
- categorical values compare as text (`tables.category_text`): 5, 5.0 and "5" are one category,
  as in training and serving, so an integer-coded column read as floats is no new value;
- duplicated rows are compared with the share expected for a batch of the same size drawn from the
  accepted data (legitimately repeated answers repeat there too), plus `max_excess_duplicate_fraction`;
- nulls are compared with each column's null share in accepted data, plus `max_excess_null_fraction`;
- shares allowed outside what was learned get a binomial sampling margin for small batches.

Declared bounds (`min`/`max`, `values`) and the opt-in fixed caps (`max_null_fraction`,
`max_duplicate_fraction`) are strict. The first batch has nothing learned to be compared with.
A batch that passes is accepted only if accepted data plus the batch can still be trained on
(`training.acceptance_problems`: the target check before every fit, and the model's preprocessing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cd4ml.core.errors import SpecError
from cd4ml.core.spec import ModelSpec
from cd4ml.data.tables import category_text

log = logging.getLogger(__name__)

NUMERIC_DTYPES = [
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
    "float16", "float32", "float64", "Float32", "Float64",
]  # fmt: skip
# Boolean-coded features (True/False, as pandas reads them from CSV or Parquet) are 0/1 numbers to
# every sklearn transformer; a regression target must be a real number.
FEATURE_DTYPES = [*NUMERIC_DTYPES, "bool", "boolean"]

FLOAT_MAX = float(np.finfo(np.float64).max)
# The accepted data's own extremes widen a learned range, but by at most this many robust spans:
# a rare legitimate value (a 0/1 flag that is 1 in 0.5% of rows) stays inside, while a batch that
# slipped 0.9% of values x1e6 under the allowance cannot stretch the range by orders of magnitude.
EXTREME_SPANS = 3.0
# Quantiles of a learned range trim at least this share and at most this share of each side.
MIN_TRIM, MAX_TRIM = 0.001, 0.25


@dataclass(frozen=True)
class Reference:
    """What accepted data taught us: numeric ranges, categorical domains, target classes.

    `new_value_rates` is the share of rows expected to carry a value not seen before (Good-Turing:
    values seen once / rows): high for an id-like column, zero for a handful of well-filled codes.
    `duplicates` profiles how often identical rows recur: (multiplicity, distinct rows with it).
    `null_rates` is each feature column's share of nulls; `largest_class_share` that of the most
    frequent class of a classification target.
    """

    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    categories: dict[str, list[Any]] = field(default_factory=dict)
    rows: int = 0
    new_value_rates: dict[str, float] = field(default_factory=dict)
    duplicates: tuple[tuple[int, int], ...] = ()
    null_rates: dict[str, float] = field(default_factory=dict)
    largest_class_share: float | None = None


@dataclass(frozen=True)
class ValidationOutcome:
    success: bool
    evaluated: int
    failed: int
    problems: list[str]
    docs_url: str | None = None
    # Numeric columns with rows moderately outside their learned range (see `range_drift`): the
    # world moved, the batch is not refused for it, and whoever reads the record should know.
    drift: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        head = (
            f"passed {self.evaluated} expectations"
            if self.success
            else f"failed {self.failed} of {self.evaluated} expectations"
        )
        return head + (f"; {describe_drift(self.drift)}" if self.drift else "")


def normalise(spec: ModelSpec, frame: pd.DataFrame) -> pd.DataFrame:
    """Categoricals compare as text everywhere (validation, training, serving); nulls stay null.

    The text of a value is `tables.category_text`'s: 5, 5.0 and "5" are one category.
    """
    out = frame.copy()
    for col in spec.categorical:
        if col in out.columns:
            out[col] = out[col].map(category_text).astype(object)
    return out


def numeric_columns(spec: ModelSpec) -> list[str]:
    """Columns that must hold finite numbers: numeric features and a regression target."""
    return list(spec.numerical) + ([spec.target] if spec.task == "regression" else [])


# -- learning the reference ------------------------------------------------------------------------


def _trim(spec: ModelSpec) -> float:
    # Rows outside a learned range are admitted up to this share per batch, so a quantile that trims
    # the same share cannot be moved by them.
    return min(max(spec.validation.max_outside_learned_range, MIN_TRIM), MAX_TRIM)


def robust_range(values: pd.Series, *, trim: float, tolerance: float) -> tuple[float, float] | None:
    """The learned range of a numeric column: finite values only, quantiles, capped extremes."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    finite = numbers[np.isfinite(numbers)]
    if finite.size == 0:
        return None
    q_lo = float(np.quantile(finite, trim, method="higher"))
    q_hi = float(np.quantile(finite, 1.0 - trim, method="lower"))
    return _widened(q_lo, q_hi, float(finite.min()), float(finite.max()), tolerance)


def _widened(q_lo: float, q_hi: float, least: float, most: float, tolerance: float) -> tuple[float, float]:
    # |q| keeps a range useful for columns far from zero with a small spread (a year, a constant
    # batch): a new year is inside; a unit change (x1000) is not.
    span = max(q_hi - q_lo, abs(q_lo), abs(q_hi)) or 1.0
    lo = min(q_lo, max(least, q_lo - EXTREME_SPANS * span)) - tolerance * span
    hi = max(q_hi, min(most, q_hi + EXTREME_SPANS * span)) + tolerance * span
    return lo, hi


def new_value_rate(values: pd.Series) -> float:
    """Good-Turing estimate of the share of future rows that carry a value not seen in `values`."""
    present = values.dropna()
    if present.empty:
        return 0.0
    counts = present.astype(str).value_counts()
    return float((counts == 1).sum()) / len(present)


def duplicate_profile(frame: pd.DataFrame) -> tuple[tuple[int, int], ...]:
    """(multiplicity, number of distinct rows seen that many times), ascending."""
    if frame.empty:
        return ()
    per_row = frame.astype(str).value_counts(dropna=False).to_numpy()
    return tuple(sorted(Counter(int(c) for c in per_row).items()))


def expected_duplicate_share(profile: tuple[tuple[int, int], ...], n: int) -> float:
    """Share of rows duplicated within a batch of `n` rows drawn from the profiled data.

    Counted as GX counts them: every row of a group of two or more identical rows. A batch no larger
    than the accepted data is a draw without replacement (hypergeometric); a larger one is
    extrapolated with replacement from the rows seen repeatedly (rows seen once are treated as
    never repeating: a continuous table must not be expected to repeat itself).
    """
    total = sum(c * m for c, m in profile)
    if n < 2 or total < 2:
        return 0.0
    from scipy import stats

    duplicated = 0.0
    for c, m in profile:
        if c < 2:
            continue
        if n <= total:
            once = float(stats.hypergeom.pmf(1, total, c, n))
            mean = n * c / total
        else:
            p = c / total
            once = n * p * math.exp((n - 1) * math.log1p(-p))
            mean = n * p
        duplicated += m * (mean - once)
    return min(max(duplicated / n, 0.0), 1.0)


def learn_reference(spec: ModelSpec, accepted: pd.DataFrame) -> Reference:
    if accepted.empty:
        return Reference()
    tol = spec.validation.range_tolerance
    ranges: dict[str, tuple[float, float]] = {}
    for col in numeric_columns(spec):
        if col in accepted.columns:
            learned = robust_range(accepted[col], trim=_trim(spec), tolerance=tol)
            if learned is not None:
                ranges[col] = learned
    categories: dict[str, list[Any]] = {}
    rates: dict[str, float] = {}
    largest: float | None = None
    if spec.validation.learn_categories:
        for col in spec.categorical:
            if col in accepted.columns:
                categories[col] = sorted(str(v) for v in accepted[col].dropna().unique())
                rates[col] = new_value_rate(accepted[col])
    if spec.task == "classification" and spec.target in accepted.columns:
        # Classes keep their own type (0/1 stay ints), so a batch that labels them "yes"/"no" fails.
        categories[spec.target] = sorted(accepted[spec.target].dropna().unique().tolist(), key=str)
        rates[spec.target] = new_value_rate(accepted[spec.target])
        shares = accepted[spec.target].value_counts(normalize=True)
        largest = float(shares.iloc[0]) if len(shares) else None
    present = [c for c in spec.columns if c in accepted.columns]
    return Reference(
        ranges=ranges,
        categories=categories,
        rows=len(accepted),
        new_value_rates=rates,
        duplicates=duplicate_profile(accepted[present]) if present == spec.columns else (),
        null_rates={c: float(accepted[c].isna().mean()) for c in spec.feature_names if c in accepted.columns},
        largest_class_share=largest,
    )


# -- the reference, learned once per file ----------------------------------------------------------
#
# Learning the reference from all accepted rows on every run cost O(history) per new batch (at 100
# batches of 5k rows: ~20 s, most of it turning every accepted row into text to count duplicates).
# A `Profile` holds what `learn_reference` needs in a form that adds up: exact counts of the distinct
# values of each column and of whole rows. A file is profiled once, when it is validated, and stored
# under its content hash; a run merges the stored profiles instead of re-reading and re-learning
# every accepted file, and `reference_from_profile` computes the same `Reference` as
# `learn_reference` on the concatenated files (quantiles exactly, duplicates up to 64-bit hashes).

PROFILE_FORMAT = 1
# Integers up to 2**53 are exact as float64: counting 5 and 5.0 as one value is what concatenating
# an int64 file with a float64 one (a null in the column) does.
_EXACT_INT = 2.0**53


def _comparable(values: pd.Series) -> pd.Series:
    if pd.api.types.is_integer_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        numbers = values.astype("float64")
        if not len(numbers) or float(np.nanmax(np.abs(numbers.to_numpy()))) <= _EXACT_INT:
            return numbers
    return values


def _text_counts(values: pd.Series) -> dict[str, int]:
    present = _comparable(values.dropna())
    return {str(k): int(v) for k, v in present.astype(str).value_counts().items()}


def _distinct_counts(values: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    distinct, inverse = np.unique(values, return_inverse=True)
    weights = np.ones(len(values), dtype="int64") if counts is None else counts
    return distinct, np.bincount(inverse.ravel(), weights=weights, minlength=len(distinct)).astype("int64")


@dataclass(frozen=True)
class Profile:
    """Mergeable summary of accepted rows: `learn_reference` computed from counts, not rows.

    `numbers`: per numeric column, its distinct finite values (sorted) and how often each occurs;
    `texts`: per categorical column and the target, non-null values as text -> count; `uniques`: the
    categorical values' own text (the learned domain); `classes`: the target's distinct values;
    `nulls` per column; `row_hashes`: distinct whole rows (all spec columns, as text) and counts.
    """

    rows: int = 0
    columns: frozenset[str] = frozenset()
    numbers: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    texts: dict[str, dict[str, int]] = field(default_factory=dict)
    uniques: dict[str, frozenset[str]] = field(default_factory=dict)
    classes: tuple[Any, ...] = ()
    nulls: dict[str, int] = field(default_factory=dict)
    row_hashes: tuple[np.ndarray, np.ndarray] = (np.empty(0, "uint64"), np.empty(0, "int64"))


def profile(spec: ModelSpec, frame: pd.DataFrame) -> Profile:
    """The profile of one (normalised) frame; `merge_profiles` adds profiles of other frames."""
    present = frozenset(str(c) for c in frame.columns if c in spec.columns)
    numbers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for col in numeric_columns(spec):
        if col in present:
            values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
            numbers[col] = _distinct_counts(values[np.isfinite(values)])
    texts: dict[str, dict[str, int]] = {}
    uniques: dict[str, frozenset[str]] = {}
    for col in spec.categorical:
        if col in present:
            texts[col] = _text_counts(frame[col])
            uniques[col] = frozenset(str(v) for v in frame[col].dropna().unique())
    classes: tuple[Any, ...] = ()
    if spec.task == "classification" and spec.target in present:
        texts[spec.target] = _text_counts(frame[spec.target])
        classes = tuple(frame[spec.target].dropna().unique().tolist())
    hashes = np.empty(0, "uint64")
    if len(frame):
        # Columns a file lacks are null in the concatenated table; they are here too.
        whole = frame.reindex(columns=spec.columns)
        text = pd.DataFrame({c: _comparable(whole[c]).astype(str) for c in spec.columns})
        hashes = pd.util.hash_pandas_object(text, index=False).to_numpy(dtype="uint64")
    return Profile(
        rows=len(frame),
        columns=present,
        numbers=numbers,
        texts=texts,
        uniques=uniques,
        classes=classes,
        nulls={c: int(frame[c].isna().sum()) for c in present},
        row_hashes=_distinct_counts(hashes),
    )


def _merged_classes(parts: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    values = [v for part in parts for v in part]
    # Concatenated, an int column and a float column are floats: so are the classes.
    kinds = {type(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)}
    if kinds == {int, float}:
        values = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values]
    return tuple(dict.fromkeys(values))


def merge_profiles(profiles: list[Profile]) -> Profile:
    """One profile of all rows the given profiles describe, as if their frames were concatenated."""
    if not profiles:
        return Profile()
    if len(profiles) == 1:
        return profiles[0]
    columns = frozenset().union(*(p.columns for p in profiles))

    def counts(pairs: list[tuple[np.ndarray, np.ndarray]], dtype: str) -> tuple[np.ndarray, np.ndarray]:
        if not pairs:
            return np.empty(0, dtype), np.empty(0, "int64")
        values = np.concatenate([v for v, _ in pairs]).astype(dtype)
        return _distinct_counts(values, np.concatenate([c for _, c in pairs]))

    texts: dict[str, dict[str, int]] = {}
    for p in profiles:
        for col, found in p.texts.items():
            total = texts.setdefault(col, {})
            for key, n in found.items():
                total[key] = total.get(key, 0) + n
    return Profile(
        rows=sum(p.rows for p in profiles),
        columns=columns,
        numbers={
            col: counts([p.numbers[col] for p in profiles if col in p.numbers], "float64")
            for col in {c for p in profiles for c in p.numbers}
        },
        texts=texts,
        uniques={
            col: frozenset().union(*(p.uniques.get(col, frozenset()) for p in profiles))
            for col in {c for p in profiles for c in p.uniques}
        },
        classes=_merged_classes([p.classes for p in profiles]),
        # A file without the column contributes nulls to the concatenated column.
        nulls={c: sum(p.nulls[c] if c in p.columns else p.rows for p in profiles) for c in columns},
        row_hashes=counts([p.row_hashes for p in profiles], "uint64"),
    )


def _sorted_at(values: np.ndarray, counts: np.ndarray, index: int) -> float:
    """The `index`-th (0-based) element of the sorted multiset `values` x `counts`."""
    return float(values[int(np.searchsorted(np.cumsum(counts), index, side="right"))])


def _range_of(
    values: np.ndarray, counts: np.ndarray, *, trim: float, tolerance: float
) -> tuple[float, float] | None:
    """`robust_range` from distinct values and counts: numpy's 'higher'/'lower' quantile indices."""
    n = int(counts.sum())
    if n == 0:
        return None
    q_lo = _sorted_at(values, counts, int(np.ceil((n - 1) * trim)))
    q_hi = _sorted_at(values, counts, int(np.floor((n - 1) * (1.0 - trim))))
    return _widened(q_lo, q_hi, float(values[0]), float(values[-1]), tolerance)


def reference_from_profile(spec: ModelSpec, summary: Profile) -> Reference:
    """The `Reference` `learn_reference` would learn from the rows `summary` profiles."""
    if summary.rows == 0:
        return Reference()
    ranges: dict[str, tuple[float, float]] = {}
    for col in numeric_columns(spec):
        if col in summary.numbers:
            learned = _range_of(
                *summary.numbers[col], trim=_trim(spec), tolerance=spec.validation.range_tolerance
            )
            if learned is not None:
                ranges[col] = learned

    def rate(col: str) -> float:
        found = summary.texts.get(col, {})
        present = sum(found.values())
        return sum(1 for n in found.values() if n == 1) / present if present else 0.0

    categories: dict[str, list[Any]] = {}
    rates: dict[str, float] = {}
    largest: float | None = None
    if spec.validation.learn_categories:
        for col in spec.categorical:
            if col in summary.columns:
                categories[col] = sorted(summary.uniques.get(col, frozenset()))
                rates[col] = rate(col)
    if spec.task == "classification" and spec.target in summary.columns:
        categories[spec.target] = sorted(summary.classes, key=str)
        rates[spec.target] = rate(spec.target)
        found = summary.texts.get(spec.target, {})
        largest = max(found.values()) / sum(found.values()) if found else None
    _, row_counts = summary.row_hashes
    multiplicities, how_many = np.unique(row_counts, return_counts=True)
    whole = all(c in summary.columns for c in spec.columns)
    return Reference(
        ranges=ranges,
        categories=categories,
        rows=summary.rows,
        new_value_rates=rates,
        duplicates=tuple(zip(multiplicities.tolist(), how_many.tolist(), strict=True)) if whole else (),
        null_rates={c: summary.nulls[c] / summary.rows for c in spec.feature_names if c in summary.columns},
        largest_class_share=largest,
    )


def _profile_key(spec: ModelSpec, sha256: str) -> str:
    # What a profile depends on besides the file's bytes: the columns and their roles.
    roles = json.dumps([PROFILE_FORMAT, spec.columns, numeric_columns(spec), spec.categorical,
                        spec.target, spec.task])  # fmt: skip
    return f"{sha256}-{hashlib.sha256(roles.encode()).hexdigest()[:12]}"


def _write_profile(target: Path, summary: Profile, **extra: Any) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"row_hashes": summary.row_hashes[0], "row_counts": summary.row_hashes[1]}
    for i, (_, (values, counts)) in enumerate(sorted(summary.numbers.items())):
        arrays[f"values_{i}"], arrays[f"counts_{i}"] = values, counts
    meta = {
        "rows": summary.rows, "columns": sorted(summary.columns), "numbers": sorted(summary.numbers),
        "texts": summary.texts, "uniques": {c: sorted(v) for c, v in summary.uniques.items()},
        "classes": list(summary.classes), "nulls": summary.nulls, **extra,
    }  # fmt: skip
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = target.with_name(f".{target.name}.part")
    save: Any = np.savez  # its stub reads **arrays as its allow_pickle flag
    with tmp.open("wb") as fh:
        save(fh, **arrays)
    tmp.replace(target)  # atomic: a reader sees the old profile or the new one
    return target


def _read_profile(path: Path) -> tuple[Profile, dict[str, Any]] | None:
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as stored:
        meta = json.loads(str(stored["meta"]))
        numbers = {
            col: (stored[f"values_{i}"], stored[f"counts_{i}"]) for i, col in enumerate(meta["numbers"])
        }
        summary = Profile(
            rows=meta["rows"],
            columns=frozenset(meta["columns"]),
            numbers=numbers,
            texts=meta["texts"],
            uniques={c: frozenset(v) for c, v in meta["uniques"].items()},
            classes=tuple(meta["classes"]),
            nulls=meta["nulls"],
            row_hashes=(stored["row_hashes"], stored["row_counts"]),
        )
    return summary, meta


def save_profile(store: Path, spec: ModelSpec, sha256: str, summary: Profile) -> Path:
    """Store the profile of the file whose content hash is `sha256`."""
    return _write_profile(store / f"{_profile_key(spec, sha256)}.npz", summary)


def load_profile(store: Path, spec: ModelSpec, sha256: str) -> Profile | None:
    """The stored profile of that file under this spec's columns, or None if there is none yet."""
    found = _read_profile(store / f"{_profile_key(spec, sha256)}.npz")
    return found[0] if found else None


def accepted_profile(
    spec: ModelSpec, store: Path, files: list[tuple[str, Path]], read: Callable[[Path], pd.DataFrame]
) -> Profile:
    """The merged profile of accepted files given as (sha256, path).

    The last merged profile is stored with the files it covers: while they are all still accepted,
    only files accepted since are added (one read of the stored sums, then O(new files)); a
    retracted file makes it start over from the per-file profiles. A file without a stored profile
    is read (`read` returns the normalised frame) and profiled once.
    """
    wanted = [sha256 for sha256, _ in files]
    merged_path = store / f"{_profile_key(spec, 'accepted')}.npz"
    last = _read_profile(merged_path)
    covered: list[str] = last[1]["files"] if last else []
    profiles = []
    if last and set(covered) <= set(wanted):
        profiles.append(last[0])
    else:
        covered = []
    for sha256, path in files:
        if sha256 in covered:
            continue
        found = load_profile(store, spec, sha256)
        if found is None:
            found = profile(spec, read(path))
            save_profile(store, spec, sha256, found)
        profiles.append(found)
    merged = merge_profiles(profiles)
    if set(covered) != set(wanted):
        _write_profile(merged_path, merged, files=wanted)
    return merged


def new_category_values(spec: ModelSpec, reference: Reference, frame: pd.DataFrame) -> dict[str, Any]:
    """Per learned categorical column: values in `frame` the reference has not seen, with counts."""
    out: dict[str, Any] = {}
    for col in spec.categorical:
        known = reference.categories.get(col)
        if known is None or col not in frame.columns:
            continue
        present = frame[col].dropna().astype(str)
        unseen = present[~present.isin(set(known))]
        if not unseen.empty:
            counts = unseen.value_counts()
            out[col] = {
                "rows": len(unseen),
                "share": round(len(unseen) / max(len(present), 1), 6),
                "values": {str(k): int(v) for k, v in counts.head(20).items()},
                "distinct": len(counts),
            }
    return out


def far_bounds(
    lo: float | None, hi: float | None, width: float, multiple: float
) -> tuple[float | None, float | None]:
    """The far band of a learned range of `width`: `multiple` widths beyond each open side."""
    width = width or 1.0
    return (
        None if lo is None else lo - multiple * width,
        None if hi is None else hi + multiple * width,
    )


def range_drift(spec: ModelSpec, reference: Reference, frame: pd.DataFrame) -> dict[str, Any]:
    """Per numeric column: finite rows of `frame` outside the learned range (not the far band).

    These rows do not fail a batch; they are drift to report (acceptance record, monitor).
    """
    out: dict[str, Any] = {}
    for col in numeric_columns(spec):
        if col not in frame.columns:
            continue
        _, (lo, hi) = _bounds(spec, reference, col)
        if lo is None and hi is None:
            continue
        numbers = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        finite = numbers[np.isfinite(numbers)]
        below = int((finite < lo).sum()) if lo is not None else 0
        above = int((finite > hi).sum()) if hi is not None else 0
        if below or above:
            out[col] = {
                "rows": below + above,
                "below": below,
                "above": above,
                "share": round((below + above) / max(len(finite), 1), 6),
                "learned": [lo, hi],
                "observed": [float(finite.min()), float(finite.max())],
            }
    return out


def describe_drift(drift: dict[str, Any]) -> str:
    parts = [
        f"{col} {d['rows']} rows outside the learned range [{_num(d['learned'][0], '-inf')}, "
        f"{_num(d['learned'][1], 'inf')}] (seen {_num(d['observed'][0])} to {_num(d['observed'][1])})"
        for col, d in drift.items()
    ]
    return "drift accepted: " + "; ".join(parts)


def non_finite_counts(spec: ModelSpec, frame: pd.DataFrame) -> dict[str, int]:
    """Columns that must be finite numbers and hold inf, -inf or an overflowed literal: counts."""
    out: dict[str, int] = {}
    for col in numeric_columns(spec):
        if col not in frame.columns:
            continue
        numbers = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        count = int(np.isinf(numbers).sum())
        if count:
            out[col] = count
    return out


# -- the suite -------------------------------------------------------------------------------------


def _rule(rule: str, **details: Any) -> dict[str, Any]:
    """GX `meta` of an expectation: which rule it enforces and which spec field sets it."""
    return {"rule": rule, **details}


def _bounds(
    spec: ModelSpec, reference: Reference, col: str
) -> tuple[tuple[float | None, float | None], tuple[float | None, float | None]]:
    """(declared bounds, learned bounds for the sides the spec leaves open)."""
    declared = next((f for f in spec.features.numerical if f.name == col), None)
    d_lo = declared.min if declared else None
    d_hi = declared.max if declared else None
    learned = reference.ranges.get(col)
    l_lo = learned[0] if learned and d_lo is None else None
    l_hi = learned[1] if learned and d_hi is None else None
    return (d_lo, d_hi), (l_lo, l_hi)


def _allowance(fraction: float) -> float | None:
    """GX `mostly` for a share of rows allowed to fail; None when everything is allowed."""
    return None if fraction >= 1.0 else round(1.0 - fraction, 6)


def with_sampling_margin(share: float, rows: int | None) -> float:
    """`share` plus two binomial standard errors for a batch of `rows`.

    A world that puts `share` of its rows outside what was learned shows that share only on average:
    a batch of 100 rows shows 1% as 3 rows often enough. Without the margin, small batches of clean
    data were quarantined (7 of 283 real tables at 1%, all with batches of 80-160 rows).
    """
    if not rows or share <= 0.0 or share >= 1.0:
        return share
    return min(1.0, share + 2.0 * math.sqrt(share * (1.0 - share) / rows))


def _range_checks(
    spec: ModelSpec, reference: Reference, col: str, rows: int | None
) -> list[tuple[str, dict[str, Any]]]:
    v = spec.validation
    out: list[tuple[str, dict[str, Any]]] = [
        (
            "ExpectColumnValuesToBeBetween",
            {"column": col, "min_value": -FLOAT_MAX, "max_value": FLOAT_MAX, "meta": _rule("finite")},
        )
    ]
    (lo, hi), (learned_lo, learned_hi) = _bounds(spec, reference, col)
    if lo is not None or hi is not None:  # the spec's bounds: every row
        out.append((
            "ExpectColumnValuesToBeBetween",
            {"column": col, "min_value": lo, "max_value": hi, "meta": _rule("declared_range")},
        ))  # fmt: skip
    mostly = _allowance(with_sampling_margin(v.max_outside_learned_range, rows))
    if (learned_lo is not None or learned_hi is not None) and mostly is not None:
        # Learned from past data: a growing world steps outside by a few widths a batch (drift, reported
        # by `range_drift`); a unit error or junk lands orders of magnitude away, and only that counts.
        whole = reference.ranges[col]
        far_lo, far_hi = far_bounds(learned_lo, learned_hi, whole[1] - whole[0], v.far_range_multiple)
        out.append((
            "ExpectColumnValuesToBeBetween",
            {"column": col, "min_value": far_lo, "max_value": far_hi, "mostly": mostly,
             "meta": _rule("learned_range", allowed=v.max_outside_learned_range,
                           tolerance=v.range_tolerance, learned=[learned_lo, learned_hi])},
        ))  # fmt: skip
    return out


def _domain_check(
    spec: ModelSpec, reference: Reference, col: str, declared: list[str] | None, rows: int | None
) -> tuple[str, dict[str, Any]] | None:
    if declared is not None:
        return (
            "ExpectColumnValuesToBeInSet",
            {"column": col, "value_set": list(declared), "meta": _rule("declared_values")},
        )
    known = reference.categories.get(col)
    if not known:
        return None
    fraction = spec.validation.max_new_category_fraction
    expected = reference.new_value_rates.get(col, 0.0)
    mostly = _allowance(with_sampling_margin(expected + fraction, rows))
    if mostly is None:
        return None
    return (
        "ExpectColumnValuesToBeInSet",
        {"column": col, "value_set": list(known), "mostly": mostly,
         "meta": _rule("learned_values", allowed=fraction, expected=round(expected, 6))},
    )  # fmt: skip


def expectation_configs(
    spec: ModelSpec,
    reference: Reference,
    columns: list[str],
    rows: int | None = None,
    datetime_columns: frozenset[str] = frozenset(),
) -> list[tuple[str, dict[str, Any]]]:
    """The suite as (GX expectation class name, kwargs) pairs; only columns present get column checks.

    `rows` is the batch's row count: the duplicate share expected from accepted data depends on it.
    `datetime_columns` already hold datetimes (Parquet) or numbers, so there is no text to parse.
    Each kwargs carries `meta`: the rule it enforces, for the quarantine reason and Data Docs.
    """
    v = spec.validation
    present = set(columns)
    out: list[tuple[str, dict[str, Any]]] = [
        (
            "ExpectTableColumnsToMatchSet",
            {"column_set": spec.columns, "exact_match": not v.allow_extra_columns, "meta": _rule("columns")},
        ),
        (
            "ExpectTableRowCountToBeBetween",
            {"min_value": v.min_rows, "max_value": v.max_rows, "meta": _rule("rows")},
        ),
    ]
    for col in spec.numerical:
        if col not in present:
            continue
        out.append((
            "ExpectColumnValuesToBeInTypeList",
            {"column": col, "type_list": FEATURE_DTYPES, "meta": _rule("numeric")},
        ))  # fmt: skip
        out.extend(_null_checks(spec, reference, col, rows))
        out.extend(_range_checks(spec, reference, col, rows))
    for feat in spec.features.categorical:
        if feat.name not in present:
            continue
        out.extend(_null_checks(spec, reference, feat.name, rows))
        domain = _domain_check(spec, reference, feat.name, feat.values, rows)
        if domain is not None:
            out.append(domain)
    if spec.target in present:
        out.append(("ExpectColumnValuesToNotBeNull", {"column": spec.target, "meta": _rule("target_nulls")}))
        if spec.task == "classification":
            if _single_class_implausible(reference, rows):
                out.append((
                    "ExpectColumnUniqueValueCountToBeBetween",
                    {"column": spec.target, "min_value": 2, "meta": _rule("target_classes")},
                ))  # fmt: skip
            classes = reference.categories.get(spec.target)
            if classes and not gains_classes(spec, classes):
                out.append((
                    "ExpectColumnValuesToBeInSet",
                    {"column": spec.target, "value_set": classes, "meta": _rule("target_values")},
                ))  # fmt: skip
            elif (gaining := _domain_check(spec, reference, spec.target, None, rows)) is not None:
                out.append(gaining)
        else:
            out.append((
                "ExpectColumnValuesToBeInTypeList",
                {"column": spec.target, "type_list": NUMERIC_DTYPES, "meta": _rule("numeric")},
            ))  # fmt: skip
            out.append((
                "ExpectColumnStdevToBeBetween",
                {"column": spec.target, "min_value": 1e-12, "meta": _rule("target_constant")},
            ))  # fmt: skip
            out.extend(_range_checks(spec, reference, spec.target, rows))
    if spec.timestamp and spec.timestamp in present:
        out.append(("ExpectColumnValuesToNotBeNull", {"column": spec.timestamp, "meta": _rule("timestamp")}))
        if spec.timestamp not in datetime_columns:
            out.append((
                "ExpectColumnValuesToBeDateutilParseable",
                {"column": spec.timestamp, "meta": _rule("timestamp")},
            ))  # fmt: skip
    if set(spec.columns) <= present:
        out.extend(_duplicate_checks(spec, reference, rows))
    for extra in v.expectations:
        out.append((extra.expectation, {**extra.kwargs, "meta": _rule("extra")}))
    return out


def gains_classes(spec: ModelSpec, classes: list[Any]) -> bool:
    """May the target gain a class? Unset `allow_new_classes`: a binary target stays binary."""
    allowed = spec.validation.allow_new_classes
    return len(classes) > 2 if allowed is None else allowed


def fold_label(value: Any) -> str:
    """A label as a typo would hide it: case, surrounding and repeated whitespace ignored."""
    return " ".join(str(value).split()).casefold()


def label_collisions(spec: ModelSpec, reference: Reference, frame: pd.DataFrame) -> list[str]:
    """New target labels in `frame` equal to another label after folding: typos, never new classes.

    'Malignant ' beside 'Malignant' would silently turn a binary target into three classes.
    """
    if spec.task != "classification" or spec.target not in frame.columns:
        return []
    known = list(reference.categories.get(spec.target, []))
    batch = frame[spec.target].dropna().unique().tolist()
    seen = {str(k) for k in known}
    problems = []
    by_fold: dict[str, list[Any]] = {}
    for label in known + [b for b in batch if str(b) not in seen]:
        by_fold.setdefault(fold_label(label), []).append(label)
    for labels in by_fold.values():
        fresh = [x for x in labels if str(x) not in seen]
        if len(labels) > 1 and fresh:
            counts = frame[spec.target].astype(str).value_counts()
            described = ", ".join(
                f"{x!r} ({'known' if str(x) in seen else f'{int(counts.get(str(x), 0))} rows'})"
                for x in labels
            )
            problems.append(
                f"column '{spec.target}': labels {described} differ only in case or whitespace; a typo is "
                f"never a new class of the target (target: {spec.target}). Fix the labels and land the "
                "file again"
            )
    return problems


def _single_class_implausible(reference: Reference, rows: int | None) -> bool:
    """Is a batch whose target holds one class a broken file, rather than a small batch of a rare event?

    Without accepted data there is nothing to judge by, and a single class cannot be trained on.
    With it, a batch of 20 rows that are all 'no churn' is expected when 95% of rows are; 300 rows of
    a 70/30 target all alike (a target overwritten by a constant) happen once in 1e46 batches.
    """
    if reference.largest_class_share is None or not rows:
        return True
    return bool(reference.largest_class_share**rows < 1e-6)


def _null_checks(
    spec: ModelSpec, reference: Reference, col: str, rows: int | None
) -> list[tuple[str, dict[str, Any]]]:
    v = spec.validation
    out: list[tuple[str, dict[str, Any]]] = []
    if v.max_null_fraction is not None:
        out.append((
            "ExpectColumnValuesToNotBeNull",
            {"column": col, "mostly": round(1.0 - v.max_null_fraction, 6),
             "meta": _rule("nulls_cap", allowed=v.max_null_fraction)},
        ))  # fmt: skip
    learned = reference.null_rates.get(col)
    if learned is not None:
        mostly = _allowance(learned + v.max_excess_null_fraction)
        if mostly is not None:
            out.append((
                "ExpectColumnValuesToNotBeNull",
                {"column": col, "mostly": mostly,
                 "meta": _rule("nulls_learned", allowed=v.max_excess_null_fraction,
                               expected=round(learned, 6))},
            ))  # fmt: skip
    elif v.max_null_fraction is None and rows:
        # The first batch has nothing to be compared with; only a column with no value at all is
        # certainly broken.
        out.append((
            "ExpectColumnValuesToNotBeNull",
            {"column": col, "mostly": round(1.0 / (rows + 1), 9), "meta": _rule("nulls_all")},
        ))  # fmt: skip
    return out


def _duplicate_checks(
    spec: ModelSpec, reference: Reference, rows: int | None
) -> list[tuple[str, dict[str, Any]]]:
    v = spec.validation
    out: list[tuple[str, dict[str, Any]]] = []
    if v.max_duplicate_fraction is not None and (mostly := _allowance(v.max_duplicate_fraction)) is not None:
        out.append((
            "ExpectCompoundColumnsToBeUnique",
            {"column_list": spec.columns, "mostly": mostly,
             "meta": _rule("duplicates_cap", allowed=v.max_duplicate_fraction)},
        ))  # fmt: skip
    if reference.duplicates and rows:
        # Compared with accepted data, not with a fixed share: survey answers repeat legitimately,
        # a categorical-only table is mostly repeats, while an export appended to itself is not.
        expected = expected_duplicate_share(reference.duplicates, rows)
        mostly = _allowance(expected + v.max_excess_duplicate_fraction)
        if mostly is not None:
            out.append((
                "ExpectCompoundColumnsToBeUnique",
                {"column_list": spec.columns, "mostly": mostly,
                 "meta": _rule("duplicates_learned", allowed=v.max_excess_duplicate_fraction,
                               expected=round(expected, 6), rows=rows)},
            ))  # fmt: skip
    return out


# -- describing failures ---------------------------------------------------------------------------


def _num(value: Any, unbounded: str = "None") -> str:
    if value is None:
        return unbounded
    return f"{value:.6g}" if isinstance(value, float | int) else str(value)


def _pct(fraction: float) -> str:
    return f"{fraction:.1%}" if fraction >= 0.001 or fraction == 0 else f"{fraction:.3%}"


def _margin(share: float, allowed: float, rows: Any, *, short: bool = False) -> str:
    if allowed - share < 5e-7:
        return ""
    if short:
        return f", plus a sampling margin for {rows} rows"
    return f" ({_pct(share)} plus a sampling margin for a batch of {rows} rows)"


def _setting(spec: ModelSpec, *assignments: str) -> str:
    """'(validation.x = 0.01; change it in include/specs/<model>.yaml)'."""
    return f"({'; '.join(assignments)}; change it in {spec_location(spec)})"


def spec_location(spec: ModelSpec) -> str:
    """Where the model's spec lives, relative to the project when it is inside it."""
    from cd4ml.core.settings import PROJECT_ROOT, get_settings

    path = get_settings().specs_dir / f"{spec.name}.yaml"
    try:
        return str(path.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def _declared_bounds(spec: ModelSpec, col: str) -> str:
    feat = next((f for f in spec.features.numerical if f.name == col), None)
    parts = []
    if feat is not None and feat.min is not None:
        parts.append(f"features.numerical[{col}].min = {_num(feat.min)}")
    if feat is not None and feat.max is not None:
        parts.append(f"features.numerical[{col}].max = {_num(feat.max)}")
    return ", ".join(parts)


@dataclass(frozen=True)
class _Failed:
    """One failed expectation as the message functions below read it."""

    spec: ModelSpec
    kwargs: dict[str, Any]
    meta: dict[str, Any]
    result: dict[str, Any]

    @property
    def col(self) -> Any:
        return self.kwargs.get("column")

    @property
    def where(self) -> str:
        return f"column '{self.col}'" if self.col else "table"

    @property
    def rule(self) -> str:
        return str(self.meta.get("rule", ""))

    @property
    def total(self) -> Any:
        return self.result.get("element_count")

    @property
    def sample(self) -> str:
        examples = self.result.get("partial_unexpected_list") or []
        return ", ".join(repr(x) for x in list(dict.fromkeys(map(str, examples)))[:5])

    @property
    def eg(self) -> str:
        return f" (e.g. {self.sample})" if self.sample else ""

    @property
    def counted(self) -> str:
        unexpected = self.result.get("unexpected_count")
        return (
            f"{unexpected} of {self.total} rows" if unexpected is not None and self.total is not None else ""
        )

    @property
    def observed(self) -> Any:
        return self.result.get("observed_value")

    @property
    def allowed(self) -> float:
        return 1 - (self.kwargs.get("mostly") or 1.0)

    @property
    def expected(self) -> float:
        return float(self.meta.get("expected", 0.0))


def _columns_message(f: _Failed) -> str:
    v = f.spec.validation
    details = f.result.get("details", {}).get("mismatched", {})
    parts = []
    if details.get("unexpected"):
        parts.append(
            f"unexpected columns {sorted(details['unexpected'])} "
            f"(validation.allow_extra_columns = {v.allow_extra_columns})"
        )
    if details.get("missing"):
        parts.append(
            f"missing columns {sorted(details['missing'])} "
            "(required by the spec's features, target and timestamp)"
        )
    return "table: " + ("; ".join(parts) or f"columns {f.observed} do not match {f.kwargs.get('column_set')}")


def _row_count_message(f: _Failed) -> str:
    v = f.spec.validation
    bounds = [f"validation.min_rows = {v.min_rows}"] + (
        [f"validation.max_rows = {v.max_rows}"] if v.max_rows else []
    )
    return (
        f"table: has {f.observed} rows; at least {f.kwargs.get('min_value')} required"
        + (f" and at most {f.kwargs['max_value']}" if f.kwargs.get("max_value") else "")
        + f" {_setting(f.spec, *bounds)}"
    )


def _nulls_message(f: _Failed) -> str:
    spec, v, where, counted, allowed = f.spec, f.spec.validation, f.where, f.counted, f.allowed
    if f.rule == "nulls_cap":
        return (
            f"{where}: {counted} are null; at most {_pct(allowed)} allowed "
            f"{_setting(spec, f'validation.max_null_fraction = {v.max_null_fraction}')}"
        )
    if f.rule == "nulls_learned":
        return (
            f"{where}: {counted} are null; at most {_pct(allowed)} allowed: {_pct(f.expected)} as in "
            f"accepted data plus validation.max_excess_null_fraction = {v.max_excess_null_fraction} "
            f"(change it in {spec_location(spec)})"
        )
    if f.rule == "nulls_all":
        return f"{where}: {counted} are null: the column holds no value at all"
    what = (
        f"the target (target: {spec.target})"
        if f.rule == "target_nulls"
        else f"the timestamp (timestamp: {spec.timestamp})"
    )
    return f"{where}: {counted} are null; {what} may not be null in any row"


def _type_message(f: _Failed) -> str:
    role = (
        "task: regression needs a numeric target"
        if f.col == f.spec.target
        else "listed in features.numerical"
    )
    return f"{f.where}: has type {f.observed or f.sample}; expected a numeric type ({role})"


def _range_message(f: _Failed) -> str:
    v, allowed = f.spec.validation, f.allowed
    if f.rule == "finite":
        return (
            f"{f.where}: {f.counted} are not finite numbers{f.eg}; inf, -inf and numbers too large for "
            "float64 (like 1e400) are never accepted, whatever the tolerances"
        )
    text = (
        f"{f.where}: {f.counted} outside [{_num(f.kwargs.get('min_value'), '-inf')}, "
        f"{_num(f.kwargs.get('max_value'), 'inf')}]{f.eg}"
    )
    if f.rule == "declared_range":
        return f"{text}; the spec's bounds allow no row outside ({_declared_bounds(f.spec, str(f.col))})"
    if f.rule == "learned_range":
        learned = f.meta.get("learned") or [None, None]
        return (
            f"{text}: far outside the range learned from accepted data "
            f"[{_num(learned[0], '-inf')}, {_num(learned[1], 'inf')}], more than "
            f"{_num(v.far_range_multiple)} times its width beyond it (a unit error or junk, not "
            f"growth); at most {_pct(allowed)} of rows may be that far"
            f"{_margin(v.max_outside_learned_range, allowed, f.total)} "
            + _setting(
                f.spec,
                f"validation.max_outside_learned_range = {v.max_outside_learned_range}",
                f"validation.far_range_multiple = {_num(v.far_range_multiple)} sets 'far'",
                f"validation.range_tolerance = {v.range_tolerance} widens the learned range",
            )
        )
    return text + (f"; at most {_pct(allowed)} allowed" if allowed else "")


def _values_message(f: _Failed) -> str:
    v = f.spec.validation
    text = f"{f.where}: {f.counted} not in the known values {f.kwargs.get('value_set')}" + (
        f" (found {f.sample})" if f.sample else ""
    )
    if f.rule == "declared_values":
        return f"{text}; features.categorical[{f.col}].values allows no other value"
    if f.rule == "target_values":
        unset = ": unset, a two-class target stays binary; set it to true to admit new classes"
        return f"{text}; a new class of the target is refused " + _setting(
            f.spec,
            f"validation.allow_new_classes = {v.allow_new_classes}"
            + (unset if v.allow_new_classes is None else ""),
        )
    if f.rule == "learned_values":
        expected = f.expected
        base = (
            f"{_pct(expected)} expected from values seen only once in accepted data plus " if expected else ""
        )
        return (
            f"{text}; at most {_pct(f.allowed)} of rows may carry values not seen in accepted data "
            f"({base}validation.max_new_category_fraction = {v.max_new_category_fraction}"
            f"{_margin(expected + v.max_new_category_fraction, f.allowed, f.total, short=True)}; "
            f"change it in {spec_location(f.spec)})"
        )
    return text


def _duplicates_message(f: _Failed) -> str:
    v = f.spec.validation
    head = f"table: {f.counted} are duplicated rows; at most {_pct(f.allowed)} allowed"
    if f.rule == "duplicates_learned":
        return (
            f"{head}: {_pct(f.expected)} expected from the duplicates in accepted data for a batch of "
            f"{f.meta.get('rows')} rows plus validation.max_excess_duplicate_fraction = "
            f"{v.max_excess_duplicate_fraction} (change it in {spec_location(f.spec)})"
        )
    return f"{head} {_setting(f.spec, f'validation.max_duplicate_fraction = {v.max_duplicate_fraction}')}"


_MESSAGES: dict[str, Callable[[_Failed], str]] = {
    "ExpectTableColumnsToMatchSet": _columns_message,
    "ExpectTableRowCountToBeBetween": _row_count_message,
    "ExpectColumnValuesToNotBeNull": _nulls_message,
    "ExpectColumnValuesToBeInTypeList": _type_message,
    "ExpectColumnValuesToBeBetween": _range_message,
    "ExpectColumnValuesToBeInSet": _values_message,
    "ExpectColumnUniqueValueCountToBeBetween": lambda f: (
        f"{f.where}: has {f.observed} distinct value(s); a target needs at least {f.kwargs.get('min_value')} "
        "(task: classification)"
    ),
    "ExpectColumnStdevToBeBetween": lambda f: (
        f"{f.where}: is constant (standard deviation {f.observed}); task: regression needs a varying target"
    ),
    "ExpectCompoundColumnsToBeUnique": _duplicates_message,
    "ExpectColumnValuesToBeDateutilParseable": lambda f: (
        f"{f.where}: {f.counted} are not timestamps{f.eg} (timestamp: {f.spec.timestamp})"
    ),
}


def _describe(
    spec: ModelSpec,
    kind: str,
    kwargs: dict[str, Any],
    meta: dict[str, Any],
    result: dict[str, Any],
    exception: str | None,
) -> str:
    """One failed expectation as a sentence: what is wrong, where, and which setting to change."""
    f = _Failed(spec, kwargs, meta, result)
    if exception:
        return f"{f.where}: {kind} could not be evaluated: {exception}"
    message = _MESSAGES.get(kind)
    if message is not None:
        return message(f)
    detail = f.counted or (f"observed {f.observed}" if f.observed is not None else "")
    return (
        f"{f.where}: {kind} failed"
        + (f": {detail}" if detail else "")
        + f.eg
        + (" (validation.expectations)" if f.rule == "extra" else "")
    )


def validate_frame(
    spec: ModelSpec,
    frame: pd.DataFrame,
    reference: Reference,
    *,
    batch_name: str,
    context_root: Path | None = None,
) -> ValidationOutcome:
    """Run the suite on one batch. With `context_root`, results go to a GX file context and Data Docs."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # A timestamp read as datetimes (Parquet) or as numbers (a year, epoch seconds) orders rows as it is.
    datetimes = frozenset(str(c) for c in frame.columns if _ordered_type(frame[c]))
    configs = expectation_configs(
        spec, reference, [str(c) for c in frame.columns], rows=len(frame), datetime_columns=datetimes
    )
    ctx: Any
    if context_root is not None:
        context_root.mkdir(parents=True, exist_ok=True)
        ctx = gx.get_context(mode="file", project_root_dir=str(context_root))
        _limit_docs_index(ctx)
    else:
        ctx = gx.get_context(mode="ephemeral")
    # Progress bars would flood the task logs.
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = ctx.data_sources.add_or_update_pandas(name=f"{spec.name}_landing")
    asset = next((a for a in source.assets if a.name == "batches"), None) or source.add_dataframe_asset(
        "batches"
    )
    batch_def = next((b for b in asset.batch_definitions if b.name == "whole"), None)
    batch_def = batch_def or asset.add_batch_definition_whole_dataframe("whole")

    expectations = []
    for kind, kwargs in configs:
        cls = getattr(gx.expectations, kind, None)
        if cls is None:
            raise SpecError(
                f"{spec_location(spec)}: field 'validation.expectations': unknown Great Expectations "
                f"class {kind!r}; see great_expectations.expectations for the names"
            )
        expectations.append(cls(**{k: v for k, v in kwargs.items() if v is not None or k == "max_value"}))
    # Built whole, not with add_expectation: once a suite of this name is stored (file context),
    # every add_expectation rewrites the stored suite, which made each validation O(n^2) slow.
    suite = ctx.suites.add_or_update(
        gx.ExpectationSuite(name=f"{spec.name}_suite", expectations=expectations)
    )
    definition = ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=f"{spec.name}_batch", data=batch_def, suite=suite)
    )
    actions: list[Any] = [UpdateDataDocsAction(name="data_docs")] if context_root is not None else []
    checkpoint = ctx.checkpoints.add_or_update(
        gx.Checkpoint(
            name=f"{spec.name}_checkpoint",
            validation_definitions=[definition],
            actions=actions,
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 10},
        )
    )
    result = checkpoint.run(
        batch_parameters={"dataframe": frame}, run_id=gx.RunIdentifier(run_name=batch_name)
    )
    problems: list[str] = []
    evaluated = failed = 0
    failures = []
    for run_result in result.run_results.values():
        for res in run_result.results:
            evaluated += 1
            if res.success:
                continue
            failed += 1
            cfg = res.expectation_config
            if cfg is None:
                raise ValueError("GX returned a result without its expectation configuration")
            failures.append((res, cfg))
    # A column with inf in it has no standard deviation either; one reason per cause.
    not_finite = {cfg.kwargs.get("column") for _, cfg in failures if (cfg.meta or {}).get("rule") == "finite"}
    for res, cfg in failures:
        meta = dict(cfg.meta or {})
        if meta.get("rule") == "target_constant" and cfg.kwargs.get("column") in not_finite:
            continue
        info = res.exception_info or {}
        raised = info.get("raised_exception") if isinstance(info, dict) else False
        message = info.get("exception_message") if raised else None
        problems.append(
            _describe(
                spec,
                _class_name(cfg.type),
                dict(cfg.kwargs),
                meta,
                dict(res.result or {}),
                message,
            )
        )
    collisions = label_collisions(spec, reference, frame)
    problems += collisions
    docs_url = None
    if context_root is not None:
        # The page of this very validation result, not the site's index.
        key = next(iter(result.run_results), None)
        urls = ctx.get_docs_sites_urls(resource_identifier=key) if key else ctx.get_docs_sites_urls()
        docs_url = urls[0]["site_url"] if urls else None
    return ValidationOutcome(
        bool(result.success) and not collisions,
        evaluated + 1,
        failed + bool(collisions),
        problems,
        docs_url,
        drift=range_drift(spec, reference, frame),
    )


# Every Data Docs build re-renders the site's index, and GX loads each stored validation result it
# lists: unlimited, each validation cost O(batches validated so far). The newest this many are
# listed; every result keeps its own page (the URL a quarantine reason links to).
DOCS_INDEX_LIMIT = 30


def _limit_docs_index(ctx: Any) -> None:
    sites = dict(ctx.variables.data_docs_sites or {})
    for name, site in sites.items():
        index = dict(site.get("site_index_builder") or {"class_name": "DefaultSiteIndexBuilder"})
        if index.get("validation_results_limit") != DOCS_INDEX_LIMIT:
            index["validation_results_limit"] = DOCS_INDEX_LIMIT
            ctx.update_data_docs_site(name, {**site, "site_index_builder": index})


def _ordered_type(column: pd.Series) -> bool:
    kind = column.dtype
    return bool(pd.api.types.is_datetime64_any_dtype(kind)) or (
        pd.api.types.is_numeric_dtype(kind) and not pd.api.types.is_bool_dtype(kind)
    )


def _class_name(snake: str) -> str:
    return "".join(part.capitalize() for part in snake.split("_"))
