"""The embedded stack: Airflow (api-server, scheduler, dag-processor, triggerer; SQLite, LocalExecutor)
and an MLflow tracking server (SQLite, local artifacts), run under supervisord.

All state lives under CD4ML_HOME (default `.cd4ml/` in the project). `up` is idempotent and resumes
with state intact; `down` stops everything supervisord started. Ports come from the environment
(CD4ML_AIRFLOW_PORT, CD4ML_MLFLOW_PORT) so tests can run a second stack beside a developer's.
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


def config_from_env() -> StackConfig:
    settings = get_settings()
    return StackConfig(
        home=settings.home,
        airflow_port=int(os.environ.get("CD4ML_AIRFLOW_PORT", "8080")),
        mlflow_port=int(os.environ.get("CD4ML_MLFLOW_PORT", "5000")),
        service_port=int(os.environ.get("CD4ML_SERVICE_PORT", "8000")),
        bin_dir=Path(sys.executable).parent,
        parallelism=int(os.environ.get("CD4ML_PARALLELISM", "4")),
    )


def _secrets(cfg: StackConfig) -> dict[str, str]:
    """Generated once per state dir, never committed, never printed except the UI password."""
    path = cfg.home / "secrets.json"
    if path.exists():
        values = dict(json.loads(path.read_text()))
        if "service_admin_token" not in values:  # state from before the prediction service existed
            values["service_admin_token"] = secrets.token_urlsafe(24)
            path.write_text(json.dumps(values))
        return values
    values = {
        "jwt_secret": secrets.token_urlsafe(32),
        "api_secret_key": secrets.token_urlsafe(32),
        "admin_password": secrets.token_urlsafe(12),
        "service_admin_token": secrets.token_urlsafe(24),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(values))
    return values


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
        "CD4ML_SERVICE_URL": cfg.service_url,
        "CD4ML_SERVICE_ADMIN_TOKEN": sec["service_admin_token"],
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
    for name, (command, priority) in PROGRAMS.items():
        cmd = command.format(home=cfg.home, mlflow_port=cfg.mlflow_port, service_port=cfg.service_port)
        program_env = {**env, **(extra_env if name == "mlflow" else {})}
        lines += [
            f"[program:{name}]",
            f"command={cfg.bin_dir}/{cmd}",
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
    if not is_running(cfg):
        ports = (
            (cfg.airflow_port, "CD4ML_AIRFLOW_PORT"),
            (cfg.mlflow_port, "CD4ML_MLFLOW_PORT"),
            (cfg.service_port, "CD4ML_SERVICE_PORT"),
        )
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


def down(cfg: StackConfig) -> None:
    if not is_running(cfg):
        print("cd4ml: the stack is not running")
        return
    supervisorctl(cfg, "shutdown", check=False)
    for _ in range(120):
        if not (cfg.supervisor_dir / "supervisord.pid").exists():
            break
        time.sleep(0.5)
    print("cd4ml: stopped Airflow, MLflow and the prediction service; state kept in", cfg.home)


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
