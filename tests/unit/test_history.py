"""Evidence and history in MLflow, against a real tracking server (SQLite, proxied artifacts).

A version's decision, validation record, spec text and snapshots are artifacts of its run, read back
whole (nothing cut at MLflow's 5,000-character tag limit) by any client of the server; versions
registered before that keep working from their tags and local paths. The per-model history is
append-only: concurrent writers lose nothing, a retry with the same key writes nothing twice.
"""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow import MlflowClient
from sklearn.linear_model import LogisticRegression

from cd4ml import registry
from cd4ml.registry import evidence as ev
from cd4ml.registry import history


def _frame(rows: int, seed: int = 0) -> pd.DataFrame:
    import numpy as np

    rng = np.random.default_rng(seed)
    plans = np.array(["basic", "pro", "max"])[rng.integers(0, 3, rows)]
    plans[rows // 2] = "rare"  # one row only: a sample of the table would likely miss it
    return pd.DataFrame({"x": rng.normal(size=rows), "plan": plans, "y": rng.integers(0, 2, rows)})


def _version(uri: str, name: str, tags: dict[str, str] | None = None) -> str:
    frame = _frame(20)
    model = LogisticRegression().fit(frame[["x"]], frame["y"])
    logged = registry.log_challenger(
        uri, experiment=name, run_name="r", model=model, input_example=frame[["x"]].head(3),
        params={}, tags={}, metrics={"roc_auc": 0.5},
    )  # fmt: skip
    mv = registry.register_version(
        registry.client(uri), name=name, description="test", logged=logged, tags=tags or {}
    )
    return str(mv.version)


@pytest.fixture
def name() -> str:
    return f"hist_{uuid.uuid4().hex[:8]}"


def test_evidence_is_stored_whole_as_artifacts_and_tags_keep_scalars(
    mlflow_server: str, name: str, tmp_path: Path
) -> None:
    version = _version(mlflow_server, name)
    train, holdout = _frame(120), _frame(40, seed=1)
    train.to_parquet(tmp_path / "train.parquet")
    holdout.to_parquet(tmp_path / "holdout.parquet")
    evidence = {"promote": True, "reason": "better " * 2000, "challenger_score": 0.91}  # > 5,000 chars
    validation = {"status": "passed", "accepted": [f"file_{i}.csv" for i in range(900)]}
    spec_text = "name: churn\ntarget: y\n# the spec as written, comments too\n"
    client = MlflowClient(mlflow_server)

    registry.record_evidence(
        client, name, version, evidence=evidence, validation=validation, spec_text=spec_text,
        snapshots={"train": str(tmp_path / "train.parquet"), "holdout": str(tmp_path / "holdout.parquet")},
    )  # fmt: skip
    # Nothing read later depends on the local files.
    (tmp_path / "train.parquet").unlink()
    (tmp_path / "holdout.parquet").unlink()

    got = registry.read_evidence(MlflowClient(mlflow_server), name, version)
    assert got.source == "artifacts"
    assert got.decision == evidence and got.validation == validation and got.spec_text == spec_text
    assert got.snapshots["train"]["rows"] == 120 and not got.snapshots["train"]["sampled"]
    pd.testing.assert_frame_equal(registry.reference_frame(client, name, version), train)
    pd.testing.assert_frame_equal(registry.reference_frame(client, name, version, "holdout"), holdout)
    assert registry.validation_status(client, name, version) == "passed"
    tags = client.get_model_version(name, version).tags
    assert max(len(v) for v in tags.values()) < 100, tags
    assert not {"cd4ml.evidence", "cd4ml.validation", "cd4ml.train_snapshot"} & set(tags), tags


def test_a_large_training_set_is_stored_as_a_sample_with_every_category(
    mlflow_server: str, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CD4ML_SNAPSHOT_MAX_ROWS", "50")
    version = _version(mlflow_server, name)
    train = _frame(400)
    train.to_parquet(tmp_path / "train.parquet")
    client = MlflowClient(mlflow_server)

    registry.record_evidence(
        client, name, version, evidence={}, validation={"status": "passed"}, spec_text="",
        snapshots={"train": str(tmp_path / "train.parquet")}, seed=7,
    )  # fmt: skip

    info = registry.read_evidence(client, name, version).snapshots["train"]
    reference = registry.reference_frame(client, name, version)
    assert (info["rows"], info["stored_rows"], info["sampled"]) == (400, 50, True)
    assert len(reference) == 50 and list(reference.columns) == ["x", "plan", "y"]
    assert reference["x"].isin(train["x"]).all()  # real rows, not made-up ones
    assert info["categories"]["plan"] == ["basic", "max", "pro", "rare"]
    assert "x" not in info["categories"] or len(info["categories"]["x"]) == 400


def test_versions_registered_before_keep_their_tags_and_local_snapshots(
    mlflow_server: str, name: str, tmp_path: Path
) -> None:
    train = _frame(30)
    train.to_parquet(tmp_path / "train.parquet")
    cut = json.dumps({"promote": False, "reason": "x" * 6000})[:5000]  # what tag_json used to store
    version = _version(mlflow_server, name, tags={
        "cd4ml.evidence": json.dumps({"promote": True, "challenger_score": 0.8}),
        "cd4ml.validation": json.dumps({"status": "passed", "accepted": ["a.csv"]}),
        "cd4ml.train_snapshot": str(tmp_path / "train.parquet"),
        "cd4ml.holdout_snapshot": str(tmp_path / "gone.parquet"),
    })  # fmt: skip
    client = MlflowClient(mlflow_server)

    got = registry.read_evidence(client, name, version)
    assert got.source == "tags" and got.spec_text is None
    assert got.decision == {"promote": True, "challenger_score": 0.8}
    assert registry.validation_status(client, name, version) == "passed"
    pd.testing.assert_frame_equal(registry.reference_frame(client, name, version), train)
    with pytest.raises(registry.EvidenceMissingError, match=r"holdout snapshot .*gone\.parquet.*missing"):
        registry.reference_frame(client, name, version, "holdout")

    client.set_model_version_tag(name, version, "cd4ml.evidence", cut)
    decision = registry.read_evidence(client, name, version).decision
    assert decision["unreadable"] == cut and "5,000" in decision["why"]


def test_events_come_back_in_time_order_whole(mlflow_server: str, name: str) -> None:
    client = MlflowClient(mlflow_server)
    assert registry.events(client, name) == []
    long_error = "the service said: " + "no " * 3000
    registry.append_event(client, name, kind="deployment", version="2", who="ann", why=long_error,
                          when="2026-01-03T00:00:00+00:00", details={"outcome": "failed"})  # fmt: skip
    registry.append_event(client, name, kind="promotion", version="2", who="ann", why="better",
                          when="2026-01-02T00:00:00+00:00", details={"previous": "1"})  # fmt: skip
    registry.append_event(client, name, kind="retraction", version=None, who="bob", why="typo file",
                          when="2026-01-04T00:00:00Z")  # fmt: skip

    got = registry.events(client, name)
    assert [(e.kind, e.version, e.who) for e in got] == [
        ("promotion", "2", "ann"), ("deployment", "2", "ann"), ("retraction", None, "bob"),
    ]  # fmt: skip
    assert got[1].why == long_error and got[1].outcome == "failed"
    assert got[0].details == {"previous": "1"} and got[0].outcome == "promotion"
    assert len({e.event_id for e in got}) == 3


def test_two_writers_append_without_losing_or_overwriting(mlflow_server: str, name: str) -> None:
    start = threading.Barrier(2)

    def writer(who: str) -> None:
        client = MlflowClient(mlflow_server)  # each writer its own client, as two workers would
        start.wait()
        for i in range(6):
            registry.append_event(client, name, kind="deployment", version=str(i), who=who,
                                  why=f"attempt {i}", when=f"2026-02-01T00:00:0{i}+00:00")  # fmt: skip

    with ThreadPoolExecutor(max_workers=2) as pool:
        for done in [pool.submit(writer, w) for w in ("a", "b")]:
            done.result()  # re-raises a writer's error here

    got = registry.events(MlflowClient(mlflow_server), name)
    assert sorted((e.who, e.version) for e in got) == sorted((w, str(i)) for w in "ab" for i in range(6))
    assert [e.when for e in got] == sorted(e.when for e in got)


def test_a_retried_append_with_a_key_is_recorded_once(mlflow_server: str, name: str) -> None:
    client = MlflowClient(mlflow_server)
    kwargs: dict[str, Any] = {"kind": "retraction", "version": None, "who": "bob", "why": "wrong file",
                              "when": "2026-03-01T00:00:00+00:00", "key": "retraction:abc"}  # fmt: skip
    registry.append_event(client, name, **kwargs)
    registry.append_event(client, name, **kwargs)
    registry.append_event(client, name, **{**kwargs, "key": "retraction:def"})
    assert len(registry.events(client, name)) == 2


def test_an_event_that_cannot_be_placed_is_refused(mlflow_server: str, name: str) -> None:
    client = MlflowClient(mlflow_server)
    with pytest.raises(history.HistoryError, match="kind 'promoted' is not one of"):
        registry.append_event(client, name, kind="promoted", version="1", who="a", why="", when="2026-01-01")
    with pytest.raises(history.HistoryError, match="'yesterday' is not an ISO 8601 time"):
        registry.append_event(client, name, kind="promotion", version="1", who="a", why="", when="yesterday")
    assert registry.events(client, name) == []


def test_record_evidence_names_a_missing_snapshot(mlflow_server: str, name: str, tmp_path: Path) -> None:
    version = _version(mlflow_server, name)
    with pytest.raises(ev.EvidenceMissingError, match=r"snapshot file\(s\) not found: .*nope\.parquet"):
        registry.record_evidence(
            MlflowClient(mlflow_server), name, version, evidence={}, validation={}, spec_text="",
            snapshots={"train": str(tmp_path / "nope.parquet")},
        )  # fmt: skip
