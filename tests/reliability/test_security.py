"""Let no one in: admin token, loopback binds, no secrets in the repo or the logs, no pickles run.

Airflow's REST API refusing requests without a login is checked on the real stack in
tests/system/test_embedded_stack.py::test_airflow_api_requires_login.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
import yaml
from fastapi.testclient import TestClient

from cd4ml import registry
from cd4ml.core.settings import get_settings
from cd4ml.serving.app import ServiceConfig, create_app
from cd4ml_dev import stack
from cd4ml_dev.netutil import free_port
from tests.conftest import start_service
from tests.helpers import REPO, make_champion
from tests.reliability.serving import serve_champion

# -- the service's admin endpoints ------------------------------------------------------------------


def test_admin_endpoints_refuse_a_missing_or_wrong_token(prediction_service: dict[str, str]) -> None:
    url, token = prediction_service["url"], prediction_service["token"]
    admin_routes = [r for r in create_app().routes if getattr(r, "path", "").startswith("/admin")]
    assert admin_routes
    for route in admin_routes:
        path = route.path.replace("{model}", MALICIOUS)  # type: ignore[attr-defined]
        for method in sorted(route.methods):  # type: ignore[attr-defined]
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Bearer {token}x"},
                {"Authorization": f"Bearer {token[:-1]}"},
                {"Authorization": b"Bearer \xff\xfe"},
            ):
                resp = httpx.request(method, f"{url}{path}", headers=headers, timeout=30)  # type: ignore[arg-type]
                assert resp.status_code == 401, (method, path, headers, resp.text)
                assert resp.json()["error"] == "admin token missing or wrong"
            # With the token: reload answers 200; staging asks for a body naming the version.
            resp = httpx.request(
                method, f"{url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=60
            )
            assert resp.status_code == (422 if method == "PUT" else 200), (method, path, resp.text)


def test_admin_endpoints_are_off_when_no_token_is_configured() -> None:
    app = create_app(config=ServiceConfig(admin_token=None))
    resp = TestClient(app).post("/admin/reload", headers={"Authorization": "Bearer anything"})
    assert resp.status_code == 403
    assert "CD4ML_SERVICE_ADMIN_TOKEN is not set" in resp.json()["error"]


def test_a_wrong_token_gets_the_same_answer_however_close_it_is(prediction_service: dict[str, str]) -> None:
    """The token check's observable contract: only the exact token passes, and a refusal tells an
    attacker nothing about how close the guess was (same status, same body, whatever the miss).

    Why not a timing test: the only behaviour that tells `hmac.compare_digest` from `==` is time, and
    on this 2-core box it is not measurable through a request. Measured: a 4 MiB token makes `==`
    cost 0.33 ms more for a late mismatch than an early one, while one in-process request through
    the app took 15-50 ms (min to median) either way; a real token of ~40 characters leaks
    nanoseconds. The constant-time property is therefore left to `hmac.compare_digest`, and what
    is tested here is what a caller can observe: near misses of every shape are refused alike,
    and none of them (nor undecodable bytes) reaches a 500.
    """
    url, token = prediction_service["url"], prediction_service["token"]
    near_misses = {
        "first character changed": chr(ord(token[0]) ^ 1) + token[1:],
        "middle character changed": token[: len(token) // 2] + "#" + token[len(token) // 2 + 1 :],
        "last character changed": token[:-1] + chr(ord(token[-1]) ^ 1),
        "one character short": token[:-1],
        "one character long": token + "x",
        "repeated": token * 2,
        "other case": token.swapcase(),
        "only a prefix": token[:3],
        "missing": "",
        "inner space": token[:2] + " " + token[2:],
        "non-ASCII": token[:-1] + "é",
    }
    answers = {}
    for why, guess in near_misses.items():
        # An empty token is the header left out (h11 refuses a value ending in a space).
        headers = {"Authorization": b"Bearer " + guess.encode()} if guess else {}
        resp = httpx.post(f"{url}/admin/reload", headers=headers, timeout=30)
        assert resp.status_code == 401, (why, resp.status_code, resp.text)
        answers[why] = resp.content
    assert len(set(answers.values())) == 1, answers
    for scheme in (f"Basic {token}", f"Token {token}", token + ":", f"Bearer{token}"):
        resp = httpx.post(f"{url}/admin/reload", headers={"Authorization": scheme}, timeout=30)
        assert resp.status_code == 401 and resp.content == answers["missing"], (scheme, resp.text)
    ok = httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert ok.status_code == 200, ok.text


# -- embedded services bind to loopback --------------------------------------------------------------


@pytest.fixture
def rendered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("CD4ML_HOME", str(tmp_path / "home"))
    cfg = stack.StackConfig(
        home=tmp_path / "home", airflow_port=18080, mlflow_port=15000, service_port=18000,
        bin_dir=Path(sys.executable).parent,
    )  # fmt: skip
    conf = stack.render_supervisord_conf(cfg)
    programs: dict[str, dict[str, str]] = {}
    current = None
    for line in conf.splitlines():
        if line.startswith("[program:"):
            current = line.removeprefix("[program:").rstrip("]")
            programs[current] = {}
        elif current and "=" in line:
            key, value = line.split("=", 1)
            programs[current][key] = value
    return {"conf": conf, "programs": programs, "cfg": cfg}


def test_every_listening_service_binds_to_loopback(rendered: dict[str, Any]) -> None:
    conf, programs = rendered["conf"], rendered["programs"]
    assert "[inet_http_server]" not in conf  # supervisord itself: a 0700 unix socket only
    assert "chmod=0700" in conf
    assert "--host 127.0.0.1" in programs["mlflow"]["command"]
    assert "--host 127.0.0.1" in programs["prediction-service"]["command"]
    assert 'AIRFLOW__API__HOST="127.0.0.1"' in programs["airflow-api-server"]["environment"]
    for name, program in programs.items():
        assert "0.0.0.0" not in program["command"] + program["environment"], name


def test_airflow_log_servers_are_not_started_on_all_interfaces(rendered: dict[str, Any]) -> None:
    for name in ("airflow-scheduler", "airflow-triggerer"):
        assert "--skip-serve-logs" in rendered["programs"][name]["command"], name


def test_the_service_cli_defaults_to_loopback(mlflow_server: str, shared_specs: Path, tmp_path: Path) -> None:
    """`cd4ml serve` with no --host and no CD4ML_SERVICE_HOST listens on 127.0.0.1 only (observed on
    the real process's sockets, not read from the source, which moved into the settings)."""
    import psutil

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "CD4ML_SPECS_DIR": str(shared_specs)}
    env.pop("CD4ML_SERVICE_HOST", None)
    proc = start_service(env, port, tmp_path / "service.log")
    try:
        listening = {
            c.laddr.ip
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
    assert listening == {"127.0.0.1"}, listening


# -- no secrets in the repository --------------------------------------------------------------------

SECRET_PATTERNS = {
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
    "AWS access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}"),
    "JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
    "URL with a password": re.compile(r"\b[a-z+]+://[^/\s:@]+:(?!\$\{|<|\{)[^@\s/]{4,}@"),
    "assigned secret": re.compile(
        r"\b[A-Za-z_]*(?i:password|passwd|secret|token|api_key)[A-Za-z_]*\s*[:=]\s*[\"']?"
        # the value: 16+ characters mixing lower case, upper case and digits, as generated secrets do
        r"(?=[A-Za-z0-9+/_\-]*[a-z])(?=[A-Za-z0-9+/_\-]*[A-Z])(?=[A-Za-z0-9+/_\-]*\d)([A-Za-z0-9+/_\-]{16,})"
    ),
}
# Values that look like secrets but are published on purpose (the docker-compose defaults for
# a local PostgreSQL, documented in .env.example as values to override).
ALLOWED = {"airflow:airflow@", "mlflow:mlflow@", "postgres:postgres@"}


def test_no_secret_is_committed() -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(
        b"\0"
    )
    tracked = [f.decode() for f in files if f]
    assert ".env" not in tracked and not any(f.startswith(".cd4ml/") for f in tracked)
    assert not any(f.endswith(("secrets.json", ".pem", ".key", "id_rsa")) for f in tracked)
    hits = []
    for name in tracked:
        path = REPO / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for kind, pattern in SECRET_PATTERNS.items():
            for match in pattern.finditer(text):
                if not any(a in match.group(0) for a in ALLOWED):
                    hits.append(f"{name}: {kind}: {match.group(0)[:80]}")
    assert not hits, "\n".join(hits)


def test_the_secret_scanner_finds_what_it_looks_for() -> None:
    """Guards the scan above against patterns that match nothing."""
    # Assembled at run time, so this file does not trip the scan of the tracked files.
    samples = {
        "private key": "-----BEGIN RSA " + "PRIVATE KEY-----",
        "AWS access key": "key AKIA" + "ABCDEFGHIJKLMNOP here",
        "GitHub token": "ghp_" + "a1" * 18,
        "Slack token": "xoxb" + "-123456789012-abc",
        "JWT": "eyJhbGciOiJIUzI1NiJ9" + ".eyJzdWIiOiJhZG1pbiJ9.c2lnbmF0dXJlc2lnbmF0dXJl",
        "URL with a password": "postgresql://admin" + ":s3cr3tpw@db/x",
        "assigned secret": "ADMIN_PASSWORD = " + '"Zq8vN3kLr7Tg2Wx9"',
    }
    for kind, sample in samples.items():
        assert SECRET_PATTERNS[kind].search(sample), kind
    assert not SECRET_PATTERNS["assigned secret"].search('password = os.environ["X"]')


# -- no secrets in the logs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack_service(
    mlflow_server: str, shared_specs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The prediction service with the environment `cd4ml-dev stack up` gives it: generated secrets."""
    home = tmp_path_factory.mktemp("stackhome")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CD4ML_HOME", str(home))
        cfg = stack.StackConfig(
            home=home, airflow_port=free_port(), mlflow_port=free_port(), service_port=free_port(),
            bin_dir=Path(sys.executable).parent,
        )  # fmt: skip
        env = {**os.environ, **stack.environment(cfg)}
    env |= {"MLFLOW_TRACKING_URI": mlflow_server, "CD4ML_SPECS_DIR": str(shared_specs)}
    secrets = json.loads((home / "secrets.json").read_text())
    assert (home / "secrets.json").stat().st_mode & 0o077 == 0
    log = home / "service.log"
    proc = start_service(env, cfg.service_port, log)
    try:
        yield {"url": cfg.service_url, "secrets": secrets, "log": log, "pid": proc.pid}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


MALICIOUS = "malicious"


@pytest.fixture(scope="module")
def safe_champion(prediction_service: dict[str, str], mlflow_server: str, shared_specs: Path) -> str:
    """A model whose champion (v1) is a genuine, safe model served by the session's service."""
    return serve_champion(
        MALICIOUS, specs_dir=shared_specs, tracking_uri=mlflow_server, service_url=prediction_service["url"]
    )


def test_generated_secrets_never_reach_the_service_log(
    stack_service: dict[str, Any], safe_champion: str, mlflow_server: str
) -> None:
    import psutil

    url, secrets = stack_service["url"], stack_service["secrets"]
    assert set(secrets) >= {"admin_password", "jwt_secret", "api_secret_key", "service_admin_token"}
    token = secrets["service_admin_token"]
    # This service holds the stack's own token: the champion's record must be signed with it (as
    # the stack's Airflow does); the session's service keeps the version it already serves.
    client = registry.client(mlflow_server)
    record = registry.champion_signature(token, MALICIOUS, safe_champion, "2026-01-01T00:00:00+00:00")
    client.set_model_version_tag(MALICIOUS, safe_champion, registry.SIGNATURE_TAG, record)
    assert httpx.post(f"{url}/admin/reload", timeout=30).status_code == 401
    wrong = httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {token}!"}, timeout=30)
    assert wrong.status_code == 401
    ok = httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["serving"].get(MALICIOUS) == safe_champion, ok.text
    predicted = httpx.post(f"{url}/v1/models/{MALICIOUS}/predict", json=[_record()], timeout=30)
    assert predicted.status_code == 200, predicted.text
    # It listens on loopback only.
    listening = {
        c.laddr.ip
        for p in [psutil.Process(stack_service["pid"]), *psutil.Process(stack_service["pid"]).children(True)]
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {"127.0.0.1"}, listening
    text = stack_service["log"].read_text(errors="replace")
    assert text.strip(), "the service wrote no log at all: this check would be empty"
    for name, value in secrets.items():
        assert value not in text, f"{name} appears in the service log"


def test_the_session_logs_hold_no_admin_token(prediction_service: dict[str, str]) -> None:
    """Every log the test session's services and tasks wrote so far (deploys send the token)."""
    token = prediction_service["token"]
    airflow_logs = Path(os.environ["AIRFLOW_HOME"]) / "logs"
    logs = [Path(prediction_service["log"])]
    logs += [p for p in airflow_logs.rglob("*") if p.is_file()] if airflow_logs.exists() else []
    logs += [p for p in (get_settings().home / "data").rglob("*.txt") if p.is_file()]
    assert logs
    leaked = [str(p) for p in logs if token in p.read_text(errors="replace")]
    assert not leaked


def _record() -> dict[str, Any]:
    from cd4ml_dev.datagen import generate_churn

    row = generate_churn(1, seed=5).iloc[0]
    return {
        k: (v.item() if hasattr(v, "item") else v)
        for k, v in row.items()
        if k not in {"churned", "event_time"}
    }


# -- models load without running pickles ---------------------------------------------------------------


class MarkerStep:
    """Creates the marker file when its state is restored, i.e. when a loader builds it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __setstate__(self, state: dict[str, Any]) -> None:
        Path(state["marker"]).touch()
        self.__dict__.update(state)


class ReducePayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _model_dir(directory: Path, *, fmt: str, filename: str, payload: bytes) -> Path:
    """An MLflow sklearn model directory, written by hand so nothing loads the payload on the way."""
    directory.mkdir(parents=True)
    (directory / filename).write_bytes(payload)
    inputs = json.dumps([{"type": "double", "name": "x", "required": True}])
    mlmodel = {
        "artifact_path": "model",
        "flavors": {"sklearn": {"pickled_model": filename, "serialization_format": fmt,
                                "sklearn_version": "1.9.1", "code": None}},
        "signature": {"inputs": inputs, "outputs": None},
        "mlflow_version": mlflow.__version__,
    }  # fmt: skip
    (directory / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return directory


def _malicious_artefacts(tmp: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """name -> (model dir, the words the refusal must contain)."""
    import skops.io
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    shell = Pipeline([("run", FunctionTransformer(func=os.system)), ("clf", LogisticRegression())])
    custom = Pipeline([("step", MarkerStep(str(marker))), ("clf", LogisticRegression())])
    return {
        "skops-os-system": (
            _model_dir(tmp / "a", fmt="skops", filename="model.skops", payload=skops.io.dumps(shell)),
            "refers to types outside the allow-list",
        ),
        "skops-custom-class": (
            _model_dir(tmp / "b", fmt="skops", filename="model.skops", payload=skops.io.dumps(custom)),
            "MarkerStep",
        ),
        "cloudpickle-reduce": (
            _model_dir(
                tmp / "c",
                fmt="cloudpickle",
                filename="model.pkl",
                payload=pickle.dumps(ReducePayload(marker)),
            ),
            "serialized as 'cloudpickle'; only 'skops' is loaded",
        ),
        "pickle-labelled-skops": (
            _model_dir(
                tmp / "d", fmt="skops", filename="model.skops", payload=pickle.dumps(ReducePayload(marker))
            ),
            "is labelled skops but is not a skops file",
        ),
        "path-escape": (_escape_dir(tmp / "e"), "not a file in the model"),
    }


def _escape_dir(directory: Path) -> Path:
    out = _model_dir(directory, fmt="skops", filename="model.skops", payload=b"PK")
    mlmodel = yaml.safe_load((out / "MLmodel").read_text())
    mlmodel["flavors"]["sklearn"]["pickled_model"] = "../../../../../../etc/passwd"
    (out / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return out


def test_malicious_model_versions_are_refused_and_never_executed(
    prediction_service: dict[str, str], mlflow_server: str, safe_champion: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    mlflow_client = registry.client(mlflow_server)
    mlflow.set_experiment(MALICIOUS)
    url, token = prediction_service["url"], prediction_service["token"]
    try:
        for name, (model_dir, words) in _malicious_artefacts(tmp_path / "artefacts", marker).items():
            with mlflow.start_run(run_name=name) as run:
                mlflow.log_artifacts(str(model_dir), "model")
            version = mlflow.register_model(f"runs:/{run.info.run_id}/model", MALICIOUS).version
            # The loader the pipeline and the service use:
            with pytest.raises(registry.UnsafeModelError) as err:
                registry.load_bundle(mlflow_server, f"models:/{MALICIOUS}/{version}")
            assert words in str(err.value), (name, str(err.value))
            # The service, told that this version is now the champion:
            make_champion(mlflow_client, MALICIOUS, version)
            reload = httpx.post(
                f"{url}/admin/reload", headers={"Authorization": f"Bearer {token}"}, timeout=120
            )
            assert reload.status_code == 200
            refused = reload.json()["refused"].get(f"{MALICIOUS}/{version}", "")
            assert "UnsafeModelError" in refused and words in refused, (name, reload.json())
            served = httpx.get(f"{url}/v1/models/{MALICIOUS}", timeout=30).json()
            assert served["version"] == safe_champion, (name, served)  # still the safe champion
            assert not marker.exists(), f"{name}: the payload ran"
    finally:
        make_champion(mlflow_client, MALICIOUS, safe_champion)
    assert not marker.exists()


def test_the_payloads_are_live() -> None:
    """Guards the test above: loaded without the allow-list, these payloads do run."""
    import tempfile

    import skops.io

    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "ran"
        pickle.loads(pickle.dumps(ReducePayload(marker)))  # that is the point
        assert marker.exists()
        marker.unlink()
        data = skops.io.dumps(MarkerStep(str(marker)))
        skops.io.loads(data, trusted=skops.io.get_untrusted_types(data=data))
        assert marker.exists()
