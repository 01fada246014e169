"""Bad data never trains a model and is never lost.

The corpus (tests/reliability/corpus.py) holds one file per way a landed file goes wrong. Each is
checked twice: fast, through the reading and validation functions directly; and together, dropped
into the landing zone of a model that already has a served champion and run through the real
`<model>__train` DAG (dag.test) against the session's MLflow server and prediction service. In
`make test` that landing holds every unreadable file and every fourth file that fails validation
(each costs a Great Expectations run); `make soak` (CD4ML_SOAK=1) lands the whole corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from cd4ml.core.errors import DataReadError
from cd4ml.core.spec import load_spec
from cd4ml.data import landing
from cd4ml.data.tables import read_table
from cd4ml.data.validation import learn_reference, normalise, validate_frame
from cd4ml_dev.datagen import generate_churn
from tests.helpers import DEMO_SPEC, LOGREG, write_spec
from tests.integration.dagtools import champion, land, run, served, versions
from tests.reliability.corpus import build_corpus, clean_variants

CORPUS = build_corpus()
SOAK = os.environ.get("CD4ML_SOAK") == "1"
LANDED = (
    CORPUS
    if SOAK
    else [c for c in CORPUS if c.stage == "read"] + [c for c in CORPUS if c.stage == "validation"][::4]
)
SPEC = load_spec(DEMO_SPEC)
REFERENCE = learn_reference(SPEC, normalise(SPEC, generate_churn(1500, seed=1)))


def test_corpus_covers_the_promised_kinds() -> None:
    kinds = {c.kind for c in CORPUS}
    assert len(kinds) == len(CORPUS) >= 18
    assert len({hashlib.sha256(c.content).hexdigest() for c in CORPUS}) == len(CORPUS)  # no duplicates
    assert {c.stage for c in CORPUS} == {"read", "validation"}


def _reason(zone: landing.Zone, name: str, content: bytes) -> str:
    """What the pipeline does with one landed file: read, validate, and quarantine on failure."""
    path = zone.landing / name
    path.write_bytes(content)
    (landed,) = landing.list_landed(zone)
    try:
        frame = normalise(SPEC, read_table(path))
    except DataReadError as err:
        reason = f"{name}: rejected before validation: {err}"
    else:
        outcome = validate_frame(SPEC, frame, REFERENCE, batch_name=name)
        if outcome.success:
            landing.accept(zone, landed, rows=len(frame), accepted_at="t", run_id="r")
            return ""
        reason = "\n".join(outcome.problems)
    landing.quarantine(zone, landed, reason=reason, details={})
    return reason


@pytest.mark.parametrize("case", CORPUS, ids=[c.kind for c in CORPUS])
def test_each_corruption_is_rejected_with_a_reason_naming_it(tmp_path: Path, case: Any) -> None:
    zone = landing.Zone(tmp_path).ensure()
    if case.stage == "read":
        with pytest.raises(DataReadError) as err:
            read_table(_write(tmp_path / "probe", case.filename, case.content))
        assert str(err.value).startswith(case.filename)
    reason = _reason(zone, case.filename, case.content)
    assert reason, f"{case.kind} was accepted"
    for expected in case.expect:
        assert expected in reason, f"{case.kind}: {expected!r} not in {reason!r}"
    (stored,) = [p for p in zone.quarantine.iterdir() if p.name.endswith("__" + case.filename)]
    assert stored.read_bytes() == case.content
    assert not any(zone.accepted.iterdir()) and not any(zone.landing.iterdir())


@pytest.mark.parametrize("name", sorted(clean_variants()))
def test_clean_variants_are_accepted(tmp_path: Path, name: str) -> None:
    """The control group: harmless differences in how a file was exported are not rejected."""
    zone = landing.Zone(tmp_path).ensure()
    assert _reason(zone, name, clean_variants()[name]) == ""
    (stored,) = [p for p in zone.accepted.iterdir() if p.name.endswith("__" + name)]
    assert stored.read_bytes() == clean_variants()[name]


def _write(directory: Path, name: str, content: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(content)
    return directory / name


# -- the whole corpus through the real training DAG --------------------------------------------------

MODEL = "badcorpus"


@pytest.fixture(scope="module")
def guarded(
    prediction_service: dict[str, str], mlflow_server: str, shared_specs: Path, airflow_db: Path
) -> Iterator[dict[str, Any]]:
    """A model with a served champion, as the session's deploy_env sets it up (module-scoped)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CD4ML_SPECS_DIR", str(shared_specs))
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.setenv("CD4ML_SERVICE_URL", prediction_service["url"])
        mp.setenv("CD4ML_SERVICE_ADMIN_TOKEN", prediction_service["token"])
        mp.setenv("CD4ML_DEPLOY_GOLDEN_ROWS", "20")
        mp.setenv("CD4ML_DEPLOY_WAIT_SECONDS", "60")
        env = {
            "specs": shared_specs,
            "data": Path(os.environ["CD4ML_HOME"]) / "data",
            "mlflow": MlflowClient(mlflow_server),
            "service": prediction_service["url"],
        }
        write_spec(shared_specs, MODEL, estimator=LOGREG)
        land(env, MODEL, "week0.csv", generate_churn(1500, seed=1))
        first = run(env, MODEL)
        assert first["__run__"] == "success", first
        assert champion(env, MODEL) == served(env, MODEL) == "1"
        yield env


@pytest.mark.integration
def test_the_corpus_in_one_landing_is_quarantined_and_nothing_is_trained(
    guarded: dict[str, Any],
) -> None:
    env = guarded
    zone = env["data"] / MODEL
    runs_before = env["mlflow"].search_runs(
        [env["mlflow"].get_experiment_by_name(MODEL).experiment_id], max_results=1000
    )
    assert {c.stage for c in LANDED} == {"read", "validation"}
    for case in LANDED:  # landed the way users are told to: write aside, then rename
        tmp = zone / "landing" / f".{case.filename}.part"
        tmp.write_bytes(case.content)
        tmp.replace(zone / "landing" / case.filename)

    states = run(env, MODEL)

    assert states["__run__"] == "failed" and states["validate_batches"] == "failed", states
    assert states["train_challenger"] in {"upstream_failed", "None"}
    assert states["register_challenger"] in {"upstream_failed", "None"}
    # Nothing trained: no new run, no new version; champion and served version untouched.
    runs_after = env["mlflow"].search_runs(
        [env["mlflow"].get_experiment_by_name(MODEL).experiment_id], max_results=1000
    )
    assert len(runs_after) == len(runs_before)
    assert [v.version for v in versions(env, MODEL)] == ["1"]
    assert champion(env, MODEL) == served(env, MODEL) == "1"
    # Every landed byte is still on disk, in exactly one place.
    assert not [p for p in (zone / "landing").iterdir() if not p.name.startswith(".")]
    stored = {
        landing.file_sha256(p): p
        for d in ("accepted", "quarantine")
        for p in (zone / d).iterdir()
        if not p.name.endswith((".reason.txt", ".reason.json", ".meta.json"))
    }
    failures = []
    for case in LANDED:
        sha = hashlib.sha256(case.content).hexdigest()
        path = stored.get(sha)
        if path is None or path.parent.name != "quarantine":
            failures.append(f"{case.kind}: not in quarantine/ ({path})")
            continue
        reason = path.with_name(path.name + ".reason.txt").read_text()
        details = json.loads(path.with_name(path.name + ".reason.json").read_text())
        assert details["sha256"] == sha and details["file"] == case.filename
        missing = [e for e in case.expect if e not in reason]
        if not reason.startswith(case.filename) or missing:
            failures.append(f"{case.kind}: reason lacks {missing}: {reason}")
    assert not failures, "\n".join(failures)
    accepted = [p for p in (zone / "accepted").iterdir() if not p.name.endswith(".meta.json")]
    assert [p.name.split("__", 1)[1] for p in accepted] == ["week0.csv"]
