"""The prediction service's throughput and latency with OpenTelemetry tracing on vs off, in one run.

Same registered version (the demo spec's HistGradientBoosting pipeline, as bench_serving.py), two
`cd4ml serve` processes started from the same environment, one with OTEL_EXPORTER_OTLP_ENDPOINT set
to a real OTLP/HTTP receiver running in a process of its own (tests/support/otlp.py: it decodes
every batch), one without. Same load generator as bench_serving.py (aiohttp, keep-alive, fixed
concurrency, 20 warm-up requests per run). The two are loaded in turn, interleaved over `--rounds`
rounds (off, on, then on, off, ...) so that a change in the machine's load hits both. Every span is
checked in at the end: the receiver must hold 4 spans (request, parse, predict, log) per request.

Usage: .venv/bin/python benchmarks/bench_tracing.py [--requests 3000] [--concurrency 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
from bench_serving import load
from benchkit import BIN, REPO, Bench, request_bodies, tree_rss_mb, write_result

from cd4ml_dev.netutil import free_port, wait_http

SPANS_PER_REQUEST = 4  # the request span, cd4ml.parse, cd4ml.predict, cd4ml.log
WARMUP = 20  # bench_serving.load sends these before it measures


def start_receiver(log: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.otlp"], cwd=REPO, stdout=subprocess.PIPE,
        stderr=log.open("wb"), text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def stop_receiver(proc: subprocess.Popen[str]) -> dict[str, int]:
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    counts: dict[str, int] = json.loads(out.strip().splitlines()[-1])
    return counts


def tracing_cpu_us(endpoint: str, n: int = 5000) -> tuple[float, float]:
    """The CPU time tracing adds to one request, in microseconds: (in the service's process, in the
    exporter process). The service's own calls (start, 3 steps, finish) and its sender thread are
    measured in this process (process CPU time, all threads); the exporter child's (span objects,
    processor, OTLP encoding, the posts to `endpoint`) from its own CPU times."""
    import time

    from cd4ml.serving.span_export import ExporterProcess
    from cd4ml.serving.tracing import LOG, PARSE, PREDICT, ROWS, ServiceTracing

    # A short export delay, so that the child has exported nearly everything when it is measured.
    tracing = ServiceTracing.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_SERVICE_NAME": "cpu",
                                       "OTEL_BSP_SCHEDULE_DELAY": "200"})  # fmt: skip
    sink = tracing.sink
    assert isinstance(sink, ExporterProcess)
    headers = {"host": "127.0.0.1", "content-type": "application/json", "content-length": "120"}

    def request() -> None:
        rt = tracing.start("POST", "/v1/models/{model}/predict", "/v1/models/bench/predict", headers, "bench",
                           "native")  # fmt: skip
        rt.serving("bench", "1")
        rt.begin(PARSE)
        rt.set(ROWS, 1)
        rt.begin(PREDICT, rows=1)
        rt.begin(LOG, rows=1)
        rt.end()
        rt.finish(200)

    request()  # starts the exporter child (not counted)
    time.sleep(2)
    assert sink.pid is not None
    child = psutil.Process(sink.pid)
    child_before = sum(child.cpu_times()[:2])
    started = time.process_time()
    for i in range(n):
        request()
        if i % 200 == 0:
            time.sleep(0.01)  # as a service between requests: the sender thread gets its turns
    spent = time.process_time() - started
    time.sleep(2)  # sent, and exported in the child
    child_cpu = sum(child.cpu_times()[:2]) - child_before
    tracing.shutdown()  # the child exports the rest and exits
    return 1e6 * spent / n, 1e6 * child_cpu / n


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    return {
        "throughput_rps": statistics.mean(r["throughput_rps"] for r in runs),
        "p50_ms": statistics.mean(r["p50_ms"] for r in runs),
        "p99_ms": statistics.mean(r["p99_ms"] for r in runs),
        "cpu_ms_per_request": statistics.mean(r["cpu_ms_per_request"] for r in runs),
        "failures": sum(r["failures"] for r in runs),
    }


def measured(pid: int, url: str, body: bytes, n: int, concurrency: int) -> dict[str, float]:
    """`load`, plus the CPU time per request of the service and its children (the span exporter
    process, when tracing is on; user + system, all threads, warm-up included): the one-worker
    service is CPU-bound, so its throughput on an idle core is the inverse of this, and unlike
    requests/s it hardly moves when other processes share the machine."""
    proc = psutil.Process(pid)

    def cpu() -> float:
        total = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    before = cpu()
    out = asyncio.run(load(url, body, n, concurrency))
    out["cpu_ms_per_request"] = 1000 * (cpu() - before) / (n + WARMUP)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--batch-requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-rows", type=int, default=20_000)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    from cd4ml.core.spec import load_spec

    receiver: subprocess.Popen[str] | None = None
    results: dict[str, Any] = {
        "concurrency": args.concurrency, "cpus": os.cpu_count(), "rounds": args.rounds,
        "requests": args.requests, "batch_requests": args.batch_requests, "loadavg": [],
    }  # fmt: skip
    bench = Bench("tracing")
    # No OTEL_ variable of this shell reaches a server: the untraced service must be untraced.
    bench.env = {k: v for k, v in bench.env.items() if not k.startswith("OTEL_")}
    try:
        bench.start_mlflow(300)
        bench.train(args.train_rows)
        one, hundred = request_bodies(load_spec(bench.spec_path))

        receiver, receiver_port = start_receiver(bench.home / "receiver.log")
        own = [tracing_cpu_us(f"http://127.0.0.1:{receiver_port}") for _ in range(3)]
        results["tracing_cpu_us_per_request"] = statistics.median(o[0] for o in own)
        results["exporter_cpu_us_per_request"] = statistics.median(o[1] for o in own)
        print(f"tracing's own CPU time per request: {results['tracing_cpu_us_per_request']:.0f} us in the "
              f"service's process, {results['exporter_cpu_us_per_request']:.0f} us in the exporter process",
              flush=True)  # fmt: skip
        tracing = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
                   "OTEL_SERVICE_NAME": "cd4ml-bench"}  # fmt: skip
        services: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        for name, extra in (("tracing off", {}), ("tracing on", tracing)):
            port = free_port()
            log = bench.home / f"service-{name.split()[1]}.log"
            proc = bench.spawn(
                [str(BIN / "cd4ml"), "serve", "--port", str(port)], log, {**bench.env, **extra}
            )
            try:
                wait_http(f"http://127.0.0.1:{port}/health/ready", 300)
            except TimeoutError:
                raise SystemExit(f"{name} did not start:\n{log.read_text()[-3000:]}") from None
            services[name] = (proc, f"http://127.0.0.1:{port}/v1/models/bench/predict")

        runs: dict[str, dict[str, list[dict[str, float]]]] = {
            n: {"single": [], "batch100": []} for n in services
        }
        order = list(services)
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                results["loadavg"].append(round(os.getloadavg()[0], 2))
                pid, url = services[name][0].pid, services[name][1]
                single = measured(pid, url, one, args.requests, args.concurrency)
                batch = measured(pid, url, hundred, args.batch_requests, args.concurrency)
                runs[name]["single"].append(single)
                runs[name]["batch100"].append(batch)
                print(f"round {r + 1} {name}: 1-row {single['throughput_rps']:.0f} req/s p99 "
                      f"{single['p99_ms']:.1f} ms CPU {single['cpu_ms_per_request']:.3f} ms/req; 100-row "
                      f"{batch['throughput_rps']:.0f} req/s p99 {batch['p99_ms']:.1f} ms CPU "
                      f"{batch['cpu_ms_per_request']:.3f} ms/req (load {results['loadavg'][-1]})",
                      flush=True)  # fmt: skip
        for name, (proc, _) in services.items():
            results[name] = {kind: summarize(rs) for kind, rs in runs[name].items()}
            results[name]["runs"] = runs[name]
            results[name]["rss_after_mb"] = tree_rss_mb(proc.pid)
            bench.stop(proc)  # the traced service flushes its last batch here
        counts = stop_receiver(receiver)
        receiver = None
        # every benchmark request, and the 3 x (5,000 + 1) of tracing_cpu_us
        sent = args.rounds * (args.requests + args.batch_requests + 2 * WARMUP) + 3 * 5001
        results["spans"] = {"received": counts["spans"], "expected": SPANS_PER_REQUEST * sent,
                            "export_requests": counts["requests"]}  # fmt: skip
        for kind in ("single", "batch100"):
            off, on = results["tracing off"][kind], results["tracing on"][kind]
            results[f"cost_{kind}_pct"] = 100 * (1 - on["throughput_rps"] / off["throughput_rps"])
            # the throughput cost on an idle core: 1 - (1 / cpu_on) / (1 / cpu_off)
            results[f"cpu_cost_{kind}_pct"] = 100 * (1 - off["cpu_ms_per_request"] / on["cpu_ms_per_request"])
            # tracing's own CPU time (in-process, same machine, same minutes) over the untraced request's
            own = results["tracing_cpu_us_per_request"] / 1000
            results[f"own_cost_{kind}_pct"] = 100 * own / (off["cpu_ms_per_request"] + own)
    finally:
        if receiver is not None:
            stop_receiver(receiver)
        bench.close()
    write_result("tracing", results)
    print(report(results))


def report(r: dict[str, Any]) -> str:
    lines = [
        "| service | 1-row req/s | p50 ms | p99 ms | CPU ms/req "
        "| 100-row req/s | p50 ms | p99 ms | CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("tracing off", "tracing on"):
        s, b = r[name]["single"], r[name]["batch100"]
        lines.append(
            f"| {name} | {s['throughput_rps']:.0f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
            f"{s['cpu_ms_per_request']:.3f} | {b['throughput_rps']:.0f} | {b['p50_ms']:.1f} | "
            f"{b['p99_ms']:.1f} | {b['cpu_ms_per_request']:.3f} |"
        )
    spans = r["spans"]
    lines.append(
        f"\nthroughput cost of tracing, measured: {r['cost_single_pct']:.1f} % (1-row), "
        f"{r['cost_batch100_pct']:.1f} % (100-row); from the service's CPU time per request: "
        f"{r['cpu_cost_single_pct']:.1f} % (1-row), {r['cpu_cost_batch100_pct']:.1f} % (100-row); from "
        f"tracing's own CPU time ({r['tracing_cpu_us_per_request']:.0f} us/request in the service's process, "
        f"{r.get('exporter_cpu_us_per_request', float('nan')):.0f} us in the exporter process): "
        f"{r['own_cost_single_pct']:.1f} % (1-row), {r['own_cost_batch100_pct']:.1f} % (100-row); spans "
        f"received {spans['received']} of {spans['expected']} in {spans['export_requests']} OTLP requests; "
        f"load average at each run start {r['loadavg']}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
