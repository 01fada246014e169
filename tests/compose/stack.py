"""Drive one docker-compose.yaml project from a test: a generated .env, `docker compose` calls,
SQL on the project's PostgreSQL, HTTP on its published 127.0.0.1 ports."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cd4ml_dev.netutil import free_port

REPO = Path(__file__).resolve().parents[2]
SECRETS = (
    "POSTGRES_PASSWORD",
    "AIRFLOW_FERNET_KEY",
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_API_SECRET_KEY",
    "AIRFLOW_ADMIN_PASSWORD",
    "CD4ML_SERVICE_ADMIN_TOKEN",
)


def compose_binary() -> str:
    out = subprocess.run(
        [str(REPO / "scripts/compose/compose-bin.sh")], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def generated_env() -> dict[str, str]:
    """Random secrets, the locally built images and free host ports: nothing shared with a real .env."""
    values = {name: secrets.token_urlsafe(24) for name in SECRETS}
    values["AIRFLOW_FERNET_KEY"] = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    # token_urlsafe may start with "-"; one such password broke `airflow users create -p VALUE`.
    values["AIRFLOW_ADMIN_PASSWORD"] = "-" + values["AIRFLOW_ADMIN_PASSWORD"]
    values.update(
        POSTGRES_IMAGE="cd4ml-local/postgres:15",
        REDIS_IMAGE="cd4ml-local/redis:7",
        PYTHON_IMAGE="cd4ml-local/python:3.11",
        CD4ML_IMAGE=os.environ.get("CD4ML_IMAGE", "cd4ml:local"),
        AIRFLOW_PORT=str(free_port()),
        MLFLOW_PORT=str(free_port()),
        CD4ML_SERVICE_PORT=str(free_port()),
        # Two task slots per worker and one MLflow worker: the machine has two cores.
        AIRFLOW_WORKER_CONCURRENCY="2",
        AIRFLOW_PARALLELISM="6",
        MLFLOW_WORKERS="1",
    )
    return values


def write_env(path: Path, values: dict[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))


@dataclass
class ComposeProject:
    name: str
    env_file: Path
    values: dict[str, str]
    binary: str = field(default_factory=compose_binary)

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "-f", str(REPO / "docker-compose.yaml"), "--project-directory", str(REPO),
                "--env-file", str(self.env_file), "-p", self.name, *args]  # fmt: skip

    def run(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if check and done.returncode != 0:
            command = " ".join(args)
            raise AssertionError(
                f"`docker compose {command}` exited {done.returncode}:\n{done.stderr[-4000:]}"
            )
        return done

    def up(self, *extra: str, timeout: float = 600) -> float:
        """`up -d --wait`: every started service healthy (or completed); returns the seconds it took."""
        started = time.monotonic()
        done = self.run("up", "-d", "--no-build", "--wait", "--wait-timeout", str(int(timeout)), *extra,
                        check=False, timeout=timeout + 60)  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(f"`up` exited {done.returncode}:\n{done.stderr[-3000:]}\n{self.diagnose()}")
        return time.monotonic() - started

    def diagnose(self) -> str:
        ps = self.run("ps", "-a", "--format", "{{.Name}} {{.Status}}", check=False).stdout
        bad = [line.split()[0] for line in ps.splitlines() if "healthy)" not in line or "unhealthy" in line]
        logs = "".join(self.logs(n.removeprefix(f"{self.name}-").rsplit("-", 1)[0], 40) for n in bad if n)
        return f"{ps}\n{logs}"

    def logs(self, service: str, tail: int = 60) -> str:
        out = self.run("logs", "--no-color", "--tail", str(tail), service, check=False)
        lines = [ln for ln in out.stdout.splitlines() if "DeprecatedImportWarning" not in ln]
        return f"--- {service}\n" + "\n".join(lines) + "\n"

    def sql(self, query: str, db: str = "airflow") -> list[list[str]]:
        out = self.run("exec", "-T", "postgres", "psql", "-U", "airflow", "-d", db, "-At", "-F", "\t",
                       "-v", "ON_ERROR_STOP=1", "-c", query).stdout  # fmt: skip
        return [line.split("\t") for line in out.splitlines() if line]

    def exec(self, service: str, script: str, stdin: bytes | None = None) -> str:
        argv = self.argv("exec", "-T", service, "bash", "-c", script)
        done = subprocess.run(argv, input=stdin, capture_output=True, timeout=300, cwd=REPO)
        if done.returncode != 0:
            raise AssertionError(f"exec in {service} failed: {done.stderr.decode()[-2000:]}")
        return done.stdout.decode()

    def containers(self, service: str) -> list[str]:
        out = self.run("ps", "--format", "{{.Name}}", service).stdout
        return sorted(line for line in out.splitlines() if line)

    def url(self, port_var: str) -> str:
        return f"http://127.0.0.1:{self.values[port_var]}"


def http_json(
    url: str, token: str | None = None, body: dict[str, Any] | None = None, timeout: float = 60
) -> Any:
    # 60 s: the api-server's first FAB login after start-up took over 15 s on two busy cores.
    req = urllib.request.Request(url, method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(req, data=data, timeout=timeout) as resp:
        return json.loads(resp.read())


def http_status(url: str, body: dict[str, Any] | None = None) -> int:
    try:
        http_json(url, body=body)
    except urllib.error.HTTPError as err:
        return err.code
    return 200
