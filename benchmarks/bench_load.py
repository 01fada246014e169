"""The prediction service under sustained concurrent load while `champion` moves under it.

A real MLflow server and the real service (`cd4ml serve`, one uvicorn process) on free ports in a
temp dir. N concurrent clients (aiohttp, keep-alive, as in bench_serving.py) send a mix of 1-row
and 50-row requests for `--duration` seconds. New versions are registered in MLflow beforehand, and
`champion` is moved `--swaps` times, evenly spread over the middle of the run; the service's own
poller swaps them in. The service's RSS is sampled every second.

Reported: failed requests (anything but a 200 with one prediction per row from a consistent
version), p50/p99 latency overall and around each swap, throughput per 5 s bucket, which version
answered in each bucket, how long after each alias move the new version first answered, and RSS
at start / end / max.

Usage: .venv/bin/python benchmarks/bench_load.py [--duration 60] [--swaps 3] [--concurrency 12]
The short version runs in `make test` (tests/reliability/test_load.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from cd4ml_dev.netutil import free_port, wait_http

REPO = Path(__file__).resolve().parents[1]
MODEL = "loadbench"
BATCH_ROWS = 50
BATCH_SHARE = 0.25  # one request in four carries 50 rows


@dataclass
class Sample:
    sent: float  # seconds since the load started
    latency: float
    rows: int
    ok: bool
    version: str | None
    error: str | None = None


@dataclass
class Swap:
    version: str
    moved_at: float  # seconds since the load started, when the alias write returned
    first_served_at: float | None = None


@dataclass
class LoadResult:
    duration: float
    concurrency: int
    samples: list[Sample]
    swaps: list[Swap]
    rss_mb: list[tuple[float, float]]  # (seconds since start, RSS MB)
    initial_version: str
    cpu_count: int = field(default_factory=lambda: os.cpu_count() or 0)
    load_avg_before: tuple[float, float, float] = (0.0, 0.0, 0.0)


# -- models and versions ---------------------------------------------------------------------------


def fit_models(spec: Any, count: int, rows: int) -> list[tuple[Any, Any]]:
    """`count` different fitted pipelines (different data), each with its input example."""
    from cd4ml.ml.training import features, train
    from cd4ml_dev.datagen import generate_churn

    out = []
    for i in range(count):
        frame = generate_churn(rows, seed=100 + i, batch=i)
        out.append((train(spec, frame), features(spec, frame.head(5))))
    return out


def register(tracking_uri: str, spec: Any, fitted: tuple[Any, Any], label: str) -> str:
    """Log and register a version (what a training run does before it decides)."""
    from cd4ml import registry

    model, example = fitted
    logged = registry.log_challenger(
        tracking_uri, experiment=spec.name, run_name=f"load {label}", model=model, input_example=example,
        params={"label": label}, tags={"cd4ml.bench": "load"}, metrics={},
    )  # fmt: skip
    mv = registry.register_version(
        registry.client(tracking_uri), name=spec.name, description="load benchmark", logged=logged,
        tags={"cd4ml.bench": label},
    )  # fmt: skip
    return str(mv.version)


def promote(tracking_uri: str, spec: Any, version: str) -> None:
    """Move `champion` to `version` as a promoting run does (signed with CD4ML_SERVICE_ADMIN_TOKEN
    when set: a service with a token serves no unsigned champion); the service's poller does the rest."""
    from datetime import UTC, datetime

    from cd4ml import registry
    from cd4ml.core.settings import get_settings

    client = registry.client(tracking_uri)
    current = registry.version_by_alias(client, spec.name, registry.CHAMPION)
    when = datetime.now(UTC).isoformat()
    registry.promote_with_tags(
        client, spec.name, version, expected_current=str(current.version) if current else None,
        tags={"cd4ml.promoted_at": when}, sign_with=get_settings().service_admin_token, when=when,
    )  # fmt: skip


def request_bodies(spec: Any) -> dict[int, bytes]:
    from cd4ml.ml.training import features
    from cd4ml_dev.datagen import generate_churn

    rows = features(spec, generate_churn(BATCH_ROWS, seed=7, batch=9))

    def body(frame: Any) -> bytes:
        return json.dumps(
            {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}
        ).encode()

    return {1: body(rows.head(1)), BATCH_ROWS: body(rows)}


# -- the load --------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


async def _drive(
    url: str, bodies: dict[int, bytes], concurrency: int, duration: float, t0: float, seed: int
) -> list[Sample]:
    import aiohttp

    samples: list[Sample] = []
    rng = random.Random(seed)
    headers = {"Content-Type": "application/json"}

    async def client(session: aiohttp.ClientSession) -> None:
        while (start := time.perf_counter()) - t0 < duration:
            rows = BATCH_ROWS if rng.random() < BATCH_SHARE else 1
            version: str | None = None
            try:
                async with session.post(url, data=bodies[rows], headers=headers) as resp:
                    raw = await resp.read()
                latency = time.perf_counter() - start
                version, error = resp.headers.get("x-model-version"), None
                if resp.status != 200:
                    error = f"HTTP {resp.status}: {raw[:200]!r}"
                else:
                    body = json.loads(raw)
                    if len(body.get("predictions", [])) != rows:
                        error = f"{len(body.get('predictions', []))} predictions for {rows} rows"
                    elif str(body.get("version")) != version:
                        error = f"header says v{version}, body says v{body.get('version')}"
            except (aiohttp.ClientError, TimeoutError) as err:
                latency, error = time.perf_counter() - start, f"{type(err).__name__}: {err}"
            samples.append(Sample(start - t0, latency, rows, error is None, version, error))

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return samples


def run_load(
    *,
    service_url: str,
    service_pid: int,
    tracking_uri: str,
    spec: Any,
    swap_versions: list[str],
    duration: float,
    concurrency: int,
    seed: int = 0,
) -> LoadResult:
    """Drive the service for `duration` s; move `champion` to each of `swap_versions` (registered
    beforehand, so each swap is exactly one alias write) at evenly spaced times."""
    from cd4ml import registry

    client = registry.client(tracking_uri)
    initial = registry.version_by_alias(client, spec.name, registry.CHAMPION)
    assert initial is not None, "the service needs a champion before the load starts"
    url = f"{service_url}/v1/models/{spec.name}/predict"
    bodies = request_bodies(spec)
    # Swaps spread over the middle: with 3 swaps in 60 s they land at 15, 30 and 45 s.
    at = [duration * (i + 1) / (len(swap_versions) + 1) for i in range(len(swap_versions))]
    swaps: list[Swap] = []
    rss: list[tuple[float, float]] = []
    stop = threading.Event()
    errors: list[Exception] = []
    load_avg = os.getloadavg()
    t0 = time.perf_counter()

    def sample_rss() -> None:
        while not stop.is_set():
            rss.append((time.perf_counter() - t0, rss_mb(service_pid)))
            stop.wait(1.0)

    def do_swaps() -> None:
        try:
            for when, version in zip(at, swap_versions, strict=True):
                if stop.wait(max(0.0, when - (time.perf_counter() - t0))):
                    return
                promote(tracking_uri, spec, version)
                swaps.append(Swap(version, time.perf_counter() - t0))
        except Exception as err:  # noqa: BLE001 - re-raised by the caller: a missed swap fails the run
            errors.append(err)

    threads = [
        threading.Thread(target=sample_rss, daemon=True),
        threading.Thread(target=do_swaps, daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        samples = asyncio.run(_drive(url, bodies, concurrency, duration, t0, seed))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    if errors:
        raise RuntimeError(f"a champion swap failed: {errors[0]!r}") from errors[0]
    for swap in swaps:
        served = [s.sent + s.latency for s in samples if s.version == swap.version]
        swap.first_served_at = min(served) if served else None
    return LoadResult(duration, concurrency, samples, swaps, rss, str(initial.version),
                      load_avg_before=load_avg)  # fmt: skip


# -- figures ---------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarise(result: LoadResult, bucket: float = 5.0) -> dict[str, Any]:
    samples = result.samples
    ms = [1000 * s.latency for s in samples]
    failed = [s for s in samples if not s.ok]
    buckets = []
    for i in range(math.ceil(result.duration / bucket - 1e-9)):
        start = i * bucket
        inside = [s for s in samples if start <= s.sent < start + bucket]
        versions: dict[str, int] = {}
        for s in inside:
            versions[str(s.version)] = versions.get(str(s.version), 0) + 1
        buckets.append({
            "from_s": start, "requests": len(inside), "rps": len(inside) / bucket,
            "p50_ms": _pct([1000 * s.latency for s in inside], 0.5),
            "p99_ms": _pct([1000 * s.latency for s in inside], 0.99), "versions": versions,
        })  # fmt: skip
    around = []
    for swap in result.swaps:
        window = [1000 * s.latency for s in samples if swap.moved_at - 2 <= s.sent < swap.moved_at + 5]
        around.append({
            "version": swap.version, "alias_moved_at_s": round(swap.moved_at, 2),
            "first_served_after_s": None if swap.first_served_at is None
            else round(swap.first_served_at - swap.moved_at, 2),
            "requests": len(window), "p50_ms": _pct(window, 0.5), "p99_ms": _pct(window, 0.99),
        })  # fmt: skip
    # After a swap took effect, did any *new* request get an older version? (it must not)
    stale = 0
    for swap in result.swaps:
        if swap.first_served_at is not None:
            newer = {swap.version, *(s.version for s in result.swaps if int(s.version) > int(swap.version))}
            stale += sum(1 for s in samples if s.sent > swap.first_served_at and s.version not in newer)
    rss = [mb for _, mb in result.rss_mb]
    return {
        "duration_s": result.duration,
        "concurrency": result.concurrency,
        "cpus": result.cpu_count,
        "load_avg_before": result.load_avg_before,
        "requests": len(samples),
        "rows": sum(s.rows for s in samples),
        "failed": len(failed),
        "failures": [s.error for s in failed[:10]],
        "rps": len(samples) / result.duration,
        "p50_ms": _pct(ms, 0.5),
        "p99_ms": _pct(ms, 0.99),
        "max_ms": max(ms) if ms else float("nan"),
        "p50_ms_1row": _pct([1000 * s.latency for s in samples if s.rows == 1], 0.5),
        "p99_ms_1row": _pct([1000 * s.latency for s in samples if s.rows == 1], 0.99),
        "p50_ms_50rows": _pct([1000 * s.latency for s in samples if s.rows == BATCH_ROWS], 0.5),
        "p99_ms_50rows": _pct([1000 * s.latency for s in samples if s.rows == BATCH_ROWS], 0.99),
        "initial_version": result.initial_version,
        "swaps": around,
        "stale_after_swap": stale,
        "buckets": buckets,
        "rss_start_mb": rss[0] if rss else float("nan"),
        "rss_end_mb": rss[-1] if rss else float("nan"),
        "rss_max_mb": max(rss) if rss else float("nan"),
        "rss_samples": len(rss),
    }


def report(s: dict[str, Any]) -> str:
    lines = [
        f"{s['requests']} requests ({s['rows']} rows) in {s['duration_s']:.0f} s from {s['concurrency']} "
        f"clients on {s['cpus']} cores (load average before: {s['load_avg_before'][0]:.2f}); "
        f"failed: **{s['failed']}**; throughput {s['rps']:.0f} req/s",
        f"latency overall p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, max {s['max_ms']:.0f} ms; "
        f"1-row p50/p99 {s['p50_ms_1row']:.1f}/{s['p99_ms_1row']:.1f} ms; "
        f"50-row p50/p99 {s['p50_ms_50rows']:.1f}/{s['p99_ms_50rows']:.1f} ms",
        f"RSS start {s['rss_start_mb']:.0f} MB, end {s['rss_end_mb']:.0f} MB, "
        f"max {s['rss_max_mb']:.0f} MB ({s['rss_samples']} samples)",
        f"requests answered by an older version after a newer one had answered: {s['stale_after_swap']}",
        "",
        "| swap to | alias moved at (s) | first answer by it after (s) | p50 ms (-2..+5 s) | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for w in s["swaps"]:
        lines.append(
            f"| v{w['version']} | {w['alias_moved_at_s']:.1f} | {w['first_served_after_s']} | "
            f"{w['p50_ms']:.1f} | {w['p99_ms']:.1f} |"
        )
    lines += ["", "| from (s) | req/s | p50 ms | p99 ms | answered by |", "|---|---|---|---|---|"]
    for b in s["buckets"]:
        served = ", ".join(f"v{v}: {n}" for v, n in sorted(b["versions"].items()))
        lines.append(
            f"| {b['from_s']:.0f} | {b['rps']:.0f} | {b['p50_ms']:.1f} | {b['p99_ms']:.1f} | {served} |"
        )
    return "\n".join(lines)


# -- the benchmark run -----------------------------------------------------------------------------


def write_spec(specs_dir: Path, estimator: dict[str, Any] | None = None) -> Path:
    import yaml

    raw = yaml.safe_load((REPO / "include/specs/churn.yaml").read_text())
    if estimator:
        raw["estimator"] = estimator
    path = specs_dir / f"{MODEL}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--train-rows", type=int, default=20_000)
    args = parser.parse_args()
    # The setup fits (not measured) use HistGradientBoosting; OpenMP threads on 2 shared cores
    # slowed one fit 20x here. The service limits its own thread pools to 1 regardless.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    # Imported here, not at the top: tests/reliability/test_load.py loads this file by its path, with
    # no benchmarks/ on sys.path, and uses only what the load and its figures need.
    from benchkit import BIN, Bench, write_result

    from cd4ml.core.spec import load_spec

    with Bench("load", MODEL) as bench:
        spec = load_spec(write_spec(bench.specs))  # the demo spec: HistGradientBoosting
        tracking_uri = bench.tracking_uri
        os.environ.update(
            {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        )
        bench.start_mlflow()
        models = fit_models(spec, args.swaps + 1, args.train_rows)
        versions = [register(tracking_uri, spec, m, f"model {i}") for i, m in enumerate(models)]
        promote(tracking_uri, spec, versions[0])
        service_port = free_port()
        service = bench.spawn(
            [str(BIN / "cd4ml"), "serve", "--port", str(service_port)], bench.home / "service.log"
        )
        service_url = f"http://127.0.0.1:{service_port}"
        wait_http(f"{service_url}/health/ready", 120)
        result = run_load(service_url=service_url, service_pid=service.pid, tracking_uri=tracking_uri,
                          spec=spec, swap_versions=versions[1:], duration=args.duration,
                          concurrency=args.concurrency)  # fmt: skip
    summary = summarise(result)
    write_result(
        "load", {"summary": summary, "rss_mb": result.rss_mb, "swaps": [asdict(s) for s in result.swaps]}
    )
    print(report(summary))
    if summary["failed"] or len(result.swaps) != args.swaps:
        sys.exit(1)


if __name__ == "__main__":
    main()
