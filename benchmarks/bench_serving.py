"""Prediction service vs `mlflow models serve --env-manager local`, side by side in one run.

Same registered model version (the demo spec's HistGradientBoosting pipeline), same machine, same
load generator (aiohttp, keep-alive, fixed concurrency), one worker each. Single-row and 100-row
requests: throughput, p50/p99 latency, server RSS. The prediction-log overhead is measured by running
our service with the log on and off, and a canary's (routing, counting; 10 % of requests answered by a
second version of the same kind) by running it with one.

Usage: .venv/bin/python benchmarks/bench_serving.py [--requests 3000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchkit import BIN, REPO, RUN_TIME, Bench, request_bodies, tree_rss_mb, write_result

from cd4ml_dev.netutil import free_port, wait_http


async def load(url: str, body: bytes, n: int, concurrency: int) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                if resp.status != 200:
                    failures += 1
            latencies.append(time.perf_counter() - t)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        # warm-up
        for _ in range(20):
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": n,
        "failures": failures,
        "throughput_rps": n / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--batch-requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    from cd4ml.core.settings import get_settings
    from cd4ml.core.spec import load_spec
    from cd4ml.steps.pipeline import run_training

    results: dict[str, Any] = {"concurrency": args.concurrency, "cpus": os.cpu_count()}
    with Bench("serving") as bench:
        bench.start_mlflow()
        settings = get_settings()
        spec = load_spec(bench.spec_path)
        bench.train()
        # A second version of the same kind for the canary target (registered, not promoted).
        assert run_training(spec, settings, run_id="bench-2", run_time=RUN_TIME,
                            deploy=False, force=True, evaluate_only=True)["version"] == "2"  # fmt: skip
        one, hundred = request_bodies(spec)

        ours = [str(BIN / "cd4ml"), "serve", "--port", "{port}"]
        theirs = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/bench@champion"]
        theirs += ["--env-manager", "local", "-h", "127.0.0.1", "-p", "{port}", "--workers", "1"]
        predict = "/v1/models/bench/predict"
        targets = {
            "cd4ml (log on)": (ours, {}, predict),
            "cd4ml (log off)": (ours, {"CD4ML_SERVICE_LOG_PREDICTIONS": "0"}, predict),
            "cd4ml (log on, canary 10 %)": (ours, {}, predict),
            # MLflow refuses to deserialize any model (skops included) unless explicitly allowed.
            "mlflow models serve": (theirs, {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"}, "/invocations"),
        }
        only = os.environ.get("CD4ML_BENCH_ONLY")
        for name, (cmd, extra, path) in targets.items():
            if only and only not in name:
                continue
            if "canary" in name:
                canary_on(bench.spec_path, settings.mlflow_tracking_uri)
            port = free_port()
            log_file = bench.home / f"{name.split()[0]}-{port}.log"
            proc = bench.spawn(
                [c.replace("{port}", str(port)) for c in cmd], log_file, {**bench.env, **extra}
            )
            health = "/health/ready" if "cd4ml" in name else "/ping"
            try:
                wait_http(f"http://127.0.0.1:{port}{health}", 120)
            except TimeoutError:
                raise SystemExit(f"{name} did not start:\n{log_file.read_text()[-3000:]}") from None
            url = f"http://127.0.0.1:{port}{path}"
            if "canary" in name:
                wait_canary(f"http://127.0.0.1:{port}/v1/models/bench/canary", "2")
            idle = tree_rss_mb(proc.pid)
            single = asyncio.run(load(url, one, args.requests, args.concurrency))
            batch = asyncio.run(load(url, hundred, args.batch_requests, args.concurrency))
            results[name] = {"single": single, "batch100": batch, "rss_idle_mb": idle,
                             "rss_after_mb": tree_rss_mb(proc.pid)}  # fmt: skip
            print(name, json.dumps(results[name]), flush=True)
            bench.stop(proc)
        logged = sum(1 for _ in (bench.home / "data" / "bench" / "predictions").rglob("*.parquet"))
        results["log_parts_written"] = logged
    write_result("serving", results)
    print(report(results))


def wait_canary(url: str, version: str, timeout: float = 60.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=5) as resp:
            if (json.loads(resp.read()).get("canary") or {}).get("version") == version:
                return
        time.sleep(0.5)
    raise SystemExit(f"the service never routed to canary version {version} ({url})")


def canary_on(spec_path: Path, tracking_uri: str) -> None:
    """The spec says canary (10 %) and version 2 holds the `canary` alias (no admin token here, so
    the service needs no signed record)."""
    import yaml
    from mlflow import MlflowClient

    raw = yaml.safe_load(spec_path.read_text())
    raw["deployment"] = {"strategy": "canary", "canary": {"fraction": 0.1}}
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    MlflowClient(tracking_uri).set_registered_model_alias("bench", "canary", "2")


def report(r: dict[str, Any]) -> str:
    head = (
        "| server | 1-row req/s | p50 ms | p99 ms | 100-row req/s | p50 ms | p99 ms | RSS idle / after MB |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for name in ("cd4ml (log on)", "cd4ml (log off)", "cd4ml (log on, canary 10 %)", "mlflow models serve"):
        if name not in r:
            continue
        x = r[name]
        s, b = x["single"], x["batch100"]
        lines.append(
            f"| {name} | {s['throughput_rps']:.0f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
            f"{b['throughput_rps']:.0f} | {b['p50_ms']:.1f} | {b['p99_ms']:.1f} | "
            f"{x['rss_idle_mb']:.0f} / {x['rss_after_mb']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
