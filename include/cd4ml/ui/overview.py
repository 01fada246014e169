"""What the Models view and the pipeline metrics show, read from MLflow and the data root.

One place computes the state of every model (champion and lineage, decisions with their evidence,
the history of promotions, deployments, rollbacks and retractions, drift checks and the live
performance each check measured on labelled traffic); the Airflow plugin renders it as a page
inside the Airflow UI (Jinja2 templates in cd4ml/ui/templates, autoescaped), as JSON, and as
Prometheus text (a prometheus_client collector). Nothing here writes.

The history is the model's append-only event log (`registry.events`); versions registered before
it existed still show what their tags kept (`cd4ml.promoted_at`, `cd4ml.deployment`, ...), unless
the log has the same event. Evidence (decision and validation record) is read with
`registry.read_evidence` for the versions the view shows only, cached per process once a version's
artifacts are complete; versions registered before evidence moved to artifacts fall back to their tags.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

from jinja2 import Environment, PackageLoader
from markupsafe import Markup
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from cd4ml import registry
from cd4ml.core.paths import ModelPaths
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec
from cd4ml.data import landing
from cd4ml.steps import batch_score, monitor

LINEAGE_TAGS = (
    "cd4ml.data_fingerprint", "cd4ml.spec_hash", "cd4ml.code_version", "cd4ml.lock_hash",
    "cd4ml.trained_through", "cd4ml.rows_train", "cd4ml.airflow_run_id", "cd4ml.trigger_reason",
)  # fmt: skip


@dataclass
class VersionInfo:
    version: str
    created_ms: int
    run_id: str | None
    aliases: list[str]
    decision: str | None
    evidence: dict[str, Any]
    validation: dict[str, Any]
    lineage: dict[str, str]
    tags: dict[str, str] = field(repr=False)


@dataclass
class Event:
    when: str
    version: str
    what: str
    detail: str
    who: str = ""
    kind: str = ""  # promotion, deployment, rollback, retraction (registry.history kinds)


# Not counted as deployment outcomes: "retrying" and "staged" have not settled (the same deployment
# ends deployed or failed later); "rollback requested" is an old tag's note beside the rollback's
# own record. "staging failed" is settled: the challenger never reached live traffic.
_UNCOUNTED = frozenset({"retrying", "staged", "rollback requested"})


@dataclass
class Totals:
    """Counts over complete sources (every version, drift check and run record), not the view's
    truncated lists: the metrics' counters are built from these."""

    decisions: dict[str, int]
    promotions: int
    deployments: dict[str, int]
    drift_checks: dict[str, int]  # by "true"/"false": the check asked for retraining or not
    training_runs: dict[str, int]  # by "true"/"false": the run trained a model or not
    files_received: dict[str, int]  # accepted (including later retracted) or quarantined on arrival
    batch_runs: dict[str, int] = field(default_factory=dict)  # `<model>__score` runs by outcome
    batch_rows: dict[str, int] = field(default_factory=dict)  # rows batch-scored or rejected
    batch_inputs: dict[str, int] = field(default_factory=dict)  # inputs scored or quarantined


def totals_of(
    versions: list[VersionInfo],
    drift: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    files: dict[str, int],
    history: Iterable[registry.HistoryEvent] = (),
    batch: Iterable[dict[str, Any]] = (),
) -> Totals:
    """Counts over every version and every event in the history: each settled deployment or
    rollback counts once, so the counters only grow as the log does. `batch`: every recorded
    batch-scoring run (`batch_score.list_runs`)."""
    deployments: Counter[str] = Counter()
    promotions = 0
    for e in _events(versions, history):
        if e.kind == "promotion":
            promotions += 1
        elif e.kind in ("deployment", "rollback") and e.what not in _UNCOUNTED:
            deployments[e.what] += 1
    triggered = sum(bool((c.get("decision") or {}).get("trigger")) for c in drift)
    trained = sum(bool(r.get("trained")) for r in runs)
    batch_runs: Counter[str] = Counter()
    batch_rows: Counter[str] = Counter()
    batch_inputs: Counter[str] = Counter()
    for b in batch:
        batch_runs[str(b.get("outcome") or "unknown")] += 1
        batch_rows.update(scored=int(b.get("rows_scored") or 0), rejected=int(b.get("rows_rejected") or 0))
        batch_inputs.update(scored=len(b.get("inputs") or []), quarantined=len(b.get("quarantined") or []))
    return Totals(
        decisions=dict(Counter(v.decision or "none" for v in versions)),
        promotions=promotions,
        deployments=dict(deployments),
        drift_checks={"true": triggered, "false": len(drift) - triggered},
        training_runs={"true": trained, "false": len(runs) - trained},
        files_received={
            "accepted": files.get("accepted", 0) + files.get("retracted", 0),
            "quarantined": files.get("quarantined", 0),
        },
        batch_runs=dict(batch_runs),
        batch_rows=dict(batch_rows),
        batch_inputs=dict(batch_inputs),
    )


@dataclass
class ModelOverview:
    name: str
    owner: str | None
    metric: str
    champion: VersionInfo | None
    versions: list[VersionInfo]
    events: list[Event]
    drift: list[dict[str, Any]]
    drift_threshold: float
    files: dict[str, int]
    runs: list[dict[str, Any]] = field(default_factory=list)
    retractions: list[dict[str, Any]] = field(default_factory=list)
    totals: Totals | None = None  # None: count the lists given (tests build overviews by hand)
    business: dict[str, str] | None = None  # the spec's business value: {"name", "unit"}
    shadow: dict[str, Any] | None = None  # the shadow version's agreement, latency, errors
    canary: dict[str, Any] | None = None  # the canary version, its policy and both sides' live counts
    batch_runs: list[dict[str, Any]] = field(default_factory=list)  # `<model>__score` runs, newest first

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for v in [out["champion"], *out["versions"]]:
            if v:
                v.pop("tags", None)
        return out


def _json_tag(tags: dict[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(tags.get(key) or "{}")
    except json.JSONDecodeError:
        return {"unreadable": tags.get(key)}
    return value if isinstance(value, dict) else {"value": value}


def _version_info(mv: Any) -> VersionInfo:
    tags = dict(mv.tags or {})
    return VersionInfo(
        version=str(mv.version),
        created_ms=int(mv.creation_timestamp or 0),
        run_id=mv.run_id,
        aliases=sorted(getattr(mv, "aliases", None) or []),
        decision=tags.get("cd4ml.decision"),
        evidence={},  # filled for the versions the view shows (`_with_evidence`)
        validation={},
        lineage={k.removeprefix("cd4ml."): tags[k] for k in LINEAGE_TAGS if k in tags},
        tags=tags,
    )


def _history_event(e: registry.HistoryEvent) -> Event:
    d = e.details
    what = {"promotion": "promoted", "retraction": "retracted"}.get(e.kind, e.outcome)
    if e.kind in ("canary", "approval") and e.outcome == e.kind:  # their details say `phase` / `decision`
        what = f"{e.kind} {d.get('phase') or d.get('decision') or ''}".strip()
    if e.kind == "promotion":
        detail = f"previous champion: {d.get('previous') or 'none'}" + (f"; {e.why}" if e.why else "")
    elif e.kind == "rollback":
        detail = f"{e.why} (from v{d.get('from') or 'none'})"
        if d.get("error"):
            detail = f"{detail}: {d['error']}; {d.get('restored', '')}".rstrip("; ")
    elif e.kind == "retraction":
        detail = f"{d.get('file') or '?'}: {e.why}"
    else:
        detail = str(d.get("error") or e.why)
        if d.get("rollback"):
            detail = f"{detail}; {d['rollback']}"
    return Event(e.when, e.version or "", what, detail, who=e.who, kind=e.kind)


def _tag_events(v: VersionInfo) -> list[Event]:
    """What a version's tags kept of its history, as versions registered before the event log
    recorded it (each tag holds the last write only)."""
    t, events = v.tags, []
    if t.get("cd4ml.promoted_at"):
        previous = t.get("cd4ml.previous_champion", "none")
        events.append(Event(t["cd4ml.promoted_at"], v.version, "promoted", f"previous champion: {previous}",
                            kind="promotion"))  # fmt: skip
    deployment = _json_tag(t, "cd4ml.deployment")
    if deployment:
        detail = deployment.get("error") or deployment.get("reason") or ""
        if not detail and deployment.get("golden_rows"):
            detail = f"smoke test passed on {deployment['golden_rows']} golden rows"
        if deployment.get("rollback"):
            detail = f"{detail}; {deployment['rollback']}"
        outcome = str(deployment.get("outcome", "deployment"))
        events.append(Event(str(deployment.get("when", "")), v.version, outcome, detail,
                            who=str(deployment.get("who") or ""),
                            kind="rollback" if outcome.startswith("roll") else "deployment"))  # fmt: skip
    if t.get("cd4ml.rolled_back_at"):
        why = f"{t.get('cd4ml.rollback_reason', '')} (from v{t.get('cd4ml.previous_champion')})"
        events.append(Event(t["cd4ml.rolled_back_at"], v.version, "rollback requested", why, kind="rollback"))
    return events


def _events(versions: list[VersionInfo], history: Iterable[registry.HistoryEvent] = ()) -> list[Event]:
    """Promotions, deployments, rollbacks and retractions, newest first: the event log, plus what
    older versions' tags kept that the log does not have (same version, kind and time)."""
    events = [_history_event(e) for e in history]
    logged = {(e.version, e.kind, e.when) for e in events}
    for v in versions:
        events.extend(e for e in _tag_events(v) if (e.version, e.kind, e.when) not in logged)
    return sorted(events, key=lambda e: e.when, reverse=True)


def _file_counts(spec: ModelSpec, settings: Settings) -> dict[str, int]:
    zone = ModelPaths.for_model(settings, spec.name)
    count = lambda d, pattern: sum(1 for _ in d.glob(pattern)) if d.is_dir() else 0  # noqa: E731
    retracted = len(landing.list_retractions(zone))
    return {
        "waiting": sum(1 for p in zone.landing.iterdir() if landing.is_candidate(p))
        if zone.landing.is_dir()
        else 0,
        "accepted": len(landing.accepted_hashes(zone)) if zone.accepted.is_dir() else 0,
        # Rejected on arrival; a retracted file was accepted first and is counted apart.
        "quarantined": count(zone.quarantine, "*.reason.json") - retracted,
        "retracted": retracted,
    }


def _retractions(spec: ModelSpec, settings: Settings, limit: int) -> list[dict[str, Any]]:
    """Who took which accepted file back, when and why (newest first), from the reason files."""
    keys = ("when", "who", "file", "sha256", "rows", "reason", "accepted_at")
    zone = ModelPaths.for_model(settings, spec.name)
    return [{k: r.get(k) for k in keys} for r in landing.list_retractions(zone)[:limit]]


def _run_outcomes(spec: ModelSpec, settings: Settings) -> list[dict[str, Any]]:
    """Why every recorded training run trained or not (runs/<run key>/outcome.json), newest first."""
    outcomes = ModelPaths.for_model(settings, spec.name).run_outcomes()
    paths = sorted(outcomes, key=lambda p: p.stat().st_mtime, reverse=True)
    out = []
    for path in paths:
        try:
            out.append({**json.loads(path.read_text()), "mtime": path.stat().st_mtime})
        except (OSError, json.JSONDecodeError):
            continue
    return out


def _with_evidence(client: Any, name: str, found: list[Any], shown: list[VersionInfo]) -> None:
    """Fill the shown versions' decision evidence and validation record (`registry.read_evidence`:
    artifacts, read once per process per version; older versions' JSON tags)."""
    by_version = {str(mv.version): mv for mv in found}
    for v in shown:
        try:
            evidence = registry.read_evidence(client, name, by_version[v.version], cached=True)
        except registry.EvidenceMissingError as err:
            v.evidence, v.validation = {"unreadable": str(err)}, {}
            continue
        # The cached records are shared: the view gets its own top-level copies.
        v.evidence, v.validation = dict(evidence.decision), dict(evidence.validation)


def model_overview(spec: ModelSpec, settings: Settings, *, limit: int = 25) -> ModelOverview:
    from mlflow.exceptions import MlflowException

    client = registry.client(settings.mlflow_tracking_uri)
    found: list[Any]
    try:
        found = list(client.search_model_versions(f"name='{spec.name}'", max_results=1000))
    except MlflowException:
        found = []
    history = registry.events(client, spec.name) if found else []
    versions = sorted((_version_info(mv) for mv in found), key=lambda v: int(v.version), reverse=True)
    # Search results carry no aliases; ask for the ones cd4ml moves.
    for alias in (registry.CHAMPION, registry.CHALLENGER, registry.SHADOW, registry.CANARY):
        mv = registry.version_by_alias(client, spec.name, alias) if versions else None
        for v in versions:
            if mv is not None and v.version == str(mv.version) and alias not in v.aliases:
                v.aliases.append(alias)
    champion = next((v for v in versions if registry.CHAMPION in v.aliases), None)
    shown = versions[:limit] + ([champion] if champion and champion not in versions[:limit] else [])
    _with_evidence(client, spec.name, found, shown)
    drift = monitor.history(settings, spec.name)
    runs = _run_outcomes(spec, settings)
    files = _file_counts(spec, settings)
    batch = batch_score.list_runs(ModelPaths.for_model(settings, spec.name))
    return ModelOverview(
        name=spec.name,
        owner=spec.owner,
        metric=spec.metric.name,
        champion=champion,
        versions=versions[:limit],
        events=_events(versions, history)[:limit],
        drift=drift[-200:],
        drift_threshold=spec.drift.threshold,
        files=files,
        runs=runs[:limit],
        retractions=_retractions(spec, settings, limit),
        totals=totals_of(versions, drift, runs, files, history, batch),
        business=_business_label(spec),
        shadow=_shadow(settings, spec.name, versions),
        canary=_canary(spec, settings, versions),
        batch_runs=[_batch_summary(b) for b in batch[:limit]],
    )


def _batch_summary(record: dict[str, Any]) -> dict[str, Any]:
    """A batch run as the view lists it: the run's figures, its inputs' names and outputs, and
    why anything was quarantined or rejected (the full record stays in run.json)."""
    inputs = record.get("inputs") or []
    keys = ("run_id", "run_time", "trigger", "version", "outcome", "rows_scored", "rows_rejected",
            "seconds", "rows_per_second", "error", "record")  # fmt: skip
    return {
        **{k: record.get(k) for k in keys},
        "inputs": [
            {k: i.get(k) for k in ("name", "rows", "scored", "rejected", "output_dir", "problems")}
            for i in inputs
        ],
        "quarantined": [{k: q.get(k) for k in ("name", "reason")} for q in record.get("quarantined") or []],
    }


def _shadow(settings: Settings, name: str, versions: list[VersionInfo]) -> dict[str, Any] | None:
    """The version holding the `shadow` alias and what the service logged of it, if any."""
    from cd4ml.data.shadow_log import read_shadow_log, shadow_summary

    shadow = next((v for v in versions if registry.SHADOW in v.aliases), None)
    if shadow is None or registry.CHAMPION in shadow.aliases:
        return None
    summary = shadow_summary(read_shadow_log(settings.data_dir, name, shadow.version))
    return {"version": shadow.version, "since": shadow.tags.get("cd4ml.shadow_since", ""), **summary}


def _canary(spec: ModelSpec, settings: Settings, versions: list[VersionInfo]) -> dict[str, Any] | None:
    """The version holding the `canary` alias, its policy, and the service's live counts of both
    sides (`/v1/models/{m}/canary`; "service unreachable" if it does not answer within 2 s)."""
    import httpx

    canary = next((v for v in versions if registry.CANARY in v.aliases), None)
    if canary is None or registry.CHAMPION in canary.aliases:
        return None
    policy = spec.deployment.canary
    out: dict[str, Any] = {
        "version": canary.version, "since": canary.tags.get("cd4ml.canary_since", ""),
        "fraction": policy.fraction, "min_requests": policy.min_requests,
        "max_duration_minutes": policy.max_duration_minutes, "sticky_key": policy.sticky_key,
        "arms": None, "service_error": None,
    }  # fmt: skip
    try:
        resp = httpx.get(f"{settings.service_url}/v1/models/{spec.name}/canary", timeout=2)
        body = resp.json() if resp.status_code == 200 else {}
        live = body.get("canary") or {}
        if str(live.get("version")) == canary.version:
            out["arms"] = live.get("arms")
            out["seconds"] = live.get("seconds")
        else:
            refused = (body.get("refused_canary") or {}).get("why")
            out["service_error"] = refused or f"the service does not route to it (HTTP {resp.status_code})"
    except (httpx.HTTPError, ValueError) as err:
        out["service_error"] = f"service unreachable at {settings.service_url} ({type(err).__name__})"
    return out


def _business_label(spec: ModelSpec) -> dict[str, str] | None:
    business = spec.business
    return None if business is None else {"name": business.name, "unit": business.unit}


def live_of(check: dict[str, Any] | None) -> dict[str, Any]:
    """A check's live performance (empty for checks made before it was measured)."""
    live = (check or {}).get("live")
    return live if isinstance(live, dict) else {}


def champion_score(o: ModelOverview) -> float | None:
    """The champion's holdout score at promotion: the reference the live metric is held to."""
    value = o.champion.evidence.get("challenger_score") if o.champion else None
    return float(value) if isinstance(value, int | float) else None


def champion_since(o: ModelOverview) -> float | None:
    """When the champion alias last moved to the champion (a promotion or a rollback), as epoch
    seconds, from the version's own tags: the view's event list may be cut before it."""
    if o.champion is None:
        return None
    moved = [o.champion.tags.get(k) for k in ("cd4ml.promoted_at", "cd4ml.rolled_back_at")]
    times = [t for t in (_epoch(m) for m in moved if m) if t is not None]
    return max(times) if times else None


def _epoch(text: str) -> float | None:
    """An ISO time as epoch seconds (naive = UTC); None for text that is no time (a hand-edited
    tag must not break a scrape of every model's figures)."""
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


# -- Prometheus ------------------------------------------------------------------------------------


def _number(value: float) -> str:
    """Integers as integers; other values with every digit (a timestamp must not lose seconds)."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


class PipelineCollector(Collector):
    """The pipeline's figures for one scrape, read from the overviews' complete totals.

    Counters come from `ModelOverview.totals`, which model_overview counts over every version, every
    drift check and every run record before the view's lists are cut, so they do not stall or drop
    when history grows past what the page shows.
    """

    def __init__(self, overviews: list[ModelOverview]) -> None:
        self.overviews = overviews

    def collect(self) -> Iterator[Metric]:
        from datetime import datetime

        champion = GaugeMetricFamily(
            "cd4ml_champion_version",
            "Registered version the champion alias points at (0: none).",
            labels=["model"],
        )
        versions = GaugeMetricFamily(
            "cd4ml_model_versions",
            "Registered versions by the evaluation gate's decision.",
            labels=["model", "decision"],
        )
        promotions = CounterMetricFamily(
            "cd4ml_promotions", "Versions promoted to champion.", labels=["model"]
        )
        deployments = CounterMetricFamily(
            "cd4ml_deployments",
            "Versions by settled deployment outcome "
            "(deployed, staging failed, failed, rolled back, rollback failed).",
            labels=["model", "outcome"],
        )
        files = GaugeMetricFamily(
            "cd4ml_files", "Data files by state: waiting in landing, accepted, quarantined, retracted.",
            labels=["model", "state"],
        )  # fmt: skip
        received = CounterMetricFamily(
            "cd4ml_files_received",
            "Landed files by what validation did with them (accepted counts files retracted later too).",
            labels=["model", "outcome"],
        )
        runs = CounterMetricFamily(
            "cd4ml_training_runs",
            "Recorded training runs by whether they trained.",
            labels=["model", "trained"],
        )
        share = GaugeMetricFamily("cd4ml_drift_share", "Share of drifted features in the last drift check.",
                                  labels=["model"])  # fmt: skip
        checks = CounterMetricFamily(
            "cd4ml_drift_checks",
            "Drift checks by outcome (retrain triggered or not).",
            labels=["model", "retrain"],
        )
        last_check = GaugeMetricFamily(
            "cd4ml_last_drift_check_timestamp_seconds",
            "End of the last drift check's window.",
            labels=["model"],
        )
        live = _LiveFamilies()
        batch = _BatchFamilies()
        for o in self.overviews:
            live.add(o)
            batch.add(o)
            t = o.totals or totals_of(o.versions, o.drift, o.runs, o.files)
            champion.add_metric([o.name], float(o.champion.version) if o.champion else 0.0)
            for decision in ("promote", "reject", "none"):
                versions.add_metric([o.name, decision], t.decisions.get(decision, 0))
            promotions.add_metric([o.name], t.promotions)
            for outcome, n in sorted(t.deployments.items()):
                deployments.add_metric([o.name, outcome], n)
            for state, n in o.files.items():
                files.add_metric([o.name, state], n)
            for outcome, n in sorted(t.files_received.items()):
                received.add_metric([o.name, outcome], n)
            for trained in ("true", "false"):
                runs.add_metric([o.name, trained], t.training_runs.get(trained, 0))
                checks.add_metric([o.name, trained], t.drift_checks.get(trained, 0))
            if o.drift:
                last = o.drift[-1]
                share.add_metric([o.name], float(last.get("share") or 0.0))
                end = (last.get("window") or {}).get("end")
                if end:
                    ts = datetime.fromisoformat(str(end).replace("Z", "+00:00")).timestamp()
                    last_check.add_metric([o.name], ts)
        yield from (
            champion,
            versions,
            promotions,
            deployments,
            files,
            received,
            runs,
            share,
            checks,
            last_check,
            *live.families(),
            *batch.families(),
        )


class _BatchFamilies:
    """`<model>__score` runs: counters over every recorded run, gauges of the last one."""

    def __init__(self) -> None:
        self.runs = CounterMetricFamily(
            "cd4ml_batch_runs", "Batch-scoring runs by outcome (scored, failed).", labels=["model", "outcome"]
        )
        self.rows = CounterMetricFamily(
            "cd4ml_batch_rows",
            "Rows of batch-scored inputs: scored, or rejected by the row checks (rejects files).",
            labels=["model", "outcome"],
        )
        self.inputs = CounterMetricFamily(
            "cd4ml_batch_inputs",
            "Batch-scoring inputs (files or folders): scored, or quarantined as unreadable.",
            labels=["model", "outcome"],
        )
        self.last = GaugeMetricFamily(
            "cd4ml_batch_last_run_timestamp_seconds", "When the last batch-scoring run was started.",
            labels=["model"],
        )  # fmt: skip
        self.success = GaugeMetricFamily(
            "cd4ml_batch_last_success_timestamp_seconds",
            "When the last batch-scoring run that scored rows was started (alert on its age).",
            labels=["model"],
        )
        self.failed = GaugeMetricFamily(
            "cd4ml_batch_last_run_failed",
            "1 when the last batch-scoring run failed, else 0.",
            labels=["model"],
        )
        self.speed = GaugeMetricFamily(
            "cd4ml_batch_last_run_rows_per_second", "Rows scored per second in the last batch-scoring run.",
            labels=["model"],
        )  # fmt: skip

    def add(self, o: ModelOverview) -> None:
        t = o.totals
        runs = t.batch_runs if t else dict(Counter(str(b.get("outcome")) for b in o.batch_runs))
        for outcome in ("scored", "failed"):
            self.runs.add_metric([o.name, outcome], runs.get(outcome, 0))
        if t is not None:
            for outcome in ("scored", "rejected"):
                self.rows.add_metric([o.name, outcome], t.batch_rows.get(outcome, 0))
            for outcome in ("scored", "quarantined"):
                self.inputs.add_metric([o.name, outcome], t.batch_inputs.get(outcome, 0))
        if not o.batch_runs:
            return
        last = o.batch_runs[0]
        when = _epoch(str(last.get("run_time") or ""))
        if when is not None:
            self.last.add_metric([o.name], when)
        self.failed.add_metric([o.name], 1.0 if last.get("outcome") == "failed" else 0.0)
        success = next((b for b in o.batch_runs if b.get("outcome") == "scored"), None)
        succeeded = _epoch(str(success.get("run_time") or "")) if success else None
        if succeeded is not None:
            self.success.add_metric([o.name], succeeded)
        if last.get("rows_per_second"):
            self.speed.add_metric([o.name], float(last["rows_per_second"]))

    def families(self) -> tuple[Metric, ...]:
        return (self.runs, self.rows, self.inputs, self.last, self.success, self.failed, self.speed)


class _LiveFamilies:
    """The live-performance gauges: the last drift check's figures (`live` in its history line)
    and the champion's reference. A figure the last check could not judge (no or too few labels)
    is left out, not exported as 0, so an alert on it does not fire on missing labels."""

    def __init__(self) -> None:
        self.metric = GaugeMetricFamily(
            "cd4ml_live_metric",
            "The champion's primary metric on labelled served traffic in the last check's window.",
            labels=["model", "metric"],
        )
        self.baseline = GaugeMetricFamily(
            "cd4ml_live_metric_baseline",
            "The champion's primary metric on its holdout at promotion (the live metric's reference).",
            labels=["model", "metric"],
        )
        self.drop = GaugeMetricFamily(
            "cd4ml_live_metric_drop",
            "Baseline minus live metric, sign-adjusted so that positive = worse than at promotion.",
            labels=["model"],
        )
        self.significant = GaugeMetricFamily(
            "cd4ml_live_metric_drop_significant",
            "1 when even the bootstrap interval's better bound is worse than the baseline by more "
            "than drift.performance_drop, else 0.",
            labels=["model"],
        )
        self.coverage = GaugeMetricFamily(
            "cd4ml_live_label_coverage",
            "Share of the champion's served rows in the live window that have a label (0..1).",
            labels=["model"],
        )
        self.business = GaugeMetricFamily(
            "cd4ml_business_value",
            "Mean business value per served prediction on labelled traffic, in the spec's business.unit.",
            labels=["model"],
        )
        self.drift = GaugeMetricFamily(
            "cd4ml_drift_detected", "1 when the last drift check found drift, else 0.", labels=["model"]
        )
        self.since = GaugeMetricFamily(
            "cd4ml_champion_promoted_timestamp_seconds",
            "When the champion alias last moved to the serving version (promotion or rollback).",
            labels=["model"],
        )

    def add(self, o: ModelOverview) -> None:
        baseline = champion_score(o)
        if baseline is not None:
            self.baseline.add_metric([o.name, o.metric], baseline)
        since = champion_since(o)
        if since is not None:
            self.since.add_metric([o.name], since)
        if not o.drift:
            return
        last = o.drift[-1]
        self.drift.add_metric([o.name], 1.0 if (last.get("decision") or {}).get("drift") else 0.0)
        live = live_of(last)
        if live.get("coverage") is not None:
            self.coverage.add_metric([o.name], float(live["coverage"]))
        if live.get("value") is None:
            return
        self.metric.add_metric([o.name, str(live.get("metric") or o.metric)], float(live["value"]))
        if live.get("drop") is not None:
            self.drop.add_metric([o.name], float(live["drop"]))
            self.significant.add_metric([o.name], 1.0 if live.get("significant") else 0.0)
        if live.get("business_value") is not None:
            self.business.add_metric([o.name], float(live["business_value"]))

    def families(self) -> tuple[Metric, ...]:
        return (self.metric, self.baseline, self.drop, self.significant, self.coverage, self.business,
                self.drift, self.since)  # fmt: skip


def prometheus_text(overviews: list[ModelOverview]) -> str:
    """Pipeline figures in the Prometheus text exposition format (see METRICS_CONTENT_TYPE)."""
    return generate_latest(PipelineCollector(overviews)).decode()


# generate_latest's default output (underscore escaping) is the 0.0.4 text format every Prometheus reads.
METRICS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


# -- HTML ------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "" if value is None else str(value)


def _when(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else ""


@lru_cache(maxsize=1)
def _templates() -> Environment:
    # autoescape on for every template: tags, specs, file names and reasons are user-controlled text.
    env = Environment(
        loader=PackageLoader("cd4ml.ui", "templates"), autoescape=True, keep_trailing_newline=False
    )
    env.filters.update(fmt=_fmt, when=_when, quote=lambda v: quote(str(v), safe=""))
    return env


def report_href(settings: Settings, model: str, uri: str | None) -> str | None:
    """A file under the model's data dir (file:// URI or path) as a URL relative to the plugin's root."""
    if not uri:
        return None
    path = Path(unquote(urlparse(uri).path) if uri.startswith("file:") else uri).resolve()
    root = settings.model_dir(model).resolve()
    if not path.is_relative_to(root):
        return None
    return f"files/{quote(model)}/{quote(str(path.relative_to(root)))}"


def drift_chart_svg(
    checks: list[dict[str, Any]], threshold: float, width: int = 560, height: int = 160
) -> Markup:
    """Drift share per check as an inline SVG line chart with the retrain threshold."""
    pad, shares = 30, [float(c.get("share") or 0.0) for c in checks]
    top = max(1.0, *shares) if shares else 1.0
    x = lambda i: pad + (width - 2 * pad) * (i / max(1, len(shares) - 1))  # noqa: E731
    y = lambda s: height - pad - (height - 2 * pad) * (s / top)  # noqa: E731
    points = [
        {"x": f"{x(i):.1f}", "y": f"{y(s):.1f}", "cls": "hot" if s >= threshold else "ok",
         "title": f"{(c.get('window') or {}).get('end', '')}: share {s:.2f}"}
        for i, (s, c) in enumerate(zip(shares, checks, strict=True))
    ]  # fmt: skip
    return Markup(
        _templates().get_template("drift_chart.svg.j2").render(
            points=points, width=width, height=height, pad=pad, threshold=f"{threshold:g}",
            thr_y=f"{y(threshold):.1f}", thr_label_y=f"{y(threshold) - 4:.1f}",
            line=" ".join(f"{x(i):.1f},{y(s):.1f}" for i, s in enumerate(shares)),
            ticks=[
                {"value": f"{t:g}", "y": f"{y(t):.1f}", "label_y": f"{y(t) + 4:.1f}"}
                for t in (0.0, top / 2, top)
            ],
        )
    )  # fmt: skip


def live_chart_svg(checks: list[dict[str, Any]], metric: str, width: int = 560, height: int = 160) -> Markup:
    """The live metric of each check that could judge one, its bootstrap interval, the champion's
    score at promotion as a step line, and the label coverage on a 0-100% right axis. x positions
    are the checks' own (as in the drift chart), so the two charts line up."""
    pad = 30
    judged = [(i, live_of(c)) for i, c in enumerate(checks) if live_of(c).get("value") is not None]
    covered = [(i, float(live_of(c)["coverage"])) for i, c in enumerate(checks)
               if live_of(c).get("coverage") is not None]  # fmt: skip
    figures = [float(v) for _, live in judged for k in ("value", "low", "high", "baseline")
               if (v := live.get(k)) is not None]  # fmt: skip
    lo, hi = (min(figures), max(figures)) if figures else (0.0, 1.0)
    margin = (hi - lo) * 0.08 or 0.05
    lo, hi = lo - margin, hi + margin
    x = lambda i: pad + (width - 2 * pad) * (i / max(1, len(checks) - 1))  # noqa: E731
    y = lambda v: height - pad - (height - 2 * pad) * ((float(v) - lo) / (hi - lo))  # noqa: E731
    share_y = lambda c: height - pad - (height - 2 * pad) * c  # noqa: E731
    points = []
    for i, live in judged:
        low, high = live.get("low"), live.get("high")
        interval = f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
        coverage, baseline = live.get("coverage"), live.get("baseline")
        title = (f"{live.get('window_end', '')}: {metric} {float(live['value']):.4f}{interval}, "
                 f"{live.get('labelled_rows', 0)} labelled rows"
                 + (f", coverage {float(coverage):.0%}" if coverage is not None else "")
                 + (f", {float(baseline):.4f} at promotion" if baseline is not None else ""))  # fmt: skip
        points.append({
            "x": f"{x(i):.1f}", "y": f"{y(live['value']):.1f}", "title": title,
            "cls": "hot" if live.get("significant") else "ok",
            "low_y": f"{y(low):.1f}" if low is not None and high is not None else None,
            "high_y": f"{y(high):.1f}" if low is not None and high is not None else None,
        })  # fmt: skip
    steps: list[str] = []
    last_baseline = None
    for i, live in judged:
        if live.get("baseline") is None:
            continue
        if last_baseline is not None and live["baseline"] != last_baseline:
            steps.append(f"{x(i):.1f},{y(last_baseline):.1f}")  # the champion changed: a step, not a slope
        steps.append(f"{x(i):.1f},{y(live['baseline']):.1f}")
        last_baseline = live["baseline"]
    if len(steps) == 1:  # one check: a short horizontal mark rather than an invisible point
        steps = [f"{pad},{steps[0].split(',')[1]}", f"{width - pad},{steps[0].split(',')[1]}"]
    return Markup(
        _templates().get_template("live_chart.svg.j2").render(
            points=points, width=width, height=height, pad=pad, metric=metric,
            line=" ".join(f"{p['x']},{p['y']}" for p in points),
            reference=" ".join(steps),
            reference_value=f"{last_baseline:.4f}" if last_baseline is not None else "",
            reference_label_y=f"{y(last_baseline) - 4:.1f}" if last_baseline is not None else "",
            coverage=" ".join(f"{x(i):.1f},{share_y(c):.1f}" for i, c in covered),
            ticks=[
                {"value": f"{t:.3f}", "y": f"{y(t):.1f}", "label_y": f"{y(t) + 4:.1f}"}
                for t in (lo, (lo + hi) / 2, hi)
            ],
        )
    )  # fmt: skip


def status(o: ModelOverview) -> tuple[str, str]:
    """(words, css class) for the summary table: the first thing that needs a person, or ok."""
    last_event = o.events[0] if o.events else None
    if last_event is not None and last_event.what in ("failed", "rollback failed"):
        return f"last deployment {last_event.what} (v{last_event.version})", "failed"
    if o.drift and float(o.drift[-1].get("share") or 0.0) >= o.drift_threshold:
        return "drifted: retraining requested", "drifted"
    live = live_of(o.drift[-1]) if o.drift else {}
    if live.get("significant") and live.get("drop") is not None:
        return f"live {live.get('metric') or o.metric} dropped by {float(live['drop']):.4f}", "drifted"
    if o.champion is None:
        return "no champion yet", "new"
    if o.batch_runs and o.batch_runs[0].get("outcome") == "failed":
        return "last batch scoring run failed", "failed"
    if o.files.get("waiting"):
        return f"{o.files['waiting']} file(s) waiting to be validated", "waiting"
    return "ok", "ok"


def _view_model(o: ModelOverview, settings: Settings) -> dict[str, Any]:
    recent = [
        {**check, "href": report_href(settings, o.name, check.get("report_uri"))}
        for check in reversed(o.drift[-8:])
    ]
    words, css = status(o)
    recent_live = [
        {**live_of(check), "end": (check.get("window") or {}).get("end")}
        for check in reversed(o.drift[-8:])
        if live_of(check)
    ]
    last_live = live_of(o.drift[-1]) if o.drift else {}
    return {
        "o": o,
        "champion_score": o.champion.evidence.get("challenger_score") if o.champion else None,
        "live": last_live if last_live.get("value") is not None else None,
        "live_chart": live_chart_svg(o.drift, o.metric),
        "recent_live": recent_live,
        "last": o.versions[0] if o.versions else None,
        "drift_share": float(o.drift[-1].get("share") or 0.0) if o.drift else None,
        "status": words,
        "status_class": css,
        "chart": drift_chart_svg(o.drift, o.drift_threshold),
        "recent_drift": recent,
    }


def render_html(overviews: list[ModelOverview], settings: Settings, mlflow_ui: str, errors: list[str]) -> str:
    """The Models view: a one-row-per-model summary, then each model's details."""
    return (
        _templates()
        .get_template("models.html.j2")
        .render(
            models=[_view_model(o, settings) for o in overviews],
            errors=errors,
            specs_dir=str(settings.specs_dir),
            mlflow_ui=mlflow_ui,
        )
    )
