"""The docker-compose topology run on this machine, without Docker (`make test-scale`, bench_scale).

Every service of docker-compose.yaml except PostgreSQL and Redis runs as a local process with the
command and environment the compose file gives it (read through `cd4ml_dev.compose`, mapped onto local
hosts, ports and paths), in depends_on order, waiting for the same health checks. PostgreSQL and
Redis are the machine's own servers: each run gets private databases (`<prefix>_airflow`,
`<prefix>_mlflow`) and a private Redis db number, and removes them when it stops.

What Docker gives each container for free is emulated per process: its own hostname (Airflow's
`hostname_callable` reads CD4ML_REPLICA_HOSTNAME, which is what task_instance.hostname records) and
its own network namespace (the worker and triggerer log servers get free ports). Health checks
are the compose file's: HTTP probes are polled; `airflow jobs check` becomes the same query on the
metadata DB's job table, `celery inspect ping` the same ping through the broker.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cd4ml.core.errors import Cd4mlError
from cd4ml.core.settings import PROJECT_ROOT
from cd4ml_dev import compose
from cd4ml_dev.netutil import free_port

# Run by the machine, not by us: service name -> (local host, port).
PROVIDED = {"postgres": ("127.0.0.1", 5432), "redis": ("127.0.0.1", 6379)}
PG_ADMIN_USER = "postgres"
# What the Dockerfile puts where: the image's AIRFLOW_HOME and the cd4ml source tree.
IMAGE_AIRFLOW_HOME = "/opt/airflow"
IMAGE_PROJECT = "/opt/cd4ml"
WORKER_SERVICE = "airflow-worker"


class ScaleError(Cd4mlError):
    """The local topology did not come up (the message names the process and its log)."""


def replica_hostname() -> str:
    """Airflow's `hostname_callable` for processes that stand in for a container."""
    import socket

    return os.environ.get("CD4ML_REPLICA_HOSTNAME") or socket.getfqdn()


def _secret(name: str) -> str:
    if "FERNET" in name:
        from cryptography.fernet import Fernet

        return Fernet.generate_key().decode()
    return secrets.token_urlsafe(24)


@dataclass
class Process:
    name: str  # replica name, e.g. airflow-worker-2: also its hostname
    service: str
    argv: list[str]
    env: dict[str, str]
    health_url: str | None
    oneshot: bool
    popen: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    healthy: bool = False

    @property
    def started(self) -> bool:
        return self.popen is not None

    @property
    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()


@dataclass
class LocalTopology:
    """The compose services as local processes. Use as a context manager: stop() always runs."""

    root: Path
    workers: int = 2
    compose_file: Path = PROJECT_ROOT / "docker-compose.yaml"
    settings: Mapping[str, str] = field(
        default_factory=dict
    )  # compose variables (knobs), e.g. MLFLOW_WORKERS
    project: Path = PROJECT_ROOT
    # Extra bind mounts, as a compose override file would add: container path -> local path.
    mounts: Mapping[str, Path] = field(default_factory=dict)
    prefix: str = field(default_factory=lambda: f"cd4ml_scale_{os.getpid()}_{secrets.token_hex(3)}")

    def __post_init__(self) -> None:
        self.root = self.root.resolve()
        raw = compose.load_raw(self.compose_file)
        self.variables = {name: var for name, var in compose.variables(raw).items()}
        self.values: dict[str, str] = {
            name: _secret(name) for name, var in self.variables.items() if var.required
        }
        self.values.update(self.settings)
        self.services = compose.load(self.compose_file, self.values)
        self.order = compose.start_order(self.services)
        self.redis_db: int | None = None
        self.databases = sorted(self._database_names())
        self.ports: dict[tuple[str, int], int] = {}
        for name, svc in self.services.items():
            if name in PROVIDED:
                continue
            for port in self._container_ports(svc):
                self.ports[(name, port)] = free_port()
        self.paths = self._paths()
        self.processes: list[Process] = []
        self._created_dbs: list[str] = []
        self.events: list[tuple[float, str, str]] = []  # (seconds since start(), process, what)
        self._t0 = time.monotonic()

    # -- derivation ------------------------------------------------------------------------------

    def _container_ports(self, svc: compose.Service) -> set[int]:
        ports = {p.container_port for p in svc.ports}
        args = svc.command or []
        ports |= {int(b) for a, b in itertools.pairwise(args) if a in {"--port", "-p"} and b.isdigit()}
        return ports

    def _database_names(self) -> set[str]:
        names = set()
        for svc in self.services.values():
            for text in [*svc.environment.values(), *(svc.command or [])]:
                for m in compose._URL.finditer(text):
                    if m.group("host") == "postgres" and m.group("path"):
                        names.add(m.group("path").strip("/"))
        return names

    def _paths(self) -> dict[str, Path]:
        paths: dict[str, Path] = {
            IMAGE_AIRFLOW_HOME: self.root / "airflow-home",
            IMAGE_PROJECT: self.project,
        }
        for svc in self.services.values():
            if svc.name in PROVIDED:
                continue
            for mount in svc.mounts:
                local = (
                    (self.compose_file.parent / mount.source).resolve()
                    if mount.is_bind
                    else self.root / "volumes" / mount.source
                )
                if paths.get(mount.target, local) != local:
                    raise ScaleError(f"{mount.target} is mounted from two places; cannot map it")
                paths[mount.target] = local
        paths.update({target: Path(local).resolve() for target, local in self.mounts.items()})
        return paths

    def endpoint(self, service: str, container_port: int) -> str:
        """http://127.0.0.1:<port> of a service's container port."""
        return f"http://127.0.0.1:{self.ports[(service, container_port)]}"

    def local_path(self, container_path: str) -> Path:
        return Path(compose.map_path(container_path, self.paths))

    def _endpoints(self, own: str | None) -> dict[tuple[str, int], compose.Endpoint]:
        prefix = self.prefix
        redis_db = self.redis_db

        def rename_db(path: str) -> str:
            return f"/{prefix}_{path.strip('/')}"

        def redis_path(_: str) -> str:
            return f"/{redis_db}"

        pg_host, pg_port = PROVIDED["postgres"]
        rd_host, rd_port = PROVIDED["redis"]
        out = {
            ("postgres", 5432): compose.Endpoint(pg_host, pg_port, user=PG_ADMIN_USER, rename_path=rename_db),
            ("redis", 6379): compose.Endpoint(rd_host, rd_port, rename_path=redis_path),
        }
        for (svc, cport), local in self.ports.items():
            out[(svc, cport)] = compose.Endpoint("127.0.0.1", local)
            for published in self.services[svc].ports:
                if published.container_port == cport:
                    for host in ("localhost", "127.0.0.1"):
                        out.setdefault((host, published.host_port), compose.Endpoint("127.0.0.1", local))
        if own is not None:  # inside a container, localhost is the container itself
            for (svc, cport), local in self.ports.items():
                if svc == own:
                    for host in ("localhost", "127.0.0.1"):
                        out[(host, cport)] = compose.Endpoint("127.0.0.1", local)
        return out

    def _mapper(self, service: str) -> Any:
        endpoints = self._endpoints(service)

        def map_value(value: str) -> str:
            value = compose.rewrite_urls(value, endpoints, compose.DEFAULT_PORTS)
            return compose.map_path(value, self.paths)

        return map_value

    def plan(self) -> list[Process]:
        """Every process to run: one per service, `workers` for the Celery worker service."""
        dependents_wait_for_exit = {
            dep
            for svc in self.services.values()
            for dep, cond in svc.depends_on.items()
            if cond == "service_completed_successfully"
        }
        base = {
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": os.environ.get("HOME", str(self.root)),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "PYTHONUNBUFFERED": "1",
            "AIRFLOW_HOME": str(self.paths[IMAGE_AIRFLOW_HOME]),
        }
        processes = []
        for name in self.order:
            if name in PROVIDED:
                continue
            svc = self.services[name]
            if not svc.command:
                raise ScaleError(f"service {name} has no command")
            map_value = self._mapper(name)
            own_ports = {cport: local for (s, cport), local in self.ports.items() if s == name}
            argv = compose.map_args(svc.command, own_ports=own_ports, map_value=map_value)
            env = {**base, **{k: map_value(v) for k, v in svc.environment.items()}}
            url = compose.health_url(svc)
            health = map_value(url) if url else None
            replicas = self.workers if name == WORKER_SERVICE else 1
            for i in range(1, replicas + 1):
                replica = f"{name}-{i}"
                extra = {
                    "CD4ML_REPLICA_HOSTNAME": replica,
                    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "cd4ml_dev.scale.replica_hostname",
                    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                    "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                }
                cmd = list(argv)
                if name == WORKER_SERVICE:
                    cmd += ["--celery-hostname", f"{replica}@%h"]
                processes.append(
                    Process(replica, name, cmd, {**env, **extra}, health, name in dependents_wait_for_exit)
                )
        return processes

    # -- provided services -----------------------------------------------------------------------

    def _pg(self, dbname: str = "postgres") -> Any:
        import psycopg2

        host, port = PROVIDED["postgres"]
        conn = psycopg2.connect(host=host, port=port, user=PG_ADMIN_USER, dbname=dbname, connect_timeout=10)
        conn.autocommit = True
        return conn

    def _redis(self, db: int) -> Any:
        import redis

        host, port = PROVIDED["redis"]
        return redis.Redis(host=host, port=port, db=db, socket_timeout=10)

    @staticmethod
    def _owner_alive(prefix: str) -> bool:
        m = re.match(r"cd4ml_scale_(\d+)_", prefix)
        return bool(m) and Path(f"/proc/{m.group(1) if m else 0}").exists()

    def _sweep_stale(self, cur: Any) -> None:
        """Databases and Redis dbs left by a run that was killed before it could clean up."""
        cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'cd4ml\\_scale\\_%%'")
        for (name,) in cur.fetchall():
            if not self._owner_alive(name):
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        for number in range(1, 16):
            client = self._redis(number)
            owner = client.get("cd4ml:scale:claimed-by")
            if owner and not self._owner_alive(owner.decode()):
                client.flushdb()

    def _prepare_provided(self) -> None:
        conn = self._pg()
        try:
            with conn.cursor() as cur:
                self._sweep_stale(cur)
                for name in self.databases:
                    db = f"{self.prefix}_{name}"
                    cur.execute(f'CREATE DATABASE "{db}"')
                    self._created_dbs.append(db)
        finally:
            conn.close()
        for number in secrets.SystemRandom().sample(range(1, 16), 15):
            client = self._redis(number)
            if client.set("cd4ml:scale:claimed-by", self.prefix, nx=True) and client.dbsize() == 1:
                self.redis_db = number
                return
        raise ScaleError("no free Redis db number (1-15) on 127.0.0.1:6379")

    def _release_provided(self) -> None:
        if self.redis_db is not None:
            client = self._redis(self.redis_db)
            if client.get("cd4ml:scale:claimed-by") == self.prefix.encode():
                client.flushdb()
            self.redis_db = None
        if self._created_dbs:
            conn = self._pg()
            try:
                with conn.cursor() as cur:
                    for db in self._created_dbs:
                        cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            finally:
                conn.close()
            self._created_dbs = []

    def sql(
        self, query: str, params: tuple[Any, ...] = (), database: str = "airflow"
    ) -> list[tuple[Any, ...]]:
        """Rows from one of this run's databases (e.g. task_instance in Airflow's metadata DB)."""
        conn = self._pg(f"{self.prefix}_{database}")
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return list(cur.fetchall())
        finally:
            conn.close()

    # -- lifecycle -------------------------------------------------------------------------------

    def _image_files(self) -> None:
        """What the Dockerfile bakes into the image: the airflow_local_settings.py that preloads."""
        from cd4ml_dev.stack import LOCAL_SETTINGS_FILE

        config = self.paths[IMAGE_AIRFLOW_HOME] / "config"
        config.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(LOCAL_SETTINGS_FILE, config / "airflow_local_settings.py")
        for local in self.paths.values():
            if str(local).startswith(str(self.root)):
                local.mkdir(parents=True, exist_ok=True)

    def _event(self, proc: Process, what: str) -> None:
        self.events.append((round(time.monotonic() - self._t0, 1), proc.name, what))

    def _start(self, proc: Process) -> None:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        proc.log = (logs / f"{proc.name}.log").open("ab")
        proc.popen = subprocess.Popen(
            proc.argv, env=proc.env, cwd=self.root, stdout=proc.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self._event(proc, "started")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.root / "logs" / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _condition_met(self, service: str, condition: str) -> bool:
        if service in PROVIDED:
            return True  # checked (and private databases created) before anything starts
        replicas = [p for p in self.processes if p.service == service]
        if condition == "service_completed_successfully":
            return all(p.exit_code == 0 for p in replicas)
        if condition == "service_healthy":
            return all(p.started and p.healthy for p in replicas)
        return all(p.started for p in replicas)

    def _probe(self, proc: Process) -> None:
        """The service's own health check: its HTTP probe, or the equivalent of its CLI check."""
        if proc.healthy or not proc.started or proc.oneshot or proc.exit_code is not None:
            return
        test = " ".join(self.services[proc.service].healthcheck or [])
        if proc.health_url is not None:
            with suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(proc.health_url, timeout=3) as resp:
                    proc.healthy = resp.status == 200
        elif m := re.search(r"jobs check --job-type (\w+)", test):
            # `airflow jobs check --hostname $HOSTNAME`: a live job of that type from this "container".
            rows = self.sql(
                "SELECT count(*) FROM job WHERE job_type = %s AND hostname = %s AND state = 'running' "
                "AND latest_heartbeat > now() - interval '60 seconds'",
                (m.group(1), proc.name),
            )
            proc.healthy = rows[0][0] > 0
        elif "inspect ping" in test:
            # `celery inspect ping -d celery@$HOSTNAME`, through the same broker.
            proc.healthy = self._celery_ping(proc)
        else:
            proc.healthy = True

    def _celery_ping(self, proc: Process) -> bool:
        import socket

        from celery import Celery

        node = f"{proc.name}@{socket.gethostname()}"
        app = Celery(broker=proc.env["AIRFLOW__CELERY__BROKER_URL"])
        try:
            return bool(app.control.ping(destination=[node], timeout=1.0))
        finally:
            app.close()

    def check_alive(self) -> None:
        """Raise, with its log, if a long-running process has exited (compose would restart it)."""
        for proc in self.processes:
            code = proc.exit_code
            if code is not None and (code != 0 or not proc.oneshot):
                raise ScaleError(
                    f"{proc.name} exited with code {code}: {' '.join(proc.argv)}\n{self.log_tail(proc.name)}"
                )

    def start(self, timeout: float = 240) -> None:
        self._t0 = time.monotonic()
        self._prepare_provided()
        self._image_files()
        self.processes = self.plan()
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            for proc in self.processes:
                was = proc.healthy or proc.exit_code == 0
                self._probe(proc)
                if not was and (proc.healthy or proc.exit_code == 0):
                    self._event(proc, "healthy" if proc.healthy else "completed")
                if not proc.started:
                    deps = self.services[proc.service].depends_on
                    if all(self._condition_met(d, c) for d, c in deps.items()):
                        self._start(proc)
            if all((p.exit_code == 0) if p.oneshot else p.healthy for p in self.processes):
                return
            if time.monotonic() > deadline:
                waiting = [p.name for p in self.processes if not (p.healthy or p.exit_code == 0)]
                raise ScaleError(f"not up within {timeout:.0f}s: {waiting}; logs in {self.root / 'logs'}")
            time.sleep(0.3)

    def stop(self, grace: float = 5) -> None:
        """Stop every process group, then drop the databases and flush the Redis db. Idempotent."""
        try:
            running = [p for p in self.processes if p.popen is not None and p.exit_code is None]
            for proc in running:
                assert proc.popen is not None
                with suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for proc in running:
                assert proc.popen is not None
                try:
                    proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                # Children (task processes, pool workers) share the group; none may outlive the run.
                with suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                with suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=10)
            for proc in self.processes:
                if proc.log:
                    proc.log.close()
        finally:
            self._release_provided()

    def __enter__(self) -> LocalTopology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- conveniences for tests and benchmarks -----------------------------------------------

    @property
    def airflow_url(self) -> str:
        return self.endpoint("airflow-api-server", 8080)

    @property
    def mlflow_url(self) -> str:
        return self.endpoint("mlflow", 5000)

    @property
    def service_url(self) -> str:
        return self.endpoint("prediction-service", 8000)

    @property
    def data_dir(self) -> Path:
        return self.local_path(self.services["airflow-scheduler"].environment["CD4ML_DATA_DIR"])

    def task_timeline(self, dag_id: str) -> list[dict[str, Any]]:
        """Every task try of a DAG from the metadata DB: where it ran, when it was queued, ran, ended."""
        rows = self.sql(
            "SELECT run_id, task_id, hostname, state, queued_dttm, start_date, end_date "
            "FROM task_instance WHERE dag_id = %s ORDER BY start_date NULLS LAST",
            (dag_id,),
        )
        keys = ("run_id", "task_id", "hostname", "state", "queued", "start", "end")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def worker_hostnames(self) -> list[str]:
        return [p.name for p in self.processes if p.service == WORKER_SERVICE]


@contextmanager
def running(root: Path, **kwargs: Any) -> Iterator[LocalTopology]:
    """Start the topology; always stop it and remove its databases, even if start-up fails."""
    topo = LocalTopology(root, **kwargs)
    try:
        topo.start()
        yield topo
    finally:
        topo.stop()
