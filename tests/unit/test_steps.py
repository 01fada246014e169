"""The step records and the one step order, without MLflow: XCom round trips, the shapes the UI and
notifications read, and how `run_steps` applies the DAG's gate and error policy (with small fake
steps where only the driver is under test). The business gate's last test runs the steps against a
real MLflow server (`run_training`, as `cd4ml train` does), to see the evidence recorded there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cd4ml.core.errors import DataError, QuarantinedError, TransientError
from cd4ml.core.settings import Settings, get_settings
from cd4ml.core.spec import ModelSpec, load_spec
from cd4ml.data.landing import AcceptedFile, LandedFile
from cd4ml.ml.evaluation import Decision
from cd4ml.steps import pipeline
from cd4ml.steps.contracts import (
    AcceptedBatch,
    Challenger,
    Collected,
    Datasets,
    Deployment,
    Evaluation,
    NothingAccepted,
    Promotion,
    Registration,
    Rejected,
    RunContext,
    RunOutcome,
    TrainingGate,
    Validated,
)
from cd4ml.steps.pipeline import TRAINING_STEPS, Results, Step, run_steps
from cd4ml_dev.datagen import generate_churn
from tests.helpers import LOGREG, write_spec

DECISION = Decision(
    promote=True, reason="first model: no champion to beat", metric="roc_auc", direction="maximize",
    challenger_score=0.81, champion_score=None, champion_version=None, difference=None, ci_low=None,
    ci_high=None, confidence=0.95, min_improvement=0.0, floor=0.6, n=300, resamples=1000,
)  # fmt: skip
DECISION_WITH_BUSINESS = Decision(
    promote=False, reason="rejected: business metric margin ...", metric="roc_auc", direction="maximize",
    challenger_score=0.84, champion_score=0.81, champion_version="2", difference=0.03, ci_low=0.01,
    ci_high=0.05, confidence=0.95, min_improvement=0.0, floor=0.6, n=300, resamples=1000,
    business_metric="margin", business_unit="EUR", business_gate=True, challenger_business_value=-12.5,
    champion_business_value=-9.0,
)  # fmt: skip
RECORDS = [
    Collected(
        (LandedFile("/d/landing/a.csv", "a.csv", "ab" * 32, 10),),
        (Rejected("b.csv", "/d/quarantine/x__b.csv", "duplicate"),),
    ),
    Validated(
        (
            AcceptedBatch(
                AcceptedFile("/d/accepted/a", "a.csv", "ab" * 32, 10, "2026-01-01", "r1"),
                "passed 9",
                {"age": {"rows": 3}},
            ),
        ),
        (Rejected("c.csv", "/d/quarantine/c", "bad"),),
        "file:///docs/index.html",
    ),
    Datasets("f" * 64, "/r/train.parquet", "/r/holdout.parquet", 80, 20, "row 80", ("a.csv",), "2026-01-01"),
    Datasets(None),
    TrainingGate(True, "no champion yet"),
    RunOutcome("manual__1", "manual: test", True, "no champion yet"),
    Challenger("run1", "models:/m-1", "7", 0.81),
    Evaluation(DECISION),
    Evaluation(DECISION_WITH_BUSINESS),
    Registration("3", "run1"),
    Promotion(True, "3", "better", "2"),
    Promotion(True, "1", "first model", None),
    Promotion(False, "4", "rejected: no improvement"),
    Deployment({"deployed": True, "version": "3"}),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_every_record_survives_a_json_xcom_round_trip(record: Any) -> None:
    wire = json.loads(json.dumps(record.to_xcom()))  # what the XCom backend stores
    assert type(record).from_xcom(wire) == record


def test_xcom_shapes_that_links_notifications_and_readers_rely_on() -> None:
    assert Datasets(None).to_xcom() == {"empty": True, "fingerprint": None}
    full = RECORDS[2].to_xcom()
    assert (
        full["empty"] is False and full["holdout_path"] == "/r/holdout.parquet" and full["files"] == ["a.csv"]
    )
    # promote_champion's XCom feeds the decision mail: "previous" only when the champion moved.
    assert Promotion(False, "4", "no").to_xcom() == {"promoted": False, "version": "4", "why": "no"}
    assert Promotion(True, "1", "first", None).to_xcom() == {
        "promoted": True, "version": "1", "previous": None, "why": "first",
    }  # fmt: skip
    # The evidence is the decision, whole; validate_batches lists files with their meta fields.
    assert Evaluation(DECISION).to_xcom() == DECISION.as_dict()
    (accepted,) = RECORDS[1].to_xcom()["accepted"]
    assert (
        accepted["name"] == "a.csv"
        and accepted["run_id"] == "r1"
        and accepted["drift"] == {"age": {"rows": 3}}
    )
    assert set(Challenger("r", "u", "7", 0.5).to_xcom()) == {
        "run_id",
        "model_uri",
        "experiment_id",
        "holdout_score",
    }


def test_a_wrong_xcom_names_the_record_and_what_is_missing() -> None:
    with pytest.raises(KeyError, match=r"Challenger\.from_xcom: missing \['model_uri'"):
        Challenger.from_xcom({"run_id": "r", "experiment_id": "1", "holdout_score": 0.5})
    with pytest.raises(TypeError, match=r"Registration\.from_xcom: expected a dict, got bool"):
        Registration.from_xcom(True)


def test_nothing_accepted_is_a_quarantine_that_keeps_its_data_docs_through_pickling() -> None:
    import pickle

    validated = Validated((), (Rejected("c.csv", "/q/c.csv", "c.csv was rejected"),), "file:///docs")
    assert validated.nothing_accepted and not Validated().nothing_accepted
    err = pickle.loads(pickle.dumps(validated.quarantine_error()))
    assert isinstance(err, QuarantinedError) and err.docs_url == "file:///docs"
    assert err.quarantined == [{"name": "c.csv", "path": "/q/c.csv", "reason": "c.csv was rejected"}]
    assert not err.retryable


def test_the_step_order_is_the_dags_and_every_input_comes_from_an_earlier_step() -> None:
    names = [s.name for s in TRAINING_STEPS]
    assert names == [
        "collect_landed_files", "validate_batches", "build_datasets", "needs_training", "train_challenger",
        "evaluate_against_champion", "register_challenger", "stage_challenger", "promote_champion",
        "deploy_champion",
    ]  # fmt: skip
    for i, step in enumerate(TRAINING_STEPS):
        assert set(step.inputs) <= set(names[:i]), step.name
    assert [s.name for s in TRAINING_STEPS if s.gate] == ["needs_training"]


def test_results_name_a_missing_or_mistyped_step_result() -> None:
    got = Results({"build_datasets": Datasets(None)})
    assert got.of("build_datasets", Datasets) == Datasets(None)
    with pytest.raises(KeyError, match="'train_challenger' is not available here"):
        got.of("train_challenger", Challenger)
    with pytest.raises(TypeError, match="'build_datasets' is a Datasets, expected Challenger"):
        got.of("build_datasets", Challenger)


# -- the driver: the DAG's gate and error policy ----------------------------------------------------

RUN = RunContext(run_id="manual__t", run_time="2026-03-01T00:00:00+00:00", trigger="manual: t", who="t")


def fake(
    name: str, result: Any, calls: list[str], *, gate: bool = False, failures: list[Exception] | None = None
) -> Step:
    pending = list(failures or [])

    def run(spec: ModelSpec, settings: Settings, run: RunContext, got: Results) -> Any:
        calls.append(f"{name} last={run.last_attempt}")
        if pending:
            raise pending.pop(0)
        return result

    return Step(name, (), run, lambda x: x, gate=gate)


@pytest.fixture
def spec(workspace: Path) -> ModelSpec:
    return load_spec(write_spec(workspace / "specs", "steps", estimator=LOGREG))


def test_a_transient_error_is_retried_and_a_deterministic_one_fails_at_once_naming_the_step(
    spec: ModelSpec,
) -> None:
    calls: list[str] = []
    steps = (
        fake("first", Registration("1", "r"), calls, failures=[TransientError("MLflow unreachable")]),
        fake("second", Registration("2", "r"), calls),
    )
    results = run_steps(spec, get_settings(), RUN, steps, retries=2, retry_delay_s=0)
    # As a task with retries=2: no try but the third is the last one.
    assert calls == ["first last=False", "first last=False", "second last=False"]
    assert results.of("second", Registration).version == "2"

    calls.clear()
    steps = (fake("broken", None, calls, failures=[DataError("column 'x': 3 rows are not finite")]),)
    with pytest.raises(DataError) as caught:
        run_steps(spec, get_settings(), RUN, steps, retries=2, retry_delay_s=0)
    assert calls == ["broken last=False"]  # no second try: it would fail the same way
    assert caught.value.__notes__ == ["steps__train: step broken failed (try 1, run manual__t)"]


def test_the_last_try_knows_it_is_the_last(spec: ModelSpec) -> None:
    calls: list[str] = []
    steps = (fake("deploy", None, calls, failures=[TransientError("down")] * 3),)
    with pytest.raises(TransientError) as caught:
        run_steps(spec, get_settings(), RUN, steps, retries=2, retry_delay_s=0)
    assert calls == ["deploy last=False", "deploy last=False", "deploy last=True"]
    assert "try 3" in caught.value.__notes__[0]


def test_a_gate_saying_no_ends_the_run_without_an_error(spec: ModelSpec) -> None:
    calls: list[str] = []
    steps = (
        fake("gate", TrainingGate(False, "nothing new"), calls, gate=True),
        fake("train", Challenger("r", "u", "1", 0.5), calls),
    )
    results = run_steps(spec, get_settings(), RUN, steps)
    assert calls == ["gate last=True"] and list(results) == ["gate"]


# -- the real first steps: nothing landed, a duplicate, everything quarantined ------------------------


def land(spec: ModelSpec, name: str, frame: Any) -> Path:
    zone = pipeline.zone_for(spec, get_settings())
    path = zone.landing / name
    frame.to_csv(path, index=False)
    return path


FIRST_STEPS = TRAINING_STEPS[:4]  # up to the gate: no MLflow is needed to get there with no data


def test_nothing_landed_and_nothing_accepted_records_a_run_that_did_not_train(spec: ModelSpec) -> None:
    results = run_steps(spec, get_settings(), RUN, FIRST_STEPS)
    assert results.of("collect_landed_files", Collected) == Collected(())
    assert results.of("validate_batches", Validated) == Validated()
    assert results.of("build_datasets", Datasets).empty
    gate = results.of("needs_training", TrainingGate)
    assert not gate.needed and gate.why.startswith("no accepted data yet")
    outcome = json.loads(
        (pipeline.zone_for(spec, get_settings()).runs / "manual__t" / "outcome.json").read_text()
    )
    assert outcome == {"run_id": "manual__t", "trigger": "manual: t", "trained": False, "why": gate.why}


def test_a_copy_landed_with_its_original_is_set_aside_as_a_duplicate(spec: ModelSpec) -> None:
    frame = generate_churn(200, seed=1)
    land(spec, "week0.csv", frame)
    land(spec, "week0-copy.csv", frame)
    collected = pipeline.collect_landed_files(spec, get_settings())
    (kept,) = collected.new
    (dup,) = collected.duplicates
    assert {kept.name, dup.name} == {"week0.csv", "week0-copy.csv"}
    assert "duplicate: byte-identical to" in dup.reason and Path(dup.path).parent.name == "quarantine"


def test_when_every_new_file_is_quarantined_validation_fails_with_the_reasons_and_data_docs(
    spec: ModelSpec,
) -> None:
    bad = generate_churn(200, seed=2).drop(columns=["plan"])
    land(spec, "week0.csv", bad)
    with pytest.raises(NothingAccepted) as caught:
        run_steps(spec, get_settings(), RUN, FIRST_STEPS)
    err = caught.value
    (rejected,) = err.quarantined
    assert rejected["name"] == "week0.csv" and "missing columns ['plan']" in rejected["reason"]
    assert err.docs_url and err.docs_url.startswith("file://")
    assert caught.value.__notes__ == ["steps__train: step validate_batches failed (try 1, run manual__t)"]
    zone = pipeline.zone_for(spec, get_settings())
    assert not any(zone.landing.iterdir()) and not any(zone.accepted.iterdir())
    assert not (zone.runs / "manual__t" / "outcome.json").exists()  # as in the DAG: no gate, no outcome


def test_validation_learns_its_reference_from_per_file_profiles_and_survives_a_retraction(
    spec: ModelSpec,
) -> None:
    """Each accepted file is profiled once, stored by content hash, and merged: the reference a run
    validates against is the one learned from every accepted row, without re-learning it per file."""
    import pandas as pd

    from cd4ml.data import landing
    from cd4ml.data.tables import read_table
    from cd4ml.data.validation import accepted_profile, learn_reference, normalise, reference_from_profile

    settings = get_settings()
    zone = pipeline.zone_for(spec, settings)
    for week in range(3):
        land(spec, f"week{week}.csv", generate_churn(300, seed=week, batch=week))
        collected = pipeline.collect_landed_files(spec, settings)
        validated = pipeline.validate_landed_files(
            spec, settings, collected.new, run_id=f"r{week}", run_time=f"2026-01-0{week + 1}T00:00:00+00:00"
        )
        assert [a.name for a in validated.accepted] == [f"week{week}.csv"], validated.quarantined
    records = landing.list_accepted(zone)
    stored = {p.name.split("-", 1)[0] for p in zone.profiles.glob("*.npz")}
    assert {r.sha256 for r in records} <= stored  # one profile per accepted file, by content hash

    def rows(kept: list[landing.AcceptedFile]) -> pd.DataFrame:
        return pd.concat([normalise(spec, read_table(Path(r.path))) for r in kept], ignore_index=True)

    def never_read(path: Path) -> pd.DataFrame:
        raise AssertionError(f"{path} was read again: its stored profile was not used")

    merged = accepted_profile(spec, zone.profiles, [(r.sha256, Path(r.path)) for r in records], never_read)
    assert reference_from_profile(spec, merged) == learn_reference(spec, rows(records))

    # A retracted file leaves the reference; the next run validates against the files that remain.
    landing.retract(zone, "week1.csv", reason="test", who="t", when="2026-01-04T00:00:00+00:00")
    land(spec, "week3.csv", generate_churn(300, seed=3, batch=3))
    collected = pipeline.collect_landed_files(spec, settings)
    validated = pipeline.validate_landed_files(
        spec, settings, collected.new, run_id="r3", run_time="2026-01-05T00:00:00+00:00"
    )
    assert [a.name for a in validated.accepted] == ["week3.csv"]
    kept = landing.list_accepted(zone)
    assert [r.name for r in kept] == ["week0.csv", "week2.csv", "week3.csv"]
    merged = accepted_profile(spec, zone.profiles, [(r.sha256, Path(r.path)) for r in kept], never_read)
    assert reference_from_profile(spec, merged) == learn_reference(spec, rows(kept))


def test_only_the_staging_and_deploy_tasks_look_up_the_service_connection() -> None:
    from cd4ml.steps.pipeline import SERVICE_STEPS

    names = [s.name for s in TRAINING_STEPS]
    assert SERVICE_STEPS == {"stage_challenger", "deploy_champion"}
    # Staging comes before the alias moves; the rollout is the last step.
    assert names.index("stage_challenger") < names.index("promote_champion") < names.index("deploy_champion")
    assert names[-1] == "deploy_champion"


# -- the business value of both models on the holdout ---------------------------------------------------


def test_both_models_business_values_on_the_same_holdout_go_into_the_evidence(workspace: Path) -> None:
    """`evaluate_against_champion`'s business part with real fitted models (no MLflow needed): each
    model valued on the labels it predicts for the holdout, both in the decision it records."""
    from cd4ml.ml import training
    from cd4ml.ml.business import business_value
    from cd4ml.ml.evaluation import decide
    from tests.helpers import WEAK

    matrix = {1: {1: 40, 0: -200}, 0: {1: -10, 0: 0}}
    spec = load_spec(write_spec(
        workspace / "specs", "biz", estimator=LOGREG,
        business={"name": "margin", "unit": "EUR", "gate": True, "matrix": matrix},
    ))  # fmt: skip
    frame = generate_churn(900, seed=4)
    train, holdout = frame.iloc[:600], frame.iloc[600:].reset_index(drop=True)
    challenger = training.train(spec, train)
    champion = training.train(
        spec.model_copy(update={"estimator": spec.estimator.model_validate(WEAK)}), train
    )
    values = pipeline.holdout_business_values(spec, holdout, challenger, champion)
    assert values is not None and (values.name, values.unit, values.gate) == ("margin", "EUR", True)
    x = training.features(spec, holdout)
    assert values.challenger == business_value(spec, holdout["churned"], challenger.predict(x))
    # The prior-only champion never flags a churner: every churner is lost (-200 each).
    assert values.champion == pytest.approx(-200 * holdout["churned"].mean())
    assert values.challenger > values.champion

    decision = decide(
        spec.metric.name, spec.promotion, holdout["churned"].to_numpy(),
        training.metric_inputs(spec, challenger, holdout), training.metric_inputs(spec, champion, holdout),
        champion_version="1", seed=spec.seed, business=values,
    )  # fmt: skip
    evidence = Evaluation(decision).to_xcom()
    assert evidence["challenger_business_value"] == values.challenger
    assert evidence["champion_business_value"] == values.champion and evidence["business_metric"] == "margin"
    # No business section: nothing computed, nothing recorded.
    plain = load_spec(write_spec(workspace / "specs", "plain", estimator=LOGREG))
    assert pipeline.holdout_business_values(plain, holdout, challenger, champion) is None


def test_the_business_gate_rejects_a_better_scoring_challenger_worth_less_and_mlflow_records_why(
    workspace: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every retention offer costs 100 and earns nothing: a prior-only champion (never flags anyone)
    is worth 0 per prediction, a logistic regression (better roc_auc, flags some) less than that."""
    import uuid

    from cd4ml import registry
    from cd4ml.core.settings import get_settings
    from cd4ml_dev.datagen import write_batch
    from tests.helpers import WEAK

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name = f"biz_{uuid.uuid4().hex[:8]}"
    business = {
        "name": "offer cost",
        "unit": "EUR",
        "gate": True,
        "matrix": {1: {1: -100, 0: 0}, 0: {1: -100, 0: 0}},
    }

    def train(estimator: dict[str, Any], batch: int) -> tuple[dict[str, Any], dict[str, Any]]:
        spec = load_spec(write_spec(workspace / "specs", name, estimator=estimator, business=business,
                                    promotion__floor=None))  # fmt: skip
        zone = pipeline.zone_for(spec, get_settings())
        write_batch(generate_churn(300, seed=batch, batch=batch), zone.landing, f"week{batch}.csv")
        out = pipeline.run_training(
            spec, get_settings(), run_id=f"r{batch}", run_time=RUN.run_time, deploy=False
        )
        client = registry.client(get_settings().mlflow_tracking_uri)
        evidence = registry.read_evidence(client, name, out["version"]).decision
        return out, evidence

    first, evidence = train(WEAK, 0)
    assert first["promoted"] is True and evidence["challenger_business_value"] == 0.0
    assert evidence["champion_business_value"] is None and evidence["business_gate"] is True
    second, evidence = train(LOGREG, 1)
    assert evidence["challenger_score"] > evidence["champion_score"]  # the ML metric alone would promote
    assert second["promoted"] is False
    assert evidence["challenger_business_value"] < evidence["champion_business_value"] == 0.0
    assert (
        second["why"].startswith("rejected: business metric offer cost -")
        and "business.gate is true" in second["why"]
    )
