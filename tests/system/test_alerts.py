"""cd4ml's alert rules in a real Prometheus server (Debian's package, `make prometheus`) scraping real
cd4ml endpoints, and a real Alertmanager mailing the alert to a real SMTP server.

- the prediction service: the real `cd4ml serve` process of the session (tests/conftest.py), with a
  champion trained by the pipeline's own steps and registered in a real MLflow server;
- `/cd4ml/metrics`: the real route of cd4ml's Airflow plugin app (`cd4ml.airflow.ui.create_app`,
  with its bearer-token check), served by uvicorn under `/cd4ml` as the Airflow API server mounts
  it, without the rest of Airflow's webserver (nothing else of it is on the scrape path);
- the drift: drifted traffic sent to the service, then the monitor's own step
  (`cd4ml.steps.monitor.check_drift`) on what the service logged.

Prometheus runs the shipped rules (config/prometheus/rules/cd4ml.rules.yml) with two changes a
test needs: every `for:` is 0s (production waits minutes), and the p99 latency threshold is 1 µs so
real traffic crosses it. Scrapes and evaluations every second.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cd4ml.core.settings import get_settings
from cd4ml.core.spec import load_spec
from cd4ml.ml.training import features
from cd4ml.serving.predlog import read_predictions
from cd4ml.steps import monitor
from cd4ml.steps.pipeline import run_training
from cd4ml_dev import stack
from cd4ml_dev.datagen import generate_churn, write_batch
from cd4ml_dev.netutil import free_port, wait_http
from tests.conftest import Inbox
from tests.helpers import LOGREG, wait_for, write_spec

pytestmark = pytest.mark.system
MODEL = "alerty"
TEAM = "ml-team@test.local"
METRICS_TOKEN = "test-metrics-token"


def rules_for_test(path: Path) -> Path:
    """The shipped rules with `for: 0s` and a p99 threshold every real request crosses."""
    rules = yaml.safe_load(stack.ALERT_RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = "0s"
            if rule.get("labels", {}).get("threshold") == "p99_latency_seconds":
                rule["expr"] = "vector(0.000001)"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def own_specs(
    mp: pytest.MonkeyPatch, shared_specs: Path, model: str, factory: pytest.TempPathFactory
) -> None:
    """The session's service serves every spec in `shared_specs`; this process (the /cd4ml/metrics
    app Prometheus scrapes) sees only `model`'s, so a scrape reads MLflow for one model, not for
    every model the whole test session wrote."""
    own = factory.mktemp(f"specs-{model}")
    shutil.copy(shared_specs / f"{model}.yaml", own / f"{model}.yaml")
    mp.setenv("CD4ML_SPECS_DIR", str(own))


@contextmanager
def served_champion(
    model: str, *, rows: int, seed: int, service: dict[str, str], mlflow_server: str, shared_specs: Path,
    factory: pytest.TempPathFactory, **spec: Any,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """A champion trained by the pipeline's own steps on `rows` demo rows and served by the session's
    service, with this process's settings pointed at it (and at only this model's spec)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CD4ML_SPECS_DIR", str(shared_specs))
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.setenv("CD4ML_SERVICE_URL", service["url"])
        mp.setenv("CD4ML_SERVICE_ADMIN_TOKEN", service["token"])
        mp.setenv("CD4ML_METRICS_TOKEN", METRICS_TOKEN)
        write_spec(shared_specs, model, estimator=LOGREG, **spec)
        own_specs(mp, shared_specs, model, factory)
        settings = get_settings()
        loaded = load_spec(shared_specs / f"{model}.yaml")
        write_batch(generate_churn(rows, seed=seed), settings.model_dir(model) / "landing", "w0.csv")
        result = run_training(loaded, settings, run_id=f"{model}_1", run_time="2026-01-01T00:00:00+00:00")
        assert result["promoted"] and result["deployment"]["deployed"], result
        url = service["url"]
        wait_for(lambda: httpx.get(f"{url}/v1/models/{model}").status_code == 200, "model served")
        yield {"url": url, "spec": loaded, "settings": settings, "version": result["version"]}


@pytest.fixture(scope="module")
def champion(
    prediction_service: dict[str, str], mlflow_server: str, shared_specs: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    with served_champion(MODEL, rows=1200, seed=71, service=prediction_service, mlflow_server=mlflow_server,
                         shared_specs=shared_specs, factory=tmp_path_factory, drift__min_rows=100,
                         drift__threshold=0.3, notifications__email=[TEAM]) as served:  # fmt: skip
        yield served


@pytest.fixture(scope="module")
def pipeline_metrics(champion: dict[str, Any]) -> Iterator[str]:
    """cd4ml's plugin app on a free port, mounted at /cd4ml as in the Airflow API server."""
    import uvicorn
    from fastapi import FastAPI

    from cd4ml.airflow.ui import create_app

    root = FastAPI()
    root.mount("/cd4ml", create_app())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(root, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: server.started, "pipeline metrics app started", timeout=30)
    # Prometheus sends the token from a credentials file; without it the route asks Airflow for a
    # login (covered by the plugin's own tests), which would import Airflow's API here.
    assert httpx.get(f"{url}/cd4ml/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
                     timeout=60).status_code == 200  # fmt: skip
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def start(command: list[str], log: Path, ready: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(ready, 60)
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"{command[0]} did not start: {log.read_text()[-2000:]}") from None
    return proc


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Alertmanager with the config the embedded stack renders from `cd4ml_smtp` and the spec's
    recipients, mailing to a real SMTP server; group_wait 0s instead of 30s."""
    from aiosmtpd.controller import Controller

    inbox = Inbox()
    smtp_port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    root = tmp_path_factory.mktemp("alertmanager")
    conn = json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": smtp_port,
                       "extra": {"from_email": "cd4ml@test.local"}})  # fmt: skip
    config = stack.alertmanager_config(
        stack.smtp_from_connection(conn), {MODEL: [TEAM]}, password_file=root / "smtp_password"
    )
    config["route"].update(group_wait="0s", group_interval="1s")
    (root / "alertmanager.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = start(
        ["prometheus-alertmanager", f"--config.file={root / 'alertmanager.yml'}",
         f"--storage.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--cluster.listen-address="],
        root / "alertmanager.log", f"http://127.0.0.1:{port}/-/ready",
    )  # fmt: skip
    try:
        yield {"target": f"127.0.0.1:{port}", "inbox": inbox}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        controller.stop()


@contextmanager
def running_prometheus(root: Path, service: str, pipeline: str, alertmanager: str | None) -> Iterator[str]:
    """Debian's Prometheus on a free port with the shipped rules made test-fast (`rules_for_test`),
    scraping `service` (its /metrics) and `pipeline` (/cd4ml/metrics) every second."""
    token = root / "metrics_token"
    token.write_text(METRICS_TOKEN)
    port = free_port()
    config = stack.prometheus_config(
        service=service.removeprefix("http://"), pipeline=pipeline, token_file=token,
        alertmanager=alertmanager, self_target=f"127.0.0.1:{port}",
        rule_files=[rules_for_test(root / "cd4ml.rules.yml")], interval="1s",
    )  # fmt: skip
    for job in config["scrape_configs"]:
        if job["job_name"] == "cd4ml-pipeline":
            # /cd4ml/metrics reads MLflow for every spec in CD4ML_SPECS_DIR: give it more than 1 s.
            job["scrape_interval"] = job["scrape_timeout"] = "3s"
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    check = subprocess.run(["promtool", "check", "config", str(root / "prometheus.yml")], capture_output=True,
                           text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    proc = start(
        ["prometheus", f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        root / "prometheus.log", f"http://127.0.0.1:{port}/-/ready",
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def prometheus(
    champion: dict[str, Any], pipeline_metrics: str, alertmanager: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:  # fmt: skip
    with running_prometheus(tmp_path_factory.mktemp("prometheus"), champion["url"], pipeline_metrics,
                            alertmanager["target"]) as url:  # fmt: skip
        yield url


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    resp.raise_for_status()
    return list(resp.json()["data"]["result"])


def alerts(prom: str, name: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{prom}/api/v1/alerts", timeout=10)
    resp.raise_for_status()
    return [a for a in resp.json()["data"]["alerts"] if a["labels"]["alertname"] == name
            and a["labels"].get("model") == MODEL]  # fmt: skip


def send(url: str, frame: Any) -> int:
    rows = json.loads(frame.to_json(orient="records"))
    for i in range(0, len(rows), 100):
        resp = httpx.post(f"{url}/v1/models/{MODEL}/predict", json=rows[i : i + 100], timeout=30)
        assert resp.status_code == 200, resp.text
    return len(rows)


def test_drift_fires_in_prometheus_and_reaches_people(
    champion: dict[str, Any], prometheus: str, alertmanager: dict[str, Any]
) -> None:
    spec, settings, url = champion["spec"], champion["settings"], champion["url"]
    # Both targets scraped, the champion seen, and no drift alert before any drift check.
    wait_for(lambda: query(prometheus, f'cd4ml_champion_version{{model="{MODEL}"}} > 0'), "champion scraped")
    up = {r["metric"]["job"]: r["value"][1] for r in query(prometheus, 'up{job=~"cd4ml-.*"}')}
    assert up == {"cd4ml-service": "1", "cd4ml-pipeline": "1"}, up
    assert alerts(prometheus, "Cd4mlDriftDetected") == []

    drifted = features(spec, generate_churn(400, seed=72, batch=2, drift=1.0))
    # A rate needs the counter scraped before and after: the first requests create the series.
    sent = send(url, drifted.iloc[:100])
    wait_for(lambda: query(prometheus, f'cd4ml_requests_total{{model="{MODEL}"}}'), "requests scraped")
    sent += send(url, drifted.iloc[100:])
    # The service's own /metrics: its latency histogram drives the p99 rule (threshold 1 µs here).
    latency = wait_for(lambda: [a for a in alerts(prometheus, "Cd4mlServiceLatencyP99High")
                                if a["state"] == "firing"], "p99 latency alert firing")  # fmt: skip
    assert latency[0]["labels"]["component"] == "service"

    def logged() -> bool:
        # This model's own rows on disk: the session's service logs every test's models, so its
        # written-rows gauge can pass `sent` before these are flushed (CI read 100 of 400 once).
        return len(read_predictions(settings.data_dir, MODEL)) >= sent

    wait_for(logged, "prediction log flushed")
    check = monitor.check_drift(
        spec, settings, run_id="alerts_drift", window_end=datetime.now(UTC).isoformat()
    )
    assert check["decision"]["drift"] is True and check["window"]["rows"] == sent, check

    firing = wait_for(lambda: [a for a in alerts(prometheus, "Cd4mlDriftDetected") if a["state"] == "firing"],
                      "drift alert firing")  # fmt: skip
    assert firing[0]["labels"]["severity"] == "warning"
    share = f"{check['share'] * 100:.4g}%"
    assert share in firing[0]["annotations"]["description"], (share, firing[0]["annotations"])

    # Alertmanager mails it to the spec's recipients through the notification SMTP server.
    inbox: Inbox = alertmanager["inbox"]
    mails = wait_for(lambda: [m for m in inbox.messages if "Cd4mlDriftDetected" in str(m["Subject"])],
                     "drift alert mail")  # fmt: skip
    assert mails[0]["To"] == TEAM and mails[0]["From"] == "cd4ml@test.local", dict(mails[0])
