"""The machine's PostgreSQL and Redis, leased to one run: private databases and a Redis db number."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cd4ml_dev.scale.common import PG_ADMIN_USER, PREFIX_STEM, PROVIDED, ScaleError

CLAIM_KEY = "cd4ml:scale:claimed-by"
REDIS_DBS = range(1, 16)  # db 0 is left to whoever else uses the machine's Redis
_LIKE_OURS = PREFIX_STEM.replace("_", "\\_") + "%"  # `_` is LIKE's any-character


def _owner_alive(prefix: str) -> bool:
    m = re.match(rf"{PREFIX_STEM}(\d+)_", prefix)
    return m is not None and Path(f"/proc/{m.group(1)}").exists()


class ProvidedLease:
    """Creates `<prefix>_<name>` databases and claims a free Redis db; release() gives both back.

    A run killed before it could release leaves them behind: acquire() first removes whatever a
    run whose process is gone left.
    """

    def __init__(self, prefix: str, databases: Sequence[str]) -> None:
        self.prefix = prefix
        self.databases = list(databases)
        self.redis_db: int | None = None
        self._created: list[str] = []

    def connect(self, dbname: str = "postgres") -> Any:
        import psycopg2

        host, port = PROVIDED["postgres"]
        conn = psycopg2.connect(host=host, port=port, user=PG_ADMIN_USER, dbname=dbname, connect_timeout=10)
        conn.autocommit = True
        return conn

    def _redis(self, db: int) -> Any:
        import redis

        host, port = PROVIDED["redis"]
        return redis.Redis(host=host, port=port, db=db, socket_timeout=10)

    def _sweep_stale(self, cur: Any) -> None:
        """Databases and Redis dbs left by a run that was killed before it could clean up."""
        cur.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (_LIKE_OURS,))
        for (name,) in cur.fetchall():
            if not _owner_alive(name):
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        for number in REDIS_DBS:
            client = self._redis(number)
            owner = client.get(CLAIM_KEY)
            if owner and not _owner_alive(owner.decode()):
                client.flushdb()

    def acquire(self) -> None:
        """Every database created is recorded at once, so release() drops it even if this fails."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                self._sweep_stale(cur)
                for name in self.databases:
                    db = f"{self.prefix}_{name}"
                    cur.execute(f'CREATE DATABASE "{db}"')
                    self._created.append(db)
        finally:
            conn.close()
        for number in secrets.SystemRandom().sample(REDIS_DBS, len(REDIS_DBS)):
            client = self._redis(number)
            # Claimed atomically, and only a db whose one key is our claim is really empty.
            if not client.set(CLAIM_KEY, self.prefix, nx=True):
                continue
            if client.dbsize() == 1:
                self.redis_db = number
                return
            # Someone's data is here: take the claim back, or a later stale sweep would flush their db.
            client.delete(CLAIM_KEY)
        host, port = PROVIDED["redis"]
        raise ScaleError(
            f"no free Redis db number ({REDIS_DBS.start}-{REDIS_DBS.stop - 1}) on {host}:{port}: "
            f"each holds data or another run's {CLAIM_KEY!r}"
        )

    def release(self) -> None:
        """Flush the claimed Redis db and drop the databases. Idempotent."""
        if self.redis_db is not None:
            client = self._redis(self.redis_db)
            if client.get(CLAIM_KEY) == self.prefix.encode():
                client.flushdb()
            self.redis_db = None
        if self._created:
            conn = self.connect()
            try:
                with conn.cursor() as cur:
                    for db in self._created:
                        cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            finally:
                conn.close()
            self._created = []

    def sql(
        self, query: str, params: tuple[Any, ...] = (), database: str = "airflow"
    ) -> list[tuple[Any, ...]]:
        """Rows from one of this run's databases (e.g. task_instance in Airflow's metadata DB)."""
        conn = self.connect(f"{self.prefix}_{database}")
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return list(cur.fetchall())
        finally:
            conn.close()
