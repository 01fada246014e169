"""Accepted data stored once in MLflow (`artifacts-v2`): each accepted file is logged a single time by
content hash into the model's data store, a version keeps the ordered list of the files it was
trained on, and its training set and holdout are rebuilt from them, so MLflow grows with the data,
not with data x versions. Against a real tracking server (SQLite, proxied artifacts)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from cd4ml import registry
from cd4ml.core.spec import ModelSpec, load_spec
from cd4ml.data.tables import read_table
from cd4ml.data.validation import normalise
from cd4ml.ml.training import split_holdout
from cd4ml.registry import evidence as ev
from cd4ml.steps.pipeline import spec_text
from cd4ml_dev.datagen import generate_churn
from tests.conftest import _SESSION_DIR as SESSION_DIR
from tests.helpers import LOGREG, write_spec
from tests.unit.test_history import _version


@pytest.fixture
def spec(tmp_path: Path) -> ModelSpec:
    (tmp_path / "specs").mkdir()
    return load_spec(write_spec(tmp_path / "specs", f"store_{uuid.uuid4().hex[:8]}", estimator=LOGREG))


def _batches(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        path = tmp_path / "accepted" / f"batch_{i}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        generate_churn(150, seed=i, batch=i).to_csv(path, index=False)
        out.append(path)
    return out


def _split(spec: ModelSpec, files: list[Path], where: Path) -> dict[str, str]:
    """What prepare_datasets writes for these files: read, normalise, concatenate, split."""
    frame = pd.concat([normalise(spec, read_table(f)) for f in files], ignore_index=True)
    split = split_holdout(spec, frame)
    where.mkdir(parents=True, exist_ok=True)
    split.train.to_parquet(where / "train.parquet", index=False)
    split.holdout.to_parquet(where / "holdout.parquet", index=False)
    return {"train": str(where / "train.parquet"), "holdout": str(where / "holdout.parquet")}


def _record(client: MlflowClient, uri: str, spec: ModelSpec, files: list[Path], where: Path) -> str:
    version = _version(uri, spec.name)
    snapshots = _split(spec, files, where)
    registry.record_evidence(
        client, spec.name, version, evidence={"promote": True}, validation={"status": "passed"},
        spec_text=spec_text(spec), snapshots=snapshots, batches=files,
    )  # fmt: skip
    return version


def _stored(client: MlflowClient, spec: ModelSpec) -> list[str]:
    run_id = ev._store_run(client, spec.name)
    return sorted(Path(a.path).name for a in client.list_artifacts(run_id, "batches"))


def test_each_accepted_file_is_stored_once_and_versions_rebuild_their_split(
    mlflow_server: str, spec: ModelSpec, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server)
    files = _batches(tmp_path, 3)
    v1 = _record(client, mlflow_server, spec, files[:2], tmp_path / "run1")
    expected_train = pd.read_parquet(tmp_path / "run1" / "train.parquet")
    expected_holdout = pd.read_parquet(tmp_path / "run1" / "holdout.parquet")
    v2 = _record(client, mlflow_server, spec, files, tmp_path / "run2")

    # Three files, two versions: three stored files, not five.
    assert len(_stored(client, spec)) == 3
    mv = client.get_model_version(spec.name, v2)
    assert mv.tags[ev.FORMAT_TAG] == ev.FORMAT_V2
    assert not client.list_artifacts(str(mv.run_id), "cd4ml/snapshots")  # no copies of rows
    info = registry.read_evidence(client, spec.name, v2).snapshots
    assert info["train"]["kind"] == "rebuilt-from-batches" and ev.held_whole(info["train"])

    # Nothing local is needed to read a version's data back.
    for path in [*files, *tmp_path.glob("run*/*.parquet")]:
        path.unlink()
    pd.testing.assert_frame_equal(registry.reference_frame(client, spec.name, v1), expected_train)
    pd.testing.assert_frame_equal(
        registry.reference_frame(client, spec.name, v1, "holdout"), expected_holdout
    )
    v2_train = registry.reference_frame(client, spec.name, v2, columns=["plan"])
    assert list(v2_train.columns) == ["plan"] and len(v2_train) == info["train"]["rows"]


def test_the_same_bytes_under_another_name_are_not_stored_again(
    mlflow_server: str, spec: ModelSpec, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server)
    files = _batches(tmp_path, 2)
    copy = files[1].with_name("relanded_copy.csv")
    copy.write_bytes(files[1].read_bytes())
    version = _record(client, mlflow_server, spec, [*files, copy], tmp_path / "run")
    assert len(_stored(client, spec)) == 2
    run_id = str(client.get_model_version(spec.name, version).run_id)
    names = [b["name"] for b in ev._load_json(client, run_id, "cd4ml/batches.json")]
    assert names == ["batch_0.csv", "batch_1.csv", "relanded_copy.csv"]
    assert (
        len(registry.reference_frame(client, spec.name, version))
        + len(registry.reference_frame(client, spec.name, version, "holdout"))
        == 450
    )


def test_a_stored_file_changed_by_hand_is_named_not_used(
    mlflow_server: str, spec: ModelSpec, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server)
    files = _batches(tmp_path, 2)
    version = _record(client, mlflow_server, spec, files, tmp_path / "run")
    # Tamper with the artifact store behind MLflow's back, as a careless clean-up script would.
    run_id = ev._store_run(client, spec.name)
    sha = ev.file_sha256(files[0])
    stored = list(
        (SESSION_DIR / "mlflow" / "artifacts").rglob(f"{run_id}/artifacts/batches/{sha}/batch_0.csv")
    )
    assert len(stored) == 1, f"the session server's artifact store has no single copy of {sha}"
    stored[0].write_text("customer_id,plan\n1,basic\n")
    ev.clear_evidence_cache()
    with pytest.raises(ev.EvidenceMissingError, match=r"batch_0\.csv .* does not match its recorded SHA-256"):
        registry.reference_frame(client, spec.name, version)


def test_a_missing_accepted_file_is_named_before_anything_is_stored(
    mlflow_server: str, spec: ModelSpec, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server)
    files = _batches(tmp_path, 2)
    version = _version(mlflow_server, spec.name)
    snapshots = _split(spec, files, tmp_path / "run")
    files[1].unlink()
    with pytest.raises(ev.EvidenceMissingError, match=r"accepted file\(s\) not found: .*batch_1\.csv"):
        registry.record_evidence(client, spec.name, version, evidence={}, validation={}, spec_text="",
                                 snapshots=snapshots, batches=files)  # fmt: skip
    assert ev.FORMAT_TAG not in client.get_model_version(spec.name, version).tags
