"""Ground truth: the label store, its join with the prediction log, late label files and their
quarantine, and the request-id lookup feedback relies on. The prediction log is written by the
real `PredictionLog` writer thread, as the service writes it."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cd4ml.core.paths import ModelPaths
from cd4ml.data.feedback import (
    LabelError,
    ingest_label_files,
    labelled_predictions,
    latest_labels,
    record_labels,
    served_rows,
)
from cd4ml.serving.predlog import Entry, PredictionLog, find_requests, read_predictions, request_index

MODEL = "churn"
COLUMNS = ("tenure", "plan")
DAY0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def log_requests(data_dir: Path, requests: list[tuple[str, datetime, list[list[Any]], str]]) -> None:
    """Log (request_id, time, rows, version) through the real writer thread; predictions = tenure * 10."""
    plog = PredictionLog(data_dir, flush_seconds=0.05)
    plog.start()
    for rid, at, rows, version in requests:
        plog.put(Entry(MODEL, version, at.timestamp(), rid, COLUMNS, rows, [r[0] * 10 for r in rows]))
    plog.close()


def labels(*items: tuple[str, Any] | tuple[str, Any, int]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"request_id": i[0], "outcome": i[1], "row": i[2] if len(i) > 2 else 0} for i in items]
    )


@pytest.fixture
def paths(tmp_path: Path) -> ModelPaths:
    return ModelPaths.in_data_dir(tmp_path, MODEL)


@pytest.fixture
def logged(tmp_path: Path, paths: ModelPaths) -> ModelPaths:
    log_requests(
        tmp_path,
        [
            ("a", DAY0, [[1, "basic"]], "1"),
            ("b", DAY0 + timedelta(minutes=1), [[2, "pro"], [3, "basic"], [4, "pro"]], "1"),
            ("c", DAY0 + timedelta(days=1), [[5, "pro"]], "2"),
        ],
    )
    return paths


def test_the_log_carries_the_row_index_inside_each_request(tmp_path: Path, logged: ModelPaths) -> None:
    frame = read_predictions(tmp_path, MODEL).sort_values(["request_id", "row"])
    assert list(zip(frame["request_id"], frame["row"], frame["tenure"], strict=True)) == [
        ("a", 0, 1), ("b", 0, 2), ("b", 1, 3), ("b", 2, 4), ("c", 0, 5)
    ]  # fmt: skip


def test_labels_join_the_logged_row_they_name(logged: ModelPaths) -> None:
    at = DAY0 + timedelta(hours=2)
    assert record_labels(logged, labels(("a", 1), ("b", 0, 2)), source="test", received_at=at) == 2
    out = labelled_predictions(logged)
    assert list(out.columns) == [
        "tenure", "plan", "prediction", "model_version", "request_id", "row", "ts", "outcome", "labelled_at"
    ]  # fmt: skip
    got = out.sort_values("request_id")[["request_id", "row", "tenure", "prediction", "outcome"]]
    assert got.values.tolist() == [["a", 0, 1, 10, 1], ["b", 2, 4, 40, 0]]
    assert out["model_version"].tolist() == ["1", "1"]
    assert str(out["ts"].dt.tz) == "UTC"
    assert (out["labelled_at"] == pd.Timestamp(at)).all()


def test_same_label_twice_counts_once_and_a_correction_replaces_it(logged: ModelPaths) -> None:
    t = DAY0 + timedelta(hours=1)
    record_labels(logged, labels(("a", "yes")), source="http", received_at=t)
    record_labels(logged, labels(("a", "yes")), source="http", received_at=t + timedelta(minutes=1))
    assert labelled_predictions(logged)["outcome"].tolist() == ["yes"]
    record_labels(logged, labels(("a", "no")), source="http", received_at=t + timedelta(minutes=2))
    out = labelled_predictions(logged)
    assert out["outcome"].tolist() == ["no"] and len(out) == 1
    # Received order decides, not the order the parts happen to be written in.
    record_labels(logged, labels(("a", "maybe")), source="late", received_at=t)
    assert labelled_predictions(logged)["outcome"].tolist() == ["no"]


def test_labels_arriving_days_later_still_join_and_since_until_filter_on_prediction_time(
    logged: ModelPaths,
) -> None:
    later = DAY0 + timedelta(days=9)
    record_labels(logged, labels(("a", 1), ("c", 0)), source="file:x.csv", received_at=later)
    assert sorted(labelled_predictions(logged)["request_id"]) == ["a", "c"]
    day1 = DAY0 + timedelta(days=1)
    assert labelled_predictions(logged, since=day1)["request_id"].tolist() == ["c"]
    assert labelled_predictions(logged, until=day1)["request_id"].tolist() == ["a"]
    assert labelled_predictions(logged, since=later).empty


def test_outcomes_keep_their_type(logged: ModelPaths) -> None:
    t = DAY0 + timedelta(hours=1)
    record_labels(logged, labels(("a", 3)), source="x", received_at=t)
    assert pq.read_table(next(logged.labels.rglob("part-*.parquet")))["outcome"].type == pa.int64()
    record_labels(logged, labels(("b", 2.5, 1), ("b", "big", 2)), source="x", received_at=t)
    got = dict(zip(labelled_predictions(logged)["row"], labelled_predictions(logged)["outcome"], strict=True))
    assert got == {0: 3, 1: "2.5", 2: "big"}  # a mix of numbers and text is kept as text


def test_a_request_id_logged_twice_joins_its_latest_prediction(tmp_path: Path, paths: ModelPaths) -> None:
    log_requests(
        tmp_path, [("dup", DAY0, [[1, "a"]], "1"), ("dup", DAY0 + timedelta(hours=1), [[7, "b"]], "2")]
    )
    record_labels(paths, labels(("dup", 1)), source="x", received_at=DAY0 + timedelta(hours=2))
    out = labelled_predictions(paths)
    assert out[["tenure", "model_version"]].values.tolist() == [[7, "2"]]


def test_parts_written_before_the_row_column_join_by_position(tmp_path: Path, paths: ModelPaths) -> None:
    day = paths.prediction_day(DAY0.date())
    day.mkdir(parents=True)
    old = pd.DataFrame({"tenure": [1, 2, 3], "plan": ["a", "b", "c"], "prediction": [10, 20, 30],
                        "model_version": "1", "request_id": ["x", "y", "y"],
                        "ts": pd.to_datetime([DAY0] * 3, utc=True)})  # fmt: skip
    old.to_parquet(day / "part-1-1-000001.parquet", index=False)
    record_labels(paths, labels(("y", 0, 1)), source="x", received_at=DAY0 + timedelta(hours=1))
    assert labelled_predictions(paths)[["request_id", "row", "tenure"]].values.tolist() == [["y", 1, 3]]
    assert read_predictions(tmp_path, MODEL)["row"].tolist() == [0, 0, 1]


def test_served_rows_counts_the_window_and_the_version(logged: ModelPaths) -> None:
    assert served_rows(logged, since=None, until=None) == 5
    assert served_rows(logged, since=DAY0, until=DAY0 + timedelta(days=1)) == 4
    assert served_rows(logged, since=None, until=None, version="2") == 1
    assert served_rows(logged, since=DAY0 + timedelta(days=5), until=None) == 0


def test_no_labels_yet_is_an_empty_frame(logged: ModelPaths) -> None:
    out = labelled_predictions(logged)
    assert out.empty and {"request_id", "row", "outcome", "ts"} <= set(out.columns)
    assert latest_labels(logged).empty


@pytest.mark.parametrize(
    ("frame", "column"),
    [
        (pd.DataFrame({"request_id": ["a"]}), "outcome"),
        (pd.DataFrame({"outcome": [1]}), "request_id"),
        (pd.DataFrame({"request_id": [5], "outcome": [1]}), "request_id"),
        (pd.DataFrame({"request_id": [""], "outcome": [1]}), "request_id"),
        (pd.DataFrame({"request_id": ["a"], "outcome": [None]}), "outcome"),
        (pd.DataFrame({"request_id": ["a"], "outcome": [float("nan")]}), "outcome"),
        (pd.DataFrame({"request_id": ["a"], "outcome": [1], "row": [-1]}), "row"),
        (pd.DataFrame({"request_id": ["a"], "outcome": [1], "row": [0.5]}), "row"),
    ],
)
def test_unusable_labels_raise_naming_the_column(paths: ModelPaths, frame: pd.DataFrame, column: str) -> None:
    with pytest.raises(LabelError) as err:
        record_labels(paths, frame, source="test", received_at=DAY0)
    assert err.value.problem.column == column
    assert not paths.labels.exists() or not list(paths.labels.rglob("part-*"))


# -- request-id lookup --------------------------------------------------------------------------


def test_request_ids_are_found_on_disk_after_a_restart(tmp_path: Path, logged: ModelPaths) -> None:
    fresh = PredictionLog(tmp_path)  # a restarted service: nothing in memory
    found = fresh.lookup(MODEL, ["a", "b", "c", "nope"])
    assert {k: (v.rows, v.version) for k, v in found.items()} == {"a": (1, "1"), "b": (3, "1"), "c": (1, "2")}
    assert fresh.lookup("other_model", ["a"]) == {}


def test_a_request_is_known_the_moment_it_is_queued(tmp_path: Path) -> None:
    plog = PredictionLog(tmp_path)  # not started: nothing reaches disk
    plog.put(Entry(MODEL, "4", DAY0.timestamp(), "fresh", COLUMNS, [[1, "a"], [2, "b"]], [1, 2]))
    assert plog.lookup(MODEL, ["fresh"])["fresh"].rows == 2
    small = PredictionLog(tmp_path, max_recent=1)
    for rid in ("r1", "r2"):
        small.put(Entry(MODEL, "4", DAY0.timestamp(), rid, COLUMNS, [[1, "a"]], [1]))
    assert set(small.lookup(MODEL, ["r1", "r2"])) == {"r2"}  # bounded: r1 is left to the disk index


def test_a_restarted_log_finds_ids_served_after_the_last_index_refresh(tmp_path: Path) -> None:
    """The day's index was refreshed a moment before the restart and misses the last requests: the
    new process does not remember them, so it must bring the index up to date (found by CI as a 422
    for an id served just before a restart)."""
    now = time.time()
    before = PredictionLog(tmp_path, flush_seconds=0.05)
    before.start()
    before.put(Entry(MODEL, "1", now, "early", COLUMNS, [[1, "a"]], [1]))
    time.sleep(0.3)  # on disk
    assert before.lookup(MODEL, ["unknown"]) == {}  # a miss refreshes today's index: now it is fresh
    before.put(Entry(MODEL, "1", now, "late", COLUMNS, [[2, "b"], [3, "c"]], [0, 1]))
    before.close()  # flushed, but the (fresh) index does not list it
    after = PredictionLog(tmp_path)
    found = after.lookup(MODEL, ["late", "early"])
    assert set(found) == {"late", "early"} and found["late"].rows == 2


def test_an_open_days_index_takes_in_new_parts_and_a_sealed_one_is_trusted(
    tmp_path: Path, paths: ModelPaths
) -> None:
    day = DAY0.date().isoformat()
    log_requests(tmp_path, [("first", DAY0, [[1, "a"]], "1")])
    during = DAY0 + timedelta(hours=1)
    assert set(find_requests(paths, ["first", "second"], now=during)) == {"first"}
    log_requests(tmp_path, [("second", DAY0 + timedelta(minutes=5), [[1, "a"], [2, "b"]], "1")])
    # The index was brought up to date a moment ago: an unknown id does not make it do so again
    # (a fresh id is in the service's memory); after `refresh_seconds` it does.
    assert find_requests(paths, ["second"], now=during) == {}
    assert find_requests(paths, ["second"], now=during, refresh_seconds=0)["second"].rows == 2
    after = DAY0 + timedelta(days=2)
    index = request_index(paths, day, now=after)
    assert index is not None and pq.read_metadata(index).metadata[b"cd4ml.sealed"] == b"1"
    assert pq.read_table(index)["request_id"].to_pylist() == ["first", "second"]
    # Sealed: a part appearing now is not looked for (nothing writes into a day that long over).
    log_requests(tmp_path, [("third", DAY0 + timedelta(minutes=9), [[1, "a"]], "1")])
    assert find_requests(paths, ["third"], now=after) == {}


# -- label files ----------------------------------------------------------------------------------


def drop(paths: ModelPaths, name: str, content: bytes | pd.DataFrame) -> Path:
    paths.feedback_landing.mkdir(parents=True, exist_ok=True)
    target = paths.feedback_landing / name
    if isinstance(content, pd.DataFrame):
        content.to_parquet(target, index=False)
    else:
        target.write_bytes(content)
    return target


def test_label_files_are_ingested_and_join(logged: ModelPaths) -> None:
    drop(logged, "week1.csv", b"request_id,outcome,row\na,1,0\nb,0,1\nunknown,1,0\n")
    drop(logged, "week2.parquet", pd.DataFrame({"request_id": ["c"], "outcome": [1]}))
    now = DAY0 + timedelta(days=4)
    result = ingest_label_files(logged, now=now)
    assert sorted(result.accepted) == ["week1.csv", "week2.parquet"]
    assert result.quarantined == () and result.rows == 4 and result.unmatched == 1
    assert list(logged.feedback_landing.iterdir()) == []
    assert len([p for p in logged.feedback_accepted.iterdir() if not p.name.endswith(".meta.json")]) == 2
    out = labelled_predictions(logged).sort_values("request_id")
    assert out[["request_id", "row", "outcome"]].values.tolist() == [["a", 0, 1], ["b", 1, 0], ["c", 0, 1]]
    assert (out["labelled_at"] == pd.Timestamp(now)).all()
    # The same file dropped again is taken in again, and changes nothing.
    drop(logged, "week1.csv", b"request_id,outcome,row\na,1,0\nb,0,1\nunknown,1,0\n")
    again = ingest_label_files(logged, now=now + timedelta(hours=1))
    assert again.accepted == ("week1.csv",) and again.rows == 0
    assert len(labelled_predictions(logged)) == 3


def test_request_ids_of_digits_keep_their_leading_zeros(tmp_path: Path, paths: ModelPaths) -> None:
    log_requests(tmp_path, [("007", DAY0, [[1, "a"]], "1")])
    drop(paths, "ids.csv", b"request_id,outcome\n007,1\n")
    assert ingest_label_files(paths, now=DAY0 + timedelta(days=1)).rows == 1
    assert labelled_predictions(paths)["request_id"].tolist() == ["007"]


@pytest.mark.parametrize(
    ("name", "content", "column", "says"),
    [
        ("nocol.csv", b"request_id,label\na,1\n", "outcome", "missing column"),
        ("semicolons.csv", b"request_id;outcome\na;1\n", "request_id", "missing column"),
        ("zero.csv", b"", None, "empty"),
        ("header.csv", b"request_id,outcome\n", None, "no label rows"),
        ("ragged.csv", b"request_id,outcome\na,1\nb,1,2\n", None, "not a readable CSV"),
        ("latin1.csv", b"request_id,outcome\nr\xe9,1\n", None, "not a readable CSV"),
        ("garbage.parquet", b"PAR1 this is not parquet", None, "not a readable Parquet"),
        ("rowtext.csv", b"request_id,outcome,row\na,1,first\n", "row", "wrong type"),
        ("rowfloat.csv", b"request_id,outcome,row\na,1,1.5\n", "row", "wrong type"),
        ("noout.csv", b"request_id,outcome\na,\n", "outcome", "no outcome"),
        ("other_model.csv", b"request_id,outcome\nzzz,1\n", "request_id", "prediction log"),
        ("labels.xlsx", b"PK\x03\x04", None, "unsupported file type"),
    ],
)
def test_bad_label_files_are_quarantined_with_a_reason_naming_the_column(
    logged: ModelPaths, name: str, content: bytes, column: str | None, says: str
) -> None:
    drop(logged, name, content)
    drop(logged, "good.csv", b"request_id,outcome\na,1\n")
    result = ingest_label_files(logged, now=DAY0 + timedelta(days=1))
    assert result.accepted == ("good.csv",)  # one bad file stops nothing else
    assert [q.name for q in result.quarantined] == [name]
    assert result.quarantined[0].column == column
    stored = Path(result.quarantined[0].path)
    assert stored.parent == logged.feedback_quarantine and stored.read_bytes() == content  # nothing lost
    reason = json.loads(stored.with_name(stored.name + ".reason.json").read_text())
    assert reason["file"] == name and reason["column"] == column and says in reason["reason"]
    assert "request_id" in reason["expected"]
    assert list(logged.feedback_landing.iterdir()) == []
    assert labelled_predictions(logged)["request_id"].tolist() == ["a"]


def test_a_parquet_file_with_numeric_request_ids_is_quarantined(logged: ModelPaths) -> None:
    drop(logged, "ints.parquet", pd.DataFrame({"request_id": [1, 2], "outcome": [1, 0]}))
    result = ingest_label_files(logged, now=DAY0)
    assert result.quarantined[0].column == "request_id" and "wrong type" in result.quarantined[0].reason


def test_files_still_being_written_are_left_alone(logged: ModelPaths) -> None:
    drop(logged, ".upload.csv", b"request_id,outcome\na,1\n")
    drop(logged, "big.csv.part", b"request_id,outcome\na,1\n")
    result = ingest_label_files(logged, now=DAY0)
    assert result.accepted == () and result.quarantined == ()
    assert sorted(p.name for p in logged.feedback_landing.iterdir()) == [".upload.csv", "big.csv.part"]


# -- the endpoint's body parsing (the HTTP side runs in tests/system/test_feedback_api.py) ---------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"request_id": "\\ud800", "outcome": 1}', "request_id"),
        ('{"request_id": "r", "outcome": "\\udfff"}', "outcome"),
        ('{"request_id": "r", "outcome": 99999999999999999999}', "outcome"),
        ('{"request_id": "r", "outcome": NaN}', "outcome"),
        ('{"feedback": [], "extra": 1}', "extra"),
    ],
)
def test_label_bodies_that_cannot_be_stored_are_named(raw: str, field: str) -> None:
    from cd4ml.serving.feedback_api import BadRequest, parse_labels

    with pytest.raises(BadRequest) as err:
        parse_labels(json.loads(raw), max_rows=10)
    assert err.value.status == 422 and field in {p.field for p in err.value.problems}


def test_label_bodies_in_their_three_shapes() -> None:
    from cd4ml.serving.feedback_api import Label, parse_labels

    one = {"request_id": "r", "outcome": "yes"}
    assert parse_labels(one, 10) == [Label("r", 0, "yes")]
    assert parse_labels([one, {**one, "row": 2}], 10) == [Label("r", 0, "yes"), Label("r", 2, "yes")]
    assert parse_labels({"feedback": [one]}, 10) == [Label("r", 0, "yes")]


def test_compaction_merges_past_days_into_one_part_and_changes_no_answer(logged: ModelPaths) -> None:
    from cd4ml.data.feedback import compact_labels

    t = DAY0 + timedelta(hours=1)
    for i, outcome in enumerate([1, 0, 1]):  # the last one corrects the first
        record_labels(logged, labels(("a", outcome)), source="http", received_at=t + timedelta(seconds=i))
    record_labels(logged, labels(("b", 1, 2)), source="http", received_at=t)
    record_labels(logged, labels(("c", 0)), source="http", received_at=t + timedelta(days=1))
    before = labelled_predictions(logged)
    assert compact_labels(logged, before=(t + timedelta(days=1)).date()) == 4
    assert len(list(logged.labels_day(t.date()).glob("part-*.parquet"))) == 1
    assert len(list(logged.labels_day((t + timedelta(days=1)).date()).glob("part-*.parquet"))) == 1
    pd.testing.assert_frame_equal(labelled_predictions(logged), before)
    assert compact_labels(logged, before=(t + timedelta(days=1)).date()) == 0  # nothing left to merge


def test_a_day_with_outcomes_of_different_types_is_left_unmerged(logged: ModelPaths) -> None:
    from cd4ml.data.feedback import compact_labels

    record_labels(logged, labels(("a", 1)), source="http", received_at=DAY0)
    record_labels(logged, labels(("b", "yes")), source="http", received_at=DAY0)
    assert compact_labels(logged, before=(DAY0 + timedelta(days=1)).date()) == 0
    assert sorted(labelled_predictions(logged)["outcome"].tolist(), key=str) == [1, "yes"]


def test_posted_labels_committed_together_keep_their_types_and_resends_are_duplicates(
    tmp_path: Path, paths: ModelPaths
) -> None:
    from cd4ml.serving.feedback_api import Label, LabelWriter

    writer = LabelWriter(tmp_path)  # the service's writer thread, as the endpoint drives it
    sent = [Label("a", 0, 1), Label("b", 0, "yes"), Label("c", 0, True), Label("d", 1, 2.5)]
    new, duplicates = writer.split(MODEL, sent)
    assert (len(new), duplicates) == (4, 0)
    assert writer.submit(MODEL, new).result(timeout=30) == 4
    stored = latest_labels(paths).set_index("request_id")["outcome"].to_dict()
    assert stored == {"a": 1, "b": "yes", "c": True, "d": 2.5}
    # (1 == True in Python: the types tell them apart)
    assert isinstance(stored["b"], str) and isinstance(stored["c"], bool | np.bool_)
    assert not isinstance(stored["a"], bool | np.bool_ | str)
    again, duplicates = writer.split(MODEL, [*sent[:2], Label("a", 0, True)])
    assert again == [Label("a", 0, True)] and duplicates == 2  # True is not the outcome 1
