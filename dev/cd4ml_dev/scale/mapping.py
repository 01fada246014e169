"""docker-compose.yaml's services mapped onto this machine: variables, local ports, paths, URLs."""

from __future__ import annotations

import itertools
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from cd4ml_dev import compose
from cd4ml_dev.netutil import free_port
from cd4ml_dev.scale.common import IMAGE_AIRFLOW_HOME, IMAGE_PROJECT, PG_ADMIN_USER, PROVIDED, ScaleError


def _secret(name: str) -> str:
    if "FERNET" in name:
        from cryptography.fernet import Fernet

        return Fernet.generate_key().decode()
    return secrets.token_urlsafe(24)


def _container_ports(svc: compose.Service) -> set[int]:
    ports = {p.container_port for p in svc.ports}
    args = svc.command or []
    ports |= {int(b) for a, b in itertools.pairwise(args) if a in {"--port", "-p"} and b.isdigit()}
    return ports


class ComposeMapping:
    """What Docker gives each service, chosen here: secrets for .env, free ports, local paths.

    Everything is decided when it is built, so a bad compose file fails before anything starts.
    """

    def __init__(
        self,
        root: Path,
        compose_file: Path,
        settings: Mapping[str, str],
        project: Path,
        mounts: Mapping[str, Path],
        prefix: str,
    ) -> None:
        self.root = root
        self.compose_file = compose_file
        self.project = project
        self.prefix = prefix
        self.variables = compose.variables(compose.load_raw(compose_file))
        # A fresh secret for every required variable, as a new .env would hold; settings are the knobs.
        self.values = {name: _secret(name) for name, var in self.variables.items() if var.required}
        self.values.update(settings)
        self.services = compose.load(compose_file, self.values)
        self.order = compose.start_order(self.services)
        self.databases = sorted(compose.databases(self.services, host="postgres"))
        self.ports: dict[tuple[str, int], int] = {
            (name, port): free_port()
            for name, svc in self.services.items()
            if name not in PROVIDED
            for port in _container_ports(svc)
        }
        self.paths = self._paths(mounts)

    def _paths(self, mounts: Mapping[str, Path]) -> dict[str, Path]:
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
                    raise ScaleError(
                        f"{mount.target} is mounted from two places in {self.compose_file}; cannot map it"
                    )
                paths[mount.target] = local
        # Extra bind mounts, as a compose override file would add: container path -> local path.
        paths.update({target: Path(local).resolve() for target, local in mounts.items()})
        return paths

    def endpoint(self, service: str, container_port: int) -> str:
        """http://127.0.0.1:<port> of a service's container port."""
        return f"http://127.0.0.1:{self.ports[(service, container_port)]}"

    def local_path(self, container_path: str) -> Path:
        return Path(compose.map_path(container_path, self.paths))

    def build_image_files(self) -> None:
        """What the Dockerfile bakes into the image (the airflow_local_settings.py that preloads),
        and the run's own directories that stand in for named volumes."""
        from cd4ml_dev.stack import LOCAL_SETTINGS_FILE

        config = self.paths[IMAGE_AIRFLOW_HOME] / "config"
        config.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(LOCAL_SETTINGS_FILE, config / "airflow_local_settings.py")
        for local in self.paths.values():
            if str(local).startswith(str(self.root)):
                local.mkdir(parents=True, exist_ok=True)

    def endpoints(self, own: str | None, redis_db: int) -> dict[tuple[str, int], compose.Endpoint]:
        """Where each (host, port) a service's URLs name is on this machine, seen from `own`."""
        prefix = self.prefix

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

    def mapper(self, service: str, redis_db: int) -> Callable[[str], str]:
        """Maps one of `service`'s values (URL, path, or text holding them) onto this machine."""
        endpoints = self.endpoints(service, redis_db)

        def map_value(value: str) -> str:
            value = compose.rewrite_urls(value, endpoints, compose.DEFAULT_PORTS)
            return compose.map_path(value, self.paths)

        return map_value
