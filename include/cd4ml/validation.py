"""Data validation with Great Expectations 1.x: a suite built from the spec and the accepted data.

`learn_reference` and `expectation_configs` are pure; `validate_frame` runs GX (ephemeral, or a
file context under the model's zone so Data Docs are built) and turns its result into sentences a
data owner can act on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cd4ml.spec import ModelSpec

log = logging.getLogger(__name__)

NUMERIC_DTYPES = [
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
    "float16", "float32", "float64", "Float32", "Float64",
]  # fmt: skip


@dataclass(frozen=True)
class Reference:
    """What accepted data taught us: numeric ranges, categorical domains, target classes."""

    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    categories: dict[str, list[Any]] = field(default_factory=dict)
    rows: int = 0


@dataclass(frozen=True)
class ValidationOutcome:
    success: bool
    evaluated: int
    failed: int
    problems: list[str]
    docs_url: str | None = None

    def summary(self) -> str:
        if self.success:
            return f"passed {self.evaluated} expectations"
        return f"failed {self.failed} of {self.evaluated} expectations"


def normalise(spec: ModelSpec, frame: pd.DataFrame) -> pd.DataFrame:
    """Categoricals compare as strings everywhere (validation, training, serving); nulls stay null."""
    out = frame.copy()
    for col in spec.categorical:
        if col in out.columns:
            out[col] = out[col].map(lambda v: v if pd.isna(v) else str(v)).astype(object)
    return out


def learn_reference(spec: ModelSpec, accepted: pd.DataFrame) -> Reference:
    if accepted.empty:
        return Reference()
    tol = spec.validation.range_tolerance
    ranges: dict[str, tuple[float, float]] = {}
    numeric_cols = list(spec.numerical) + ([spec.target] if spec.task == "regression" else [])
    for col in numeric_cols:
        values = pd.to_numeric(accepted[col], errors="coerce").dropna()
        if values.empty:
            continue
        lo, hi = float(values.min()), float(values.max())
        span = max(hi - lo, abs(hi), 1.0)
        ranges[col] = (lo - tol * span, hi + tol * span)
    categories: dict[str, list[Any]] = {}
    if spec.validation.learn_categories:
        for col in spec.categorical:
            categories[col] = sorted(str(v) for v in accepted[col].dropna().unique())
    if spec.task == "classification":
        # Classes keep their own type (0/1 stay ints), so a batch that labels them "yes"/"no" fails.
        categories[spec.target] = sorted(accepted[spec.target].dropna().unique().tolist(), key=str)
    return Reference(ranges=ranges, categories=categories, rows=len(accepted))


def _bounds(
    spec: ModelSpec, reference: Reference, col: str
) -> tuple[tuple[float | None, float | None], tuple[float | None, float | None]]:
    """(declared bounds, learned bounds for the sides the spec leaves open)."""
    declared = next((f for f in spec.features.numerical if f.name == col), None)
    d_lo = declared.min if declared else None
    d_hi = declared.max if declared else None
    learned = reference.ranges.get(col)
    l_lo = learned[0] if learned and d_lo is None else None
    l_hi = learned[1] if learned and d_hi is None else None
    return (d_lo, d_hi), (l_lo, l_hi)


def expectation_configs(
    spec: ModelSpec, reference: Reference, columns: list[str]
) -> list[tuple[str, dict[str, Any]]]:
    """The suite as (GX expectation class name, kwargs) pairs; only columns present get column checks."""
    v = spec.validation
    present = set(columns)
    mostly_non_null = round(1.0 - v.max_null_fraction, 6)
    mostly_in_range = round(1.0 - v.max_outside_learned_range, 6)
    out: list[tuple[str, dict[str, Any]]] = [
        (
            "ExpectTableColumnsToMatchSet",
            {"column_set": spec.columns, "exact_match": not v.allow_extra_columns},
        ),
        ("ExpectTableRowCountToBeBetween", {"min_value": v.min_rows, "max_value": v.max_rows}),
    ]
    for col in spec.numerical:
        if col not in present:
            continue
        out.append(("ExpectColumnValuesToBeInTypeList", {"column": col, "type_list": NUMERIC_DTYPES}))
        out.append(("ExpectColumnValuesToNotBeNull", {"column": col, "mostly": mostly_non_null}))
        (lo, hi), (learned_lo, learned_hi) = _bounds(spec, reference, col)
        if lo is not None or hi is not None:  # the spec's bounds: every row
            out.append(("ExpectColumnValuesToBeBetween", {"column": col, "min_value": lo, "max_value": hi}))
        if learned_lo is not None or learned_hi is not None:
            # Learned from past data: a drifting world may step a little outside; a broken file won't.
            out.append((
                "ExpectColumnValuesToBeBetween",
                {"column": col, "min_value": learned_lo, "max_value": learned_hi, "mostly": mostly_in_range},
            ))  # fmt: skip
    for feat in spec.features.categorical:
        if feat.name not in present:
            continue
        out.append(("ExpectColumnValuesToNotBeNull", {"column": feat.name, "mostly": mostly_non_null}))
        domain = feat.values if feat.values is not None else reference.categories.get(feat.name)
        if domain:
            out.append(("ExpectColumnValuesToBeInSet", {"column": feat.name, "value_set": list(domain)}))
    if spec.target in present:
        out.append(("ExpectColumnValuesToNotBeNull", {"column": spec.target}))
        if spec.task == "classification":
            out.append(("ExpectColumnUniqueValueCountToBeBetween", {"column": spec.target, "min_value": 2}))
            classes = reference.categories.get(spec.target)
            if classes:
                out.append(("ExpectColumnValuesToBeInSet", {"column": spec.target, "value_set": classes}))
        else:
            out.append(
                ("ExpectColumnValuesToBeInTypeList", {"column": spec.target, "type_list": NUMERIC_DTYPES})
            )
            out.append(("ExpectColumnStdevToBeBetween", {"column": spec.target, "min_value": 1e-12}))
            if spec.target in reference.ranges:
                lo, hi = reference.ranges[spec.target]
                out.append(
                    (
                        "ExpectColumnValuesToBeBetween",
                        {"column": spec.target, "min_value": lo, "max_value": hi},
                    )
                )
    if spec.timestamp and spec.timestamp in present:
        out.append(("ExpectColumnValuesToNotBeNull", {"column": spec.timestamp}))
        out.append(("ExpectColumnValuesToBeDateutilParseable", {"column": spec.timestamp}))
    if set(spec.columns) <= present:
        out.append(
            (
                "ExpectCompoundColumnsToBeUnique",
                {"column_list": spec.columns, "mostly": round(1.0 - v.max_duplicate_fraction, 6)},
            )
        )
    for extra in v.expectations:
        out.append((extra.expectation, dict(extra.kwargs)))
    return out


def _num(value: Any, unbounded: str = "None") -> str:
    if value is None:
        return unbounded
    return f"{value:.6g}" if isinstance(value, float | int) else str(value)


def _describe(kind: str, kwargs: dict[str, Any], result: dict[str, Any], exception: str | None) -> str:
    col = kwargs.get("column")
    where = f"column '{col}'" if col else "table"
    if exception:
        return f"{where}: {kind} could not be evaluated: {exception}"
    unexpected = result.get("unexpected_count")
    total = result.get("element_count")
    examples = result.get("partial_unexpected_list") or []
    sample = ", ".join(repr(x) for x in list(dict.fromkeys(map(str, examples)))[:5])
    counted = f"{unexpected} of {total} rows" if unexpected is not None and total is not None else ""
    observed = result.get("observed_value")
    if kind == "ExpectTableColumnsToMatchSet":
        details = result.get("details", {}).get("mismatched", {})
        parts = []
        if details.get("unexpected"):
            parts.append(f"unexpected columns {sorted(details['unexpected'])}")
        if details.get("missing"):
            parts.append(f"missing columns {sorted(details['missing'])}")
        return "table: " + ("; ".join(parts) or f"columns {observed} do not match {kwargs.get('column_set')}")
    if kind == "ExpectTableRowCountToBeBetween":
        return f"table: has {observed} rows; at least {kwargs.get('min_value')} required" + (
            f" and at most {kwargs['max_value']}" if kwargs.get("max_value") else ""
        )
    if kind == "ExpectColumnValuesToNotBeNull":
        allowed = 1 - kwargs.get("mostly", 1.0)
        return f"{where}: {counted} are null; at most {allowed:.1%} allowed"
    if kind == "ExpectColumnValuesToBeInTypeList":
        return f"{where}: has type {observed or sample}; expected a numeric type"
    if kind == "ExpectColumnValuesToBeBetween":
        allowed = 1 - kwargs.get("mostly", 1.0)
        return (
            f"{where}: {counted} outside [{_num(kwargs.get('min_value'), '-inf')}, "
            f"{_num(kwargs.get('max_value'), 'inf')}]"
            + (f" (e.g. {sample})" if sample else "")
            + (
                f"; at most {allowed:.1%} allowed outside the range learned from accepted data"
                if allowed
                else ""
            )
        )
    if kind == "ExpectColumnValuesToBeInSet":
        return f"{where}: {counted} not in the known values {kwargs.get('value_set')}" + (
            f" (found {sample})" if sample else ""
        )
    if kind == "ExpectColumnUniqueValueCountToBeBetween":
        return f"{where}: has {observed} distinct value(s); a target needs at least {kwargs.get('min_value')}"
    if kind == "ExpectColumnStdevToBeBetween":
        return f"{where}: is constant (standard deviation {observed})"
    if kind == "ExpectCompoundColumnsToBeUnique":
        return f"table: {counted} are duplicated rows; at most {1 - kwargs.get('mostly', 1.0):.1%} allowed"
    if kind == "ExpectColumnValuesToBeDateutilParseable":
        return f"{where}: {counted} are not timestamps" + (f" (e.g. {sample})" if sample else "")
    detail = counted or (f"observed {observed}" if observed is not None else "")
    return (
        f"{where}: {kind} failed"
        + (f": {detail}" if detail else "")
        + (f" (e.g. {sample})" if sample else "")
    )


def validate_frame(
    spec: ModelSpec,
    frame: pd.DataFrame,
    reference: Reference,
    *,
    batch_name: str,
    context_root: Path | None = None,
) -> ValidationOutcome:
    """Run the suite on one batch. With `context_root`, results go to a GX file context and Data Docs."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    configs = expectation_configs(spec, reference, [str(c) for c in frame.columns])
    ctx: Any
    if context_root is not None:
        context_root.mkdir(parents=True, exist_ok=True)
        ctx = gx.get_context(mode="file", project_root_dir=str(context_root))
    else:
        ctx = gx.get_context(mode="ephemeral")
    # Progress bars would flood the task logs.
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = ctx.data_sources.add_or_update_pandas(name=f"{spec.name}_landing")
    asset = next((a for a in source.assets if a.name == "batches"), None) or source.add_dataframe_asset(
        "batches"
    )
    batch_def = next((b for b in asset.batch_definitions if b.name == "whole"), None)
    batch_def = batch_def or asset.add_batch_definition_whole_dataframe("whole")

    expectations = []
    for kind, kwargs in configs:
        cls = getattr(gx.expectations, kind, None)
        if cls is None:
            raise ValueError(
                f"spec {spec.name}: validation.expectations: unknown Great Expectations class {kind!r}"
            )
        expectations.append(cls(**{k: v for k, v in kwargs.items() if v is not None or k == "max_value"}))
    # Built whole, not with add_expectation: once a suite of this name is stored (file context),
    # every add_expectation rewrites the stored suite, which made each validation O(n^2) slow.
    suite = ctx.suites.add_or_update(
        gx.ExpectationSuite(name=f"{spec.name}_suite", expectations=expectations)
    )
    definition = ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=f"{spec.name}_batch", data=batch_def, suite=suite)
    )
    actions: list[Any] = [UpdateDataDocsAction(name="data_docs")] if context_root is not None else []
    checkpoint = ctx.checkpoints.add_or_update(
        gx.Checkpoint(
            name=f"{spec.name}_checkpoint",
            validation_definitions=[definition],
            actions=actions,
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 10},
        )
    )
    result = checkpoint.run(
        batch_parameters={"dataframe": frame}, run_id=gx.RunIdentifier(run_name=batch_name)
    )
    problems: list[str] = []
    evaluated = failed = 0
    for run_result in result.run_results.values():
        for res in run_result.results:
            evaluated += 1
            if res.success:
                continue
            failed += 1
            cfg = res.expectation_config
            if cfg is None:
                raise ValueError("GX returned a result without its expectation configuration")
            info = res.exception_info or {}
            raised = info.get("raised_exception") if isinstance(info, dict) else False
            message = info.get("exception_message") if raised else None
            problems.append(
                _describe(_class_name(cfg.type), dict(cfg.kwargs), dict(res.result or {}), message)
            )
    docs_url = None
    if context_root is not None:
        # The page of this very validation result, not the site's index.
        key = next(iter(result.run_results), None)
        urls = ctx.get_docs_sites_urls(resource_identifier=key) if key else ctx.get_docs_sites_urls()
        docs_url = urls[0]["site_url"] if urls else None
    return ValidationOutcome(bool(result.success), evaluated, failed, problems, docs_url)


def _class_name(snake: str) -> str:
    return "".join(part.capitalize() for part in snake.split("_"))
