"""The steps' edge cases against a real MLflow store (SQLite, in this process; no server, no Airflow):
no champion yet, nothing new to train on, equal scores, evaluate-only, a registration retried, and
`cd4ml train` driving the same steps with the DAG's run outcome, evaluate-only mode and failure shape.

The DAG's own wiring of these paths is covered by tests/integration/test_train_dag.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cd4ml import registry
from cd4ml.core.settings import get_settings
from cd4ml.core.spec import ModelSpec, load_spec
from cd4ml.steps import pipeline
from cd4ml.steps.contracts import Evaluation, Registration, RunContext, Validated
from cd4ml.steps.pipeline import Results, run_steps, run_training
from cd4ml_dev.datagen import generate_churn
from tests.helpers import LOGREG, WEAK, sqlite_mlflow, write_spec

ROWS = 400


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One SQLite MLflow store for the module (creating its schema costs seconds); each test its own model."""
    with sqlite_mlflow(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture
def model(workspace: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch, request: Any) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    return request.node.name.removeprefix("test_")[:40].strip("_")


def spec_for(workspace: Path, name: str, **overrides: Any) -> ModelSpec:
    return load_spec(write_spec(workspace / "specs", name, **overrides))


def land(spec: ModelSpec, name: str, frame: Any) -> None:
    frame.to_csv(pipeline.zone_for(spec, get_settings()).landing / name, index=False)


def train(spec: ModelSpec, run: str, **kwargs: Any) -> dict[str, Any]:
    return run_training(
        spec, get_settings(), run_id=run, run_time="2026-03-01T00:00:00+00:00", deploy=False, **kwargs
    )


def client() -> Any:
    return registry.client(get_settings().mlflow_tracking_uri)


def champion(name: str) -> str | None:
    mv = registry.version_by_alias(client(), name, registry.CHAMPION)
    return str(mv.version) if mv else None


def outcome(spec: ModelSpec, run: str) -> dict[str, Any]:
    return dict(json.loads((pipeline.zone_for(spec, get_settings()).runs / run / "outcome.json").read_text()))


def test_first_model_then_same_data_then_forced_equal_model(workspace: Path, model: str) -> None:
    spec = spec_for(workspace, model, estimator=LOGREG)
    land(spec, "week0.csv", generate_churn(ROWS, seed=1))

    first = train(spec, "r1", trigger="manual: first")
    assert first == {"promoted": True, "version": "1", "previous": None, "why": first["why"]}
    assert "first model" in first["why"] and champion(model) == "1"
    assert outcome(spec, "r1") == {
        "run_id": "r1",
        "trigger": "manual: first",
        "trained": True,
        "why": "no champion yet",
    }
    evidence = registry.read_evidence(client(), model, "1")
    assert evidence.source == "artifacts" and evidence.spec_text and "snapshots" not in evidence.validation
    assert set(evidence.snapshots) == {"train", "holdout"}
    assert evidence.decision["champion_version"] is None and evidence.decision["promote"]
    (promotion,) = [e for e in registry.events(client(), model) if e.kind == "promotion"]
    assert (promotion.version, promotion.who) == ("1", "r1")

    # Nothing new: the gate stops the run, and says which version already has exactly this data.
    again = train(spec, "r2")
    assert (
        again["trained"] is False
        and "version 1 (champion) was already trained on exactly this data" in again["why"]
    )
    assert outcome(spec, "r2")["trained"] is False
    assert [str(mv.version) for mv in client().search_model_versions(f"name = '{model}'")] == ["1"]

    # Forced: the identical model scores equal on the same holdout, and equal is not better.
    forced = train(spec, "r3", force=True)
    assert forced["promoted"] is False and forced["version"] == "2"
    v2 = client().get_model_version(model, "2")
    assert v2.tags["cd4ml.decision"] == "reject"
    assert registry.read_evidence(client(), model, v2).decision["difference"] == 0.0
    # Tags keep small scalars only: the records are artifacts, not (cut) JSON tags.
    assert "cd4ml.evidence" not in v2.tags and "cd4ml.validation" not in v2.tags, sorted(v2.tags)
    assert max(len(value) for value in v2.tags.values()) <= 500, v2.tags
    assert (
        champion(model) == "1"
        and str(client().get_model_version_by_alias(model, "challenger").version) == "2"
    )
    assert outcome(spec, "r3")["why"] == "forced by the run's parameters"

    # A promotion retried after its first attempt moved the alias carries on (returning the champion
    # it replaced) instead of refusing its own move as stale; a really stale decision is refused.
    assert registry.move_champion(client(), model, "2", expected_current="1") == "1"
    assert registry.move_champion(client(), model, "2", expected_current="1") == "1"
    assert champion(model) == "2"
    with pytest.raises(registry.Cd4mlError, match="refusing to promote on a stale decision"):
        registry.move_champion(client(), model, "1", expected_current=None)

    # The tags a service reads when it loads a champion are there before the alias moves (the
    # service may load it within a poll); a refused move puts them back as they were.
    v1_tags = dict(client().get_model_version(model, "1").tags)
    with pytest.raises(registry.Cd4mlError, match="stale decision"):
        registry.promote_with_tags(client(), model, "1", expected_current=None,
                                   tags={"cd4ml.promoted_at": "later", "cd4ml.new_tag": "x"})  # fmt: skip
    assert dict(client().get_model_version(model, "1").tags) == v1_tags
    assert champion(model) == "2"
    seen: list[dict[str, str]] = []
    real_move = registry.move_champion

    def move_and_look(*args: Any, **kwargs: Any) -> str | None:
        seen.append(dict(client().get_model_version(model, "1").tags))
        return real_move(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "move_champion", move_and_look)
        assert registry.promote_with_tags(client(), model, "1", expected_current="2",
                                          tags={"cd4ml.promoted_at": "now"}) == "2"  # fmt: skip
    assert seen[0]["cd4ml.promoted_at"] == "now" and champion(model) == "1"


def test_evaluate_only_records_a_winning_decision_and_leaves_the_champion(
    workspace: Path, model: str
) -> None:
    spec = spec_for(workspace, model, estimator=WEAK, promotion__floor=None)
    land(spec, "week0.csv", generate_churn(ROWS, seed=2))
    assert train(spec, "r1")["version"] == "1"
    better = spec_for(workspace, model, estimator=LOGREG, promotion__floor=None)

    result = train(better, "r2", evaluate_only=True)
    assert result == {
        "promoted": False,
        "version": "2",
        "why": "evaluate_only: decision recorded, champion untouched",
    }
    v2 = client().get_model_version(model, "2")
    assert v2.tags["cd4ml.decision"] == "promote" and v2.tags["cd4ml.promotion"] == "skipped: evaluate_only"
    assert champion(model) == "1"
    assert [e.version for e in registry.events(client(), model) if e.kind == "promotion"] == ["1"]


def test_a_retried_registration_reuses_its_version_and_evidence(workspace: Path, model: str) -> None:
    spec = spec_for(workspace, model, estimator=LOGREG)
    land(spec, "week0.csv", generate_churn(ROWS, seed=3))
    run = RunContext(run_id="r1", run_time="2026-03-01T00:00:00+00:00", trigger="manual: retry", who="t")
    upto_register = pipeline.TRAINING_STEPS[:7]
    results = run_steps(spec, get_settings(), run, upto_register)
    first = results.of("register_challenger", Registration)

    # The task retried after MLflow had created the version (a lost response, say): same version.
    register = pipeline.STEPS_BY_NAME["register_challenger"]
    again = register.run(spec, get_settings(), run, Results(results))
    assert again == first == Registration("1", first.run_id)
    assert len(client().search_model_versions(f"name = '{model}'")) == 1
    assert registry.read_evidence(client(), model, "1").validation["accepted"] == ["week0.csv"]
    assert results.of("validate_batches", Validated).accepted[0].name == "week0.csv"
    assert results.of("evaluate_against_champion", Evaluation).champion_version is None


def test_cd4ml_train_has_the_dags_evaluate_only_outcome_and_failure_shape(
    workspace: Path, model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from cd4ml.cli import main

    spec = spec_for(workspace, model, estimator=LOGREG, promotion__floor=None)
    land(spec, "week0.csv", generate_churn(ROWS, seed=4))
    assert main(["train", model, "--no-deploy", "--evaluate-only", "--reason", "try it"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # The first model wins, but evaluate-only never moves the champion, as in the DAG's form.
    assert printed["promoted"] is False and printed["why"].startswith("evaluate_only")
    assert champion(model) is None
    (run_dir,) = pipeline.zone_for(spec, get_settings()).runs.iterdir()
    recorded = json.loads((run_dir / "outcome.json").read_text())
    assert recorded["trigger"] == "manual: try it" and recorded["trained"] is True
    assert client().get_model_version(model, "1").tags["cd4ml.trigger_reason"] == "manual: try it"

    # A quarantine fails like the DAG's validate_batches: named step, deterministic, the reasons.
    land(spec, "week1.csv", generate_churn(ROWS, seed=4, batch=1).drop(columns=["plan"]))
    assert main(["train", model, "--no-deploy"]) == 2
    err = capsys.readouterr().err
    assert f"{model}__train: step validate_batches failed (try 1" in err
    assert "NothingAccepted (deterministic, not retried)" in err and "missing columns ['plan']" in err
