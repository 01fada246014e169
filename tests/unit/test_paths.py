"""The per-model data-root layout lives in cd4ml.core.paths and nowhere else."""

from __future__ import annotations

import ast
from datetime import date
from pathlib import Path

import pytest

from cd4ml.core.paths import ModelPaths
from cd4ml.core.settings import Settings
from cd4ml.data import landing

PACKAGE = Path(__file__).resolve().parents[2] / "include" / "cd4ml"

# The directory and file names of the layout: a runtime module that joins one onto a path (or
# globs for one) has a second copy of the layout.
LAYOUT_DIRS = {
    "landing", "accepted", "quarantine", "runs", "gx", "reports", "predictions", "monitor", "feedback"
}  # fmt: skip
LAYOUT_FILES = {
    "state.json", "checks.jsonl", "outcome.json", "train.parquet", "holdout.parquet", "request_index.parquet"
}  # fmt: skip
PARTITION = "date="  # the prediction log's day partitions

# Modules that take every layout path from ModelPaths. Add yours once it does; the goal is all of
# include/cd4ml except core/paths.py.
ADOPTED = [
    "data/landing.py",
    "core/spec.py",
    "core/settings.py",
    "steps/pipeline.py",
    "steps/monitor.py",
    "ui/overview.py",
    "serving/predlog.py",
    "serving/feedback_api.py",
    "data/feedback.py",
    "airflow/ui.py",
    "airflow/retract_dag.py",
    "airflow/train_dag.py",
    "airflow/score_dag.py",
    "steps/batch_score.py",
    "cli.py",
]


def test_layout_under_the_model_root(tmp_path: Path) -> None:
    p = ModelPaths(tmp_path / "iris")
    assert {
        "landing": p.landing,
        "accepted": p.accepted,
        "quarantine": p.quarantine,
        "runs": p.runs,
        "gx": p.gx,
        "reports": p.reports,
        "predictions": p.predictions,
        "monitor": p.monitor,
        "feedback": p.feedback,
    } == {name: tmp_path / "iris" / name for name in LAYOUT_DIRS}
    assert p.run_dir("r1") == tmp_path / "iris" / "runs" / "r1"
    assert p.train_snapshot("r1") == p.run_dir("r1") / "train.parquet"
    assert p.holdout_snapshot("r1") == p.run_dir("r1") / "holdout.parquet"
    assert p.run_outcome("r1") == p.run_dir("r1") / "outcome.json"
    assert p.drift_report_dir("r1") == tmp_path / "iris" / "reports" / "drift" / "r1"
    assert p.monitor_state == tmp_path / "iris" / "monitor" / "state.json"
    assert p.monitor_history == tmp_path / "iris" / "monitor" / "checks.jsonl"
    assert p.report_dirs == (p.gx, p.reports)


def test_prediction_partitions_sort_as_text_by_day(tmp_path: Path) -> None:
    p = ModelPaths(tmp_path)
    assert p.prediction_day(date(2026, 3, 9)) == tmp_path / "predictions" / "date=2026-03-09"
    assert p.prediction_day("2026-03-09") == p.prediction_day(date(2026, 3, 9))
    # Readers skip old partitions by comparing names: that only works with zero-padded ISO days.
    assert p.prediction_day(date(2026, 3, 9)).name < p.prediction_day(date(2026, 10, 1)).name


def test_feedback_is_a_zone_of_its_own_with_the_label_store_beside_it(tmp_path: Path) -> None:
    p = ModelPaths(tmp_path / "iris")
    fb = tmp_path / "iris" / "feedback"
    assert (p.feedback_landing, p.feedback_accepted, p.feedback_quarantine) == (
        fb / "landing", fb / "accepted", fb / "quarantine"
    )  # fmt: skip
    # The label-file zone is laid out as the data zone, so cd4ml.data.landing moves its files.
    assert (
        p.feedback_zone.landing == p.feedback_landing and p.feedback_zone.quarantine == p.feedback_quarantine
    )
    assert p.labels == fb / "labels"
    assert p.labels_day(date(2026, 3, 9)) == fb / "labels" / "date=2026-03-09" == p.labels_day("2026-03-09")
    assert p.prediction_index("2026-03-09") == p.prediction_day("2026-03-09") / "request_index.parquet"
    assert ModelPaths.partition_day(p.prediction_day("2026-03-09")) == "2026-03-09"
    # Label folders appear on first use (the first ingest creates landing/), not with the data zone.
    assert p.feedback not in (p.landing, p.accepted, p.quarantine, p.runs)


def test_built_from_settings_or_the_data_root(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, data_dir=tmp_path / "data", specs_dir=tmp_path, mlflow_tracking_uri="")
    assert ModelPaths.for_model(settings, "iris").root == settings.model_dir("iris")
    assert ModelPaths.in_data_dir(settings.data_dir, "iris") == ModelPaths.for_model(settings, "iris")


def test_zone_is_the_paths_object(tmp_path: Path) -> None:
    zone = landing.Zone(tmp_path / "m").ensure()
    assert isinstance(zone, ModelPaths)
    assert all(d.is_dir() for d in (zone.landing, zone.accepted, zone.quarantine, zone.runs))
    # Only the zone is created up front; monitor/, predictions/ etc. appear when first written.
    assert sorted(d.name for d in zone.root.iterdir()) == ["accepted", "landing", "quarantine", "runs"]


def test_run_outcomes_lists_only_recorded_runs(tmp_path: Path) -> None:
    p = ModelPaths(tmp_path)
    assert p.run_outcomes() == []
    p.run_dir("a").mkdir(parents=True)
    p.run_dir("b").mkdir()
    p.run_outcome("b").write_text("{}")
    assert p.run_outcomes() == [p.run_outcome("b")]


def layout_spellings(source: str) -> list[str]:
    """`x / "landing"` joins and string constants naming a layout file, as `line: text`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Div)
            and isinstance(node.right, ast.Constant)
            and isinstance(node.right.value, str)
            and node.right.value.split("/", 1)[0] in LAYOUT_DIRS
        ):
            found.append(f"{node.lineno}: / {node.right.value!r}")
        elif isinstance(node, ast.Tuple | ast.List | ast.Set) and node.elts:
            # A list of layout directories, e.g. the ones a view may serve files from.
            names = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            if len(names) == len(node.elts) and all(n in LAYOUT_DIRS for n in names):
                found.append(f"{node.lineno}: {tuple(names)!r}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and not _prose(node.value):
            if any(name in node.value for name in LAYOUT_FILES) or node.value.startswith(PARTITION):
                found.append(f"{node.lineno}: {node.value!r}")
    return sorted(found, key=lambda line: int(line.split(":")[0]))


def _prose(text: str) -> bool:
    # Docstrings and messages describe the layout to people; only path-shaped constants copy it.
    return " " in text.strip()


def test_the_scanner_finds_a_second_copy_of_the_layout() -> None:
    source = (
        'root = Path("x")\na = root / "landing"\nb = root.glob("*/outcome.json")\nc = root / "models"\n'
        'd = root / f"date={day}"\nDIRS = ("gx", "reports")\ntags = ["cd4ml", name, "monitor"]\n'
    )
    assert layout_spellings(source) == [
        "2: / 'landing'", "3: '*/outcome.json'", "5: 'date='", "6: ('gx', 'reports')"
    ]  # fmt: skip
    assert layout_spellings('"""Files land in landing/ and runs/<key>/outcome.json."""\n') == []


@pytest.mark.parametrize("module", ADOPTED)
def test_adopted_modules_do_not_spell_the_layout(module: str) -> None:
    assert layout_spellings((PACKAGE / module).read_text(encoding="utf-8")) == [], (
        f"include/cd4ml/{module} spells part of the data-root layout: use cd4ml.core.paths.ModelPaths"
    )
