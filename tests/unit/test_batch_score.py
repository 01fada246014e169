"""Batch scoring (`cd4ml.steps.batch_score`) on real files and a real fitted pipeline, without MLflow:
the same answers and the same row checks as the prediction service, chunking, rejects, quarantine,
folders, hashes, and a retry that finishes a crashed run without writing anything twice."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cd4ml.core.errors import is_transient
from cd4ml.core.paths import ModelPaths
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec, parse_spec
from cd4ml.ml import training
from cd4ml.serving.fastpath import verified
from cd4ml.serving.models import Slot
from cd4ml.serving.payload import FeatureSchema, PayloadError, check, to_columns
from cd4ml.steps import batch_score as bs
from cd4ml_dev.datagen import generate_churn
from tests.helpers import LOGREG, spec_dict

RUN = "manual__2026-03-01T00:00:00+00:00"
WHEN = "2026-03-01T00:00:00+00:00"


def make_spec(**scoring: Any) -> ModelSpec:
    return parse_spec(json.dumps(spec_dict(estimator=LOGREG, scoring=scoring or None)), Path("churn.yaml"))


def make_slot(model: Any, spec: ModelSpec, *, fast: bool = True) -> Slot:
    """The model as the service loads it (`load_slot`): with the fast path when it verifies."""
    classes = [c.item() for c in model.classes_] if hasattr(model, "classes_") else None
    slot = Slot(name="churn", version="4", run_id="r", champion_since="", data_fingerprint="", loaded_at=0.0,
                model=model, schema=FeatureSchema(tuple(spec.numerical), tuple(spec.categorical)),
                classes=classes, classifier=classes is not None)  # fmt: skip
    if not fast:
        return slot
    example = training.features(spec, generate_churn(20, seed=9))
    return replace(slot, fast=verified(model, example, list(slot.schema.columns)))


@pytest.fixture(scope="module")
def slot() -> Slot:
    spec = make_spec()
    made = make_slot(training.train(spec, generate_churn(2000, seed=1)), spec)
    assert made.fast is not None  # served through the fast path, as cd4ml's pipelines are
    return made


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, data_dir=tmp_path / "data", specs_dir=tmp_path, mlflow_tracking_uri="")


@pytest.fixture
def paths(settings: Settings) -> ModelPaths:
    p = ModelPaths.for_model(settings, "churn")
    p.score.mkdir(parents=True)
    return p


def score(spec: ModelSpec, settings: Settings, slot: Slot, run_id: str = RUN, **kw: Any) -> bs.BatchRun:
    return bs.score_pending(spec, settings, run_id=run_id, run_time=WHEN, trigger="test",
                            champion=lambda run: bs.Scorer(slot), **kw)  # fmt: skip


def frame(n: int, seed: int = 3) -> pd.DataFrame:
    out = generate_churn(n, seed=seed)
    return out.assign(customer_id=[f"c{i:05d}" for i in range(n)])


def online(slot: Slot, records: list[dict[str, Any]]) -> dict[str, Any]:
    """What the prediction service answers for these JSON records (its own check, then predict)."""
    columns, data = to_columns(records)
    return slot.predict(check(slot.schema, columns, data, max_rows=10**6))


def records_of(df: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(df.to_json(orient="records"))


# -- the same answers as the service ---------------------------------------------------------------


def test_csv_and_parquet_rows_get_the_services_answers_in_chunks(
    slot: Slot, settings: Settings, paths: ModelPaths
) -> None:
    spec = make_spec(chunk_rows=70, keep_columns=["customer_id"])
    df = frame(300)
    df.to_csv(paths.score / "nightly.csv", index=False)
    df.to_parquet(paths.score / "nightly.parquet", index=False)
    shas = {
        n: hashlib.sha256((paths.score / n).read_bytes()).hexdigest()
        for n in ("nightly.csv", "nightly.parquet")
    }
    run = score(spec, settings, slot)

    assert run.outcome == "scored" and run.version == "4" and run.rows_scored == 600 and not run.rows_rejected
    # Each chunk gets what the service answers for a request of those rows, to the last bit (BLAS
    # rounds a product of 70 rows and one of 300 differently, on either path).
    chunks = [online(slot, records_of(df[spec.feature_names].iloc[i : i + 70])) for i in range(0, 300, 70)]
    expected = {k: [x for c in chunks for x in c[k]] for k in ("predictions", "probabilities")}
    for result in run.inputs:
        assert result.chunks == 5 and result.rows == result.scored == 300 and result.rejects is None
        assert result.sha256 == shas[result.name]
        out = pd.read_parquet(result.predictions)
        assert list(out.columns) == ["row", "input_file", "customer_id", "prediction", "probability_0",
                                     "probability_1", "model_version", "run_id", "input_sha256"]  # fmt: skip
        assert (
            out["row"].tolist() == list(range(300))
            and out["customer_id"].tolist() == df["customer_id"].tolist()
        )
        assert set(out["model_version"]) == {"4"} and set(out["run_id"]) == {RUN}
        assert set(out["input_sha256"]) == {shas[result.name]} and set(out["input_file"]) == {result.name}
        assert out["prediction"].tolist() == expected["predictions"]
        assert np.array_equal(
            out[["probability_0", "probability_1"]].to_numpy(), np.asarray(expected["probabilities"])
        )
    # Both inputs left score/ for scored/inputs, under their hash; the record lists them.
    assert not any(paths.score.iterdir())
    assert sorted(p.name for p in paths.scored_inputs.iterdir()) == sorted(
        f"{sha[:16]}__{name}" for name, sha in shas.items()
    )
    record = json.loads(Path(run.record or "").read_text())
    assert record["rows_scored"] == 600 and len(record["inputs"]) == 2 and record["outcome"] == "scored"


def test_a_model_the_service_serves_through_sklearn_gets_sklearns_labels(
    slot: Slot, settings: Settings, paths: ModelPaths
) -> None:
    plain = replace(slot, fast=None)  # no fast path (another pipeline shape): the service calls predict()
    df = frame(90)
    df.to_parquet(paths.score / "x.parquet")
    (result,) = score(make_spec(), settings, plain).inputs
    out = pd.read_parquet(result.predictions)
    expected = online(plain, records_of(df[make_spec().feature_names]))
    assert out["prediction"].tolist() == expected["predictions"]
    assert np.array_equal(
        out[["probability_0", "probability_1"]].to_numpy(), np.asarray(expected["probabilities"])
    )


def test_a_regression_model_on_numbers_only_scores_one_column(settings: Settings, paths: ModelPaths) -> None:
    raw = spec_dict(task="regression", target="monthly_charges", metric={"name": "rmse"},
                    estimator={"class": "sklearn.linear_model.Ridge"}, promotion__floor=None,
                    features={"numerical": ["tenure_months", "age", "support_calls"]})  # fmt: skip
    spec = parse_spec(json.dumps(raw), Path("churn.yaml"))
    reg = make_slot(training.train(spec, generate_churn(500, seed=1)), spec)
    df = frame(50)
    df.to_parquet(paths.score / "x.parquet")
    (result,) = score(spec, settings, reg).inputs
    out = pd.read_parquet(result.predictions)
    assert [c for c in out.columns if c.startswith(("prediction", "probability"))] == ["prediction"]
    assert out["prediction"].tolist() == online(reg, records_of(df[spec.feature_names]))["predictions"]


# -- rows checked as the service checks them ---------------------------------------------------------


def service_problem(slot: Slot, column: str, value: Any) -> str:
    """The service's message for one bad value (its own check, on a JSON record)."""
    record = {c: 1 if c in slot.schema.numerical else "basic" for c in slot.schema.columns}
    with pytest.raises(PayloadError) as err:
        check(slot.schema, *to_columns([{**record, column: value}]), max_rows=10)
    return err.value.problems[0].problem


def test_bad_rows_are_rejected_with_the_services_reasons_and_the_rest_are_scored(
    slot: Slot, settings: Settings, paths: ModelPaths
) -> None:
    spec = make_spec(keep_columns=["customer_id"])
    df = frame(40).astype({"tenure_months": float, "age": float})
    df.loc[5, "tenure_months"] = math.inf
    df.loc[11, ["tenure_months", "age"]] = [-math.inf, math.inf]  # two problems, one reject row
    df.loc[9, ["age", "region"]] = [None, None]  # missing: allowed, the pipeline imputes it
    df.to_parquet(paths.score / "typed.parquet", index=False)
    text_ages = frame(5).astype({"age": str})  # a whole column written as text: refused row by row
    text_ages.to_parquet(paths.score / "text_ages.parquet", index=False)
    run = score(spec, settings, slot)
    texts, typed = sorted(run.inputs, key=lambda r: r.name)
    rejects = pd.read_parquet(typed.rejects).set_index("row")
    assert typed.scored == 38 and typed.rejected == 2 and sorted(rejects.index) == [5, 11]
    assert rejects.loc[5, "reason"] == "tenure_months: expected a finite number, got inf"
    assert service_problem(slot, "tenure_months", math.inf) == "expected a finite number"
    assert rejects.loc[11, "columns"] == "tenure_months, age" and rejects.loc[11, "customer_id"] == "c00011"
    assert typed.problems["tenure_months"]["rows"] == 2 and typed.problems["age"]["rows"] == 1
    assert 9 in pd.read_parquet(typed.predictions)["row"].tolist()
    assert texts.scored == 0 and texts.rejected == 5 and texts.predictions is None
    first = pd.read_parquet(texts.rejects).iloc[0]
    assert first["reason"] == f"age: {service_problem(slot, 'age', str(text_ages['age'][0]))}"
    assert first["reason"].startswith("age: expected a number, got str '")


def test_the_row_checks_follow_the_service_for_every_arrow_type() -> None:
    import datetime

    import pyarrow as pa

    table = pa.table({
        "n": pa.array([True, None, True, False], pa.bool_()),
        "x": pa.array([1.5, None, float("nan"), 2.0]),
        "c": pa.array([1.0, None, float("nan"), 3.0]),
        "d": pa.array([datetime.date(2026, 1, 1), None, None, None]),
        "k": pa.array(["a", "b", "a", None]).dictionary_encode(),
    })  # fmt: skip
    checked = bs.check_chunk(("n", "x"), ("c", "d", "k"), table, from_text=False)
    assert checked.good.tolist() == [False, True, False, False]
    category = "expected a category (text or an integer code), got"
    assert checked.problems == {
        0: [
            ("n", "expected a number, got bool True"),
            ("d", f"{category} date32[day] datetime.date(2026, 1, 1)"),
        ],
        2: [("n", "expected a number, got bool True"), ("c", f"{category} nan")],
        3: [("n", "expected a number, got bool False")],
    }
    # A NaN number is a missing value (JSON's NaN is too); a NaN category is refused, as online.
    (good,) = checked.frame.to_dict("records")
    assert math.isnan(good["n"]) and math.isnan(good["x"]) and good["c"] is None and good["k"] == "b"


def test_csv_cells_are_text_read_as_numbers_and_categories_as_pandas_reads_them(
    slot: Slot, settings: Settings, paths: ModelPaths
) -> None:
    spec = make_spec()
    df = frame(6)
    text = df.to_csv(index=False).splitlines()
    header = text[0].split(",")
    age, region = header.index("age"), header.index("region")
    rows = [line.split(",") for line in text[1:]]
    rows[0][age] = " 41 "  # padded: still a number
    rows[1][age] = "abc"
    rows[2][age] = "1e400"  # overflows: not finite
    rows[3][age] = "NA"  # pandas' missing value
    rows[4][region] = "7.0"  # an integer code: the category "7", as pandas reads it for training
    (paths.score / "t.csv").write_text("\n".join([text[0], *(",".join(r) for r in rows)]) + "\n")
    (result,) = score(spec, settings, slot).inputs
    rejects = pd.read_parquet(result.rejects)
    assert rejects.set_index("row")["reason"].to_dict() == {
        1: "age: expected a number, got 'abc'",
        2: "age: expected a finite number, got '1e400'",
    }
    assert bs._category("7.0", True) == bs._category(7, False) == "7"
    assert (
        bs._category("007", True) == "7"
        and bs._category("12345678901234567890", True) == "12345678901234567890"
    )
    assert bs._category("north", True) == "north" and bs._category("5", False) == "5"
    out = pd.read_parquet(result.predictions).set_index("row")
    records = records_of(df[spec.feature_names])
    records[0]["age"], records[3]["age"], records[4]["region"] = 41, None, 7
    answers = online(slot, [records[i] for i in (0, 3, 4, 5)])
    assert out.loc[[0, 3, 4, 5], "probability_1"].tolist() == [p[1] for p in answers["probabilities"]]


def test_malformed_csv_lines_are_rejected_and_every_row_keeps_its_number(
    slot: Slot, settings: Settings, paths: ModelPaths
) -> None:
    spec = make_spec(chunk_rows=4, keep_columns=["customer_id"])
    lines = frame(12).to_csv(index=False).splitlines()
    lines[3] += ",extra"  # data row 2: one field too many
    lines[8] = lines[8].rsplit(",", 3)[0]  # data row 7: three fields short
    (paths.score / "broken.csv").write_text("\n".join(lines) + "\n")
    (result,) = score(spec, settings, slot).inputs
    rejects = pd.read_parquet(result.rejects)
    assert rejects["row"].tolist() == [2, 7] and rejects["customer_id"].isna().all()
    assert rejects["reason"].tolist() == ["line 4 has 11 fields; the header has 10",
                                          "line 9 has 7 fields; the header has 10"]  # fmt: skip
    out = pd.read_parquet(result.predictions)
    assert out["row"].tolist() == [0, 1, 3, 4, 5, 6, 8, 9, 10, 11]
    assert out["customer_id"].tolist() == [f"c{r:05d}" for r in out["row"]]  # numbers match the file's rows
    assert result.rows == 12 and result.problems["(malformed line)"]["rows"] == 2


# -- inputs that cannot be scored -------------------------------------------------------------------


def test_unreadable_inputs_are_quarantined_with_a_reason_naming_file_column_and_setting(
    slot: Slot, settings: Settings, paths: ModelPaths
) -> None:
    spec = make_spec(keep_columns=["customer_id"])
    frame(20).to_csv(paths.score / "good.csv", index=False)
    frame(20).drop(columns=["age"]).to_csv(paths.score / "no_age.csv", index=False)
    frame(20).drop(columns=["customer_id"]).to_parquet(paths.score / "no_id.parquet")
    frame(5).to_csv(paths.score / "semicolons.csv", index=False, sep=";")
    (paths.score / "empty.csv").write_bytes(b"")
    (paths.score / "junk.parquet").write_bytes(b"PAR1 not really")
    (paths.score / "notes.xlsx").write_bytes(b"x")
    (paths.score / ".hidden.csv").write_text("a\n1\n")  # still being written: left alone
    (paths.score / "later.csv.part").write_text("a\n1\n")
    run = score(spec, settings, slot)
    assert run.outcome == "scored" and [r.name for r in run.inputs] == ["good.csv"]
    reasons = {q.name: q.reason for q in run.quarantined}
    assert reasons["no_age.csv"].startswith(
        "no_age.csv could not be scored: missing column(s) 'age' (features.numerical)"
    )
    assert "'customer_id' (scoring.keep_columns)" in reasons["no_id.parquet"]
    assert "delimited by something other than commas" in reasons["semicolons.csv"]
    assert "empty" in reasons["empty.csv"] and "not a readable Parquet file" in reasons["junk.parquet"]
    assert "unsupported file type '.xlsx'" in reasons["notes.xlsx"]
    assert sorted(p.name for p in paths.score.iterdir()) == [".hidden.csv", "later.csv.part"]
    for q in run.quarantined:  # moved aside with the reason beside it; nothing deleted
        moved = Path(q.path)
        assert moved.parent == paths.score_quarantine and moved.exists()
        assert moved.with_name(moved.name + ".reason.txt").read_text().startswith(q.reason)


def test_nothing_scored_fails_the_run_with_every_reason_recorded(
    slot: Slot, settings: Settings, paths: ModelPaths
) -> None:
    spec = make_spec()
    frame(5).drop(columns=["plan"]).to_csv(paths.score / "a.csv", index=False)
    bad = frame(3).astype({"age": object})
    bad["age"] = "old"
    bad.to_parquet(paths.score / "b.parquet")
    with pytest.raises(bs.BatchScoringError) as err:
        score(spec, settings, slot)
    message = str(err.value)
    assert "nothing could be scored (version 4)" in message and "missing column(s) 'plan'" in message
    assert "b.parquet: all 3 rows rejected, e.g. age: expected a number, got str 'old' (3 rows)" in message
    assert not err.value.retryable and not is_transient(err.value)
    (record,) = bs.list_runs(paths)
    assert record["outcome"] == "failed" and record["error"] == message and record["rows_rejected"] == 3


def test_nothing_waiting_is_a_quiet_run_that_records_nothing(
    slot: Slot, settings: Settings, paths: ModelPaths
) -> None:
    def no_model(run: bs.ScoringRun) -> bs.Scorer:
        raise AssertionError("nothing to score: the champion is not even loaded")

    run = bs.score_pending(make_spec(), settings, run_id=RUN, run_time=WHEN, trigger="t", champion=no_model)
    assert run.outcome == "nothing to score" and bs.list_runs(paths) == []


# -- folders, hashes, CSV output --------------------------------------------------------------------


def test_a_folder_of_parts_is_one_input_numbered_across_its_parts_with_a_stable_hash(
    slot: Slot, settings: Settings, paths: ModelPaths, tmp_path: Path
) -> None:
    spec = make_spec(csv=True, keep_columns=["customer_id"])
    df = frame(30)
    folder = paths.score / "export"
    (folder / "part=1").mkdir(parents=True)
    df.iloc[:10].to_parquet(folder / "part-0.parquet")  # parts in the order of their paths
    df.iloc[10:].to_csv(folder / "part=1" / "data.csv", index=False)
    (folder / "_SUCCESS").write_text("")
    (folder / "README.txt").write_text("not data")
    expected_sha = bs.describe_input(folder).sha256
    (result,) = score(spec, settings, slot).inputs
    assert result.sha256 == expected_sha and result.ignored_files == ["README.txt"]
    out = pd.read_parquet(result.predictions)
    assert (
        out["row"].tolist() == list(range(30)) and out["customer_id"].tolist() == df["customer_id"].tolist()
    )
    assert out["input_file"].tolist() == ["part-0.parquet"] * 10 + ["part=1/data.csv"] * 20
    csv_out = pd.read_csv(Path(result.output_dir) / "predictions.csv")
    assert csv_out["row"].tolist() == out["row"].tolist()
    assert np.allclose(csv_out["probability_1"], out["probability_1"], rtol=0, atol=1e-15)
    # The same parts elsewhere have the same hash: it is the content, not the place.
    copy = tmp_path / "copy"
    (copy / "part=1").mkdir(parents=True)
    moved = paths.scored_inputs / result.stored_name
    for part in ("part-0.parquet", "part=1/data.csv"):
        (copy / part).write_bytes((moved / part).read_bytes())
    assert bs.describe_input(copy).sha256 == expected_sha
    (copy / "part-0.parquet").write_bytes(b"changed")
    assert bs.describe_input(copy).sha256 != expected_sha


def test_a_given_path_is_scored_where_it_is_and_not_moved(
    slot: Slot, settings: Settings, paths: ModelPaths, tmp_path: Path
) -> None:
    source = tmp_path / "shared" / "table.parquet"
    source.parent.mkdir()
    frame(8).to_parquet(source)
    (result,) = score(make_spec(), settings, slot, source=str(source)).inputs
    assert source.exists() and result.scored == 8
    with pytest.raises(bs.BatchScoringError, match="no existing absolute path"):
        score(make_spec(), settings, slot, run_id="other", source="relative/table.parquet")


# -- retries -----------------------------------------------------------------------------------------


class FlakyScorer(bs.Scorer):
    """Loses its connection on the n-th chunk it is asked to score, as a crashed worker would."""

    def __init__(self, slot: Slot, fail_at: int) -> None:
        super().__init__(slot)
        object.__setattr__(self, "calls", 0)
        object.__setattr__(self, "fail_at", fail_at)

    def predict(self, frame: pd.DataFrame) -> dict[str, Any]:
        object.__setattr__(self, "calls", self.calls + 1)  # type: ignore[attr-defined]
        if self.calls == self.fail_at:  # type: ignore[attr-defined]
            raise ConnectionError("worker lost")
        return super().predict(frame)


def test_a_retry_finishes_a_crashed_run_and_writes_nothing_twice(
    slot: Slot, settings: Settings, paths: ModelPaths
) -> None:
    spec = make_spec(chunk_rows=10)
    for name in ("a.csv", "b.csv", "c.csv"):
        frame(25, seed=len(name) + ord(name[0])).to_csv(paths.score / name, index=False)
    flaky = FlakyScorer(slot, fail_at=5)  # a.csv takes 3 chunks; b.csv dies on its 2nd
    with pytest.raises(ConnectionError):
        bs.score_pending(spec, settings, run_id=RUN, run_time=WHEN, trigger="t", champion=lambda run: flaky)
    run_dir = paths.score_run_dir("manual__2026-03-01T00_00_00_00_00")
    assert sorted(p.name for p in paths.score.iterdir()) == ["b.csv", "c.csv"]
    (a_out,) = [p for p in run_dir.iterdir() if p.name.endswith("__a.csv")]
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # b's half-written outputs went
    # A worker killed outright leaves them, though: the retry must not take them for finished.
    b = bs.describe_input(paths.score / "b.csv")
    (run_dir / f".{b.stored_name}.tmp").mkdir()
    (run_dir / f".{b.stored_name}.tmp" / "manifest.json").write_text("{}")
    a_written = (a_out / "predictions.parquet").stat().st_mtime_ns
    # The worker also died once between renaming c.csv's outputs into place and moving c.csv.
    c = bs.describe_input(paths.score / "c.csv")
    facts = bs.RunFacts("churn", RUN, (), 10, False)
    bs.score_input(spec, bs.Scorer(slot), c, facts, run_dir / c.stored_name)
    c_written = (run_dir / c.stored_name / "predictions.parquet").stat().st_mtime_ns

    retried = score(spec, settings, slot)
    assert sorted(r.name for r in retried.inputs) == ["a.csv", "b.csv", "c.csv"]
    assert retried.rows_scored == 75 and not any(paths.score.iterdir())
    assert (a_out / "predictions.parquet").stat().st_mtime_ns == a_written  # not scored again
    assert (run_dir / c.stored_name / "predictions.parquet").stat().st_mtime_ns == c_written
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]
    outputs = sorted(p.name for p in run_dir.iterdir() if p.is_dir())
    assert len(outputs) == 3 and len(list(paths.scored_inputs.iterdir())) == 3
    for r in retried.inputs:
        assert pd.read_parquet(r.predictions)["row"].tolist() == list(range(25))


# -- the watcher, the record, the view and the metrics ------------------------------------------------


def test_scan_sees_files_and_finished_folders_and_skips_partial_ones(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x\n1\n")
    (tmp_path / "b.csv.part").write_text("x\n")
    (tmp_path / ".c.csv").write_text("x\n")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "p0.parquet").write_bytes(b"12345")
    (tmp_path / "export" / "p1.parquet").write_bytes(b"123")
    found = bs.scan_inputs(tmp_path)
    assert sorted(found) == ["a.csv", "export"] and found["export"][0] == 8
    assert bs.scan_inputs(tmp_path / "missing") == {}


def test_the_score_watcher_fires_once_a_dropped_folder_stops_changing(tmp_path: Path) -> None:
    from cd4ml.airflow.triggers import ScoreZoneTrigger

    async def scenario() -> dict[str, Any]:
        trigger = ScoreZoneTrigger(directory=str(tmp_path), poke_interval=0.05)
        runner = trigger.run()
        (tmp_path / "export").mkdir()
        (tmp_path / "export" / "p0.csv").write_text("a\n1\n")
        event = await asyncio.wait_for(runner.__anext__(), timeout=5)
        await runner.aclose()
        return dict(event.payload)

    assert asyncio.run(scenario()) == {"directory": str(tmp_path), "files": ["export"]}
    name, kwargs = ScoreZoneTrigger(str(tmp_path), 3.0).serialize()
    assert name == "cd4ml.airflow.triggers.ScoreZoneTrigger" and kwargs["poke_interval"] == 3.0


def test_the_models_view_and_the_metrics_list_the_batch_runs(
    slot: Slot, settings: Settings, paths: ModelPaths
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from cd4ml.ui import overview as ov

    spec = make_spec()
    bad = frame(10).astype({"age": object})
    bad.loc[0, "age"] = "x"
    bad.to_csv(paths.score / "one.csv", index=False)
    (paths.score / "two.txt").write_text("?")
    score(spec, settings, slot)
    (paths.score / "three.txt").write_text("?")
    with pytest.raises(bs.BatchScoringError):
        score(spec, settings, slot, run_id="scheduled__2026-03-02T00:00:00+00:00")
    runs = bs.list_runs(paths)
    assert [r["outcome"] for r in runs] == ["failed", "scored"]  # newest first (same run_time: by id)
    champion = ov.VersionInfo(version="4", created_ms=0, run_id=None, aliases=["champion"], decision=None,
                              evidence={}, validation={}, lineage={}, tags={})  # fmt: skip
    o = ov.ModelOverview(name="churn", owner=None, metric="roc_auc", champion=champion, versions=[],
                         events=[], drift=[], drift_threshold=0.3, files={},
                         batch_runs=[ov._batch_summary(r) for r in runs],
                         totals=ov.totals_of([], [], [], {}, batch=runs))  # fmt: skip
    html = ov.render_html([o], settings, "http://mlflow", [])
    assert "<h3>Batch scoring</h3>" in html and "one.csv (9, 1 rejected)" in html
    assert "two.txt (quarantined)" in html and "1 row(s) rejected for age" in html
    assert "/dags/churn__score/runs/" in html
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(ov.prometheus_text([o]))
        for s in family.samples
    }
    assert samples[("cd4ml_batch_runs_total", (("model", "churn"), ("outcome", "failed")))] == 1
    assert samples[("cd4ml_batch_rows_total", (("model", "churn"), ("outcome", "scored")))] == 9
    assert samples[("cd4ml_batch_rows_total", (("model", "churn"), ("outcome", "rejected")))] == 1
    assert samples[("cd4ml_batch_inputs_total", (("model", "churn"), ("outcome", "quarantined")))] == 2
    assert samples[("cd4ml_batch_last_run_failed", (("model", "churn"),))] == 1
    assert ("cd4ml_batch_last_success_timestamp_seconds", (("model", "churn"),)) in samples
    assert ov.status(o) == ("last batch scoring run failed", "failed")


# -- the spec's scoring section ----------------------------------------------------------------------


def test_the_scoring_section_is_checked_named_and_left_out_of_the_spec_hash() -> None:
    from cd4ml.core.errors import SpecError

    plain = make_spec()
    assert plain.scoring == bs_default() and "scoring" not in plain.canonical()
    custom = make_spec(schedule="0 3 * * *", csv=True, chunk_rows=5000, keep_columns=["customer_id"])
    assert custom.spec_hash() == plain.spec_hash()  # how predictions are written retrains nothing
    assert parse_spec(json.dumps(custom.canonical()), Path("churn.yaml")) == custom
    for bad, field in (({"schedule": "0 2 30 2 *"}, "scoring.schedule"),
                       ({"chunk_rows": 0}, "scoring.chunk_rows"),
                       ({"keep_columns": ["prediction"]}, "scoring.keep_columns"),
                       ({"keep_columns": ["probability_1"]}, "scoring.keep_columns"),
                       ({"keep_columns": ["id", "id"]}, "scoring.keep_columns"),
                       ({"parquet": False}, "scoring.parquet")):  # fmt: skip
        with pytest.raises(SpecError, match=f"churn.yaml: field '{field}'"):
            make_spec(**bad)


def bs_default() -> Any:
    from cd4ml.core.spec import Scoring

    return Scoring()


def test_memory_follows_the_chunk_not_the_file(slot: Slot, settings: Settings, paths: ModelPaths) -> None:
    """Chunks never exceed chunk_rows, whatever the file's size or its Parquet row groups."""
    df = frame(2500)
    df.to_parquet(paths.score / "big.parquet", row_group_size=1000)
    df.to_csv(paths.score / "big.csv", index=False)
    seen: list[int] = []

    class Counting(bs.Scorer):
        def predict(self, frame: pd.DataFrame) -> dict[str, Any]:
            seen.append(len(frame))
            return super().predict(frame)

    bs.score_pending(make_spec(chunk_rows=300), settings, run_id=RUN, run_time=WHEN, trigger="t",
                     champion=lambda run: Counting(slot))  # fmt: skip
    assert max(seen) <= 300 and sum(seen) == 5000
    assert os.path.getsize(paths.scored_inputs / next(iter(os.listdir(paths.scored_inputs)))) > 0
