"""Retraction of accepted files: matching, refusals that list candidates, the move, crash safety,
and the command line (which needs no Airflow to retract)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cd4ml import cli
from cd4ml.core.errors import RetractionError
from cd4ml.data import landing
from cd4ml_dev.netutil import free_port

WHEN = "2026-03-01T10:00:00+00:00"


def accept(
    zone: landing.Zone, name: str, content: bytes, when: str, run_id: str = "r1"
) -> landing.AcceptedFile:
    (zone.landing / name).write_bytes(content)
    (landed,) = [f for f in landing.list_landed(zone) if f.name == name]
    return landing.accept(zone, landed, rows=content.count(b"\n") - 1, accepted_at=when, run_id=run_id)


@pytest.fixture
def zone(tmp_path: Path) -> landing.Zone:
    zone = landing.Zone(tmp_path / "churn").ensure()
    accept(zone, "week0.csv", b"x,y\n1,2\n3,4\n", "2026-01-01T00:00:00+00:00")
    accept(zone, "week1.csv", b"x,y\n5,6\n", "2026-01-08T00:00:00+00:00", run_id="r2")
    return zone


def test_retract_moves_the_file_to_quarantine_with_who_when_why(zone: landing.Zone) -> None:
    week1 = next(f for f in landing.list_accepted(zone) if f.name == "week1.csv")
    done = landing.retract(zone, "week1.csv", reason="  mislabelled batch ", who="ana via cli", when=WHEN)

    assert [f.name for f in landing.list_accepted(zone)] == ["week0.csv"]  # out of every training set
    target = Path(done.path)
    assert target.parent == zone.quarantine and target.read_bytes() == b"x,y\n5,6\n"  # nothing deleted
    assert (done.file, done.sha256, done.reason, done.who, done.when) == (
        "week1.csv", week1.sha256, "mislabelled batch", "ana via cli", WHEN
    )  # fmt: skip
    assert (done.accepted_at, done.accepted_run_id, done.rows) == ("2026-01-08T00:00:00+00:00", "r2", 1)
    text = target.with_name(target.name + ".reason.txt").read_text()
    assert "week1.csv was retracted by ana via cli at 2026-03-01T10:00:00+00:00: mislabelled batch" in text
    record = json.loads(target.with_name(target.name + ".reason.json").read_text())
    assert record["kind"] == "retracted" and record["sha256"] == week1.sha256
    # The acceptance record travels with the file; accepted/ keeps nothing of it.
    assert json.loads(target.with_name(target.name + ".accepted.json").read_text())["run_id"] == "r2"
    assert not any(p.name.startswith(week1.sha256[:16]) for p in zone.accepted.iterdir())
    assert [r["file"] for r in landing.list_retractions(zone)] == ["week1.csv"]


@pytest.mark.parametrize("how", ["stored", "sha6", "sha64", "path"])
def test_a_file_is_found_by_stored_name_sha_prefix_or_path(zone: landing.Zone, how: str) -> None:
    week0 = next(f for f in landing.list_accepted(zone) if f.name == "week0.csv")
    key = {
        "stored": Path(week0.path).name,
        "sha6": week0.sha256[:6].upper(),
        "sha64": week0.sha256,
        "path": week0.path,
    }[how]
    assert landing.retract(zone, key, reason="r", who="w", when=WHEN).sha256 == week0.sha256
    assert [f.name for f in landing.list_accepted(zone)] == ["week1.csv"]


def test_unknown_key_is_refused_listing_the_candidates(zone: landing.Zone) -> None:
    with pytest.raises(RetractionError) as err:
        landing.retract(zone, "week9.csv", reason="r", who="w", when=WHEN)
    message = str(err.value)
    assert "no accepted file matches 'week9.csv'" in message
    assert "__week0.csv" in message and "__week1.csv" in message
    assert len(landing.list_accepted(zone)) == 2  # nothing moved
    with pytest.raises(RetractionError, match="at least 6 hex digits"):
        landing.retract(zone, "ab", reason="r", who="w", when=WHEN)  # too short to be a sha prefix


def test_ambiguous_key_is_refused_listing_the_matches(zone: landing.Zone) -> None:
    accept(zone, "week1.csv", b"x,y\n7,8\n", "2026-01-15T00:00:00+00:00")  # same name, new content
    with pytest.raises(RetractionError) as err:
        landing.retract(zone, "week1.csv", reason="r", who="w", when=WHEN)
    assert "'week1.csv' matches 2 accepted files" in str(err.value)
    assert "longer sha256 prefix" in str(err.value)
    assert len(landing.list_accepted(zone)) == 3


def test_a_reason_is_required(zone: landing.Zone) -> None:
    with pytest.raises(RetractionError, match="needs a reason"):
        landing.retract(zone, "week1.csv", reason="  ", who="w", when=WHEN)


def test_retracting_twice_returns_the_recorded_retraction(zone: landing.Zone) -> None:
    first = landing.retract(zone, "week1.csv", reason="bad", who="a", when=WHEN)
    again = landing.retract(zone, "week1.csv", reason="other", who="b", when="later")
    assert again == first
    assert len(landing.list_retractions(zone)) == 1


def test_a_crash_after_the_move_is_finished_by_the_retry(zone: landing.Zone) -> None:
    week1 = next(f for f in landing.list_accepted(zone) if f.name == "week1.csv")
    done = landing.retract(zone, "week1.csv", reason="bad", who="a", when=WHEN)
    target = Path(done.path)
    # Simulate the crash between the rename and the sidecar move: put the sidecar back.
    sidecar = Path(week1.path).with_name(Path(week1.path).name + ".meta.json")
    os.replace(target.with_name(target.name + ".accepted.json"), sidecar)
    assert [f.name for f in landing.list_accepted(zone)] == ["week0.csv"]  # already not accepted
    assert landing.retract(zone, week1.sha256[:8], reason="bad", who="a", when=WHEN) == done
    assert not sidecar.exists() and target.with_name(target.name + ".accepted.json").exists()


def test_a_crash_before_the_move_leaves_the_file_accepted_and_the_retry_completes(
    zone: landing.Zone,
) -> None:
    week1 = next(f for f in landing.list_accepted(zone) if f.name == "week1.csv")
    target = zone.quarantine / Path(week1.path).name
    # The reason was written, then the process died before the rename.
    half_done = {"kind": "retracted", "path": str(target), "file": "week1.csv", "sha256": week1.sha256,
                 "stored_name": target.name, "when": WHEN}  # fmt: skip
    target.with_name(target.name + ".reason.json").write_text(json.dumps(half_done))
    assert len(landing.list_accepted(zone)) == 2 and landing.list_retractions(zone) == []
    done = landing.retract(zone, "week1.csv", reason="bad", who="a", when=WHEN)
    assert done.path == str(target) and target.exists()
    assert [r["reason"] for r in landing.list_retractions(zone)] == ["bad"]


def test_a_retracted_file_next_to_a_quarantined_copy_overwrites_nothing(zone: landing.Zone) -> None:
    week1 = next(f for f in landing.list_accepted(zone) if f.name == "week1.csv")
    copy = zone.quarantine / Path(week1.path).name  # e.g. the same bytes landed twice
    copy.write_bytes(b"the duplicate")
    done = landing.retract(zone, "week1.csv", reason="bad", who="a", when=WHEN)
    assert done.path != str(copy) and copy.read_bytes() == b"the duplicate"
    assert Path(done.path).read_bytes() == b"x,y\n5,6\n"


def test_cli_retracts_without_airflow_and_says_how_the_retrain_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CD4ML_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CD4ML_AIRFLOW_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nor here
    zone = landing.Zone(tmp_path / "churn").ensure()
    accept(zone, "week0.csv", b"x,y\n1,2\n", "2026-01-01T00:00:00+00:00")
    accept(zone, "week1.csv", b"x,y\n5,6\n", "2026-01-08T00:00:00+00:00")

    code = cli.main(["data", "retract", "churn", "week1.csv", "--reason", "labels were shifted"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert [f.name for f in landing.list_accepted(zone)] == ["week0.csv"]
    (record,) = landing.list_retractions(zone)
    assert record["reason"] == "labels were shifted" and "via cd4ml CLI" in record["who"]
    assert "retracted week1.csv" in out.out
    assert "churn__train" in out.out and "Airflow is not reachable" in out.out  # how to start the retrain
    # The history note is best effort: an unreachable MLflow is reported after a short retry,
    # not after MLflow's default ~4 minutes of back-off (registry.impatient).
    assert "MLflow is not reachable" in out.out and "not in the model's history yet" in out.out

    code = cli.main(["data", "retract", "churn", "nope.csv", "--reason", "x"])
    assert code == 2 and "no accepted file matches 'nope.csv'" in capsys.readouterr().err
    code = cli.main(["data", "retract", "ghost", "a.csv", "--reason", "x"])
    assert code == 2 and "ghost" in capsys.readouterr().err
