"""Read docker-compose.yaml the way `docker compose` does, and map its services onto this machine.

Docker cannot run here, but the topology it describes can: `cd4ml_dev.scale` runs every service's own
command with its own environment, taken from the compose file through this module, so the file
and the test that proves it cannot drift apart. The mapping replaces only what Docker provides:

- service names in URLs (`postgres`, `redis`, `mlflow`, ...) become 127.0.0.1 and a local port;
  the PostgreSQL role and databases become the local server's, under a unique prefix, and Redis
  gets a private db number;
- container paths become local ones: bind mounts (`./dags:/opt/airflow/dags`) the repository's
  directories, named volumes a directory each under the run's root, the image's own paths
  (/opt/airflow, /opt/cd4ml) the run's AIRFLOW_HOME and the repository;
- `--host`/`--port` arguments become 127.0.0.1 and a free port.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cd4ml.core.errors import Cd4mlError

_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[?\-])(?P<arg>[^}]*))?\})")
_URL = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?:(?P<auth>[^@/\s]+)@)?(?P<host>[A-Za-z0-9_.-]+)"
    r"(?::(?P<port>\d+))?(?P<path>/[^\s,]*)?"
)


class ComposeError(Cd4mlError):
    """The compose file is invalid, or a required variable is missing (the message names it)."""


@dataclass(frozen=True)
class Variable:
    name: str
    required: bool
    default: str | None
    message: str | None


def variables(raw: Any) -> dict[str, Variable]:
    """Every `${VAR}` the (parsed, not yet interpolated) compose file refers to."""
    found: dict[str, Variable] = {}
    for text in _strings(raw):
        for m in _VAR.finditer(text):
            name = m.group("name")
            if not name:
                continue
            op = m.group("op") or ""
            var = Variable(
                name=name,
                required="?" in op,
                default=m.group("arg") if "-" in op else None,
                message=m.group("arg") if "?" in op else None,
            )
            if name not in found or var.required:
                found[name] = var
    return found


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's rules: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$."""

    def sub(m: re.Match[str]) -> str:
        name = m.group("name")
        if name is None:
            return "$"
        op, arg = m.group("op") or "", m.group("arg") or ""
        value = env.get(name)
        unset_or_empty = value is None or (op.startswith(":") and value == "")
        if op.endswith("?") and unset_or_empty:
            raise ComposeError(f"required variable {name} is missing a value: {arg or name}")
        if op.endswith("-") and unset_or_empty:
            return arg
        return value or ""

    return _VAR.sub(sub, text)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(v, env) for v in node]
    return node


@dataclass(frozen=True)
class Mount:
    source: str  # "./dags" (bind, relative to the compose file) or "cd4ml-data" (named volume)
    target: str
    read_only: bool = False

    @property
    def is_bind(self) -> bool:
        return self.source.startswith((".", "/"))


@dataclass(frozen=True)
class Port:
    host_ip: str
    host_port: int
    container_port: int


@dataclass
class Service:
    name: str
    image: str | None
    build: Any
    entrypoint: list[str] | None
    command: list[str] | None
    environment: dict[str, str]
    mounts: list[Mount]
    ports: list[Port]
    depends_on: dict[str, str]
    healthcheck: list[str] | None
    raw: dict[str, Any] = field(repr=False)

    @property
    def builds_image(self) -> bool:
        return self.build is not None


def _as_list(value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        # Shell form: compose splits it like a shell would; cd4ml keeps commands in exec form.
        import shlex

        return shlex.split(value)
    if isinstance(value, list):
        return [str(v) for v in value]
    raise ComposeError(f"{what}: expected a list or a string, got {type(value).__name__}")


def _service(name: str, raw: dict[str, Any]) -> Service:
    env_raw = raw.get("environment") or {}
    if isinstance(env_raw, list):
        env_raw = dict(item.split("=", 1) for item in env_raw)
    environment = {str(k): "" if v is None else str(v) for k, v in env_raw.items()}
    mounts = []
    for spec in raw.get("volumes") or []:
        parts = str(spec).split(":")
        if len(parts) < 2:
            raise ComposeError(f"service {name}: volume {spec!r} has no container path")
        mounts.append(Mount(parts[0], parts[1], read_only=parts[2:3] == ["ro"]))
    ports = []
    for spec in raw.get("ports") or []:
        parts = str(spec).split(":")
        if len(parts) == 3:
            ports.append(Port(parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            ports.append(Port("0.0.0.0", int(parts[0]), int(parts[1])))
        else:
            raise ComposeError(f"service {name}: port {spec!r} needs host and container ports")
    deps_raw = raw.get("depends_on") or {}
    if isinstance(deps_raw, list):
        deps_raw = {d: {"condition": "service_started"} for d in deps_raw}
    depends_on = {str(d): str((c or {}).get("condition", "service_started")) for d, c in deps_raw.items()}
    health = raw.get("healthcheck") or {}
    return Service(
        name=name,
        image=raw.get("image"),
        build=raw.get("build"),
        entrypoint=_as_list(raw.get("entrypoint"), f"service {name}: entrypoint"),
        command=_as_list(raw.get("command"), f"service {name}: command"),
        environment=environment,
        mounts=mounts,
        ports=ports,
        depends_on=depends_on,
        healthcheck=_as_list(health.get("test"), f"service {name}: healthcheck"),
        raw=raw,
    )


def load_raw(path: Path) -> dict[str, Any]:
    """The parsed YAML (anchors and `<<` merges resolved), before interpolation."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ComposeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("services"), dict):
        raise ComposeError(f"{path}: no `services:` mapping")
    return raw


def load(path: Path, env: Mapping[str, str]) -> dict[str, Service]:
    """Services with every variable interpolated from `env`, as `docker compose config` shows them."""
    raw = _interpolate_tree(load_raw(path), env)
    # As `docker compose up` without --profile: services in a profile are not started.
    return {
        name: _service(name, svc or {})
        for name, svc in raw["services"].items()
        if not (svc or {}).get("profiles")
    }


def start_order(services: Mapping[str, Service]) -> list[str]:
    """Services in an order that honours depends_on (compose refuses cycles, and so does this)."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ComposeError(f"depends_on cycle: {' -> '.join((*chain, name))}")
        if name not in services:
            raise ComposeError(f"{chain[-1]} depends on unknown service {name!r}")
        state[name] = "visiting"
        for dep in services[name].depends_on:
            visit(dep, (*chain, name))
        state[name] = "done"
        order.append(name)

    for name in services:
        visit(name, ())
    return order


def urls(text: str) -> Iterator[re.Match[str]]:
    """Every URL in a value, with its scheme, auth, host, port and path as named groups."""
    return _URL.finditer(text)


def databases(services: Mapping[str, Service], host: str) -> set[str]:
    """The database names that URLs to `host` carry, in any service's environment or command."""
    return {
        m.group("path").strip("/")
        for svc in services.values()
        for text in [*svc.environment.values(), *(svc.command or [])]
        for m in urls(text)
        if m.group("host") == host and m.group("path")
    }


# -- mapping onto this machine -------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where a compose service's port is reachable on this machine."""

    host: str
    port: int
    user: str | None = None  # replaces the URL's credentials (local PostgreSQL: trust auth)
    rename_path: Callable[[str], str] | None = None  # e.g. database name -> private database name


def rewrite_urls(
    text: str, endpoints: Mapping[tuple[str, int], Endpoint], default_ports: Mapping[str, int]
) -> str:
    """Point every URL whose host is a compose service (or a published localhost port) elsewhere."""

    def sub(m: re.Match[str]) -> str:
        host, scheme = m.group("host"), m.group("scheme")
        port = int(m.group("port")) if m.group("port") else default_ports.get(scheme.split("+")[-1], 0)
        target = endpoints.get((host, port))
        if target is None:
            return m.group(0)
        auth = m.group("auth")
        if target.user is not None:
            auth = target.user
        path = m.group("path") or ""
        if target.rename_path and path:
            path = target.rename_path(path)
        cred = f"{auth}@" if auth else ""
        return f"{scheme}://{cred}{target.host}:{target.port}{path}"

    return _URL.sub(sub, text)


DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "redis": 6379, "http": 80, "https": 443}


def map_path(value: str, paths: Mapping[str, Path]) -> str:
    """A container path (or a value that is one) under the longest matching prefix, else unchanged."""
    for prefix in sorted(paths, key=len, reverse=True):
        if value == prefix or value.startswith(prefix.rstrip("/") + "/"):
            return str(paths[prefix]) + value[len(prefix.rstrip("/")) :]
    return value


def map_args(
    args: list[str],
    *,
    own_ports: Mapping[int, int],
    map_value: Callable[[str], str],
) -> list[str]:
    """An exec-form command with --host/--port and every value mapped (see map_value)."""
    out: list[str] = []
    previous = ""
    for arg in args:
        if previous in {"--host", "-H"} and arg in {"0.0.0.0", "::"}:
            out.append("127.0.0.1")
        elif previous in {"--port", "-p"} and arg.isdigit() and int(arg) in own_ports:
            out.append(str(own_ports[int(arg)]))
        else:
            out.append(map_value(arg))
        previous = arg
    return out


def health_url(service: Service) -> str | None:
    """The URL an HTTP health check (`curl --fail <url>`) probes, if it is one."""
    for part in service.healthcheck or []:
        m = _URL.search(part)
        if m and m.group("scheme") in {"http", "https"}:
            return m.group(0)
    return None
