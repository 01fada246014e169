from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cd4ml.core.errors import SpecError
from cd4ml.core.spec import load_spec, load_specs, parse_spec
from tests.helpers import DEMO_SPEC, spec_dict


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
