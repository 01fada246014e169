"""Labelled served traffic becomes one landed file (`cd4ml.steps.feedback_batch`): what it holds,
that it is exported once, what a crash leaves behind, and that the training pipeline's own
validation accepts it or quarantines it with a reason, like any landed file.

Served traffic is written as the prediction log lays it out (`predictions/date=.../part-*.parquet`
with the logged features, prediction, model_version, request_id, row, ts); labels go through the
real label store (`cd4ml.data.feedback.record_labels`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cd4ml.core.paths import ModelPaths
from cd4ml.core.settings import get_settings
from cd4ml.core.spec import ModelSpec, load_spec
from cd4ml.data import landing
from cd4ml.data.feedback import record_labels
from cd4ml.steps import feedback_batch, pipeline
from cd4ml.steps.feedback_batch import cast_outcomes, land_feedback_batch, read_state
from cd4ml_dev.datagen import generate_churn
from tests.helpers import LOGREG, write_spec

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def spec(workspace: Path) -> ModelSpec:
    return load_spec(
        write_spec(
            workspace / "specs", "fb", estimator=LOGREG, feedback={"to_training": True, "min_rows": 60}
        )
    )


def zone(spec: ModelSpec) -> ModelPaths:
    return pipeline.zone_for(spec, get_settings())


def accept_training_data(spec: ModelSpec, rows: int = 400) -> pd.DataFrame:
    """A first accepted batch (a CSV: text timestamps), as validation leaves it in accepted/."""
    frame = generate_churn(rows, seed=0)
    path = zone(spec).landing / "week0.csv"
    frame.to_csv(path, index=False)
    landed = landing.LandedFile(str(path), path.name, landing.file_sha256(path), path.stat().st_size)
    landing.accept(
        zone(spec), landed, rows=rows, accepted_at=(T0 - timedelta(days=30)).isoformat(), run_id="r0"
    )
    return frame


def validate(spec: ModelSpec, run_id: str) -> Any:
    settings = get_settings()
    collected = pipeline.collect_landed_files(spec, settings)
    return pipeline.validate_landed_files(
        spec, settings, collected.new, run_id=run_id, run_time=T0.isoformat()
    )


def serve(
    spec: ModelSpec, frame: pd.DataFrame, *, at: datetime, prefix: str, per_request: int = 2
) -> list[str]:
    """Log `frame`'s features as answered requests of `per_request` rows each; returns request ids."""
    log = frame[spec.feature_names].copy()
    for col in spec.numerical:
        log[col] = log[col].astype(float)  # the service parses numbers as floats
    log["prediction"] = 0
    log["model_version"] = "1"
    log["request_id"] = [f"{prefix}-{i // per_request}" for i in range(len(log))]
    log["row"] = [i % per_request for i in range(len(log))]
    log["ts"] = pd.Timestamp(at) + pd.to_timedelta(range(len(log)), unit="s")
    day = zone(spec).prediction_day(at.date())
    day.mkdir(parents=True, exist_ok=True)
    log.to_parquet(day / f"part-{prefix}.parquet", index=False)
    return list(log["request_id"])


def label(
    spec: ModelSpec, ids: list[str], outcomes: list[Any], *, at: datetime, per_request: int = 2
) -> None:
    rows = [i % per_request for i in range(len(ids))]
    labels = pd.DataFrame({"request_id": ids, "row": rows, "outcome": outcomes})
    record_labels(zone(spec), labels, source="test", received_at=at)


def landed_files(spec: ModelSpec) -> list[Path]:
    return sorted(zone(spec).landing.glob("feedback__*"))


def test_served_and_labelled_rows_land_as_one_training_file_once_enough_are_ready(spec: ModelSpec) -> None:
    accept_training_data(spec)
    traffic = generate_churn(100, seed=5)
    ids = serve(spec, traffic, at=T0 - timedelta(days=3), prefix="a")
    # 40 labels: below feedback.min_rows (60), nothing lands and nothing is recorded.
    label(spec, ids[:40], list(traffic["churned"][:40]), at=T0)
    first = land_feedback_batch(spec, get_settings(), now=T0 + timedelta(minutes=5))
    assert first["landed"] is False and first["rows_ready"] == 40 and "waits for 60" in first["why"]
    assert landed_files(spec) == [] and read_state(zone(spec))["next"] == 1

    # Labels days after their predictions, sent as text ("1"/"0" as a CSV or a JSON client may).
    label(spec, ids[40:], [str(v) for v in traffic["churned"][40:]], at=T0 + timedelta(days=2))
    now = T0 + timedelta(days=2, minutes=5)
    out = land_feedback_batch(spec, get_settings(), now=now)
    assert out["landed"] is True and out["rows"] == 100 and out["batch"] == 1
    (path,) = landed_files(spec)
    assert path.name == "feedback__000001.parquet" and out["path"] == str(path)
    frame = pd.read_parquet(path)
    assert list(frame.columns) == spec.columns  # features, target, timestamp: nothing else
    assert frame["churned"].dtype == "int64"  # as the accepted data has it, though half came as text
    # Rows in label order; the features and outcome are the served row's, the timestamp its prediction time.
    expected = traffic.assign(event_time=None)
    assert sorted(frame["churned"]) == sorted(expected["churned"])
    merged = frame.merge(traffic, on=spec.feature_names, suffixes=("", "_sent"))
    assert len(merged) == 100 and (merged["churned"] == merged["churned_sent"]).all()
    assert frame["event_time"].str.endswith("Z").all()  # text, as in the accepted CSV
    assert pd.to_datetime(frame["event_time"], utc=True).min() == pd.Timestamp(T0 - timedelta(days=3))

    # Nothing new: nothing lands again, whatever the time.
    again = land_feedback_batch(spec, get_settings(), now=now + timedelta(hours=1))
    assert again["landed"] is False and again["rows_ready"] == 0
    assert landed_files(spec) == [path]


def test_a_label_sent_again_is_not_exported_again_and_a_corrected_one_is(spec: ModelSpec) -> None:
    accept_training_data(spec)
    traffic = generate_churn(60, seed=6)
    ids = serve(spec, traffic, at=T0, prefix="b")
    label(spec, ids, list(traffic["churned"]), at=T0 + timedelta(hours=1))
    assert land_feedback_batch(spec, get_settings(), now=T0 + timedelta(hours=2))["rows"] == 60
    # The store now hands these labels back with a newer labelled_at: still the same labels.
    label(spec, ids, list(traffic["churned"]), at=T0 + timedelta(hours=3))
    same = land_feedback_batch(spec, get_settings(), now=T0 + timedelta(hours=4))
    assert same["landed"] is False and same["rows_ready"] == 0
    # Corrected outcomes are new information: exported (once min_rows of them are ready).
    label(spec, ids, [1 - v for v in traffic["churned"]], at=T0 + timedelta(hours=5))
    fixed = land_feedback_batch(spec, get_settings(), now=T0 + timedelta(hours=6))
    assert fixed["landed"] is True and fixed["rows"] == 60 and fixed["file"] == "feedback__000002.parquet"
    assert list(pd.read_parquet(landed_files(spec)[1])["churned"]) != list(
        pd.read_parquet(landed_files(spec)[0])["churned"]
    )


def test_labels_recorded_after_now_wait_and_max_rows_splits_batches(workspace: Path) -> None:
    spec = load_spec(write_spec(
        workspace / "specs", "fb", estimator=LOGREG, feedback={"to_training": True, "max_rows": 80},
    ))  # fmt: skip
    accept_training_data(spec)
    traffic = generate_churn(150, seed=7)
    ids = serve(spec, traffic, at=T0, prefix="c")
    label(spec, ids[:120], list(traffic["churned"][:120]), at=T0 + timedelta(hours=1))
    label(spec, ids[120:], list(traffic["churned"][120:]), at=T0 + timedelta(hours=3))  # after `now`
    out = land_feedback_batch(spec, get_settings(), now=T0 + timedelta(hours=2))
    # feedback.max_rows caps a batch; the rest waits, in label order.
    assert out["rows"] == 80 and out["rows_ready"] == 120 and "40 more wait" in out["why"]
    rest = land_feedback_batch(spec, get_settings(), now=T0 + timedelta(hours=2))
    assert rest["landed"] is False and rest["rows_ready"] == 40  # below validation.min_rows (50)
    later = land_feedback_batch(spec, get_settings(), now=T0 + timedelta(hours=4))
    assert later["rows"] == 70 and later["batch"] == 2
    frames = [pd.read_parquet(p) for p in landed_files(spec)]
    assert sum(len(f) for f in frames) == 150


def test_a_crash_between_landing_and_commit_lands_the_batch_once(
    spec: ModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    accept_training_data(spec)
    traffic = generate_churn(80, seed=8)
    ids = serve(spec, traffic, at=T0, prefix="d")
    label(spec, ids, list(traffic["churned"]), at=T0 + timedelta(hours=1))
    now = T0 + timedelta(hours=2)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full while writing state.json")

    with monkeypatch.context() as patched:
        patched.setattr(feedback_batch, "_commit", crash)
        with pytest.raises(OSError, match="disk full"):
            land_feedback_batch(spec, get_settings(), now=now)
    (path,) = landed_files(spec)
    assert read_state(zone(spec))["next"] == 1  # not committed
    # The training run may even have taken the file in before the retry: it is found in accepted/.
    (landed,) = landing.list_landed(zone(spec))
    landing.accept(zone(spec), landed, rows=80, accepted_at=T0.isoformat(), run_id="r1")
    assert not path.exists() and any(
        p.name.endswith("__feedback__000001.parquet") for p in zone(spec).accepted.iterdir()
    )
    retry = land_feedback_batch(spec, get_settings(), now=now)
    assert retry["landed"] is True and retry["batch"] == 1 and "earlier attempt" in retry["why"]
    assert landed_files(spec) == [] and read_state(zone(spec))["next"] == 2
    assert land_feedback_batch(spec, get_settings(), now=now)["rows_ready"] == 0  # exported once


def test_a_crash_before_the_file_landed_exports_the_labels_later(
    spec: ModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    accept_training_data(spec)
    traffic = generate_churn(80, seed=9)
    ids = serve(spec, traffic, at=T0, prefix="e")
    label(spec, ids, list(traffic["churned"]), at=T0 + timedelta(hours=1))
    real = feedback_batch._write_parquet

    def landing_fails(frame: pd.DataFrame, target: Path) -> Path:
        if target.parent == zone(spec).landing:
            raise OSError("landing/ is not writable")
        return real(frame, target)

    with monkeypatch.context() as patched:
        patched.setattr(feedback_batch, "_write_parquet", landing_fails)
        with pytest.raises(OSError, match="not writable"):
            land_feedback_batch(spec, get_settings(), now=T0 + timedelta(hours=2))
    assert feedback_batch.ledger_part(zone(spec), 1).is_file() and landed_files(spec) == []
    out = land_feedback_batch(spec, get_settings(), now=T0 + timedelta(hours=2))
    assert out["landed"] is True and out["rows"] == 80 and out["file"] == "feedback__000001.parquet"


def test_off_unless_the_spec_opts_in(workspace: Path) -> None:
    spec = load_spec(write_spec(workspace / "specs", "fb", estimator=LOGREG))
    assert spec.feedback.to_training is False
    out = land_feedback_batch(spec, get_settings(), now=T0)
    assert out == {"landed": False, "rows_ready": 0, "why": "feedback.to_training is off in the spec"}
    with pytest.raises(ValueError, match="timezone-aware"):
        land_feedback_batch(spec, get_settings(), now=datetime(2026, 3, 1))


# -- the same validation and quarantine as any landed file -------------------------------------------


def test_a_feedback_batch_passes_the_pipelines_validation(spec: ModelSpec) -> None:
    accept_training_data(spec)
    traffic = generate_churn(120, seed=10, batch=1)
    ids = serve(spec, traffic, at=T0, prefix="f")
    label(spec, ids, list(traffic["churned"]), at=T0 + timedelta(hours=1))
    out = land_feedback_batch(spec, get_settings(), now=T0 + timedelta(hours=2))
    validated = validate(spec, "r1")
    assert [a.name for a in validated.accepted] == [out["file"]], validated.quarantined
    assert [r.name for r in landing.list_accepted(zone(spec))] == ["week0.csv", out["file"]]
    # And training reads it together with the CSV it joins (one type per column).
    datasets = pipeline.prepare_datasets(spec, get_settings(), run_id="r1")
    assert datasets.rows_train + datasets.rows_holdout == 400 + 120


def test_outcomes_of_the_wrong_type_are_quarantined_with_a_reason(spec: ModelSpec) -> None:
    accept_training_data(spec)
    traffic = generate_churn(80, seed=11)
    ids = serve(spec, traffic, at=T0, prefix="g")
    label(spec, ids, ["yes" if v else "no" for v in traffic["churned"]], at=T0 + timedelta(hours=1))
    out = land_feedback_batch(spec, get_settings(), now=T0 + timedelta(hours=2))
    assert pd.read_parquet(out["path"])["churned"].dtype == object  # left as text, not guessed
    validated = validate(spec, "r1")
    (rejected,) = validated.quarantined
    assert rejected.name == out["file"] and "churned" in rejected.reason
    reason_file = Path(rejected.path).with_name(Path(rejected.path).name + ".reason.txt")
    assert reason_file.is_file() and not validated.accepted


# -- casting outcomes to the target's type -------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcomes", "like", "expected", "dtype"),
    [
        (["1", "0", 1], pd.Series([0, 1]), [1, 0, 1], "int64"),
        ([1.0, 0.0], pd.Series([0, 1]), [1, 0], "int64"),
        ([1.5, 0.0], pd.Series([0, 1]), ["1.5", "0"], "object"),
        (["yes", "no"], pd.Series([0, 1]), ["yes", "no"], "object"),
        ([1, 0], pd.Series(["0", "1"], dtype=object), ["1", "0"], "object"),
        (["true", "False", 1], pd.Series([True, False]), [True, False, True], "bool"),
        (["3.5", 2], pd.Series([1.0]), [3.5, 2.0], "float64"),
    ],
)
def test_outcomes_take_the_training_datas_type_or_stay_text(
    workspace: Path, outcomes: list[Any], like: pd.Series, expected: list[Any], dtype: str
) -> None:
    spec = load_spec(write_spec(workspace / "specs", "fb", estimator=LOGREG))
    out = cast_outcomes(spec, pd.Series(outcomes, dtype=object), like)
    assert list(out) == expected and str(out.dtype) == dtype
