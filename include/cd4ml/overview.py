"""What the Models view and the pipeline metrics show, read from MLflow and the data root.

One place computes the state of every model (champion and lineage, decisions with their evidence,
deployments and rollbacks, drift checks); the Airflow plugin renders it as a page inside the
Airflow UI, as JSON, and as Prometheus text. Nothing here writes anything.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

from cd4ml import landing, monitor, registry
from cd4ml.settings import Settings
from cd4ml.spec import ModelSpec

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
        evidence=_json_tag(tags, "cd4ml.evidence"),
        validation=_json_tag(tags, "cd4ml.validation"),
        lineage={k.removeprefix("cd4ml."): tags[k] for k in LINEAGE_TAGS if k in tags},
        tags=tags,
    )


def _events(versions: list[VersionInfo]) -> list[Event]:
    """Promotions, deployments and rollbacks, newest first, from the versions' tags."""
    events: list[Event] = []
    for v in versions:
        t = v.tags
        if t.get("cd4ml.promoted_at"):
            previous = t.get("cd4ml.previous_champion", "none")
            events.append(
                Event(t["cd4ml.promoted_at"], v.version, "promoted", f"previous champion: {previous}")
            )
        deployment = _json_tag(t, "cd4ml.deployment")
        if deployment:
            detail = deployment.get("error") or deployment.get("reason") or ""
            if not detail and deployment.get("golden_rows"):
                detail = f"smoke test passed on {deployment['golden_rows']} golden rows"
            if deployment.get("rollback"):
                detail = f"{detail}; {deployment['rollback']}"
            who = deployment.get("who")
            events.append(Event(str(deployment.get("when", "")), v.version,
                                str(deployment.get("outcome", "deployment")),
                                f"{detail} (by {who})" if who else detail))  # fmt: skip
        if t.get("cd4ml.rolled_back_at"):
            why = f"{t.get('cd4ml.rollback_reason', '')} (from v{t.get('cd4ml.previous_champion')})"
            events.append(Event(t["cd4ml.rolled_back_at"], v.version, "rollback requested", why))
    return sorted(events, key=lambda e: e.when, reverse=True)


def _file_counts(spec: ModelSpec, settings: Settings) -> dict[str, int]:
    zone = landing.Zone(settings.model_dir(spec.name))
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
    zone = landing.Zone(settings.model_dir(spec.name))
    return [{k: r.get(k) for k in keys} for r in landing.list_retractions(zone)[:limit]]


def _run_outcomes(spec: ModelSpec, settings: Settings, limit: int) -> list[dict[str, Any]]:
    """Why the latest training runs trained or not (runs/<run key>/outcome.json), newest first."""
    runs = landing.Zone(settings.model_dir(spec.name)).runs
    paths = sorted(runs.glob("*/outcome.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    out = []
    for path in paths[:limit]:
        try:
            out.append({**json.loads(path.read_text()), "mtime": path.stat().st_mtime})
        except (OSError, json.JSONDecodeError):
            continue
    return out


def model_overview(spec: ModelSpec, settings: Settings, *, limit: int = 25) -> ModelOverview:
    from mlflow.exceptions import MlflowException

    client = registry.client(settings.mlflow_tracking_uri)
    found: list[Any]
    try:
        found = list(client.search_model_versions(f"name='{spec.name}'", max_results=1000))
    except MlflowException:
        found = []
    versions = sorted((_version_info(mv) for mv in found), key=lambda v: int(v.version), reverse=True)
    # Search results carry no aliases; ask for the two cd4ml moves.
    for alias in (registry.CHAMPION, registry.CHALLENGER):
        mv = registry.version_by_alias(client, spec.name, alias) if versions else None
        for v in versions:
            if mv is not None and v.version == str(mv.version) and alias not in v.aliases:
                v.aliases.append(alias)
    champion = next((v for v in versions if registry.CHAMPION in v.aliases), None)
    return ModelOverview(
        name=spec.name,
        owner=spec.owner,
        metric=spec.metric.name,
        champion=champion,
        versions=versions[:limit],
        events=_events(versions)[:limit],
        drift=monitor.history(settings, spec.name)[-200:],
        drift_threshold=spec.drift.threshold,
        files=_file_counts(spec, settings),
        runs=_run_outcomes(spec, settings, limit),
        retractions=_retractions(spec, settings, limit),
    )


# -- Prometheus ------------------------------------------------------------------------------------

_HELP = {
    "cd4ml_champion_version": ("gauge", "Registered version the champion alias points at (0: none)."),
    "cd4ml_model_versions": ("gauge", "Registered versions by the evaluation gate's decision."),
    "cd4ml_promotions_total": ("counter", "Versions promoted to champion."),
    "cd4ml_deployments_total": ("counter", "Deployments by outcome (deployed, failed, rolled back...)."),
    "cd4ml_files": ("gauge", "Data files by state: waiting in landing, accepted, quarantined, retracted."),
    "cd4ml_drift_share": ("gauge", "Share of drifted features in the last drift check."),
    "cd4ml_drift_checks_total": ("counter", "Drift checks by outcome (retrain triggered or not)."),
    "cd4ml_last_drift_check_timestamp_seconds": ("gauge", "End of the last drift check's window."),
}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def _number(value: float) -> str:
    """Integers as integers; other values with every digit (a timestamp must not lose seconds)."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def prometheus_text(overviews: list[ModelOverview]) -> str:
    """Pipeline figures in the Prometheus text exposition format (version 0.0.4)."""
    from datetime import datetime

    samples: dict[str, list[tuple[dict[str, str], float]]] = {name: [] for name in _HELP}
    for o in overviews:
        m = {"model": o.name}
        samples["cd4ml_champion_version"].append((m, float(o.champion.version) if o.champion else 0.0))
        decisions: dict[str, int] = {}
        for v in o.versions:
            decisions[v.decision or "none"] = decisions.get(v.decision or "none", 0) + 1
        for decision in ("promote", "reject", "none"):
            samples["cd4ml_model_versions"].append(({**m, "decision": decision}, decisions.get(decision, 0)))
        samples["cd4ml_promotions_total"].append((m, sum(e.what == "promoted" for e in o.events)))
        outcomes: dict[str, int] = {}
        for e in o.events:
            if e.what not in ("promoted", "rollback requested"):
                outcomes[e.what] = outcomes.get(e.what, 0) + 1
        for outcome, n in sorted(outcomes.items()):
            samples["cd4ml_deployments_total"].append(({**m, "outcome": outcome}, n))
        for state, n in o.files.items():
            samples["cd4ml_files"].append(({**m, "state": state}, n))
        triggered = sum(bool((c.get("decision") or {}).get("trigger")) for c in o.drift)
        samples["cd4ml_drift_checks_total"].append(({**m, "retrain": "true"}, triggered))
        samples["cd4ml_drift_checks_total"].append(({**m, "retrain": "false"}, len(o.drift) - triggered))
        if o.drift:
            last = o.drift[-1]
            samples["cd4ml_drift_share"].append((m, float(last.get("share") or 0.0)))
            end = (last.get("window") or {}).get("end")
            if end:
                ts = datetime.fromisoformat(str(end).replace("Z", "+00:00")).timestamp()
                samples["cd4ml_last_drift_check_timestamp_seconds"].append((m, ts))
    lines: list[str] = []
    for name, (kind, text) in _HELP.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for labels, value in samples[name]:
            rendered = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{rendered}}} {_number(value)}")
    return "\n".join(lines) + "\n"


# -- HTML ------------------------------------------------------------------------------------------


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
) -> str:
    """Drift share per check as an inline SVG line chart with the retrain threshold."""
    pad, points = 30, [float(c.get("share") or 0.0) for c in checks]
    if not points:
        return "<p class='muted'>No drift checks yet.</p>"
    top = max(1.0, *points)
    x = lambda i: pad + (width - 2 * pad) * (i / max(1, len(points) - 1))  # noqa: E731
    y = lambda s: height - pad - (height - 2 * pad) * (s / top)  # noqa: E731
    line = " ".join(f"{x(i):.1f},{y(s):.1f}" for i, s in enumerate(points))
    dots = "".join(
        f"<circle cx='{x(i):.1f}' cy='{y(s):.1f}' r='3' class='{'hot' if s >= threshold else 'ok'}'>"
        f"<title>{escape(str((c.get('window') or {}).get('end', '')))}: share {s:.2f}</title></circle>"
        for i, (s, c) in enumerate(zip(points, checks, strict=True))
    )
    return (
        f"<svg role='img' aria-label='drift share over time' width='{width}' height='{height}'>"
        f"<line x1='{pad}' x2='{width - pad}' y1='{y(threshold):.1f}' y2='{y(threshold):.1f}' class='thr'/>"
        f"<text x='{width - pad}' y='{y(threshold) - 4:.1f}' text-anchor='end' class='muted'>"
        f"retrain threshold {threshold:g}</text>"
        + "".join(
            f"<text x='{pad - 4}' y='{y(t) + 4:.1f}' text-anchor='end' class='muted'>{t:g}</text>"
            f"<line x1='{pad}' x2='{width - pad}' y1='{y(t):.1f}' y2='{y(t):.1f}' class='grid'/>"
            for t in (0.0, top / 2, top)
        )
        + f"<polyline points='{line}' class='share'/>{dots}"
        f"<text x='{pad}' y='{height - 8}' class='muted'>{len(points)} checks, oldest left</text></svg>"
    )


_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#1a202c}h1{font-size:20px}
h2{font-size:17px;margin:24px 0 4px}h3{font-size:14px;margin:14px 0 4px}
table{border-collapse:collapse;font-size:13px;margin:4px 0}td,th{border:1px solid #d9dee5;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f3f5f8}.muted{color:#6b7280;font-size:12px}
.promote,.deployed,.passed{color:#15803d;font-weight:600}.reject,.failed{color:#b91c1c;font-weight:600}
.card{border:1px solid #d9dee5;border-radius:6px;padding:8px 14px;margin:10px 0}
svg .share{fill:none;stroke:#2563eb;stroke-width:2}svg .thr{stroke:#b91c1c;stroke-dasharray:4 3}
svg .grid{stroke:#e5e7eb}svg .hot{fill:#b91c1c}svg .ok{fill:#2563eb}code{font-size:12px}
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "" if value is None else escape(str(value))


def _when(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else ""


def render_html(overviews: list[ModelOverview], settings: Settings, mlflow_ui: str, errors: list[str]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>cd4ml models</title>"
             f"<style>{_CSS}</style></head><body><h1>Models</h1>"]  # fmt: skip
    parts += [f"<p class='failed'>{escape(e)}</p>" for e in errors]
    if not overviews and not errors:
        parts.append(f"<p>No model specs in <code>{escape(str(settings.specs_dir))}</code>.</p>")
    for o in overviews:
        parts.append(_render_model(o, settings, mlflow_ui))
    parts.append("</body></html>")
    return "".join(parts)


def _render_model(o: ModelOverview, settings: Settings, mlflow_ui: str) -> str:
    name = escape(o.name)
    version_url = lambda v: f"{mlflow_ui}/#/models/{quote(o.name)}/versions/{quote(v)}"  # noqa: E731
    out = [f"<section class='card' id='model-{name}'><h2>{name}</h2>"]
    out.append(
        f"<p class='muted'>owner: {_fmt(o.owner) or '—'} · metric: {escape(o.metric)} · files: "
        + ", ".join(f"{n} {k}" for k, n in o.files.items())
        + f" · <a href='/dags/{quote(o.name)}__train' target='_top'>training DAG</a>"
        + f" · <a href='/dags/{quote(o.name)}__monitor' target='_top'>monitor DAG</a>"
        + f" · <a href='/dags/{quote(o.name)}__rollback' target='_top'>rollback DAG</a>"
        + f" · <a href='/dags/{quote(o.name)}__retract' target='_top'>retract DAG</a></p>"
    )
    c = o.champion
    if c is None:
        out.append("<p class='champion'>No champion yet: land a file to train the first model.</p>")
    else:
        ev = c.evidence
        out.append(
            f"<p class='champion'>Champion: <a href='{version_url(c.version)}' target='_blank'>"
            f"<b>version {escape(c.version)}</b></a> · {escape(o.metric)} "
            f"{_fmt(ev.get('challenger_score'))} on its holdout (n={_fmt(ev.get('n'))}) · "
            f"registered {_when(c.created_ms)}</p>"
        )
        run_link = c.lineage.get("airflow_run_id")
        rows = "".join(
            f"<tr><th>{escape(k)}</th><td><code>{escape(v)}</code></td></tr>" for k, v in c.lineage.items()
        )
        if run_link:
            rows += (
                f"<tr><th>training run</th><td><a target='_top' href='/dags/{quote(o.name)}__train/runs/"
                f"{quote(run_link)}'>open in Airflow</a></td></tr>"
            )
        out.append(f"<h3>Lineage</h3><table>{rows}</table>")
    out.append("<h3>Decisions</h3>")
    if not o.versions:
        out.append("<p class='muted'>No versions registered.</p>")
    else:
        out.append(
            "<table class='decisions'><tr><th>version</th><th>registered</th><th>decision</th>"
            f"<th>{escape(o.metric)}</th><th>champion</th><th>difference [CI]</th><th>why</th>"
            "<th>trigger</th><th>aliases</th></tr>"
        )
        for v in o.versions:
            ev = v.evidence
            ci = (
                f" [{_fmt(ev.get('ci_low'))}, {_fmt(ev.get('ci_high'))}]"
                if ev.get("ci_low") is not None
                else ""
            )
            champ = f"{_fmt(ev.get('champion_score'))} (v{_fmt(ev.get('champion_version'))})"
            out.append(
                f"<tr data-version='{escape(v.version)}'><td><a href='{version_url(v.version)}' "
                f"target='_blank'>{escape(v.version)}</a></td><td>{_when(v.created_ms)}</td>"
                f"<td class='{escape(v.decision or '')}'>{_fmt(v.decision)}</td>"
                f"<td>{_fmt(ev.get('challenger_score'))}</td>"
                f"<td>{champ if ev.get('champion_score') is not None else '—'}</td>"
                f"<td>{_fmt(ev.get('difference'))}{ci}</td><td>{_fmt(ev.get('reason'))}</td>"
                f"<td>{_fmt((v.lineage.get('trigger_reason') or '')[:160])}</td>"
                f"<td>{escape(', '.join(v.aliases))}</td></tr>"
            )
        out.append("</table>")
    out.append("<h3>Training runs</h3>")
    if not o.runs:
        out.append("<p class='muted'>None yet.</p>")
    else:
        out.append("<table class='runs'><tr><th>run</th><th>trigger</th><th>trained</th><th>why</th></tr>")
        out += [
            f"<tr><td><a target='_top' href='/dags/{quote(o.name)}__train/runs/{quote(str(r['run_id']))}'>"
            f"{_fmt(r.get('run_id'))}</a></td><td>{_fmt(str(r.get('trigger', ''))[:160])}</td>"
            f"<td>{'yes' if r.get('trained') else 'no'}</td><td>{_fmt(r.get('why'))}</td></tr>"
            for r in o.runs[:10]
        ]
        out.append("</table>")
    out.append("<h3>Retracted files</h3>")
    if not o.retractions:
        out.append("<p class='muted'>None: every accepted file is used for training.</p>")
    else:
        out.append(
            "<table class='retractions'><tr><th>when</th><th>who</th><th>file</th><th>sha256</th>"
            "<th>rows</th><th>why</th></tr>"
        )
        out += [
            f"<tr><td>{_fmt(r.get('when'))}</td><td>{_fmt(r.get('who'))}</td><td>{_fmt(r.get('file'))}</td>"
            f"<td><code>{_fmt(str(r.get('sha256') or '')[:12])}</code></td><td>{_fmt(r.get('rows'))}</td>"
            f"<td>{_fmt(r.get('reason'))}</td></tr>"
            for r in o.retractions
        ]
        out.append("</table>")
    out.append("<h3>Deployments and rollbacks</h3>")
    if not o.events:
        out.append("<p class='muted'>None yet.</p>")
    else:
        out.append("<table class='events'><tr><th>when</th><th>version</th><th>what</th><th>detail</th></tr>")
        out += [
            f"<tr><td>{_fmt(e.when)}</td><td>{_fmt(e.version)}</td>"
            f"<td class='{escape(e.what.split()[0])}'>{_fmt(e.what)}</td><td>{_fmt(e.detail)}</td></tr>"
            for e in o.events
        ]
        out.append("</table>")
    out.append("<h3>Drift share over time</h3>")
    out.append(drift_chart_svg(o.drift, o.drift_threshold))
    recent = list(reversed(o.drift[-8:]))
    if recent:
        out.append(
            "<table class='drift'><tr><th>window end</th><th>share</th><th>drifted</th>"
            "<th>decision</th><th>report</th></tr>"
        )
        for check in recent:
            href = report_href(settings, o.name, check.get("report_uri"))
            link = f"<a href='{href}' target='_blank'>Evidently report</a>" if href else ""
            decision = check.get("decision") or {}
            out.append(
                f"<tr><td>{_fmt((check.get('window') or {}).get('end'))}</td>"
                f"<td>{_fmt(float(check.get('share') or 0.0), 2)}</td>"
                f"<td>{escape(', '.join(check.get('drifted_columns') or []))}</td>"
                f"<td>{_fmt(decision.get('reason'))}</td>"
                f"<td>{link}</td></tr>"
            )
        out.append("</table>")
    out.append("</section>")
    return "".join(out)
