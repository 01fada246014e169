"""The one place that spells the per-model data-root layout.

    <data dir>/<model>/
      landing/                     files dropped for validation (the new-data asset watches it)
      accepted/                    validated files, `<sha16>__<name>` + `.meta.json`: the training data
      quarantine/                  rejected and retracted files, each with `.reason.txt`/`.reason.json`
      runs/<run key>/              one training run: train.parquet, holdout.parquet, outcome.json
      gx/                          the Great Expectations file context and its Data Docs
      profiles/                    per accepted file, the summary validation learns from (by sha256)
      reports/drift/<run key>/     one drift check: report.html, report.json, summary.json
      predictions/date=YYYY-MM-DD/ the prediction log, part-*.parquet
      predictions/date=YYYY-MM-DD/request_index.parquet
                                   that day's request ids, sorted (feedback looks ids up here)
      monitor/                     the drift monitor's state.json and checks.jsonl (its history)
      feedback/landing/            label files dropped for late ground truth (request_id, outcome[, row])
      feedback/accepted/           ingested label files, `<sha16>__<name>` + `.meta.json`
      feedback/quarantine/         rejected label files, each with `<name>.reason.json`
      feedback/labels/date=YYYY-MM-DD/ the label store (by day received), part-*.parquet
      feedback/to_training/        labels exported as training data: state.json + exported/<seq>.parquet
      score/                       CSV/Parquet files or folders dropped to be scored by the champion
      scored/runs/<run key>/       one batch-scoring run: run.json, state.json, and per input <sha16>__<name>/
                                   (predictions.parquet [+ .csv], rejects.parquet [+ .csv], manifest.json)
      scored/inputs/               inputs after scoring, `<sha16>__<name>` (nothing is deleted)
      scored/quarantine/           inputs that could not be scored at all, with `.reason.txt`/`.reason.json`

Pure paths, no I/O (except `ensure`): build one with `ModelPaths.for_model(settings, name)`, or
`ModelPaths.in_data_dir(data_dir, name)` where only the data root is known (the prediction service).
What lives inside a directory beyond these names (sidecar suffixes, hash prefixes) belongs to the
module that writes it (`cd4ml.data.landing`, `cd4ml.serving.predlog`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, overload

if TYPE_CHECKING:
    from cd4ml.core.settings import Settings

RUN_OUTCOME = "outcome.json"
PREDICTION_PART_GLOB = "date=*/part-*.parquet"
PART_GLOB = "part-*.parquet"  # the parts inside one day partition (prediction log, label store)
LABEL_PART_GLOB = PREDICTION_PART_GLOB
SCORE_RUN_RECORD = "run.json"


class Under:
    """A path under a zone's root, declared once as a class attribute (`landing = Under("landing")`):
    reading it on a `ModelPaths` gives `root / "landing"`."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    @overload
    def __get__(self, obj: None, owner: type) -> Under: ...
    @overload
    def __get__(self, obj: ModelPaths, owner: type) -> Path: ...
    def __get__(self, obj: ModelPaths | None, owner: type) -> Path | Under:
        return self if obj is None else obj.root.joinpath(*self.parts)


@dataclass(frozen=True)
class ModelPaths:
    root: Path

    @classmethod
    def for_model(cls, settings: Settings, model: str) -> ModelPaths:
        return cls(settings.model_dir(model))

    @classmethod
    def in_data_dir(cls, data_dir: Path, model: str) -> ModelPaths:
        return cls(data_dir / model)

    # -- the data zone -----------------------------------------------------------------------------

    landing = Under("landing")
    accepted = Under("accepted")
    quarantine = Under("quarantine")
    gx = Under("gx")
    profiles = Under("profiles")

    # -- training runs -----------------------------------------------------------------------------

    runs = Under("runs")

    def run_dir(self, run_key: str) -> Path:
        return self.runs / run_key

    def train_snapshot(self, run_key: str) -> Path:
        return self.run_dir(run_key) / "train.parquet"

    def holdout_snapshot(self, run_key: str) -> Path:
        return self.run_dir(run_key) / "holdout.parquet"

    def run_outcome(self, run_key: str) -> Path:
        return self.run_dir(run_key) / RUN_OUTCOME

    def run_outcomes(self) -> list[Path]:
        """Every recorded run's outcome file (unordered)."""
        return list(self.runs.glob(f"*/{RUN_OUTCOME}")) if self.runs.is_dir() else []

    # -- reports, predictions, monitor -------------------------------------------------------------

    reports = Under("reports")

    def drift_report_dir(self, run_key: str) -> Path:
        return self.reports / "drift" / run_key

    @property
    def report_dirs(self) -> tuple[Path, ...]:
        """Where human-readable reports live: the only directories the UI may serve files from."""
        return (self.gx, self.reports)

    predictions = Under("predictions")

    def prediction_day(self, day: date | str) -> Path:
        """The partition for one UTC day (`date=YYYY-MM-DD`), compared as text by readers."""
        text = day if isinstance(day, str) else day.strftime("%Y-%m-%d")
        return self.predictions / f"date={text}"

    def prediction_index(self, day: date | str) -> Path:
        """One day's request ids (sorted, with row counts and versions): what feedback looks up."""
        return self.prediction_day(day) / "request_index.parquet"

    @staticmethod
    def partition_day(partition: Path) -> str:
        """`date=YYYY-MM-DD` -> `YYYY-MM-DD` (the inverse of `prediction_day`/`labels_day`)."""
        return partition.name.partition("=")[2]

    monitor = Under("monitor")
    monitor_state = Under("monitor", "state.json")
    monitor_history = Under("monitor", "checks.jsonl")

    # -- ground truth from production ----------------------------------------------------------------

    feedback = Under("feedback")

    @property
    def feedback_zone(self) -> ModelPaths:
        """Label files go through a zone of their own, laid out as the data zone is: landing/ ->
        accepted/ or quarantine/ (so `cd4ml.data.landing` moves them, exactly once)."""
        return ModelPaths(self.feedback)

    feedback_landing = Under("feedback", "landing")
    feedback_accepted = Under("feedback", "accepted")
    feedback_quarantine = Under("feedback", "quarantine")
    feedback_exports = Under("feedback", "to_training")
    labels = Under("feedback", "labels")

    def labels_day(self, day: date | str) -> Path:
        """The label store's partition for one UTC day of receipt (`date=YYYY-MM-DD`)."""
        text = day if isinstance(day, str) else day.strftime("%Y-%m-%d")
        return self.labels / f"date={text}"

    # -- batch scoring ---------------------------------------------------------------------------------

    @property
    def score(self) -> Path:
        """Where users drop files (or folders of parts) for `<model>__score` (watched, like landing/)."""
        return self.root / "score"

    scored = Under("scored")
    scored_inputs = Under("scored", "inputs")
    score_quarantine = Under("scored", "quarantine")
    score_runs = Under("scored", "runs")

    def score_run_dir(self, run_key: str) -> Path:
        return self.score_runs / run_key

    def score_run_record(self, run_key: str) -> Path:
        return self.score_run_dir(run_key) / SCORE_RUN_RECORD

    def score_run_state(self, run_key: str) -> Path:
        """The version a scoring run pinned on its first try (its retries score with the same)."""
        return self.score_run_dir(run_key) / "state.json"

    def score_run_records(self) -> list[Path]:
        """Every finished batch-scoring run's record (unordered)."""
        return list(self.score_runs.glob(f"*/{SCORE_RUN_RECORD}")) if self.score_runs.is_dir() else []

    def ensure(self) -> ModelPaths:
        """Create the zone directories a training run writes to (the rest appear on first use)."""
        for d in (self.landing, self.accepted, self.quarantine, self.runs):
            d.mkdir(parents=True, exist_ok=True)
        return self
