"""`registry.read_evidence(..., cached=True)` and the Models view, against a real MLflow server seen
through a counting HTTP proxy: a version whose evidence artifacts are complete is read from MLflow once
per process; one without them (registered before the artifacts, or not finished yet) is read afresh
every time; the view reads evidence for the versions it shows only.
"""

from __future__ import annotations

import http.client
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from cd4ml import registry
from cd4ml.core.settings import Settings
from cd4ml.core.spec import load_spec
from cd4ml.data import landing
from cd4ml.registry import evidence as ev
from cd4ml.ui.overview import model_overview
from tests.helpers import write_spec
from tests.unit.test_history import _version

# Not forwarded: they describe one hop (the proxy sets its own length; http.client its own Host).
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


class _Forward(BaseHTTPRequestHandler):
    server: CountingProxy

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        out = b""
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            out += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()  # the CRLF after the last (empty) chunk
        return out

    def _forward(self) -> None:
        body = self._body()
        self.server.requests.append(f"{self.command} {self.path}")
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        headers["Content-Length"] = str(len(body))
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        upstream.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the test reads `requests`


class CountingProxy(ThreadingHTTPServer):
    """127.0.0.1:<port> -> the MLflow server; `requests` lists every request that went through."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _Forward)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def evidence_reads(self) -> list[str]:
        """Requests for evidence artifacts (`cd4ml/...` under a run), not model or history files."""
        return [r for r in self.requests if "artifacts" in r and "/cd4ml/" in r.replace("%2F", "/")]


@pytest.fixture
def proxy(mlflow_server: str) -> Iterator[CountingProxy]:
    server = CountingProxy(mlflow_server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    ev.clear_evidence_cache()
    yield
    ev.clear_evidence_cache()


@pytest.fixture
def name() -> str:
    return f"cache_{uuid.uuid4().hex[:8]}"


def _record(client: MlflowClient, name: str, version: str, tmp_path: Path, score: float) -> None:
    snapshot = tmp_path / f"train_{name}_{version}.parquet"
    pd.DataFrame({"x": [1.0, 2.0], "y": [0, 1]}).to_parquet(snapshot)
    registry.record_evidence(
        client, name, version, evidence={"promote": True, "challenger_score": score},
        validation={"status": "passed", "accepted": [f"v{version}.csv"]}, spec_text="name: x\n",
        snapshots={"train": str(snapshot)},
    )  # fmt: skip


def test_a_complete_version_is_read_from_mlflow_once(proxy: CountingProxy, name: str, tmp_path: Path) -> None:
    client = MlflowClient(proxy.url)
    version = _version(proxy.url, name)
    _record(client, name, version, tmp_path, 0.8)
    mv = client.get_model_version(name, version)
    proxy.requests.clear()

    first = registry.read_evidence(client, name, mv, cached=True)
    assert first.source == "artifacts" and first.decision == {"promote": True, "challenger_score": 0.8}
    assert len(proxy.evidence_reads()) >= 4, proxy.requests  # decision, validation, spec, manifest

    proxy.requests.clear()
    again = registry.read_evidence(MlflowClient(proxy.url), name, mv, cached=True)  # another client
    assert again == first and proxy.requests == []  # not one request to MLflow
    info = registry.evidence_cache_info()
    assert (info.hits, info.misses, info.entries) == (1, 1, 1) and info.chars > 0

    # Without `cached` the artifacts are read again (what the steps do: one read per task).
    assert registry.read_evidence(client, name, mv) == first and proxy.evidence_reads()


def test_versions_without_complete_artifacts_are_not_cached(
    proxy: CountingProxy, name: str, tmp_path: Path
) -> None:
    client = MlflowClient(proxy.url)
    # Registered, its evidence not recorded yet (the step was interrupted, say): nothing to cache.
    version = _version(proxy.url, name)
    pending = registry.read_evidence(client, name, client.get_model_version(name, version), cached=True)
    assert pending.source == "tags" and pending.decision == {} and pending.validation == {}
    assert registry.evidence_cache_info().entries == 0

    # Once the retry records it, the next read has it (the empty answer was not kept).
    _record(client, name, version, tmp_path, 0.7)
    done = registry.read_evidence(client, name, client.get_model_version(name, version), cached=True)
    assert done.source == "artifacts" and done.decision["challenger_score"] == 0.7
    assert registry.evidence_cache_info().entries == 1

    # A version registered before the artifacts: its JSON tags, read afresh each time.
    legacy = _version(proxy.url, name, tags={"cd4ml.evidence": json.dumps({"promote": False})})
    old = registry.read_evidence(client, name, client.get_model_version(name, legacy), cached=True)
    assert old.source == "tags" and old.decision == {"promote": False}
    client.set_model_version_tag(name, legacy, "cd4ml.evidence", json.dumps({"promote": True}))
    new = registry.read_evidence(client, name, client.get_model_version(name, legacy), cached=True)
    assert new.decision == {"promote": True} and registry.evidence_cache_info().entries == 1


def test_the_cache_is_bounded_by_entries_and_by_size() -> None:
    item = ev.Evidence(decision={}, validation={}, spec_text=None)
    by_count = ev._EvidenceCache(max_entries=2, max_chars=1000)
    by_count.put(("u", "m", "1", "r1"), item, 10)
    by_count.put(("u", "m", "2", "r2"), item, 10)
    assert by_count.get(("u", "m", "1", "r1")) is item  # now the most recently used
    by_count.put(("u", "m", "3", "r3"), item, 10)
    assert by_count.get(("u", "m", "2", "r2")) is None  # the least recently used went
    assert by_count.info().entries == 2

    by_size = ev._EvidenceCache(max_entries=100, max_chars=100)
    by_size.put(("u", "m", "1", "r1"), item, 26)  # over a quarter of the budget: never kept
    assert by_size.get(("u", "m", "1", "r1")) is None
    for v in range(2, 7):
        by_size.put(("u", "m", str(v), f"r{v}"), item, 25)
    assert (by_size.info().entries, by_size.info().chars) == (4, 100)
    assert by_size.get(("u", "m", "2", "r2")) is None and by_size.get(("u", "m", "6", "r6")) is item


def test_the_models_view_reads_evidence_of_the_versions_it_shows_once(
    proxy: CountingProxy, name: str, tmp_path: Path
) -> None:
    client = MlflowClient(proxy.url)
    legacy = _version(proxy.url, name, tags={
        "cd4ml.decision": "promote",
        "cd4ml.evidence": json.dumps({"promote": True, "challenger_score": 0.6}),
        "cd4ml.validation": json.dumps({"status": "passed", "accepted": ["old.csv"]}),
    })  # fmt: skip
    runs = {}
    for score in (0.7, 0.8):
        version = _version(proxy.url, name, tags={"cd4ml.decision": "promote"})
        _record(client, name, version, tmp_path, score)
        runs[version] = str(client.get_model_version(name, version).run_id)
    (tmp_path / "specs").mkdir()
    spec = load_spec(write_spec(tmp_path / "specs", name))
    settings = Settings(tmp_path, tmp_path / "data", tmp_path / "specs", proxy.url)
    landing.Zone(settings.model_dir(name)).ensure()
    proxy.requests.clear()

    view = model_overview(spec, settings, limit=1)  # shows the newest version only
    assert [v.version for v in view.versions] == ["3"]
    assert view.versions[0].evidence["challenger_score"] == 0.8
    assert view.versions[0].validation["accepted"] == ["v3.csv"]
    read = proxy.evidence_reads()
    assert read and all(runs["3"] in r for r in read), read  # not version 2's artifacts

    proxy.requests.clear()
    view = model_overview(spec, settings, limit=3)
    assert [(v.version, v.evidence.get("challenger_score")) for v in view.versions] == [
        ("3", 0.8), ("2", 0.7), (legacy, 0.6),
    ]  # fmt: skip
    assert view.versions[2].validation["accepted"] == ["old.csv"]  # the legacy tags' record
    read = proxy.evidence_reads()
    assert read and all(runs["2"] in r for r in read), read  # version 3 came from the cache

    proxy.requests.clear()
    model_overview(spec, settings, limit=3)
    assert proxy.evidence_reads() == [], proxy.requests
