from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cd4ml.core.errors import SpecError
from cd4ml.core.spec import CRON_PRESETS, load_spec, load_specs, parse_spec
from tests.helpers import DEMO_SPEC, spec_dict

# A regression spec from the demo's columns (overrides for `spec_dict`).
REGRESSION = {
    "task": "regression",
    "target": "monthly_charges",
    "metric": {"name": "mae"},
    "features__numerical": ["age"],
}


def parse(raw: dict, name: str = "m") -> object:
    return parse_spec(yaml.safe_dump(raw), Path(f"specs/{name}.yaml"))


def test_demo_spec_parses_with_defaults() -> None:
    spec = load_spec(DEMO_SPEC)
    assert spec.name == "churn"
    assert spec.metric.direction == "maximize"
    assert spec.promotion.bootstrap_resamples >= 1000
    assert spec.columns[-2:] == ["churned", "event_time"]
    assert "region" in spec.categorical and "age" in spec.numerical
    assert spec.schedule.retrain_cron == "0 2 * * *"


def test_spec_hash_is_stable_and_sensitive() -> None:
    a = parse(spec_dict())
    assert a.spec_hash() == parse(spec_dict()).spec_hash()
    assert a.spec_hash() != parse(spec_dict(promotion__floor=0.8)).spec_hash()


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"task": "ranking"}, "task", "classification"),
        ({"target": None}, "target", "Field required"),
        ({"metric__name": "auc_pr"}, "metric.name", "unknown metric"),
        ({"metric__direction": "minimize"}, "metric", "maximized"),
        ({"metric__name": "rmse", "metric__direction": None}, "metric.name", "for regression"),
        ({"estimator__class": "RandomForest"}, "estimator.class", "import path"),
        ({"promotion__confidence": 1.5}, "promotion.confidence", "less than 1"),
        ({"promotion__bootstrap_resamples": 100}, "promotion.bootstrap_resamples", "1000"),
        (
            {"features__numerical": [{"name": "age", "min": 5, "max": 1}]},
            "features.numerical.0",
            "greater than max",
        ),
        ({"features__categorical": ["age"]}, "features", "unique"),
        ({"target": "age"}, "target", "also listed as a feature"),
        ({"validation__max_null_fraction": 2}, "validation.max_null_fraction", "less than or equal to 1"),
        (
            {"validation__max_new_category_fraction": 1.5},
            "validation.max_new_category_fraction",
            "less than or equal to 1",
        ),
        (
            {"validation__max_excess_null_fraction": -0.1},
            "validation.max_excess_null_fraction",
            "greater than",
        ),
        (
            {"validation__max_excess_duplicate_fraction": "many"},
            "validation.max_excess_duplicate_fraction",
            "valid number",
        ),
        ({"validation__range_tolerance": -1}, "validation.range_tolerance", "greater than or equal to 0"),
        ({"validation__allow_new_classes": "sometimes"}, "validation.allow_new_classes", "valid boolean"),
        (
            {"validation__expectations": [{"expectation": "not_a_class"}]},
            "validation.expectations.0.expectation",
            "Great Expectations class",
        ),
        ({"schedule__retrain_cron": "nightly"}, "schedule.retrain_cron", "cron"),
        ({"surprise": 1}, "surprise", "Extra inputs"),
        ({"notifications": {"email": ["not-an-address"]}}, "notifications.email", "not e-mail addresses"),
        # business: a matrix for classification, a cost per unit of error for regression
        ({"business": {"gate": True}}, "business.matrix", "needs matrix[actual][predicted]"),
        ({"business": {"matrix": {1: {1: 40}, 0: {0: 0, 1: -10}}}}, "business.matrix", "('1', '0')"),
        (
            {"business": {"matrix": {1: {1: 40}, "1": {1: 3}}}},
            "business.matrix",
            "given twice, as 1 and as '1'",
        ),
        ({"business": {"matrix": {1: {1: "lots"}}}}, "business.matrix.1.1", "valid number"),
        ({"business": {"matrix": {}}}, "business.matrix", "names no class"),
        (
            {"business": {"matrix": {1: {1: 1}}, "cost_per_unit": 2}},
            "business.cost_per_unit",
            "for regression",
        ),
        ({"business": {"matrix": {1: {1: 1}}, "gate": "sometimes"}}, "business.gate", "valid boolean"),
        ({"business": {"matrix": {1: {1: 1}}, "currency": "EUR"}}, "business.currency", "Extra inputs"),
        (
            {**REGRESSION, "business": {"cost_per_unit_under": 3}},
            "business.cost_per_unit_over",
            "both cost_per_unit_under and cost_per_unit_over",
        ),
        (
            {**REGRESSION, "business": {"matrix": {1: {1: 1}}}},
            "business.matrix",
            "is for classification",
        ),
        (
            {**REGRESSION, "business": {"cost_per_unit": -1}},
            "business.cost_per_unit",
            "greater than or equal to 0",
        ),
        # feedback: a batch size validation would refuse is refused here
        ({"feedback": {"to_training": "please"}}, "feedback.to_training", "valid boolean"),
        ({"feedback": {"min_rows": 10}}, "feedback.min_rows", "below validation.min_rows (50)"),
        (
            {"feedback": {"max_rows": 500}, "validation__max_rows": 400},
            "feedback.max_rows",
            "above validation.max_rows",
        ),
        ({"feedback": {"min_rows": 100, "max_rows": 60}}, "feedback.max_rows", "no batch could be landed"),
        ({"feedback": {"min_rows": 0}}, "feedback.min_rows", "greater than or equal to 1"),
        # deployment: a strategy cd4ml does not have, a fraction that copies nothing or too much
        ({"deployment": {"strategy": "blue-green"}}, "deployment.strategy", "'direct', 'shadow' or 'canary'"),
        (
            {"deployment": {"strategy": "canary", "canary": {"fraction": 1}}},
            "deployment.canary.fraction",
            "less than 1",
        ),
        ({"promotion": {"approval": "yes"}}, "promotion.approval", "'none' or 'required'"),
        ({"deployment": {"shadow_fraction": 0}}, "deployment.shadow_fraction", "greater than 0"),
        ({"deployment": {"shadow_fraction": 1.5}}, "deployment.shadow_fraction", "less than or equal to 1"),
    ],
)
def test_bad_spec_names_file_and_field(overrides: dict, field: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        parse(spec_dict(**overrides))
    message = str(err.value)
    assert message.startswith("specs/m.yaml: field")
    assert f"'{field}'" in message
    assert words in message


def test_name_must_match_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="must match the file name 'other'"):
        parse(spec_dict(name="churn"), name="other")


def test_invalid_yaml_and_non_mapping() -> None:
    with pytest.raises(SpecError, match="not valid YAML"):
        parse_spec("a: [1, 2", Path("x.yaml"))
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        parse_spec("- 1\n- 2\n", Path("x.yaml"))


def test_broken_spec_does_not_hide_others(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(spec_dict()))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec_dict(metric__name="nope")))
    specs, errors = load_specs([bad, good])
    assert [s.name for s in specs] == ["good"]
    assert list(errors) == [bad]
    assert "field 'metric.name'" in str(errors[bad])


def test_validation_defaults_learn_from_accepted_data_and_fixed_caps_are_opt_in() -> None:
    """The defaults chosen on the dataset zoo and ~400 real tables (see the Validation docstring)."""
    from cd4ml.core.spec import Validation

    v = Validation()
    assert v.max_null_fraction is None and v.max_duplicate_fraction is None  # no fixed caps
    assert (v.max_excess_null_fraction, v.max_excess_duplicate_fraction) == (0.2, 0.3)
    assert (v.range_tolerance, v.max_outside_learned_range, v.max_new_category_fraction) == (1.0, 0.01, 0.05)
    assert v.allow_new_classes is None  # unset: multiclass may gain classes, binary stays binary
    assert v.far_range_multiple == 10.0
    capped = parse(spec_dict(validation__max_null_fraction=0.02, validation__max_duplicate_fraction=0.0))
    assert (capped.validation.max_null_fraction, capped.validation.max_duplicate_fraction) == (0.02, 0.0)


# -- schedules: what Airflow runs, checked when the spec is read ------------------------------------

GOOD_SCHEDULES = [
    "0 2 * * *",
    "*/15 * * * *",
    "0,30 2-4 * * MON-FRI",
    "0 0 29 2 *",  # every leap year: rare, but it fires
    "0 2 1W * *",
    *CRON_PRESETS,
]
BAD_SCHEDULES = [
    ("99 2 * * *", "out of range"),
    ("0 24 * * *", "out of range"),
    ("0 2 0 * *", "out of range"),
    ("0 2 * 13 *", "out of range"),
    ("0 2 * * 8", "out of range"),
    ("0-99 * * * *", "out of bands"),
    ("*/0 * * * *", "step '0'"),
    ("0 2 * * * 0", "has 6 fields"),
    ("0 0 2 * * * 2030", "has 7 fields"),
    ("0 2 * *", "5, 6 or 7 columns"),
    ("nightly", "5, 6 or 7 columns"),
    ("", "5, 6 or 7 columns"),
    ("   ", "5, 6 or 7 columns"),
    ("@annually", "not one of Airflow's presets"),
    ("@reboot", "not one of Airflow's presets"),
    ("0 2 30 2 *", "never fires"),
]


@pytest.mark.parametrize("field", ["schedule__retrain_cron", "drift__schedule"])
@pytest.mark.parametrize("value", GOOD_SCHEDULES)
def test_cron_expressions_and_airflow_presets_are_accepted(field: str, value: str) -> None:
    spec = parse(spec_dict(**{field: value}))
    assert (spec.schedule.retrain_cron if field.startswith("schedule") else spec.drift.schedule) == value


@pytest.mark.parametrize("field", ["schedule__retrain_cron", "drift__schedule"])
@pytest.mark.parametrize(("value", "words"), BAD_SCHEDULES)
def test_a_schedule_airflow_cannot_run_names_field_and_fix(field: str, value: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        parse(spec_dict(**{field: value}))
    message = str(err.value)
    assert message.startswith(f"specs/m.yaml: field '{field.replace('__', '.')}': {value!r}"), message
    assert words in message
    assert "like '0 2 * * *'" in message and "@daily" in message  # the fix


@pytest.mark.parametrize("value", ["@once", "@continuous"])
def test_the_monitor_needs_a_recurring_schedule(value: str) -> None:
    with pytest.raises(SpecError, match=f"field 'drift.schedule': '{value}' is not a recurring schedule"):
        parse(spec_dict(drift__schedule=value))


def test_accepted_schedules_are_what_airflow_runs() -> None:
    """Both DAGs end in a CronTriggerTimetable: every schedule the spec takes must build and fire."""
    import pendulum
    from airflow.sdk.definitions.timetables._cron import CRON_PRESETS as SDK_PRESETS
    from airflow.timetables.base import TimeRestriction
    from airflow.timetables.trigger import CronTriggerTimetable
    from airflow.utils.dates import cron_presets

    assert CRON_PRESETS == SDK_PRESETS == cron_presets
    restriction = TimeRestriction(earliest=pendulum.datetime(2026, 1, 1, tz="UTC"), latest=None, catchup=True)
    for value in GOOD_SCHEDULES:
        timetable = CronTriggerTimetable(value, timezone="UTC")
        timetable.validate()
        assert timetable.description, value  # Airflow can say when it runs
        info = timetable.next_dagrun_info(last_automated_data_interval=None, restriction=restriction)
        assert info is not None and info.run_after >= restriction.earliest, value


# -- business value and feedback to training ---------------------------------------------------------


def test_business_feedback_and_deployment_are_optional_and_change_no_existing_specs_hash() -> None:
    """Specs without the new sections hash as before them: an upgrade retrains nothing by itself."""
    import hashlib
    import json

    spec = load_spec(DEMO_SPEC)
    assert spec.business is None and spec.feedback.to_training is False
    assert spec.deployment.strategy == "direct" and spec.deployment.shadow_fraction == 1.0
    before = spec.model_dump(mode="json", by_alias=True)
    del before["business"], before["feedback"], before["deployment"]
    del before["promotion"]["approval"], before["promotion"]["approval_timeout_hours"]
    del before["scoring"]  # batch scoring (issue 16): never hashed, set or not
    assert spec.spec_hash() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert parse(spec_dict(feedback={"to_training": True})).spec_hash() != spec.spec_hash()
    plain = parse(spec_dict()).spec_hash()
    assert parse(spec_dict(deployment={"strategy": "shadow"})).spec_hash() != plain
    assert parse(spec_dict(deployment={"strategy": "direct", "shadow_fraction": 1})).spec_hash() == plain
    assert parse(spec_dict(deployment={"strategy": "canary"})).spec_hash() != plain
    assert parse(spec_dict(promotion__approval="required")).spec_hash() == plain  # retrains nothing
    assert parse(spec_dict(promotion__approval="none")).spec_hash() == plain
    scoring = {"schedule": "@daily", "csv": True, "keep_columns": ["id"]}
    assert parse(spec_dict(scoring=scoring)).spec_hash() == plain
    assert (
        parse(spec_dict(business={"matrix": {1: {1: 1, 0: 0}, 0: {1: 0, 0: 0}}})).spec_hash()
        != spec.spec_hash()
    )


def test_a_business_matrix_reads_with_its_keys_as_text_and_the_feedback_sizes_follow_validation() -> None:
    spec = parse(spec_dict(
        business={"name": "retention margin", "unit": "EUR", "gate": True,
                  "matrix": {1: {1: 40, 0: -200}, 0: {1: -10, 0: 0}}},
        feedback={"to_training": True}, validation__max_rows=5000,
    ))  # fmt: skip
    business = spec.business
    assert business is not None and business.gate and business.classes == ["0", "1"]
    assert business.matrix == {"0": {"0": 0.0, "1": -10.0}, "1": {"0": -200.0, "1": 40.0}}
    assert business.label == "retention margin (EUR per prediction)"
    assert (spec.feedback_min_rows, spec.feedback_max_rows) == (50, 5000)  # validation's
    own = parse(spec_dict(feedback={"to_training": True, "min_rows": 80, "max_rows": 1000}))
    assert (own.feedback_min_rows, own.feedback_max_rows) == (80, 1000)
    # The recorded spec (spec.yaml in MLflow) parses back to the same spec.
    again = parse(spec.canonical())
    assert again == spec and again.spec_hash() == spec.spec_hash()


def test_regression_costs_per_unit_of_error() -> None:
    raw = spec_dict(**REGRESSION)
    symmetric = parse({**raw, "business": {"cost_per_unit": 2.5}}).business
    assert symmetric is not None and (symmetric.under_cost, symmetric.over_cost) == (2.5, 2.5)
    uneven = parse({**raw, "business": {"cost_per_unit_under": 4, "cost_per_unit_over": 1}}).business
    assert uneven is not None and (uneven.under_cost, uneven.over_cost) == (4.0, 1.0)


def test_the_demo_specs_commented_business_and_feedback_example_parses_when_uncommented() -> None:
    text = DEMO_SPEC.read_text()
    example = text[text.index("# business:") :].splitlines()
    yaml_lines = [line[2:] for line in example if line.startswith("# ") and not line.startswith("# Optional")]
    spec = parse_spec(text + "\n".join(yaml_lines) + "\n", DEMO_SPEC)
    assert spec.business is not None and spec.business.matrix == {
        "1": {"1": 40.0, "0": -200.0}, "0": {"1": -10.0, "0": 0.0},
    }  # fmt: skip
    assert spec.feedback.min_rows == 200 and not spec.feedback.to_training
