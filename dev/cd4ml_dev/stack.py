"""The embedded stack: Airflow (api-server, scheduler, dag-processor, triggerer; SQLite, LocalExecutor)
and an MLflow tracking server (SQLite, local artifacts), run under supervisord.

All state lives under CD4ML_HOME (default `.cd4ml/` in the project). `up` is idempotent and resumes
with state intact; `down` stops everything supervisord started. Ports come from the environment
(CD4ML_AIRFLOW_PORT, CD4ML_MLFLOW_PORT) so tests can run a second stack beside a developer's.

`CD4ML_PROMETHEUS=1` adds a Prometheus server and an Alertmanager (Debian's packages, `make
prometheus`) with the committed config/prometheus files, rendered for the stack's ports: bound to
127.0.0.1 on CD4ML_PROMETHEUS_PORT (9090) and CD4ML_ALERTMANAGER_PORT (9093), data under
`<CD4ML_HOME>/prometheus` and `<CD4ML_HOME>/alertmanager` (docs/monitoring.md).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cd4ml.core.settings import PROJECT_ROOT, get_settings
from cd4ml_dev import netutil
from cd4ml_dev.netutil import port_in_use


@dataclass(frozen=True)
class StackConfig:
    home: Path
    airflow_port: int
    mlflow_port: int
    service_port: int
    bin_dir: Path
    parallelism: int = 4
    prometheus: bool = False  # CD4ML_PROMETHEUS: also run Prometheus and Alertmanager
    prometheus_port: int = 9090
    alertmanager_port: int = 9093

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def supervisor_dir(self) -> Path:
        return self.home / "supervisor"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def conf_path(self) -> Path:
        return self.supervisor_dir / "supervisord.conf"

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.airflow_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.service_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"

    @property
    def prometheus_dir(self) -> Path:
        return self.home / "prometheus"

    @property
    def alertmanager_dir(self) -> Path:
        return self.home / "alertmanager"


def config_from_env() -> StackConfig:
    settings = get_settings()
    return StackConfig(
        home=settings.home,
        airflow_port=int(os.environ.get("CD4ML_AIRFLOW_PORT", "8080")),
        mlflow_port=int(os.environ.get("CD4ML_MLFLOW_PORT", "5000")),
        service_port=int(os.environ.get("CD4ML_SERVICE_PORT", "8000")),
        bin_dir=Path(sys.executable).parent,
        parallelism=int(os.environ.get("CD4ML_PARALLELISM", "4")),
        prometheus=os.environ.get("CD4ML_PROMETHEUS", "").strip().lower() in {"1", "true", "yes", "on"},
        prometheus_port=int(os.environ.get("CD4ML_PROMETHEUS_PORT", "9090")),
        alertmanager_port=int(os.environ.get("CD4ML_ALERTMANAGER_PORT", "9093")),
    )


def _secrets(cfg: StackConfig) -> dict[str, str]:
    """Generated once per state dir, never committed, never printed except the UI password."""
    path = cfg.home / "secrets.json"
    if path.exists():
        values = dict(json.loads(path.read_text()))
        added = False
        # State from before the prediction service (admin token) or Prometheus (metrics token) existed.
        for key in ("service_admin_token", "metrics_token"):
            if key not in values:
                values[key], added = secrets.token_urlsafe(24), True
        if added:
            path.write_text(json.dumps(values))
        return values
    values = {
        "jwt_secret": secrets.token_urlsafe(32),
        "api_secret_key": secrets.token_urlsafe(32),
        "admin_password": secrets.token_urlsafe(12),
        "service_admin_token": secrets.token_urlsafe(24),
        "metrics_token": secrets.token_urlsafe(24),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(values))
    return values


def otel_environment(source: Mapping[str, str]) -> dict[str, str]:
    """What the stack's processes get for OpenTelemetry: every `OTEL_*` variable of the caller's
    environment (`OTEL_EXPORTER_OTLP_ENDPOINT=... make up`), unset ones staying unset (off).

    Put in the supervisord config rather than left to inheritance, so a changed value restarts the
    programs on the next `up` and `cd4ml-dev stack env` shows it. The one place to derive Airflow's
    own trace settings (AIRFLOW__TRACES__*) from these, too.
    """
    from cd4ml.core.telemetry import airflow_trace_env

    # Airflow's [traces] switch and exporter follow the same variables (nothing when no endpoint).
    return {**{key: value for key, value in source.items() if key.startswith("OTEL_")},
            **airflow_trace_env(source)}  # fmt: skip


def environment(cfg: StackConfig) -> dict[str, str]:
    """The environment every process of the stack shares (a shell can `source` `cd4ml-dev stack env`)."""
    settings = get_settings()
    sec = _secrets(cfg)
    ah = cfg.airflow_home
    return {
        "PATH": f"{cfg.bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "CD4ML_HOME": str(cfg.home),
        "CD4ML_DATA_DIR": str(settings.data_dir),
        "CD4ML_SPECS_DIR": str(settings.specs_dir),
        "CD4ML_AIRFLOW_PORT": str(cfg.airflow_port),
        "CD4ML_MLFLOW_PORT": str(cfg.mlflow_port),
        "CD4ML_SERVICE_PORT": str(cfg.service_port),
        "CD4ML_SERVICE_WORKERS": str(settings.service_workers),
        "CD4ML_SERVICE_URL": cfg.service_url,
        "CD4ML_SERVICE_ADMIN_TOKEN": sec["service_admin_token"],
        # Prometheus scrapes /cd4ml/metrics with it instead of an Airflow login (prometheus_config).
        "CD4ML_METRICS_TOKEN": sec["metrics_token"],
        # What deploy and rollback tasks use (the settings above serve `cd4ml train` and the service).
        "AIRFLOW_CONN_CD4ML_SERVICE": json.dumps(
            {"conn_type": "http", "host": cfg.service_url, "password": sec["service_admin_token"]}
        ),
        "MLFLOW_TRACKING_URI": cfg.mlflow_url,
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # OpenMP threads (HistGradientBoosting, ...) sleep instead of spinning while they wait: with
        # several tasks at once on few cores, spinning threads starve each other (a 1,600-row fit took
        # 160 s instead of 1 s with 4 fits on 2 busy cores; BENCHMARKS.md "Scale-out").
        "OMP_WAIT_POLICY": "passive",
        "AIRFLOW_HOME": str(ah),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(cfg.parallelism),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{ah}/airflow.db",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(ah / "simple_auth_manager_passwords.json"),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(cfg.airflow_port),
        "AIRFLOW__API__BASE_URL": cfg.airflow_url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": sec["api_secret_key"],
        "AIRFLOW__API_AUTH__JWT_SECRET": sec["jwt_secret"],
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{cfg.airflow_url}/execution/",
        # New and edited specs show up within seconds, not the 5-minute default.
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "15",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        # A chained task waits for the scheduler's next loop; idle loops sleep 1 s by default.
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25",
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
        **otel_environment(os.environ),
    }


PROGRAMS: dict[str, tuple[str, int]] = {
    # name: (command relative to the venv's bin/, start priority)
    "mlflow": (
        "mlflow server --backend-store-uri sqlite:///{home}/mlflow/mlflow.db "
        "--artifacts-destination {home}/mlflow/artifacts --host 127.0.0.1 --port {mlflow_port} --workers 1",
        10,
    ),
    "airflow-api-server": ("airflow api-server", 20),
    # --skip-serve-logs: Airflow's log servers bind every interface; task logs here are local files.
    "airflow-scheduler": ("airflow scheduler --skip-serve-logs", 30),
    "airflow-dag-processor": ("airflow dag-processor", 30),
    "airflow-triggerer": ("airflow triggerer --skip-serve-logs", 30),
    "prediction-service": ("cd4ml serve --host 127.0.0.1 --port {service_port}", 20),
}


# Debian's packages (`make prometheus`), found on PATH when the config is rendered. Alertmanager's
# cluster port (gossip, 0.0.0.0:9094 by default) is off: one instance, nothing to gossip with.
MONITORING_PROGRAMS: dict[str, tuple[str, int]] = {
    "prometheus": (
        "prometheus --config.file={prometheus_dir}/prometheus.yml --storage.tsdb.path={prometheus_dir}/data "
        "--web.listen-address=127.0.0.1:{prometheus_port} --web.enable-lifecycle",
        40,
    ),
    "alertmanager": (
        "prometheus-alertmanager --config.file={alertmanager_dir}/alertmanager.yml "
        "--storage.path={alertmanager_dir}/data --web.listen-address=127.0.0.1:{alertmanager_port} "
        "--cluster.listen-address=",
        40,
    ),
}


def programs(cfg: StackConfig) -> dict[str, tuple[str, int]]:
    return {**PROGRAMS, **(MONITORING_PROGRAMS if cfg.prometheus else {})}


def _command(cfg: StackConfig, name: str, command: str) -> str:
    cmd = command.format(
        home=cfg.home, mlflow_port=cfg.mlflow_port, service_port=cfg.service_port,
        prometheus_dir=cfg.prometheus_dir, prometheus_port=cfg.prometheus_port,
        alertmanager_dir=cfg.alertmanager_dir, alertmanager_port=cfg.alertmanager_port,
    )  # fmt: skip
    if name not in MONITORING_PROGRAMS:
        return f"{cfg.bin_dir}/{cmd}"
    program, _, args = cmd.partition(" ")
    found = shutil.which(program)
    if found is None:
        raise SystemExit(
            f"cd4ml: CD4ML_PROMETHEUS is set but `{program}` is not installed; run `make prometheus`"
        )
    return f"{found} {args}"


def _quote_env(env: dict[str, str]) -> str:
    return ",".join(f'{k}="{v.replace("%", "%%").replace(chr(34), "")}"' for k, v in sorted(env.items()))


def render_supervisord_conf(cfg: StackConfig) -> str:
    env = environment(cfg)
    sup = cfg.supervisor_dir
    lines = [
        "; generated by `cd4ml-dev stack up`; edit cd4ml_dev/stack.py instead",
        "[unix_http_server]",
        f"file={sup}/supervisor.sock",
        "chmod=0700",
        "[supervisord]",
        f"logfile={cfg.logs_dir}/supervisord.log",
        f"pidfile={sup}/supervisord.pid",
        f"directory={cfg.home}",
        "logfile_maxbytes=10MB",
        "logfile_backups=2",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "[supervisorctl]",
        f"serverurl=unix://{sup}/supervisor.sock",
    ]
    extra_env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    for name, (command, priority) in programs(cfg).items():
        program_env = {**env, **(extra_env if name == "mlflow" else {})}
        lines += [
            f"[program:{name}]",
            f"command={_command(cfg, name, command)}",
            f"environment={_quote_env(program_env)}",
            f"directory={cfg.home}",
            f"priority={priority}",
            "autostart=true",
            "autorestart=true",
            "startsecs=3",
            "startretries=5",
            "stopasgroup=true",
            "killasgroup=true",
            "stopwaitsecs=20",
            "redirect_stderr=true",
            f"stdout_logfile={cfg.logs_dir}/{name}.log",
            "stdout_logfile_maxbytes=20MB",
            "stdout_logfile_backups=2",
        ]
    return "\n".join(lines) + "\n"


# -- Prometheus and Alertmanager (CD4ML_PROMETHEUS=1) ------------------------------------------------

PROMETHEUS_DIR = PROJECT_ROOT / "config" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTMANAGER_CONFIG = PROMETHEUS_DIR / "alertmanager.yml"
ALERT_RULES = PROMETHEUS_DIR / "rules" / "cd4ml.rules.yml"


def prometheus_config(
    *,
    service: str,
    pipeline: str,
    token_file: Path,
    alertmanager: str | None,
    self_target: str,
    rule_files: list[Path] | None = None,
    interval: str | None = None,
) -> dict[str, Any]:
    """config/prometheus/prometheus.yml with its targets (host:port) and files replaced, so the
    embedded stack and the tests scrape with the same jobs and rules as compose. `interval`
    (e.g. "1s", for tests) replaces every scrape and evaluation interval."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["rule_files"] = [str(p) for p in (rule_files or [ALERT_RULES])]
    if alertmanager:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    else:
        config.pop("alerting", None)
    targets = {"cd4ml-service": service, "cd4ml-pipeline": pipeline, "prometheus": self_target}
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        if "authorization" in job and job["job_name"] == "cd4ml-pipeline":
            job["authorization"]["credentials_file"] = str(token_file)
        if interval:
            job["scrape_interval"] = job["scrape_timeout"] = interval
    if interval:
        config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    return config


@dataclass(frozen=True)
class SmtpServer:
    """An Airflow SMTP connection (`cd4ml_smtp`) as Alertmanager's global smtp_* settings take it."""

    host: str
    port: int
    login: str | None
    password: str | None
    sender: str
    require_tls: bool


def smtp_from_connection(value: str) -> SmtpServer:
    """Parse AIRFLOW_CONN_CD4ML_SMTP (JSON or URI form) with the TLS rules of cd4ml's notifier
    (cd4ml.airflow.notifiers): without `disable_ssl`/`disable_tls` extras, STARTTLS only when extra
    `starttls` is true; with them, STARTTLS unless `disable_tls`. Alertmanager speaks implicit TLS
    on port 465 by itself."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    if value.lstrip().startswith("{"):
        conn = json.loads(value)
        extra = conn.get("extra") or {}
        if isinstance(extra, str):
            extra = json.loads(extra or "{}")
        host, port = str(conn.get("host") or ""), int(conn.get("port") or 25)
        login, password = conn.get("login"), conn.get("password")
    else:
        url = urlsplit(value)
        extra = dict(parse_qsl(url.query))
        host, port = url.hostname or "", int(url.port or 25)
        login = unquote(url.username) if url.username else None
        password = unquote(url.password) if url.password else None
    if not host:
        raise SystemExit("cd4ml: AIRFLOW_CONN_CD4ML_SMTP has no host; see docs/settings.md (cd4ml_smtp)")

    def flag(key: str) -> bool:
        return str(extra.get(key, "false")).strip().lower() in {"1", "true", "yes", "on"}

    legacy = "disable_ssl" not in extra and "disable_tls" not in extra
    return SmtpServer(
        host=host, port=port, login=login or None, password=password or None,
        sender=str(extra.get("from_email") or "cd4ml@localhost"),
        require_tls=flag("starttls") if legacy else not flag("disable_tls"),
    )  # fmt: skip


def alertmanager_config(
    smtp: SmtpServer | None,
    recipients: Mapping[str, list[str]],
    *,
    password_file: Path,
    webhook_url: str | None = None,
) -> dict[str, Any]:
    """config/prometheus/alertmanager.yml (its routing, timings and inhibitions) with the SMTP
    server of cd4ml's notification mails and, per model, the spec's `notifications.email`;
    alerts without a model (a scrape down) go to everyone. Without an SMTP connection nobody is
    mailed: alerts show in Alertmanager's UI (and reach `webhook_url`, if given)."""
    config: dict[str, Any] = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    glob: dict[str, Any] = {"resolve_timeout": config.get("global", {}).get("resolve_timeout", "5m")}
    if smtp is not None:
        glob.update(smtp_smarthost=f"{smtp.host}:{smtp.port}", smtp_from=smtp.sender,
                    smtp_require_tls=smtp.require_tls)  # fmt: skip
        if smtp.login:
            glob["smtp_auth_username"] = smtp.login
        if smtp.password:
            glob["smtp_auth_password_file"] = str(password_file)
    config["global"] = glob

    def receiver(name: str, addresses: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name}
        if smtp is not None and addresses:
            out["email_configs"] = [{"to": ", ".join(addresses), "send_resolved": True}]
        if webhook_url:
            out["webhook_configs"] = [{"url": webhook_url, "send_resolved": True}]
        return out

    everyone = sorted({a for addresses in recipients.values() for a in addresses})
    route = config["route"]
    default = route["receiver"]
    receivers = [receiver(default, everyone)]
    model_routes = []
    for model, addresses in sorted(recipients.items()):
        if addresses:
            receivers.append(receiver(f"{model}-people", sorted(addresses)))
            model_routes.append({"matchers": [f'model="{model}"'], "receiver": f"{model}-people",
                                 "continue": False})  # fmt: skip
    # Per-model routes first; the shipped routes (info alerts' repeat interval) keep their receiver.
    route["routes"] = model_routes + list(route.get("routes") or [])
    config["receivers"] = receivers
    return config


def _spec_recipients() -> dict[str, list[str]]:
    from cd4ml.core.spec import load_specs, spec_files

    specs, _ = load_specs(spec_files(get_settings().specs_dir))
    return {spec.name: list(spec.notifications.email) for spec in specs}


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)


def write_monitoring_config(cfg: StackConfig) -> str:
    """Prometheus's and Alertmanager's files under the state dir; returns who gets the mail."""
    for d in (cfg.prometheus_dir / "data", cfg.alertmanager_dir / "data"):
        d.mkdir(parents=True, exist_ok=True)
    token_file = cfg.prometheus_dir / "metrics_token"
    _write_private(token_file, _secrets(cfg)["metrics_token"])
    config = prometheus_config(
        service=f"127.0.0.1:{cfg.service_port}", pipeline=f"127.0.0.1:{cfg.airflow_port}",
        token_file=token_file, alertmanager=f"127.0.0.1:{cfg.alertmanager_port}",
        self_target=f"127.0.0.1:{cfg.prometheus_port}",
    )  # fmt: skip
    (cfg.prometheus_dir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    conn = os.environ.get("AIRFLOW_CONN_CD4ML_SMTP")
    smtp = smtp_from_connection(conn) if conn else None
    password_file = cfg.alertmanager_dir / "smtp_password"
    if smtp is not None and smtp.password:
        _write_private(password_file, smtp.password)
    recipients = _spec_recipients()
    webhook = os.environ.get("CD4ML_ALERT_WEBHOOK_URL") or None
    am = alertmanager_config(smtp, recipients, password_file=password_file, webhook_url=webhook)
    (cfg.alertmanager_dir / "alertmanager.yml").write_text(yaml.safe_dump(am, sort_keys=False))
    people = sorted({a for addresses in recipients.values() for a in addresses})
    if smtp is None:
        mail = "no mail (AIRFLOW_CONN_CD4ML_SMTP is not set)"
    elif not people:
        mail = "no mail (no spec lists notifications.email)"
    else:
        mail = f"mail to {', '.join(people)} via {smtp.host}:{smtp.port}"
    return mail + (f", webhook {webhook}" if webhook else "")


# Committed, so the image copies the same file the embedded stack uses (Dockerfile, cd4ml_dev.scale).
LOCAL_SETTINGS_FILE = PROJECT_ROOT / "config" / "airflow_local_settings.py"


def _run(cmd: list[str], env: dict[str, str], log: Path | None = None) -> None:
    out = log.open("ab") if log else subprocess.DEVNULL
    try:
        subprocess.run(cmd, env={**os.environ, **env}, check=True, stdout=out, stderr=subprocess.STDOUT)
    except subprocess.CalledProcessError as err:
        hint = f"; see {log}" if log else ""
        raise SystemExit(f"cd4ml: `{' '.join(cmd)}` failed with exit code {err.returncode}{hint}") from None


def init(cfg: StackConfig) -> dict[str, str]:
    """Directories, secrets, the UI password, and the migrated Airflow metadata DB (idempotent)."""
    env = environment(cfg)
    for d in (cfg.airflow_home, cfg.supervisor_dir, cfg.logs_dir, cfg.home / "mlflow" / "artifacts"):
        d.mkdir(parents=True, exist_ok=True)
    passwords = cfg.airflow_home / "simple_auth_manager_passwords.json"
    if not passwords.exists():
        passwords.write_text(json.dumps({"admin": _secrets(cfg)["admin_password"]}))
        passwords.chmod(0o600)
    local_settings = cfg.airflow_home / "config" / "airflow_local_settings.py"
    local_settings.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(LOCAL_SETTINGS_FILE, local_settings)
    _run([str(cfg.bin_dir / "airflow"), "db", "migrate"], env, cfg.logs_dir / "airflow-db-migrate.log")
    if cfg.prometheus:
        print(f"cd4ml: Prometheus {cfg.prometheus_url}, Alertmanager {cfg.alertmanager_url}: "
              f"{write_monitoring_config(cfg)}", flush=True)  # fmt: skip
    cfg.conf_path.write_text(render_supervisord_conf(cfg))
    return env


def supervisorctl(cfg: StackConfig, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(cfg.bin_dir / "supervisorctl"), "-c", str(cfg.conf_path), *args],
        capture_output=True, text=True, check=check,
    )  # fmt: skip


def is_running(cfg: StackConfig) -> bool:
    if not cfg.conf_path.exists():
        return False
    return supervisorctl(cfg, "pid", check=False).stdout.strip().isdigit()


def up(cfg: StackConfig) -> None:
    running = is_running(cfg)
    ports: list[tuple[int, str]] = []
    if not running:
        ports += [
            (cfg.airflow_port, "CD4ML_AIRFLOW_PORT"),
            (cfg.mlflow_port, "CD4ML_MLFLOW_PORT"),
            (cfg.service_port, "CD4ML_SERVICE_PORT"),
        ]
    # Also when monitoring is switched on for a stack that already runs without it.
    if cfg.prometheus and not (
        running and supervisorctl(cfg, "pid", "prometheus", check=False).stdout.strip().isdigit()
    ):
        ports += [
            (cfg.prometheus_port, "CD4ML_PROMETHEUS_PORT"),
            (cfg.alertmanager_port, "CD4ML_ALERTMANAGER_PORT"),
        ]
    for port, what in ports:
        if port_in_use(port):
            raise SystemExit(f"cd4ml: port {port} is already in use; set {what} to a free port")
    init(cfg)
    if is_running(cfg):
        supervisorctl(cfg, "reread")
        supervisorctl(cfg, "update")
        supervisorctl(cfg, "start", "all", check=False)
    else:
        subprocess.run([str(cfg.bin_dir / "supervisord"), "-c", str(cfg.conf_path)], check=True)
    # Generous: a busy 2-core machine has been seen taking 2 minutes to start MLflow alone.
    limit = float(os.environ.get("CD4ML_START_TIMEOUT", "300"))
    wait_http(f"{cfg.mlflow_url}/health", "MLflow", timeout=limit, cfg=cfg)
    wait_http(f"{cfg.airflow_url}/api/v2/monitor/health", "Airflow API", timeout=limit, cfg=cfg)
    wait_http(f"{cfg.service_url}/health/live", "prediction service", timeout=limit, cfg=cfg)
    if cfg.prometheus:
        wait_http(f"{cfg.prometheus_url}/-/ready", "Prometheus", timeout=limit, cfg=cfg)
        wait_http(f"{cfg.alertmanager_url}/-/ready", "Alertmanager", timeout=limit, cfg=cfg)


def down(cfg: StackConfig) -> None:
    if not is_running(cfg):
        print("cd4ml: the stack is not running")
        return
    supervisorctl(cfg, "shutdown", check=False)
    for _ in range(120):
        if not (cfg.supervisor_dir / "supervisord.pid").exists():
            break
        time.sleep(0.5)
    print("cd4ml: stopped every program of the stack; state kept in", cfg.home)


def wait_http(url: str, what: str, *, timeout: float, cfg: StackConfig) -> None:
    try:
        netutil.wait_http(url, timeout)
    except TimeoutError as err:
        raise SystemExit(f"cd4ml: {what} is not up: {err}; logs in {cfg.logs_dir}") from None


def status(cfg: StackConfig) -> str:
    if not is_running(cfg):
        return "cd4ml: the stack is not running (make up)"
    return supervisorctl(cfg, "status", check=False).stdout


def login(cfg: StackConfig) -> tuple[str, str]:
    return "admin", _secrets(cfg)["admin_password"]


def write_auth_file(env: Mapping[str, str]) -> Path:
    """The simple auth manager's login file, from CD4ML_ADMIN_PASSWORD (compose's airflow-init).

    The embedded stack generates its password; a compose deployment must bring its own, so a
    missing one stops start-up with a message that names it.
    """
    target = env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
    password = env.get("CD4ML_ADMIN_PASSWORD")
    if not target:
        raise SystemExit("cd4ml: AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE must be set")
    if not password:
        raise SystemExit("cd4ml: CD4ML_ADMIN_PASSWORD must be set (AIRFLOW_ADMIN_PASSWORD in .env)")
    users = env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin")
    names = [entry.split(":", 1)[0] for entry in users.split(",") if entry.strip()]
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.touch(mode=0o600)
    tmp.write_text(json.dumps({name: password for name in names}))
    tmp.replace(path)
    return path


def clean(cfg: StackConfig) -> None:
    """Delete all local state (models, data, runs). Refuses while the stack runs."""
    if is_running(cfg):
        raise SystemExit("cd4ml: stop the stack first (make down)")
    shutil.rmtree(cfg.home, ignore_errors=False) if cfg.home.exists() else None
