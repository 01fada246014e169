"""The Models view's pure parts: Prometheus text that a real parser reads back, the drift chart,
events from the event log and (for older versions) their tags, and report paths that cannot
escape the model's directory."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cd4ml.core.settings import Settings
from cd4ml.registry import HistoryEvent
from cd4ml.ui.overview import (
    ModelOverview,
    VersionInfo,
    _events,
    drift_chart_svg,
    live_chart_svg,
    prometheus_text,
    render_html,
    report_href,
    totals_of,
)


def version(v: str, decision: str | None, **tags: str) -> VersionInfo:
    return VersionInfo(v, 1_795_600_000_000, f"run{v}", [], decision, {}, {}, {}, tags)


def overview(drift: list[dict], versions: list[VersionInfo], champion: VersionInfo | None) -> ModelOverview:
    return ModelOverview(
        name='we"ird\\model',
        owner=None,
        metric="roc_auc",
        champion=champion,
        versions=versions,
        events=_events(versions),
        drift=drift,
        drift_threshold=0.3,
        files={"waiting": 1, "accepted": 4, "quarantined": 2},
    )


def test_prometheus_text_parses_back_with_the_figures() -> None:
    deployed = json.dumps({"when": "2026-11-02T00:00:00", "outcome": "deployed", "golden_rows": 50})
    failed = json.dumps({"when": "2026-11-03T00:00:00", "outcome": "failed", "error": "smoke test"})
    v1 = version("1", "promote", **{"cd4ml.promoted_at": "2026-11-01T00:00:00", "cd4ml.deployment": deployed})
    v2 = version("2", "reject")
    v3 = version("3", "promote", **{"cd4ml.promoted_at": "2026-11-03T00:00:00", "cd4ml.deployment": failed})
    checks = [
        {"share": 0.1, "decision": {"trigger": False}, "window": {"end": "2026-11-01T00:00:00+00:00"}},
        {"share": 0.6, "decision": {"trigger": True}, "window": {"end": "2026-11-02T03:25:45.5+00:00"}},
    ]
    text = prometheus_text([overview(checks, [v3, v2, v1], v1)])
    samples = {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert all(
        s.labels["model"] == 'we"ird\\model'
        for family in text_string_to_metric_families(text)
        for s in family.samples
    )
    assert samples[("cd4ml_champion_version", ())] == 1
    assert samples[("cd4ml_model_versions", (("decision", "promote"),))] == 2
    assert samples[("cd4ml_model_versions", (("decision", "reject"),))] == 1
    assert samples[("cd4ml_promotions_total", ())] == 2
    assert samples[("cd4ml_deployments_total", (("outcome", "deployed"),))] == 1
    assert samples[("cd4ml_deployments_total", (("outcome", "failed"),))] == 1
    assert samples[("cd4ml_files", (("state", "quarantined"),))] == 2
    assert samples[("cd4ml_drift_share", ())] == 0.6
    assert samples[("cd4ml_drift_checks_total", (("retrain", "true"),))] == 1
    assert samples[("cd4ml_drift_checks_total", (("retrain", "false"),))] == 1
    end = datetime(2026, 11, 2, 3, 25, 45, 500000, tzinfo=UTC).timestamp()
    assert samples[("cd4ml_last_drift_check_timestamp_seconds", ())] == end


def test_events_are_newest_first_and_say_what_happened() -> None:
    failed = json.dumps({"when": "2026-11-03", "outcome": "failed", "error": "boom", "rollback": "back to 1"})
    rolled_back = {"cd4ml.rolled_back_at": "2026-11-04", "cd4ml.rollback_reason": "bad v2"}
    v1 = version("1", "promote", **{"cd4ml.promoted_at": "2026-11-01", **rolled_back,
                                    "cd4ml.previous_champion": "2"})  # fmt: skip
    v2 = version("2", "promote", **{"cd4ml.promoted_at": "2026-11-02", "cd4ml.deployment": failed})
    events = _events([v2, v1])
    assert [(e.when, e.version, e.what) for e in events] == [
        ("2026-11-04", "1", "rollback requested"),
        ("2026-11-03", "2", "failed"),
        ("2026-11-02", "2", "promoted"),
        ("2026-11-01", "1", "promoted"),
    ]
    assert events[0].detail == "bad v2 (from v2)" and events[1].detail == "boom; back to 1"


def test_drift_chart_has_a_point_per_check_and_marks_those_over_the_threshold() -> None:
    checks = [{"share": s, "window": {"end": f"t{i}"}} for i, s in enumerate([0.0, 0.2, 0.5, 0.9])]
    svg = drift_chart_svg(checks, threshold=0.3)
    assert svg.count("<circle") == 4 and svg.count("class='hot'") == 2
    assert "retrain threshold 0.3" in svg
    assert "No drift checks yet" in drift_chart_svg([], threshold=0.3)


def test_report_links_stay_inside_the_model_dir(tmp_path: Path) -> None:
    settings = Settings(tmp_path, tmp_path / "data", tmp_path / "specs", "http://mlflow")
    inside = tmp_path / "data" / "churn" / "reports" / "drift" / "r 1" / "report.html"
    assert report_href(settings, "churn", inside.as_uri()) == "files/churn/reports/drift/r%201/report.html"
    assert report_href(settings, "churn", str(tmp_path / "data" / "other" / "x.html")) is None
    assert report_href(settings, "churn", str(tmp_path / "data" / "churn" / ".." / "x.html")) is None
    assert report_href(settings, "churn", None) is None


def test_html_escapes_what_comes_from_tags() -> None:
    v1 = version("1", "<script>alert(1)</script>")
    page = render_html([overview([], [v1], None)], Settings(Path("/"), Path("/d"), Path("/s"), "x"), "m", [])
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "No champion yet" in page


def test_retractions_are_listed_with_who_when_why_and_counted_apart(tmp_path: Path) -> None:
    from cd4ml.core.spec import load_spec
    from cd4ml.data import landing
    from cd4ml.ui.overview import _file_counts, _retractions
    from tests.helpers import write_spec

    settings = Settings(tmp_path, tmp_path / "data", tmp_path / "specs", "http://mlflow")
    (tmp_path / "specs").mkdir()
    spec = load_spec(write_spec(tmp_path / "specs", "churn"))
    zone = landing.Zone(settings.model_dir("churn")).ensure()
    for name, content in (("a.csv", b"x\n1\n"), ("b.csv", b"x\n2\n"), ("c.csv", b"x\n3\n")):
        (zone.landing / name).write_bytes(content)
    a, b, c = landing.list_landed(zone)
    landing.accept(zone, a, rows=1, accepted_at="2026-01-01T00:00:00+00:00", run_id="r1")
    landing.accept(zone, b, rows=1, accepted_at="2026-01-02T00:00:00+00:00", run_id="r2")
    landing.quarantine(zone, c, reason="c.csv: bad", details={"kind": "validation"})
    landing.retract(
        zone, "b.csv", reason="<b>leaked labels</b>", who="ana via cli", when="2026-02-01T00:00:00"
    )

    assert _file_counts(spec, settings) == {"waiting": 0, "accepted": 1, "quarantined": 1, "retracted": 1}
    (r,) = _retractions(spec, settings, 10)
    assert (r["file"], r["who"], r["when"], r["reason"], r["rows"]) == (
        "b.csv", "ana via cli", "2026-02-01T00:00:00", "<b>leaked labels</b>", 1
    )  # fmt: skip
    view = overview([], [], None)
    view.retractions = [r]
    page = render_html([view], settings, "m", [])
    assert "Retracted files" in page and "ana via cli" in page and "b.csv" in page
    assert "<b>leaked" not in page and "&lt;b&gt;leaked labels&lt;/b&gt;" in page
    assert "__retract" in page  # the DAG that retracts is linked


def test_summary_table_has_one_row_per_model_and_escapes_hostile_names() -> None:
    hostile = "<img src=x onerror=alert(1)>"
    lineage = {"trigger_reason": f"manual: {hostile}"}
    champion = VersionInfo("3", 1_795_600_000_000, "r3", ["champion"], "promote",
                           {"challenger_score": 0.8123}, {}, lineage, {})  # fmt: skip
    good = overview([{"share": 0.1, "window": {"end": "e"}}], [champion], champion)
    good.name, good.files = "churn", {"waiting": 0, "accepted": 4, "quarantined": 2}
    bad = overview([{"share": 0.9, "window": {"end": hostile}}], [], None)
    bad.name = f"m'{hostile}"
    page = render_html([good, bad], Settings(Path("/"), Path("/d"), Path("/s"), "x"), "m", [])
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "m'<" not in page and "m&#39;&lt;img" in page  # a quote cannot close an attribute
    summary = page[page.index("<table class='summary'>") : page.index("</table>")]
    assert summary.count("<tr data-model=") == 2
    assert summary.index("churn") < page.index("<section")  # the summary opens the page
    churn_row = summary[summary.index("data-model='churn'") :].split("</tr>")[0]
    assert "version 3" in churn_row and "0.8123" in churn_row and "promote" in churn_row
    assert "0.10" in churn_row and ">ok<" in churn_row
    bad_row = summary.split("</tr>")[-2]
    assert "drifted" in bad_row and "0.90" in bad_row


def test_trigger_reasons_read_as_text_not_dict_reprs() -> None:
    from types import SimpleNamespace

    from airflow.sdk import Asset

    from cd4ml.airflow.train_dag import _trigger_reason

    asset = Asset(name="cd4ml://churn/drift", uri="cd4ml://churn/drift")
    extra = {"reason": "share 0.42 >= threshold 0.3", "share": 0.421875,
             "drifted_columns": ["age", "plan"], "performance_drop": None,
             "report_uri": "file:///data/r.html", "champion_version": "3"}  # fmt: skip
    ctx = {"dag_run": SimpleNamespace(run_type="asset_triggered"), "params": {},
           "triggering_asset_events": {asset: [SimpleNamespace(extra=extra)]}}  # fmt: skip
    reason = _trigger_reason(ctx)
    assert reason == (
        "asset cd4ml://churn/drift: share 0.42 >= threshold 0.3; share: 0.422; "
        "drifted columns: age, plan; champion version: 3"
    )
    assert "{" not in reason and "file://" not in reason
    landed = {"directory": "/data/churn/landing", "files": ["a.csv", "b.csv"]}
    ctx["triggering_asset_events"] = {
        Asset(name="new", uri="cd4ml://churn/new"): [SimpleNamespace(extra=landed)]
    }
    assert _trigger_reason(ctx) == "asset new: files: a.csv, b.csv"
    ctx["dag_run"] = SimpleNamespace(run_type="manual")
    ctx["params"] = {"reason": "backfill"}
    assert _trigger_reason(ctx) == "manual: backfill"


def _logged(kind: str, version: str | None, when: str, why: str = "", **details: object) -> HistoryEvent:
    return HistoryEvent(kind, version, "ana via churn__rollback", why, when, dict(details))


def test_the_event_log_is_the_history_and_old_tags_fill_in_only_what_it_lacks() -> None:
    # v1 predates the log: its tags are all that is left of its promotion and deployment.
    deployed = json.dumps({"when": "2026-11-01T01:00:00+00:00", "outcome": "deployed", "golden_rows": 50})
    v1 = version(
        "1", "promote", **{"cd4ml.promoted_at": "2026-11-01T00:00:00+00:00", "cd4ml.deployment": deployed}
    )
    # v2's promotion is in the log and (as a small tag the service reads) on the version: shown once.
    v2 = version("2", "promote", **{"cd4ml.promoted_at": "2026-11-02T00:00:00+00:00",
                                    "cd4ml.rolled_back_at": "2026-11-05T00:00:00+00:00"})  # fmt: skip
    history = [
        _logged("promotion", "2", "2026-11-02T00:00:00+00:00", "better", previous="1"),
        _logged("deployment", "2", "2026-11-02T00:01:00+00:00", "unreachable", outcome="retrying"),
        _logged(
            "deployment", "2", "2026-11-02T00:02:00+00:00", "smoke ok", outcome="deployed", golden_rows=50
        ),
        _logged("retraction", None, "2026-11-03T00:00:00+00:00", "labels shifted", file="week1.csv"),
        _logged(
            "rollback",
            "2",
            "2026-11-05T00:00:00+00:00",
            "bad in prod",
            outcome="rolled back",
            **{"from": "3"},
        ),
    ]
    events = _events([v2, v1], history)
    assert [(e.version, e.what) for e in events] == [
        ("2", "rolled back"), ("", "retracted"), ("2", "deployed"), ("2", "retrying"), ("2", "promoted"),
        ("1", "deployed"), ("1", "promoted"),
    ]  # fmt: skip
    assert events[0].detail == "bad in prod (from v3)" and events[0].who == "ana via churn__rollback"
    assert events[1].detail == "week1.csv: labels shifted"
    assert events[-2].detail == "smoke test passed on 50 golden rows"

    totals = totals_of([v2, v1], [], [], {}, history)
    # Every settled outcome counts once, the retrying attempt not at all.
    assert totals.deployments == {"deployed": 2, "rolled back": 1} and totals.promotions == 2
    more = [*history, _logged("deployment", "3", "2026-11-06T00:00:00+00:00", "x", outcome="failed")]
    assert totals_of([v2, v1], [], [], {}, more).deployments == {"deployed": 2, "rolled back": 1, "failed": 1}

    view = overview([], [v2, v1], v1)
    view.events = events
    page = render_html([view], Settings(Path("/"), Path("/d"), Path("/s"), "x"), "m", [])
    assert "History: promotions, deployments, rollbacks, retractions" in page
    assert "ana via churn__rollback" in page and "week1.csv: labels shifted" in page


def live_check(
    end: str,
    value: float | None,
    *,
    baseline: float = 0.85,
    significant: bool = False,
    coverage: float | None = 0.4,
    low: float | None = None,
    high: float | None = None,
) -> dict:
    live = {"metric": "roc_auc", "version": "3", "window_end": end, "value": value, "baseline": baseline,
            "low": low if low is not None else (value - 0.02 if value is not None else None),
            "high": high if high is not None else (value + 0.02 if value is not None else None),
            "drop": (baseline - value) if value is not None else None, "significant": significant,
            "coverage": coverage, "labelled_rows": 400, "served_rows": 1000, "business_value": 1.25,
            "business_baseline": 2.0,
            "reason": f"live roc_auc {value}"}  # fmt: skip
    return {"share": 0.1, "window": {"end": end}, "decision": {"drift": significant}, "live": live}


def test_live_chart_draws_each_judged_check_its_interval_the_reference_and_the_coverage() -> None:
    checks = [
        {"share": 0.1, "window": {"end": "t0"}},  # a check from before live performance existed
        live_check("t1", 0.84),
        live_check("t2", None, coverage=0.01),  # too few labels: coverage, but no point
        live_check("t3", 0.70, significant=True),
        live_check("t4", 0.80, baseline=0.82),  # a new champion, with its own score at promotion
    ]
    svg = live_chart_svg(checks, "roc_auc")
    assert "aria-label='live roc_auc over time'" in svg
    assert svg.count("<circle") == 3 and svg.count("class='hot'") == 1
    assert svg.count("class='ci'") == 3
    assert "at promotion 0.8200" in svg  # the current champion's reference is labelled
    reference = svg.split("class='thr'")[0].rsplit("<polyline points='", 1)[1].rstrip("' ")
    assert len(reference.split()) == 4  # t1, t3 at 0.85, then a step at t4 down to 0.82
    xs = [p.split(",")[0] for p in reference.split()]
    assert xs[2] == xs[3]  # the step is vertical
    coverage = svg.split("class='cov'")[0].rsplit("<polyline points='", 1)[1].rstrip("' ")
    assert len(coverage.split()) == 4  # every check that knows its coverage, the unjudged one too
    assert "t3: roc_auc 0.7000 [0.6800, 0.7200], 400 labelled rows, coverage 40%, 0.8500 at promotion" in svg
    assert "No live roc_auc yet" in live_chart_svg([{"share": 0.1}], "roc_auc")
    assert "No live roc_auc yet" in live_chart_svg([], "roc_auc")


def test_the_models_view_shows_the_live_metric_next_to_drift_with_a_drop_as_the_status() -> None:
    champion = VersionInfo("3", 1_795_600_000_000, "r3", ["champion"], "promote",
                           {"challenger_score": 0.85}, {}, {}, {})  # fmt: skip
    view = overview([live_check("t1", 0.84), live_check("2026-11-02T00:00:00", 0.70, significant=True)],
                    [champion], champion)  # fmt: skip
    view.business = {"name": "margin", "unit": "EUR"}
    page = render_html([view], Settings(Path("/"), Path("/d"), Path("/s"), "x"), "m", [])
    charts = page[page.index("<div class='charts'>") :]
    assert charts.index("drift share over time") < charts.index("live roc_auc over time")
    assert "live roc_auc dropped by 0.1500" in page  # the status a person acts on
    live = page[page.index("<table class='live'>") :].split("</table>")[0]
    assert "margin (EUR per prediction)" in live and "1.2500 (2.0000 at promotion)" in live
    assert "0.7000 [0.6800, 0.7200]" in live and "(significant)" in live and "40%" in live
    assert live.index("2026-11-02T00:00:00") < live.index("t1")  # newest first
    summary = page[page.index("<table class='summary'>") :].split("</table>")[0]
    assert "0.7000</span> (400 labelled)" in summary
    assert "<table class='live'>" not in render_html(
        [overview([{"share": 0.1, "window": {"end": "e"}}], [], None)],
        Settings(Path("/"), Path("/d"), Path("/s"), "x"),
        "m",
        [],
    )
