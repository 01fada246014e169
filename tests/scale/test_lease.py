"""The local topology's cleanup guarantees, on the machine's real PostgreSQL and Redis.

Whatever a run leases (private databases, a Redis db number) is gone after it, whether it stopped
normally, failed during start-up, or was killed and left them for the next run to sweep.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cd4ml_dev.scale import ScaleError, running
from cd4ml_dev.scale.lease import CLAIM_KEY, ProvidedLease

pytestmark = pytest.mark.scale
DEAD_PID = 4_194_305  # above Linux's largest pid_max: no process ever has it


def our_databases(lease: ProvidedLease, prefix: str) -> set[str]:
    conn = lease.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,))
            return {name for (name,) in cur.fetchall()}
    finally:
        conn.close()


def redis_claim(db: int) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=6379, db=db, socket_timeout=10).get(CLAIM_KEY)


def test_acquire_creates_private_databases_and_release_drops_them() -> None:
    prefix = f"cd4ml_scale_{os.getpid()}_lease"
    lease = ProvidedLease(prefix, ["airflow", "mlflow"])
    try:
        lease.acquire()
        assert our_databases(lease, prefix) == {f"{prefix}_airflow", f"{prefix}_mlflow"}
        assert lease.redis_db is not None and redis_claim(lease.redis_db) == prefix.encode()
        assert lease.sql("SELECT current_database()") == [(f"{prefix}_airflow",)]
        claimed = lease.redis_db
    finally:
        lease.release()
    assert our_databases(lease, prefix) == set()
    assert redis_claim(claimed) is None and lease.redis_db is None
    lease.release()  # idempotent: a second stop() must not fail


def test_acquire_sweeps_what_a_killed_run_left_and_spares_a_live_run() -> None:
    import redis

    dead, alive = f"cd4ml_scale_{DEAD_PID}_gone", f"cd4ml_scale_{os.getpid()}_live"
    admin = ProvidedLease(alive, [])
    conn = admin.connect()
    # An empty db to plant the dead run's claim in; one holding data belongs to someone else.
    empty = [n for n in range(15, 0, -1) if redis.Redis(host="127.0.0.1", port=6379, db=n).dbsize() == 0]
    if not empty:
        pytest.skip("every Redis db 1-15 on 127.0.0.1:6379 holds data")
    stale_redis = redis.Redis(host="127.0.0.1", port=6379, db=empty[0], socket_timeout=10)
    try:
        with conn.cursor() as cur:
            for db in (f"{dead}_airflow", f"{alive}_airflow"):
                cur.execute(f'CREATE DATABASE "{db}"')
        assert stale_redis.set(CLAIM_KEY, dead, nx=True), f"Redis db {empty[0]} was claimed meanwhile"
        stale_redis.set("left-behind", "1")
        lease = ProvidedLease(f"cd4ml_scale_{os.getpid()}_sweeper", ["airflow"])
        try:
            lease.acquire()
            assert our_databases(admin, dead) == set()
            assert our_databases(admin, alive) == {f"{alive}_airflow"}
            assert stale_redis.get("left-behind") is None
        finally:
            lease.release()
    finally:
        with conn.cursor() as cur:
            for db in (f"{dead}_airflow", f"{alive}_airflow"):
                cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.close()
        if stale_redis.get(CLAIM_KEY) == dead.encode():
            stale_redis.flushdb()


def test_a_failed_start_up_names_the_process_and_still_releases_everything(tmp_path: Path) -> None:
    compose_file = tmp_path / "docker-compose.yaml"
    compose_file.write_text(
        """
services:
  postgres: {image: postgres}
  redis: {image: redis}
  app:
    image: app
    command: ["sh", "-c", "echo would use postgresql://app@postgres:5432/appdb && exit 3"]
    depends_on: {postgres: {condition: service_started}}
"""
    )
    with pytest.raises(ScaleError) as err:
        with running(tmp_path / "run", workers=1, compose_file=compose_file, project=tmp_path):
            pytest.fail("start() returned although app exits with code 3")
    message = str(err.value)
    assert "app-1 exited with code 3" in message
    # The log tail in the message shows the command ran mapped: the leased, private database.
    assert "postgresql://postgres@127.0.0.1:5432/cd4ml_scale_" in message and "_appdb" in message
    prefix = message.split("127.0.0.1:5432/")[1].split("_appdb")[0]
    assert our_databases(ProvidedLease(prefix, []), prefix) == set()
    for db in range(1, 16):
        assert redis_claim(db) != prefix.encode()


def test_a_db_holding_someones_data_keeps_no_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim left in a non-empty db would make a later stale sweep flush someone else's data."""
    import redis

    from cd4ml_dev.scale import lease as lease_module

    prefix = f"cd4ml_scale_{os.getpid()}_busy"
    lease = ProvidedLease(prefix, [])
    for number in lease_module.REDIS_DBS:  # a db free of claims, to hold the stranger's data
        client = redis.Redis(host="127.0.0.1", port=6379, db=number, socket_timeout=10)
        if client.dbsize() == 0:
            break
    else:
        pytest.skip("no empty Redis db on this machine to plant data in")
    client.set("someone:else", "precious")
    monkeypatch.setattr(lease_module, "REDIS_DBS", range(number, number + 1))
    try:
        with pytest.raises(ScaleError, match="no free Redis db number"):
            lease.acquire()
        assert client.get(CLAIM_KEY) is None and client.get("someone:else") == b"precious"
    finally:
        client.delete("someone:else")
        lease.release()
