"""cd4ml's signed champion record: what the promotion and the rollback write on a version, and
what a prediction service holding the admin token requires before it serves that version."""

from __future__ import annotations

from pathlib import Path

import pytest

from cd4ml.registry import SIGNATURE_TAG, champion_signature, signature_problem

KEY = "the-admin-token"
WHEN = "2026-06-01T00:00:00+00:00"


def test_a_record_signed_with_the_key_for_this_model_and_version_passes() -> None:
    record = champion_signature(KEY, "churn", "7", WHEN)
    assert record.startswith(f"v1 {WHEN} ") and len(record.rpartition(" ")[2]) == 64
    spaced = champion_signature(KEY, "churn", "7", "2026-06-01 00:00:00")
    assert signature_problem(KEY, "churn", "7", {SIGNATURE_TAG: spaced}) is None
    assert signature_problem(KEY, "churn", "7", {SIGNATURE_TAG: record}) is None


def test_a_missing_malformed_copied_or_foreign_record_is_named() -> None:
    record = champion_signature(KEY, "churn", "7", WHEN)
    assert "carries no cd4ml promotion record" in str(signature_problem(KEY, "churn", "7", {}))
    assert "malformed" in str(signature_problem(KEY, "churn", "7", {SIGNATURE_TAG: "v1 nonsense"}))
    assert "malformed" in str(signature_problem(KEY, "churn", "7", {SIGNATURE_TAG: "v9 a b"}))
    not_signed = "not signed with this service's admin token"
    # Copied onto another version or another model, or signed with another key, or its time edited.
    assert not_signed in str(signature_problem(KEY, "churn", "8", {SIGNATURE_TAG: record}))
    assert not_signed in str(signature_problem(KEY, "other", "7", {SIGNATURE_TAG: record}))
    foreign = champion_signature("someone-else", "churn", "7", WHEN)
    assert not_signed in str(signature_problem(KEY, "churn", "7", {SIGNATURE_TAG: foreign}))
    edited = record.replace(WHEN, "2027-01-01T00:00:00+00:00")
    assert not_signed in str(signature_problem(KEY, "churn", "7", {SIGNATURE_TAG: edited}))


def test_cd4ml_champion_sign_signs_the_current_champion_and_records_who_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The upgrade path: a champion promoted before records were signed gets one by hand."""
    from cd4ml import registry
    from cd4ml.cli import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("CD4ML_SERVICE_ADMIN_TOKEN", raising=False)
    client = registry.client(uri)
    assert main(["champion", "sign", "legacy", "--reason", "upgrade"]) == 2
    assert "CD4ML_SERVICE_ADMIN_TOKEN is not set" in capsys.readouterr().err
    monkeypatch.setenv("CD4ML_SERVICE_ADMIN_TOKEN", KEY)
    assert main(["champion", "sign", "legacy", "--reason", "upgrade"]) == 2
    assert "no champion to sign" in capsys.readouterr().err

    # A version needs no model behind it to carry an alias and tags.
    client.create_registered_model("legacy")
    version = str(client.create_model_version("legacy", source=str(tmp_path / "model")).version)
    client.set_registered_model_alias("legacy", registry.CHAMPION, version)
    assert main(["champion", "sign", "legacy", "--reason", "upgrade to signed records"]) == 0
    tags = client.get_model_version("legacy", version).tags
    assert signature_problem(KEY, "legacy", version, tags) is None
    (event,) = registry.events(client, "legacy")
    assert event.kind == "promotion" and event.version == version
    assert (
        event.why == "champion record signed by hand: upgrade to signed records"
        and "via cd4ml CLI" in event.who
    )
