"""The model spec: one YAML file per model, parsed into a typed, validated object.

A spec is the whole contract between a team's dataset and cd4ml: which columns are features,
what is predicted, how a challenger is trained and judged, and how data is validated. Parsing
imports nothing heavy (no sklearn, no pandas), so DAG files can read specs at parse time.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from croniter import CroniterError, croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cd4ml.core.errors import SpecError

# Natural direction of every metric we know how to compute; a spec that declares the opposite is
# almost certainly a mistake that would promote worse models, so it is refused.
METRICS: dict[str, tuple[Literal["classification", "regression"], Literal["maximize", "minimize"]]] = {
    "accuracy": ("classification", "maximize"),
    "balanced_accuracy": ("classification", "maximize"),
    "roc_auc": ("classification", "maximize"),
    "f1": ("classification", "maximize"),
    "log_loss": ("classification", "minimize"),
    "rmse": ("regression", "minimize"),
    "mae": ("regression", "minimize"),
    "r2": ("regression", "maximize"),
}

# Metrics that combine per-class scores on a multiclass target (`metric.average`).
AVERAGED_METRICS = {"f1", "roc_auc"}

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# Prefix of a cross-field error message that names its field: "field=metric.name: ...".
_FIELD = "field="
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_EXPECTATION = re.compile(r"^Expect[A-Za-z0-9]+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NumericalFeature(_Strict):
    name: str
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> NumericalFeature:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class CategoricalFeature(_Strict):
    name: str
    values: list[str] | None = Field(
        default=None, description="Allowed values; when absent they are learned from accepted data."
    )


def _as_feature_dicts(items: Any) -> Any:
    # Allow the short form `- column_name` next to the long form `- name: column_name`.
    if isinstance(items, list):
        return [{"name": item} if isinstance(item, str) else item for item in items]
    return items


class Features(_Strict):
    numerical: list[NumericalFeature] = Field(default_factory=list)
    categorical: list[CategoricalFeature] = Field(default_factory=list)

    _short_num = field_validator("numerical", mode="before")(_as_feature_dicts)
    _short_cat = field_validator("categorical", mode="before")(_as_feature_dicts)

    @model_validator(mode="after")
    def _non_empty_unique(self) -> Features:
        names = [f.name for f in self.numerical] + [f.name for f in self.categorical]
        if not names:
            raise ValueError("at least one numerical or categorical feature is required")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"feature names must be unique; repeated: {', '.join(duplicates)}")
        return self


class Estimator(_Strict):
    class_path: str = Field(alias="class", description="Import path of an sklearn-compatible estimator")
    params: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("class_path")
    @classmethod
    def _dotted(cls, value: str) -> str:
        if not _DOTTED.match(value):
            raise ValueError(
                f"must be an import path like 'sklearn.linear_model.LogisticRegression', got {value!r}"
            )
        return value


class Metric(_Strict):
    name: str
    direction: Literal["maximize", "minimize"] | None = None
    average: Literal["binary", "macro", "micro", "weighted"] | None = Field(
        default=None,
        description=(
            "How f1 (and roc_auc) combine classes: unset means 'binary' for a two-class target and "
            "'macro' for more; 'binary' on a target with more than two classes is refused before training."
        ),
    )

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in METRICS:
            raise ValueError(f"unknown metric {value!r}; choose one of {', '.join(sorted(METRICS))}")
        return value

    @model_validator(mode="after")
    def _direction(self) -> Metric:
        natural = METRICS[self.name][1]
        if self.direction is None:
            object.__setattr__(self, "direction", natural)
        elif self.direction != natural:
            raise ValueError(
                f"metric {self.name!r} is to be {natural}d, but direction says {self.direction!r}"
            )
        return self

    @model_validator(mode="after")
    def _average(self) -> Metric:
        if self.average is not None and self.name not in AVERAGED_METRICS:
            raise ValueError(
                f"'average' applies to {', '.join(sorted(AVERAGED_METRICS))} only, not to {self.name!r}"
            )
        return self

    @property
    def higher_is_better(self) -> bool:
        return self.direction == "maximize"


class Promotion(_Strict):
    min_improvement: float = Field(
        default=0.0, ge=0.0, description="The challenger must beat the champion by more than this margin."
    )
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    floor: float | None = Field(
        default=None, description="Absolute score a model must reach to serve at all."
    )
    bootstrap_resamples: int = Field(default=1000, ge=1000, le=100_000)
    min_holdout_rows: int = Field(default=30, ge=1)
    approval: Literal["none", "required"] = Field(
        default="none",
        description="required: a challenger that won waits for a person to approve it in Airflow "
        "(task approve_promotion) before champion moves; a rejection or the time-out promotes nothing.",
    )
    approval_timeout_hours: float = Field(default=24.0, gt=0.0, le=24.0 * 30)


class Expectation(_Strict):
    expectation: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("expectation")
    @classmethod
    def _gx_name(cls, value: str) -> str:
        if not _EXPECTATION.match(value):
            raise ValueError(
                f"must be a Great Expectations class name like 'ExpectColumnMeanToBeBetween', got {value!r}"
            )
        return value


class Validation(_Strict):
    """How landed batches are judged. Declared bounds (`min`/`max`, `values`) are strict; what is
    learned from accepted data allows the shares below. Defaults were chosen on the dataset zoo
    (tests/zoo): no real dataset there is quarantined, every broken file in the reliability corpus is."""

    min_rows: int = Field(default=10, ge=1)
    max_rows: int | None = Field(default=None, ge=1)
    max_null_fraction: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description=(
            "Optional fixed cap on the share of null values in any feature column of any batch, the "
            "first included. Unset: batches are compared with accepted data (max_excess_null_fraction)."
        ),
    )
    max_excess_null_fraction: float = Field(
        default=0.2,
        ge=0.0,
        le=1.0,
        description=(
            "Share of a feature column that may be null beyond its null share in accepted data "
            "(a survey question skipped by many is normal; a column that empties out is not)."
        ),
    )
    max_duplicate_fraction: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description=(
            "Optional fixed cap on the share of duplicated rows in any batch, the first included. "
            "Unset: batches are compared with accepted data (max_excess_duplicate_fraction)."
        ),
    )
    max_excess_duplicate_fraction: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description=(
            "Share of rows that may be duplicated beyond what accepted data predicts for a batch of "
            "that size (survey answers repeat legitimately; an export appended to itself does not)."
        ),
    )
    range_tolerance: float = Field(
        default=1.0,
        ge=0.0,
        description="Learned ranges are widened by this multiple of their robust span on each side.",
    )
    max_outside_learned_range: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description=(
            "Share of a batch's rows allowed FAR outside a learned range (further than "
            "far_range_multiple widths of it: a unit error x100/x1000, junk like 1e300). Rows only "
            "moderately outside are drift: the batch is accepted, the rows are reported, and the "
            "range follows. The spec's own min/max allow no row outside."
        ),
    )
    far_range_multiple: float = Field(
        default=10.0,
        gt=0.0,
        description=(
            "How far outside a learned range [lo, hi] a value is 'far': beyond lo - m*(hi - lo) or "
            "hi + m*(hi - lo). Growth (prices, populations in time order) moves a range by a few "
            "widths per batch; a column scaled x100 or more lands beyond 10 widths."
        ),
    )
    max_new_category_fraction: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description=(
            "Share of rows that may carry a categorical value (or class) not seen in accepted data, "
            "on top of the share the accepted data itself predicts; declared `values:` allow none. "
            "New values join the learned domain once their batch is accepted."
        ),
    )
    learn_categories: bool = True
    allow_new_classes: bool | None = Field(
        default=None,
        description=(
            "Whether a classification target may gain classes like a learned categorical feature "
            "(within max_new_category_fraction of a batch's rows). Unset: a target with three or more "
            "classes may (a rare class first seen in a later batch, fog in a half-year of Seattle "
            "weather, must not starve the model) and a two-class target stays binary; true: any "
            "target may; false: none may. A new label equal to a known one after case and whitespace "
            "folding ('Malignant ' vs 'Malignant') is always refused."
        ),
    )
    allow_extra_columns: bool = False
    expectations: list[Expectation] = Field(default_factory=list)


class Data(_Strict):
    holdout_fraction: float = Field(default=0.2, gt=0.0, lt=0.9)


# Airflow's cron presets (airflow.sdk.definitions.timetables._cron.CRON_PRESETS; a unit test keeps
# the copy in step). Copied, not imported: specs are parsed where Airflow is not installed.
CRON_PRESETS: dict[str, str] = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@quarterly": "0 0 1 */3 *",
    "@yearly": "0 0 1 1 *",
}
# A fixed origin for "does it ever fire": the answer does not depend on today (no now() in logic).
_CRON_ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)


def check_cron(value: str) -> str:
    """A schedule both DAGs turn into a `CronTriggerTimetable`: a preset or 5 valid cron fields.

    Airflow resolves its presets, then hands the text to croniter; croniter alone would also take
    its own aliases and a 6th (seconds) field, which Airflow's timetables do not describe, so they
    are refused here.
    An expression that can never fire (`0 2 30 2 *`) is refused too: the scheduler would fail on it.
    """
    expression = CRON_PRESETS.get(value, value)
    presets = ", ".join(CRON_PRESETS)
    hint = f"5 cron fields like '0 2 * * *' (minute hour day month weekday, UTC) or one of {presets}"
    if expression.startswith("@"):
        # croniter knows a few more (@annually, @midnight), which Airflow neither names nor describes.
        raise ValueError(f"{value!r} is not one of Airflow's presets; use {hint}")
    try:
        fields = croniter(expression).expanded
    except CroniterError as err:
        raise ValueError(f"{value!r} is not a valid schedule ({err}); use {hint}") from None
    if len(fields) != 5:
        raise ValueError(f"{value!r} has {len(fields)} fields, Airflow schedules take 5; use {hint}")
    try:
        croniter(expression, _CRON_ORIGIN).get_next(datetime)
    except CroniterError:
        raise ValueError(f"{value!r} never fires (no such date); use {hint}") from None
    return value


class Schedule(_Strict):
    retrain_cron: str = "0 2 * * *"
    landing_poll_seconds: float = Field(default=2.0, gt=0.0, le=3600)

    _cron = field_validator("retrain_cron")(check_cron)


class Drift(_Strict):
    schedule: str = "@hourly"
    threshold: float = Field(
        default=0.3, gt=0.0, le=1.0, description="Share of drifted features that means drift"
    )
    performance_drop: float | None = Field(default=None, gt=0.0)
    cooldown_hours: float = Field(default=6.0, ge=0.0)
    min_rows: int = Field(default=200, ge=1)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        # Airflow also takes these two for a plain `schedule=`; neither makes a monitor: each check
        # covers the window since the last one, which @once never repeats and @continuous shrinks to
        # seconds (a drift test on a handful of rows, back to back).
        if value in {"@once", "@continuous"}:
            raise ValueError(
                f"{value!r} is not a recurring schedule; a drift check needs one, e.g. '@hourly'"
            )
        return check_cron(value)


class Notifications(_Strict):
    """Who hears about what. E-mail goes through the Airflow connection `cd4ml_smtp`."""

    email: list[str] = Field(default_factory=list)
    on_promotion: bool = True
    on_reject: bool = False
    on_quarantine: bool = True
    on_drift: bool = True
    on_rollback: bool = True
    on_failure: bool = True

    @field_validator("email")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        bad = [a for a in value if not re.match(r"^[^@\s]+@[^@\s]+$", a)]
        if bad:
            raise ValueError(f"not e-mail addresses: {bad}")
        return value


def label_text(value: Any) -> str:
    """A class label as the business matrix compares it: the text `cd4ml.data.tables.category_text`
    gives a categorical value (1, 1.0 and "1" are the class "1"; True is "True"), for the scalars
    YAML writes. Copied, not imported: specs are parsed where pandas is not loaded."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value)


def _text_keys(mapping: dict[Any, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    spelled: dict[str, Any] = {}
    for label, item in mapping.items():
        if label is None:
            raise ValueError(f"{where}a class cannot be null (an empty YAML key); write the class label")
        key = label_text(label)
        if key in out:
            raise ValueError(f"{where}class {key!r} is given twice, as {spelled[key]!r} and as {label!r}")
        out[key], spelled[key] = item, label
    return out


def _matrix_keys(value: Any) -> Any:
    # YAML keys may be ints (0/1 targets), bools or text; they are compared as text (`label_text`),
    # so `1:` and `"1":` name the same class (and together are refused as a repeat).
    if not isinstance(value, dict):
        return value
    rows = _text_keys(value, "")
    return {
        actual: _text_keys(row, f"actual {actual!r}: ") if isinstance(row, dict) else row
        for actual, row in rows.items()
    }


class Business(_Strict):
    """A business value per prediction, reported next to the ML metric (`cd4ml.ml.business`).

    Classification: `matrix[actual][predicted]` is the value of one prediction with that outcome
    (a gain positive, a cost negative), e.g. a caught churner is worth a retention offer's margin
    and a missed one costs the customer. Class labels are compared as text, as categorical values
    are everywhere: `1:` and `"1":` are the class 1 whether labels arrive as ints or strings. Quote
    `'yes'`/`'no'`/`'on'`/`'off'`: unquoted, YAML reads them as true/false. Every class must be
    named (as an actual or a predicted key; `rare: {}` names one), and every pair of named classes
    needs a value unless `default` gives the value of the pairs left out.

    Regression: a cost per unit of absolute error, `cost_per_unit`, or asymmetric
    `cost_per_unit_under` (prediction below the actual) and `cost_per_unit_over` (above); a side
    left out costs `cost_per_unit`. The value of a prediction is minus its cost.

    The business value of a set of predictions is the mean value per prediction, in `unit`.
    With `gate: true` a challenger whose value on the holdout is below the champion's is rejected.
    """

    name: str = Field(default="business value", min_length=1, description="Shown next to the value.")
    unit: str = Field(default="", description="The unit of one prediction's value, e.g. 'EUR'.")
    matrix: dict[str, dict[str, float]] | None = Field(
        default=None, description="Classification: value of each (actual, predicted) outcome."
    )
    default: float | None = Field(
        default=None, description="Classification: value of a pair of named classes the matrix leaves out."
    )
    cost_per_unit: float | None = Field(default=None, ge=0.0)
    cost_per_unit_under: float | None = Field(default=None, ge=0.0)
    cost_per_unit_over: float | None = Field(default=None, ge=0.0)
    gate: bool = Field(
        default=False,
        description="Reject a challenger whose business value on the holdout is below the champion's.",
    )

    _keys = field_validator("matrix", mode="before")(_matrix_keys)

    @model_validator(mode="after")
    def _complete(self) -> Business:
        if self.matrix is None:
            return self
        classes = self.classes
        if not classes:
            raise ValueError(
                f"{_FIELD}business.matrix: names no class; give matrix[actual][predicted] values"
            )
        if self.default is None:
            missing = [(a, p) for a in classes for p in classes if p not in self.matrix.get(a, {})]
            if missing:
                shown = ", ".join(f"({a!r}, {p!r})" for a, p in missing[:6])
                more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
                raise ValueError(
                    f"{_FIELD}business.matrix: no value for the (actual, predicted) pairs {shown}{more} "
                    f"of the classes it names ({', '.join(map(repr, classes))}); give each a value or "
                    "set business.default for the pairs left out"
                )
        return self

    @property
    def classes(self) -> list[str]:
        """Every class the matrix names, as text, in the order written."""
        names = dict.fromkeys(self.matrix or {})
        for row in (self.matrix or {}).values():
            names.update(dict.fromkeys(row))
        return list(names)

    def check_task(self, task: str) -> None:
        """The fields of the spec's task only (raised as the field to change)."""
        costs = {
            "cost_per_unit": self.cost_per_unit,
            "cost_per_unit_under": self.cost_per_unit_under,
            "cost_per_unit_over": self.cost_per_unit_over,
        }
        given = [k for k, v in costs.items() if v is not None]
        if task == "classification":
            if given:
                raise ValueError(
                    f"{_FIELD}business.{given[0]}: a cost per unit of error is for regression; a "
                    "classification spec gives business.matrix (value per actual/predicted outcome)"
                )
            if self.matrix is None:
                raise ValueError(
                    f"{_FIELD}business.matrix: a classification spec needs matrix[actual][predicted] "
                    "values, e.g. {1: {1: 40, 0: -200}, 0: {1: -10, 0: 0}}"
                )
            return
        for name in ("matrix", "default"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{_FIELD}business.{name}: is for classification; a regression spec gives "
                    "business.cost_per_unit (or cost_per_unit_under and cost_per_unit_over)"
                )
        if self.cost_per_unit is None and (
            self.cost_per_unit_under is None or self.cost_per_unit_over is None
        ):
            field = "cost_per_unit" if not given else ("cost_per_unit_over" if self.cost_per_unit_over is None
                                                       else "cost_per_unit_under")  # fmt: skip
            raise ValueError(
                f"{_FIELD}business.{field}: a regression spec needs business.cost_per_unit, or both "
                "cost_per_unit_under and cost_per_unit_over (the cost of one unit of absolute error)"
            )

    @property
    def under_cost(self) -> float:
        """Cost of one unit a prediction falls short of the actual (regression)."""
        value = self.cost_per_unit_under if self.cost_per_unit_under is not None else self.cost_per_unit
        return float(value or 0.0)

    @property
    def over_cost(self) -> float:
        """Cost of one unit a prediction exceeds the actual (regression)."""
        value = self.cost_per_unit_over if self.cost_per_unit_over is not None else self.cost_per_unit
        return float(value or 0.0)

    @property
    def label(self) -> str:
        """How the value is shown: its name and unit per prediction."""
        return f"{self.name} ({self.unit} per prediction)" if self.unit else f"{self.name} (per prediction)"


class Feedback(_Strict):
    """Labelled served traffic as training data (`cd4ml.steps.feedback_batch`): opt-in.

    With `to_training: true`, the monitor turns predictions whose outcome has been reported since
    the last export (features from the prediction log, the outcome as the target) into one file in
    landing/, which is validated and quarantined like any landed file.
    """

    to_training: bool = False
    min_rows: int | None = Field(
        default=None,
        ge=1,
        description="Rows a batch waits for before it is landed; unset: validation.min_rows.",
    )
    max_rows: int | None = Field(
        default=None,
        ge=1,
        description="Most rows in one batch (the rest wait for the next); unset: validation.max_rows.",
    )


class CanaryPolicy(_Strict):
    """`deployment.strategy: canary`: the challenger answers `fraction` of live requests for real.

    Routing is sticky: a request carrying `sticky_key` (a column of the request rows, feature or
    not: the first row's value) or the header `x-cd4ml-route-key` always lands on the same side.
    cd4ml judges once the canary has answered `min_requests` (or `max_duration_minutes` passed):
    it promotes when the canary is no worse than the champion on error rate (by more than
    `max_error_rate_increase`), on p99 latency (at most `max_p99_ratio` times the champion's, or
    within `min_p99_difference_ms` of it) and,
    where at least `min_labels` labels have arrived for both, on the primary metric (by more than
    `max_metric_drop`); otherwise, or with too little traffic by the deadline, it rolls back.
    """

    fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    min_requests: int = Field(default=200, ge=1)
    max_duration_minutes: float = Field(default=60.0, gt=0.0, le=7 * 24 * 60.0)
    sticky_key: str | None = Field(default=None, min_length=1)
    max_error_rate_increase: float = Field(default=0.01, ge=0.0, le=1.0)
    max_p99_ratio: float = Field(default=1.5, ge=1.0)
    min_p99_difference_ms: float = Field(default=5.0, ge=0.0)  # p99s closer than this are equal
    max_metric_drop: float = Field(default=0.0, ge=0.0)
    min_labels: int = Field(default=30, ge=1)


class DeploymentPolicy(_Strict):
    """How a challenger that beat the champion reaches live traffic.

    `direct`: staged smoke test, then `champion` moves and all traffic switches. `shadow`: the
    challenger (smoke-tested in staging) gets the `shadow` alias instead; the service answers a copy
    of `shadow_fraction` of live requests with it off the request path, logs both predictions and
    counts agreement, latency and errors; clients only ever get the champion's answers. Promote a
    shadow by hand with `<model>__rollback` (version: the shadow's).
    """

    strategy: Literal["direct", "shadow", "canary"] = "direct"
    shadow_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    canary: CanaryPolicy = Field(default_factory=CanaryPolicy)


# Columns `<model>__score` writes itself; a kept input column may not take one of these names.
SCORING_OUTPUT_COLUMNS = frozenset(
    {"row", "input_file", "prediction", "model_version", "run_id", "input_sha256", "columns", "reason"}
)
SCORING_PROBABILITY_PREFIX = "probability_"


class Scoring(_Strict):
    """`<model>__score`: batch scoring with the champion (`cd4ml.steps.batch_score`).

    Files (or folders of part files) dropped into the model's `score/` folder are scored within
    seconds; with `schedule` also on that cron (UTC), whatever waits there. Rows are checked as the
    prediction service checks a request; a row that fails goes to a rejects file with the reason and
    the others are still scored. Not part of the spec hash: how predictions are written does not
    change the model, so editing this section retrains nothing.
    """

    schedule: str | None = Field(
        default=None,
        description="Also score what waits in score/ on this cron (UTC); unset: only when files land.",
    )
    csv: bool = Field(
        default=False, description="Write predictions.csv (and rejects.csv) beside the Parquet."
    )
    chunk_rows: int = Field(
        default=100_000,
        ge=1,
        le=10_000_000,
        description="Rows read, checked and scored at a time: memory stays bounded by this, not the file.",
    )
    keep_columns: list[str] = Field(
        default_factory=list,
        description="Input columns copied next to each prediction and reject (e.g. a customer id).",
    )

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return None if value is None else check_cron(value)

    @field_validator("keep_columns")
    @classmethod
    def _kept(cls, value: list[str]) -> list[str]:
        repeated = sorted({c for c in value if value.count(c) > 1})
        if repeated:
            raise ValueError(f"repeated: {', '.join(repeated)}")
        clash = [c for c in value if c in SCORING_OUTPUT_COLUMNS or c.startswith(SCORING_PROBABILITY_PREFIX)]
        if clash:
            raise ValueError(
                f"{', '.join(map(repr, clash))}: the scorer writes a column of that name itself "
                f"({', '.join(sorted(SCORING_OUTPUT_COLUMNS))}, {SCORING_PROBABILITY_PREFIX}<class>); "
                "rename the input column"
            )
        return value


class ModelSpec(_Strict):
    name: str
    description: str = ""
    task: Literal["classification", "regression"]
    target: str
    timestamp: str | None = None
    features: Features
    estimator: Estimator
    metric: Metric
    promotion: Promotion = Field(default_factory=Promotion)
    validation: Validation = Field(default_factory=Validation)
    data: Data = Field(default_factory=Data)
    schedule: Schedule = Field(default_factory=Schedule)
    drift: Drift = Field(default_factory=Drift)
    notifications: Notifications = Field(default_factory=Notifications)
    business: Business | None = None
    feedback: Feedback = Field(default_factory=Feedback)
    deployment: DeploymentPolicy = Field(default_factory=DeploymentPolicy)
    scoring: Scoring = Field(default_factory=Scoring)
    seed: int = 42
    owner: str = "cd4ml"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"must be lower-case letters, digits and underscores, starting with a letter, got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        features = set(self.feature_names)
        if self.target in features:
            raise ValueError(f"{_FIELD}target: {self.target!r} is also listed as a feature")
        if self.timestamp is not None and self.timestamp in features | {self.target}:
            raise ValueError(f"{_FIELD}timestamp: {self.timestamp!r} is also a feature or the target")
        metric_task = METRICS[self.metric.name][0]
        if metric_task != self.task:
            raise ValueError(
                f"{_FIELD}metric.name: metric {self.metric.name!r} is for {metric_task}, but task is "
                f"{self.task!r}; choose a {self.task} metric ({', '.join(_metrics_for(self.task))}) or "
                f"set task: {metric_task}"
            )
        if self.business is not None:
            self.business.check_task(self.task)
        self._feedback_rows()
        return self

    def _feedback_rows(self) -> None:
        low, high = self.validation.min_rows, self.validation.max_rows
        wait, cap = self.feedback.min_rows, self.feedback.max_rows
        if wait is not None and wait < low:
            raise ValueError(
                f"{_FIELD}feedback.min_rows: {wait} is below validation.min_rows ({low}): such a batch "
                "would be quarantined for its size; leave it unset or raise it"
            )
        if cap is not None and high is not None and cap > high:
            raise ValueError(
                f"{_FIELD}feedback.max_rows: {cap} is above validation.max_rows ({high}): such a batch "
                "would be quarantined for its size; leave it unset or lower it"
            )
        if cap is not None and cap < (wait or low):
            raise ValueError(
                f"{_FIELD}feedback.max_rows: {cap} is below the rows a batch waits for "
                f"({wait or low}, feedback.min_rows or validation.min_rows); no batch could be landed"
            )

    @property
    def feedback_min_rows(self) -> int:
        """Rows a feedback batch waits for: `feedback.min_rows`, else `validation.min_rows`."""
        return self.feedback.min_rows or self.validation.min_rows

    @property
    def feedback_max_rows(self) -> int | None:
        """Most rows in one feedback batch: `feedback.max_rows`, else `validation.max_rows`."""
        return self.feedback.max_rows or self.validation.max_rows

    @property
    def numerical(self) -> list[str]:
        return [f.name for f in self.features.numerical]

    @property
    def categorical(self) -> list[str]:
        return [f.name for f in self.features.categorical]

    @property
    def feature_names(self) -> list[str]:
        return self.numerical + self.categorical

    @property
    def columns(self) -> list[str]:
        """Every column a landed file must have."""
        return self.feature_names + [self.target] + ([self.timestamp] if self.timestamp else [])

    def canonical(self) -> dict[str, Any]:
        """The spec as parsed, as JSON-able data; what `spec_hash` hashes.

        Sections added later are left out while they are absent or at their defaults, so a spec that
        does not use them keeps its hash (and is not retrained for an upgrade that changes nothing).
        """
        out = self.model_dump(mode="json", by_alias=True)
        if self.business is None:
            del out["business"]
        if self.feedback == Feedback():
            del out["feedback"]
        if self.deployment == DeploymentPolicy():
            del out["deployment"]
        elif self.deployment.strategy != "canary" and self.deployment.canary == CanaryPolicy():
            del out["deployment"]["canary"]
        for key in ("approval", "approval_timeout_hours"):  # who signs off changes no model
            del out["promotion"][key]
        if self.scoring == Scoring():
            del out["scoring"]
        return out

    def spec_hash(self) -> str:
        """What the model is trained from. `scoring` is left out even when set: how predictions are
        written changes no model, so it must not make the training gate retrain."""
        model = {k: v for k, v in self.canonical().items() if k != "scoring"}
        canonical = json.dumps(model, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


def _metrics_for(task: str) -> list[str]:
    return sorted(name for name, (kind, _) in METRICS.items() if kind == task)


def _format_error(path: Path, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        # A check across fields names the field a user should change (pydantic has no location for it).
        if message.startswith(_FIELD):
            field, _, message = message.removeprefix(_FIELD).partition(": ")
        lines.append(f"{path}: field '{field}': {message}")
    return "\n".join(lines)


def parse_spec(text: str, path: Path) -> ModelSpec:
    """Parse spec text; `path` is used for error messages and as the default model name."""
    try:
        # libyaml's safe loader where present: the same documents, parsed several times faster (every
        # DAG parse reads every spec).
        raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec must be a YAML mapping, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    if raw["name"] != path.stem:
        raise SpecError(f"{path}: field 'name': {raw['name']!r} must match the file name {path.stem!r}")
    try:
        return ModelSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_format_error(path, err)) from None


def load_spec(path: Path) -> ModelSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read spec: {err}") from None
    return parse_spec(text, path)


def spec_files(specs_dir: Path) -> list[Path]:
    return sorted(p for p in specs_dir.glob("*.y*ml") if p.suffix in {".yaml", ".yml"})


def load_specs(paths: Iterable[Path]) -> tuple[list[ModelSpec], dict[Path, SpecError]]:
    """Load every spec; a broken one is reported, not raised, so it cannot hide the others."""
    specs: list[ModelSpec] = []
    errors: dict[Path, SpecError] = {}
    for path in paths:
        try:
            specs.append(load_spec(path))
        except SpecError as err:
            errors[path] = err
    return specs, errors
