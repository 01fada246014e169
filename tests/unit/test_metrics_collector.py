"""/cd4ml/metrics through prometheus_client: counters come from complete sources, so a Models view
that shows only the latest history never makes a `*_total` counter stall or go down."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cd4ml.core.settings import Settings
from cd4ml.core.spec import load_spec
from cd4ml.data import landing
from cd4ml.steps.monitor import monitor_paths
from cd4ml.ui.overview import VersionInfo, model_overview, prometheus_text
from tests.helpers import write_spec


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def counters(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {k: v for k, v in samples(text).items() if k[0].endswith("_total")}


def write_history(settings: Settings, model: str, n_checks: int, n_runs: int) -> None:
    checks = monitor_paths(settings, model).monitor_history
    checks.parent.mkdir(parents=True, exist_ok=True)
    with checks.open("w") as fh:
        for i in range(n_checks):
            check = {"share": 0.5 if i % 3 == 0 else 0.1, "decision": {"trigger": i % 3 == 0},
                     "window": {"end": f"2026-11-01T00:{i // 60:02d}:{i % 60:02d}+00:00"}}  # fmt: skip
            fh.write(json.dumps(check) + "\n")
    runs = landing.Zone(settings.model_dir(model)).runs
    for i in range(n_runs):
        (runs / f"run{i:03d}").mkdir(parents=True, exist_ok=True)
        outcome = {"run_id": f"run{i:03d}", "trained": i % 2 == 0, "trigger": "t", "why": "w"}
        (runs / f"run{i:03d}" / "outcome.json").write_text(json.dumps(outcome))


def test_counters_count_every_check_and_run_not_the_views_truncated_lists(tmp_path: Path) -> None:
    settings = Settings(tmp_path, tmp_path / "data", tmp_path / "specs", f"sqlite:///{tmp_path}/mlflow.db")
    (tmp_path / "specs").mkdir()
    spec = load_spec(write_spec(tmp_path / "specs", "churn"))
    landing.Zone(settings.model_dir("churn")).ensure()
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    # 250 checks and 40 runs: past the view's 200 checks and `limit` runs.
    for n_checks, n_runs in ((10, 3), (199, 24), (230, 30), (250, 40)):
        write_history(settings, "churn", n_checks, n_runs)
        view = model_overview(spec, settings, limit=5)  # an empty registry, as a new install
        assert len(view.runs) == min(5, n_runs) and len(view.drift) == min(200, n_checks)
        now = counters(prometheus_text([view]))
        triggered = sum(1 for i in range(n_checks) if i % 3 == 0)
        assert now[("cd4ml_drift_checks_total", (("retrain", "true"),))] == triggered
        assert now[("cd4ml_drift_checks_total", (("retrain", "false"),))] == n_checks - triggered
        assert now[("cd4ml_training_runs_total", (("trained", "true"),))] == (n_runs + 1) // 2
        assert now[("cd4ml_training_runs_total", (("trained", "false"),))] == n_runs // 2
        assert all(now[k] >= v for k, v in before.items()), (before, now)
        before = now


def version(v: str, **tags: str) -> VersionInfo:
    return VersionInfo(v, 0, f"run{v}", [], "promote", {}, {}, {}, tags)


def test_deployment_counter_skips_the_transient_retrying_record() -> None:
    from cd4ml.ui.overview import ModelOverview, totals_of

    def scrape(outcome: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        deployed = json.dumps({"when": "2026-11-02", "outcome": "deployed"})
        attempt = json.dumps({"when": "2026-11-03", "outcome": outcome})
        versions = [
            version("2", **{"cd4ml.promoted_at": "2026-11-03", "cd4ml.deployment": attempt}),
            version("1", **{"cd4ml.promoted_at": "2026-11-02", "cd4ml.deployment": deployed}),
        ]
        files = {"waiting": 0, "accepted": 3, "quarantined": 1, "retracted": 1}
        view = ModelOverview("m", None, "roc_auc", None, versions[:1], [], [], 0.3, files,
                             totals=totals_of(versions, [], [], files))  # fmt: skip
        return counters(prometheus_text([view]))

    retrying, settled = scrape("retrying"), scrape("deployed")
    assert retrying[("cd4ml_deployments_total", (("outcome", "deployed"),))] == 1
    assert ("cd4ml_deployments_total", (("outcome", "retrying"),)) not in retrying
    assert settled[("cd4ml_deployments_total", (("outcome", "deployed"),))] == 2
    # Promotions count every version, though the view kept only the newest one.
    assert settled[("cd4ml_promotions_total", ())] == 2
    # A retracted file was accepted once: it stays counted as received-and-accepted.
    assert settled[("cd4ml_files_received_total", (("outcome", "accepted"),))] == 4
    assert settled[("cd4ml_files_received_total", (("outcome", "quarantined"),))] == 1


def test_a_scrape_has_help_and_type_for_every_family_and_escapes_label_values() -> None:
    from cd4ml.ui.overview import ModelOverview

    view = ModelOverview('a"b\\c\nd', None, "rmse", None, [], [], [], 0.3, {"waiting": 2})
    text = prometheus_text([view])
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["cd4ml_promotions"].type == "counter"
    assert families["cd4ml_files"].type == "gauge"
    assert all(f.documentation for f in families.values())
    (waiting,) = families["cd4ml_files"].samples
    assert waiting.labels == {"model": 'a"b\\c\nd', "state": "waiting"} and waiting.value == 2


def live_families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    names = {"cd4ml_live_metric", "cd4ml_live_metric_baseline", "cd4ml_live_metric_drop",
             "cd4ml_live_metric_drop_significant", "cd4ml_live_label_coverage", "cd4ml_business_value",
             "cd4ml_drift_detected", "cd4ml_champion_promoted_timestamp_seconds"}  # fmt: skip
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert names <= set(families), names - set(families)  # every family is declared, even when empty
    assert all(families[n].type == "gauge" and families[n].documentation for n in names)
    return {n: [(s.labels, s.value) for s in families[n].samples] for n in names}


def test_live_performance_gauges_read_the_last_check_and_the_champion() -> None:
    from cd4ml.ui.overview import ModelOverview

    champion = VersionInfo("4", 0, "run4", ["champion"], "promote", {"challenger_score": 0.86}, {}, {},
                           {"cd4ml.promoted_at": "2026-11-01T00:00:00+00:00",
                            "cd4ml.rolled_back_at": "2026-11-03T06:00:00+00:00"})  # fmt: skip
    live = {"metric": "roc_auc", "value": 0.71, "baseline": 0.86, "drop": 0.15, "significant": True,
            "coverage": 0.25, "business_value": -1.5, "labelled_rows": 300}  # fmt: skip
    checks = [{"share": 0.1, "decision": {"drift": False}, "window": {"end": "2026-11-04T00:00:00+00:00"}},
              {"share": 0.1, "decision": {"drift": True}, "live": live,
               "window": {"end": "2026-11-04T01:00:00+00:00"}}]  # fmt: skip
    view = ModelOverview("churn", None, "roc_auc", champion, [champion], [], checks, 0.3, {})
    got = live_families(prometheus_text([view]))
    model = {"model": "churn"}
    assert got["cd4ml_live_metric"] == [({**model, "metric": "roc_auc"}, 0.71)]
    assert got["cd4ml_live_metric_baseline"] == [({**model, "metric": "roc_auc"}, 0.86)]
    assert got["cd4ml_live_metric_drop"] == [(model, 0.15)]
    assert got["cd4ml_live_metric_drop_significant"] == [(model, 1.0)]
    assert got["cd4ml_live_label_coverage"] == [(model, 0.25)]
    assert got["cd4ml_business_value"] == [(model, -1.5)]
    assert got["cd4ml_drift_detected"] == [(model, 1.0)]
    # The alias last moved by the rollback, after the promotion.
    assert got["cd4ml_champion_promoted_timestamp_seconds"] == [(model, 1793685600.0)]


def test_a_check_that_could_not_judge_exports_no_live_metric_rather_than_zero() -> None:
    from cd4ml.ui.overview import ModelOverview

    too_few = {"metric": "roc_auc", "value": None, "baseline": 0.86, "drop": None, "significant": False,
               "coverage": 0.02, "business_value": None, "labelled_rows": 12}  # fmt: skip
    checks = [{"share": 0.5, "decision": {"drift": False}, "live": too_few, "window": {"end": "2026-11-04"}}]
    view = ModelOverview("churn", None, "roc_auc", None, [], [], checks, 0.3, {})
    got = live_families(prometheus_text([view]))
    assert got["cd4ml_live_label_coverage"] == [({"model": "churn"}, 0.02)]
    assert got["cd4ml_drift_detected"] == [({"model": "churn"}, 0.0)]
    for name in ("cd4ml_live_metric", "cd4ml_live_metric_drop", "cd4ml_live_metric_drop_significant",
                 "cd4ml_business_value", "cd4ml_live_metric_baseline",
                 "cd4ml_champion_promoted_timestamp_seconds"):  # fmt: skip
        assert got[name] == [], name  # no champion, nothing judged
    empty = live_families(prometheus_text([ModelOverview("new", None, "rmse", None, [], [], [], 0.3, {})]))
    assert all(samples == [] for samples in empty.values())
