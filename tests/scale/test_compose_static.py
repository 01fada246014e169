"""docker-compose.yaml, checked without Docker: valid, complete, secret-free, and the same process
topology, commands and settings as the embedded stack (cd4ml/stack.py), the Dockerfile and the
Makefile. Runs in the default `pytest` (it takes well under a second)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cd4ml_dev import compose, stack

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yaml"
PROVIDED = {"postgres", "redis"}  # official images with their own commands
SECRET_KEY = re.compile(r"SECRET|PASSWORD|TOKEN|FERNET|_KEY\b")


def required_vars() -> dict[str, str]:
    return {
        n: f"test-{n.lower()}" for n, v in compose.variables(compose.load_raw(COMPOSE)).items() if v.required
    }


@pytest.fixture(scope="module")
def services() -> dict[str, compose.Service]:
    return compose.load(COMPOSE, required_vars())


def airflow_services(services: dict[str, compose.Service]) -> list[compose.Service]:
    return [s for s in services.values() if (s.command or [""])[0] in {"airflow", "bash"}]


def test_valid_yaml_with_an_image_or_build_for_every_service() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(raw["services"], dict)
    for name, svc in raw["services"].items():
        assert svc.get("image") or svc.get("build"), f"{name}: neither image nor build"
    assert set(raw["volumes"]) >= {
        m.source for s in compose.load(COMPOSE, required_vars()).values() for m in s.mounts if not m.is_bind
    }


def test_the_same_processes_as_the_embedded_stack_plus_workers_and_servers(
    services: dict[str, compose.Service],
) -> None:
    assert set(services) == set(stack.PROGRAMS) | PROVIDED | {"airflow-init", "airflow-worker"}
    for name, (command, _) in stack.PROGRAMS.items():
        # Same program and subcommand as under supervisord (options differ: hosts and paths).
        assert services[name].command is not None, name
        assert services[name].command[:2] == command.split()[:2], (name, services[name].command, command)
    assert services["airflow-worker"].command[:3] == ["airflow", "celery", "worker"]
    # Log servers bind every interface; logs are files on the shared volume instead (as embedded).
    for name in ("airflow-worker", "airflow-triggerer"):
        assert "--skip-serve-logs" in (services[name].command or []), name
    assert (
        services["airflow-init"].command is not None
        and "airflow db migrate" in services["airflow-init"].command[-1]
    )


def test_commands_are_exec_form_and_non_airflow_ones_bypass_the_airflow_entrypoint() -> None:
    raw = compose.load_raw(COMPOSE)["services"]
    for name, svc in raw.items():
        if name in PROVIDED:
            continue
        assert isinstance(svc.get("command"), list), (
            f"{name}: use exec form so cd4ml_dev.scale runs it verbatim"
        )
        # The Airflow image's entrypoint runs `airflow <command>` unless it starts with airflow/bash/python.
        if svc["command"][0] not in {"airflow", "bash", "python"}:
            assert svc.get("entrypoint"), (
                f"{name}: `{svc['command'][0]}` would run as `airflow {svc['command'][0]}`"
            )


def test_airflow_services_share_one_celery_configuration(services: dict[str, compose.Service]) -> None:
    envs = [s.environment for s in airflow_services(services)]
    assert len(envs) == 6  # init, api-server, scheduler, dag-processor, triggerer, worker
    keys = ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL",
            "AIRFLOW__CELERY__RESULT_BACKEND", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "MLFLOW_TRACKING_URI", "CD4ML_DATA_DIR")  # fmt: skip
    for key in keys:
        assert len({env[key] for env in envs}) == 1, key
    env = envs[0]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://")
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:6379/")


def test_urls_point_at_the_services_that_listen_there(services: dict[str, compose.Service]) -> None:
    def listens(name: str, port: int) -> bool:
        cmd = services[name].command or []
        return any(p.container_port == port for p in services[name].ports) or (
            "--port" in cmd and cmd[cmd.index("--port") + 1] == str(port)
        )

    env = services["airflow-worker"].environment
    checks = {
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": ("airflow-api-server", "/execution/"),
        "MLFLOW_TRACKING_URI": ("mlflow", ""),
        "CD4ML_SERVICE_URL": ("prediction-service", ""),
    }
    for key, (name, path) in checks.items():
        m = re.fullmatch(r"http://([\w-]+):(\d+)(/.*)?", env[key])
        assert m, (key, env[key])
        assert m.group(1) == name and listens(name, int(m.group(2))) and (m.group(3) or "") == path, env[key]
    assert services["prediction-service"].environment["MLFLOW_TRACKING_URI"] == env["MLFLOW_TRACKING_URI"]
    assert services["prediction-service"].environment["OMP_WAIT_POLICY"] == env["OMP_WAIT_POLICY"]
    # The worker deploys to the service with the token the service checks.
    assert (
        services["prediction-service"].environment["CD4ML_SERVICE_ADMIN_TOKEN"]
        == env["CD4ML_SERVICE_ADMIN_TOKEN"]
    )


def test_tuning_matches_the_embedded_stack(services: dict[str, compose.Service]) -> None:
    """Scheduler, DAG-processor and triggerer settings must not drift from what `make up` runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CD4ML_HOME", "/tmp/cd4ml-static-check-unused")
        cfg = stack.StackConfig(Path("/tmp/cd4ml-static-check-unused"), 8080, 5000, 8000, Path("/usr/bin"))
        mp.setattr(stack, "_secrets", lambda _: dict.fromkeys(
            ("jwt_secret", "api_secret_key", "admin_password", "service_admin_token", "metrics_token"),
            "x"))  # fmt: skip
        embedded = stack.environment(cfg)
    topology_specific = {
        "AIRFLOW__CORE__EXECUTOR", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__DAGS_FOLDER",
        "AIRFLOW__CORE__PLUGINS_FOLDER", "AIRFLOW__CORE__PARALLELISM", "AIRFLOW__API__HOST",
        "AIRFLOW__API__PORT", "AIRFLOW__API__BASE_URL", "AIRFLOW__API__WORKERS", "AIRFLOW__API__SECRET_KEY",
        "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
        # Compose logs in with FAB (users in the metadata DB); the embedded stack with SimpleAuthManager.
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS",
        "AIRFLOW__CORE__AUTH_MANAGER",
    }  # fmt: skip
    env = services["airflow-scheduler"].environment
    for key, value in embedded.items():
        if key.startswith("AIRFLOW__") and key not in topology_specific:
            assert env.get(key) == value, f"{key}: compose {env.get(key)!r} vs embedded {value!r}"
    for key in ("GX_ANALYTICS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "OMP_WAIT_POLICY"):
        assert env[key] == embedded[key]


def test_volumes_share_code_data_and_artifacts(services: dict[str, compose.Service]) -> None:
    for svc in services.values():
        for mount in svc.mounts:
            if mount.is_bind:
                assert (COMPOSE.parent / mount.source).exists(), f"{svc.name}: {mount.source} does not exist"
    for svc in airflow_services(services):
        targets = {m.target: m for m in svc.mounts}
        env = svc.environment
        assert targets[env["AIRFLOW__CORE__DAGS_FOLDER"]].source == "./dags", svc.name
        assert targets[env["AIRFLOW__CORE__PLUGINS_FOLDER"]].source == "./plugins", svc.name
        assert targets[env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"]].source == "airflow-logs", svc.name
        assert env["CD4ML_SPECS_DIR"].startswith(
            next(t for t, m in targets.items() if m.source == "./include")
        )
        # Logins live in the metadata DB (FAB), not in a passwords file on a volume.
        assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith(".FabAuthManager"), svc.name
    # One data volume for every process that reads or writes the data root (the triggerer watches
    # landing/, workers move files, the service writes its prediction log).
    data_users = [*airflow_services(services), services["prediction-service"]]
    sources = {
        next(m.source for m in s.mounts if m.target == s.environment["CD4ML_DATA_DIR"]) for s in data_users
    }
    assert sources == {"cd4ml-data"}
    mlflow = services["mlflow"]
    cmd = mlflow.command or []
    artifacts = cmd[cmd.index("--artifacts-destination") + 1]
    assert any(m.target == artifacts and not m.is_bind for m in mlflow.mounts)
    assert cmd[cmd.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://airflow:")
    init_sql = next(m for m in services["postgres"].mounts if "initdb" in m.target)
    assert "CREATE DATABASE mlflow" in (COMPOSE.parent / init_sql.source).read_text()


def test_health_checks_and_start_order(services: dict[str, compose.Service]) -> None:
    for svc in services.values():
        if svc.name != "airflow-init":
            assert svc.healthcheck, f"{svc.name}: no healthcheck"
    for svc in airflow_services(services):
        assert svc.depends_on.get("postgres") == "service_healthy", svc.name
        assert svc.depends_on.get("redis") == "service_healthy", svc.name
        if svc.name != "airflow-init":
            assert svc.depends_on.get("airflow-init") == "service_completed_successfully", svc.name
    worker = services["airflow-worker"].depends_on
    assert worker["airflow-api-server"] == worker["mlflow"] == "service_healthy"
    assert services["prediction-service"].depends_on == {"mlflow": "service_healthy"}
    order = compose.start_order(services)
    assert order.index("airflow-init") < order.index("airflow-scheduler") < order.index("airflow-worker")
    for svc in services.values():
        for port in svc.ports:
            assert port.host_ip == "127.0.0.1", f"{svc.name}: publish on loopback only"


def _env_example() -> tuple[set[str], set[str]]:
    text = (REPO / ".env.example").read_text()
    required = set(re.findall(r"^([A-Z][A-Z0-9_]*)=$", text, re.M))
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, re.M))
    return required, documented


def test_no_hard_coded_secrets_and_every_variable_documented() -> None:
    raw = compose.load_raw(COMPOSE)
    variables = compose.variables(raw)
    required, documented = _env_example()
    assert set(variables) <= documented, f"undocumented in .env.example: {set(variables) - documented}"
    secrets = {n for n, v in variables.items() if v.required}
    assert secrets == required, "required variables and the empty `VAR=` lines of .env.example differ"
    assert all(v.default is None for n, v in variables.items() if SECRET_KEY.search(n))

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                # A *_FILE setting names where a secret lives; the value itself must come from .env.
                if isinstance(v, str) and SECRET_KEY.search(str(k)) and not str(k).endswith("_FILE"):
                    assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", v), (
                        f"{where}.{k} is not a required ${{VAR}}"
                    )
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
        elif isinstance(node, str):
            for m in compose.urls(node):
                auth = m.group("auth") or ""
                if ":" in auth:
                    assert auth.split(":", 1)[1].startswith("${"), f"{where}: password in a URL"

    walk(raw, "compose")
    tracked = subprocess.run(["git", "ls-files", ".env"], cwd=REPO, capture_output=True, text=True).stdout
    assert tracked.strip() == "", ".env must never be committed"


def test_a_missing_secret_stops_start_up_with_its_name() -> None:
    values = required_vars()
    for name in values:
        partial = {k: v for k, v in values.items() if k != name}
        with pytest.raises(compose.ComposeError, match=rf"\b{name}\b"):
            compose.load(COMPOSE, partial)
        with pytest.raises(compose.ComposeError, match=rf"\b{name}\b"):
            compose.load(COMPOSE, {**partial, name: ""})


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert (
        compose.interpolate("${SET} ${EMPTY:-d} ${EMPTY-d} ${UNSET:-d} $$HOSTNAME", env) == "v d  d $HOSTNAME"
    )
    with pytest.raises(compose.ComposeError, match="UNSET must be set"):
        compose.interpolate("${UNSET:?UNSET must be set}", env)


def test_image_and_makefile_agree_with_the_pins_and_the_test_entry_point() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    # The venv's Python (pyproject's requires-python) on the official Debian image of that Python.
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in dockerfile
    assert ">=3.11,<3.12" in (REPO / "pyproject.toml").read_text()
    assert "-c /opt/cd4ml/constraints.txt" in dockerfile and "-r /opt/cd4ml/requirements.txt" in dockerfile
    requirements = (REPO / "requirements.txt").read_text()
    assert re.search(r"^apache-airflow-providers-fab==", requirements, re.M), "FAB login needs its provider"
    # The image copies the committed local settings; it never imports the dev tooling to write them.
    assert "COPY --chown=airflow:0 config/airflow_local_settings.py /opt/airflow/config/" in dockerfile
    assert "cd4ml_dev" not in dockerfile and not re.search(r"^COPY.* dev/", dockerfile, re.M)
    makefile = (REPO / "Makefile").read_text()
    # The Celery topology is proven on real containers (make test-compose, which CI runs after make
    # test); the local-process emulation (make test-scale) stays out of make test (pyproject's addopts).
    test_rule = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert test_rule and "scale" not in test_rule.group(1), (
        "make test leaves the emulation to make test-scale"
    )
    scale_rule = re.search(r"^test-scale:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert scale_rule and "-m scale" in scale_rule.group(1)
    compose_rule = re.search(r"^test-compose:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert compose_rule and "scripts/compose/test.sh" in compose_rule.group(1)
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M) and re.search(r"^make test-compose$", ci, re.M), ci


def test_the_runtime_image_holds_no_dev_or_test_tooling() -> None:
    """The build context is only what .dockerignore lets in; the runtime package never imports tooling."""
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    assert "*" in lines, "everything is left out of the build context unless listed"
    allowed = [line[1:] for line in lines if line.startswith("!")]
    assert allowed and not [p for p in allowed if p.startswith(("dev", "tests", "benchmarks", "scripts"))]
    shipped = [REPO / "include" / "cd4ml", REPO / "dags", REPO / "plugins", REPO / "config"]
    for module in (path for root in shipped for path in root.rglob("*.py")):
        imports = re.findall(r"^\s*(?:from|import) ([\w.]+)", module.read_text(), re.M)
        tooling = [m for m in imports if m.split(".")[0] in {"cd4ml_dev", "tests", "pytest", "playwright"}]
        assert not tooling, f"{module.relative_to(REPO)} imports {tooling}"


def test_airflow_metrics_reach_the_statsd_exporter_when_switched_on() -> None:
    on = compose.load(COMPOSE, {**required_vars(), "AIRFLOW_STATSD_ON": "True"})
    raw = compose.load_raw(COMPOSE)["services"]
    exporter = raw["statsd-exporter"]
    assert exporter["profiles"] == ["metrics"] and "statsd-exporter" not in on  # opt-in, as compose does
    for svc in airflow_services(on):
        env = svc.environment
        assert env["AIRFLOW__METRICS__STATSD_ON"] == "True", svc.name
        assert env["AIRFLOW__METRICS__STATSD_HOST"] == "statsd-exporter", svc.name
        assert f"--statsd.listen-udp=:{env['AIRFLOW__METRICS__STATSD_PORT']}" in exporter["command"]
    off = compose.load(COMPOSE, required_vars())
    assert all(s.environment["AIRFLOW__METRICS__STATSD_ON"] == "False" for s in airflow_services(off))


OTEL_VARIABLES = {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_HEADERS"}


def test_prometheus_and_alertmanager_come_with_the_monitoring_profile() -> None:
    raw = compose.load_raw(COMPOSE)
    services = raw["services"]
    on_by_default = compose.load(COMPOSE, required_vars())
    for name in ("prometheus", "alertmanager"):
        assert services[name]["profiles"] == ["monitoring"] and name not in on_by_default, name
        assert services[name]["image"].startswith(f"prom/{name}:v"), name  # the official images, pinned
        for port in services[name]["ports"]:
            assert port.startswith("127.0.0.1:"), f"{name}: publish on loopback only"
    # Both read the committed files: the same ones `CD4ML_PROMETHEUS=1 make up` renders from.
    prometheus, alertmanager = (compose._service(n, services[n]) for n in ("prometheus", "alertmanager"))
    mount = next(m for m in prometheus.mounts if m.is_bind)
    assert (REPO / mount.source).resolve() == stack.PROMETHEUS_DIR

    def config_file(svc: compose.Service, flag: str) -> Path:
        value = next(a.split("=", 1)[1] for a in svc.command or [] if a.startswith(f"{flag}="))
        m = next(m for m in svc.mounts if value.startswith(m.target + "/"))
        return REPO / m.source / value.removeprefix(m.target + "/")

    assert config_file(prometheus, "--config.file") == REPO / "config/prometheus/prometheus.yml"
    assert config_file(alertmanager, "--config.file") == REPO / "config/prometheus/alertmanager.yml"
    assert "--cluster.listen-address=" in (alertmanager.command or [])

    # Prometheus scrapes the services where they listen, and sends alerts where Alertmanager listens.
    config = yaml.safe_load(stack.PROMETHEUS_CONFIG.read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    assert targets["cd4ml-service"] == ["prediction-service:8000"]
    assert targets["cd4ml-pipeline"] == ["airflow-api-server:8080"]
    assert on_by_default["airflow-api-server"].command[-1] == "8080"
    assert on_by_default["prediction-service"].command[-1] == "8000"
    alerting = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alerting == ["alertmanager:9093"] and "127.0.0.1:9093:9093" in services["alertmanager"]["ports"]

    # The metrics token: one .env value, in the api-server's settings and in Prometheus's credentials file.
    pipeline = next(j for j in config["scrape_configs"] if j["job_name"] == "cd4ml-pipeline")
    (secret,) = services["prometheus"]["secrets"]
    assert pipeline["authorization"]["credentials_file"] == f"/run/secrets/{secret}"
    assert raw["secrets"][secret] == {"environment": "CD4ML_METRICS_TOKEN"}
    # No value in the file: taken from .env when set there, unset (login required) otherwise.
    assert "CD4ML_METRICS_TOKEN" in services["airflow-api-server"]["environment"]
    assert services["airflow-api-server"]["environment"]["CD4ML_METRICS_TOKEN"] is None


def test_the_otel_collector_comes_with_the_telemetry_profile_and_otel_variables_stay_unset() -> None:
    raw = compose.load_raw(COMPOSE)
    collector = raw["services"]["otel-collector"]
    assert collector["profiles"] == ["telemetry"] and collector["image"].startswith(
        "otel/opentelemetry-collector:"
    )
    assert sorted(collector["ports"]) == ["127.0.0.1:4317:4317", "127.0.0.1:4318:4318"]
    svc = compose._service("otel-collector", collector)
    value = (svc.command or [""])[0].split("=", 1)[1]
    mount = next(m for m in svc.mounts if value.startswith(m.target + "/"))
    config = yaml.safe_load((REPO / mount.source / value.removeprefix(mount.target + "/")).read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    # Inside its container the collector must listen beyond localhost (its default since 0.104).
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317" and protocols["http"]["endpoint"] == "0.0.0.0:4318"
    assert config["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]
    assert set(config["service"]["pipelines"]["traces"]["exporters"]) <= set(config["exporters"])
    # Every process that runs cd4ml code gets the OTEL_* variables, with no value: compose passes
    # the user's (shell or .env) and leaves them unset otherwise, so tracing is off unless asked for.
    services = compose.load(COMPOSE, required_vars())
    for name in [*(s.name for s in airflow_services(services)), "prediction-service"]:
        env = raw["services"][name]["environment"]
        assert OTEL_VARIABLES <= set(env), name
        assert all(env[key] is None for key in OTEL_VARIABLES), name
