"""Property-based tests (hypothesis) for the file readers and the validation suite.

Readers: whatever bytes land, `read_table` returns a DataFrame or raises DataReadError naming the
file; never any other exception. Validation: frames drawn inside the spec's bounds pass, frames with
exactly one violation drawn outside them fail with that column named, and nothing crashes.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cd4ml.core.errors import DataReadError
from cd4ml.core.spec import parse_spec
from cd4ml.data.tables import read_table
from cd4ml.data.validation import (
    EXTREME_SPANS,
    Reference,
    learn_reference,
    normalise,
    robust_range,
    validate_frame,
)

EXAMPLES = {"bytes": 300, "text": 400, "parquet": 150, "validation": 14, "validation_any": 5}
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _read(name: str, content: bytes) -> pd.DataFrame | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(content)
        try:
            return read_table(path)
        except DataReadError as err:
            assert str(err).startswith(f"{name}: "), err
            return None


@settings(FAST, max_examples=EXAMPLES["bytes"])
@given(st.binary(max_size=2048))
def test_any_bytes_named_csv_read_or_a_clear_error(content: bytes) -> None:
    _read("landed.csv", content)


CSV_ALPHABET = st.sampled_from([*'ab1.-e,,,,"\n\n\r ;\t|', "é", "\ufeff", "NaN", "inf", "1e308"])


@settings(FAST, max_examples=EXAMPLES["text"])
@given(st.lists(CSV_ALPHABET, max_size=300).map("".join))
def test_any_csv_like_text_reads_or_a_clear_error(text: str) -> None:
    frame = _read("landed.csv", text.encode("utf-8"))
    if frame is not None:
        # A frame that came out has a header row of unique names: nothing was silently shifted.
        assert len(set(map(str, frame.columns))) == frame.shape[1]


def _parquet(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


VALID_PARQUET = _parquet(pd.DataFrame({"a": [1.5, 2.5, None], "b": ["x", "y", "z"], "c": [1, 2, 3]}))


@settings(FAST, max_examples=EXAMPLES["parquet"])
@given(
    st.one_of(
        st.binary(max_size=1024),
        # A real Parquet file with some bytes overwritten, cut short, or both.
        st.tuples(
            st.lists(st.tuples(st.integers(0, len(VALID_PARQUET) - 1), st.integers(0, 255)), max_size=8),
            st.integers(0, len(VALID_PARQUET)),
        ).map(lambda t: _mutate(VALID_PARQUET, *t)),
    )
)
def test_any_bytes_named_parquet_read_or_a_clear_error(content: bytes) -> None:
    _read("landed.parquet", content)


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos] = value
    return bytes(out[: max(cut, 1)])


# -- validation ---------------------------------------------------------------------------------------

SPEC = parse_spec(
    """
task: classification
target: label
features:
  numerical:
    - {name: x, min: 0, max: 10}
    - {name: y, min: -5, max: 5}
  categorical:
    - {name: c, values: [red, green, blue]}
estimator: {class: sklearn.linear_model.LogisticRegression}
metric: {name: accuracy}
validation: {min_rows: 5, max_null_fraction: 0.0, max_duplicate_fraction: 1.0}
""",
    Path("prop.yaml"),
)

VIOLATIONS = {
    # name: (how the frame is broken, the words the problems must contain)
    "x_above": (lambda f, v: f.assign(x=f["x"].mask(f.index == 0, 10 + v)), "column 'x'"),
    "y_below": (lambda f, v: f.assign(y=f["y"].mask(f.index == 0, -5 - v)), "column 'y'"),
    "x_null": (lambda f, v: f.assign(x=f["x"].mask(f.index == 0, np.nan)), "column 'x'"),
    "c_unseen": (lambda f, v: f.assign(c=f["c"].mask(f.index == 0, "purple")), "column 'c'"),
    "label_constant": (lambda f, v: f.assign(label=0), "column 'label'"),
    "y_missing": (lambda f, v: f.drop(columns=["y"]), "missing columns ['y']"),
    "extra_column": (lambda f, v: f.assign(z=1.0), "unexpected columns ['z']"),
    "too_few_rows": (lambda f, v: f.iloc[:4], "table: has 4 rows"),
    "x_text": (lambda f, v: f.assign(x=f["x"].astype(str) + "kg"), "column 'x'"),
}


@st.composite
def frames(draw: st.DrawFn) -> pd.DataFrame:
    n = draw(st.integers(5, 40))
    x = draw(st.lists(st.floats(0, 10), min_size=n, max_size=n))
    y = draw(st.lists(st.integers(-5, 5), min_size=n, max_size=n))
    c = draw(st.lists(st.sampled_from(["red", "green", "blue"]), min_size=n, max_size=n))
    label = [0, 1, *draw(st.lists(st.integers(0, 1), min_size=n - 2, max_size=n - 2))]
    return pd.DataFrame({"x": x, "y": y, "c": c, "label": label})


@settings(deadline=None, max_examples=EXAMPLES["validation"], suppress_health_check=list(HealthCheck))
@given(
    frames(),
    st.one_of(st.none(), st.sampled_from(sorted(VIOLATIONS))),
    st.floats(1e-6, 1e9, allow_nan=False),
)
def test_a_frame_is_accepted_iff_it_is_within_the_spec(
    frame: pd.DataFrame, violation: str | None, amount: float
) -> None:
    expected_word = None
    if violation is not None:
        breaker, expected_word = VIOLATIONS[violation]
        frame = breaker(frame, amount)
    outcome = validate_frame(SPEC, normalise(SPEC, frame), Reference(), batch_name="prop")
    assert outcome.success == (violation is None), (violation, outcome.problems)
    if expected_word:
        assert any(expected_word in p for p in outcome.problems), (expected_word, outcome.problems)


CELL = st.one_of(
    st.sampled_from(["", "NaN", "inf", "-inf", "1e308", "0", "-1", "red", "blue", "2026-01-01", "True"]),
    st.text(st.sampled_from(list("ab1.-e é\t;")), max_size=6),
    st.floats(allow_nan=True).map(str),
)
ROWS = st.lists(st.lists(CELL, min_size=4, max_size=4).map(",".join), min_size=0, max_size=30)


@settings(deadline=None, max_examples=EXAMPLES["validation_any"], suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["x,y,c,label", "x,y,c,z", "label,c,y,x", "x,x2,c,label"]), ROWS)
def test_whatever_the_reader_returns_validation_answers_without_crashing(
    header: str, rows: list[str]
) -> None:
    frame = _read("landed.csv", "\n".join([header, *rows]).encode("utf-8"))
    assert frame is not None  # four fields per row, a unique header: a well-formed CSV
    outcome = validate_frame(SPEC, normalise(SPEC, frame), Reference(), batch_name="any")
    assert outcome.success == (not outcome.problems)
    assert outcome.evaluated > 0


@pytest.mark.parametrize("violation", sorted(VIOLATIONS))
def test_every_violation_kind_is_reachable(violation: str) -> None:
    """Guards the property above against a breaker that silently stopped breaking anything."""
    frame = pd.DataFrame({"x": [1.0] * 6, "y": [0] * 6, "c": ["red"] * 6, "label": [0, 1] * 3})
    broken = VIOLATIONS[violation][0](frame, 1.0)
    assert not broken.equals(frame)


# -- no batch can poison a learned reference ----------------------------------------------------------

TOLERANT = parse_spec(
    """
task: regression
target: y
features:
  numerical: [x]
estimator: {class: sklearn.linear_model.Ridge}
metric: {name: rmse}
validation: {min_rows: 1, max_outside_learned_range: 1.0, max_excess_null_fraction: 1.0,
             max_excess_duplicate_fraction: 1.0}
""",
    Path("tolerant.yaml"),
)


@settings(FAST, max_examples=200)
@given(
    st.lists(st.floats(-1e6, 1e6), min_size=20, max_size=400),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=40),
    st.sampled_from([0.0, 0.5, 1.0, 3.0]),
)
def test_poison_under_the_trimmed_share_cannot_stretch_a_learned_range(
    clean: list[float], poison: list[float], tolerance: float
) -> None:
    trim = 0.1
    poison = poison[: int(len(clean) * trim * 0.9)]  # strictly less than the trimmed share
    learned = robust_range(pd.Series(clean + poison), trim=trim, tolerance=tolerance)
    assert learned is not None
    lo, hi = learned
    m = max(abs(v) for v in clean)
    bound = m + (EXTREME_SPANS + tolerance) * max(2 * m, 1.0)
    assert np.isfinite(lo) and np.isfinite(hi) and -bound <= lo <= hi <= bound


@settings(deadline=None, max_examples=8, suppress_health_check=list(HealthCheck))
@given(
    st.integers(20, 200),
    st.lists(st.sampled_from([np.inf, -np.inf]), min_size=1, max_size=3),
    st.sampled_from(["x", "y"]),
)
def test_non_finite_numbers_are_refused_whatever_the_tolerances(
    n: int, bad: list[float], column: str
) -> None:
    rng = np.random.default_rng(n)
    frame = pd.DataFrame({"x": rng.normal(size=n), "y": rng.normal(size=n)})
    frame.loc[: len(bad) - 1, column] = bad
    reference = learn_reference(TOLERANT, pd.DataFrame({"x": rng.normal(size=50), "y": rng.normal(size=50)}))
    outcome = validate_frame(TOLERANT, frame, reference, batch_name="inf")
    assert any(
        p.startswith(f"column '{column}': {len(bad)} of {n} rows are not finite numbers")
        for p in outcome.problems
    ), outcome.problems


@FAST
@given(st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1))
def test_an_integer_code_is_one_category_as_int_float_text_and_after_a_csv_round_trip(code: int) -> None:
    from cd4ml.data.tables import category_text

    assert category_text(code) == category_text(float(code)) == category_text(np.int64(code)) == str(code)
    # A column with a null is read back from CSV as floats; its codes must come back as the same text.
    frame = pd.DataFrame({"c": [code, None]})
    with tempfile.TemporaryDirectory() as tmp:
        frame.to_csv(Path(tmp) / "b.csv", index=False)
        back = read_table(Path(tmp) / "b.csv")["c"]
    if abs(code) < 10**15:  # pandas writes floats with 15 significant digits to CSV
        assert category_text(back.iloc[0]) == str(code)
    assert pd.isna(category_text(back.iloc[1]))


@FAST
@given(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not float(x).is_integer()))
def test_a_fractional_value_keeps_its_own_text(value: float) -> None:
    from cd4ml.data.tables import category_text

    assert category_text(value) == str(value)
