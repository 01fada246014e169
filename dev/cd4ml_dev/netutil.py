"""Small network helpers shared by the stack, the tests and the benchmarks."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_http(url: str, timeout: float) -> None:
    """Return once `url` answers 200; raise TimeoutError naming the last error otherwise."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as err:
            last = str(err)
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s ({last})")


def local_mlflow_server(bin_dir: Path, home: Path, port: int) -> list[str]:
    """argv of a one-worker MLflow server on 127.0.0.1 with its SQLite store and artifacts in `home`
    (the tests' and benchmarks' throw-away server; the stack's own is in cd4ml_dev.stack)."""
    return [str(bin_dir / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
            "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]  # fmt: skip
