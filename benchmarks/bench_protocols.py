"""Service processes and wire protocols, side by side in one run (issue 16).

(a) `cd4ml serve` with CD4ML_SERVICE_WORKERS = 1, 2, 4: the no-op endpoint (GET /health/live, the
    ceiling of the HTTP stack) and single-row predictions (POST /v1/models/<m>/predict).
(b) each protocol with the same single row: native /v1/models/<m>/predict (dataframe_split), MLflow's
    scoring protocol POST /invocations (dataframe_split) and Open Inference Protocol v2
    POST /v2/models/<m>/infer (one named tensor per feature column).
(c) MLServer (mlserver + mlserver-mlflow in a venv of its own, made with uv in the temp dir, the
    model's libraries pinned to ours) serving the same registered version: its V2 infer endpoint
    with the same body, and its no-op GET /v2/health/live; parallel_workers 1 (its default) and 0
    with OMP_NUM_THREADS=1, and once as shipped.

Same registered version (the demo spec's HistGradientBoosting pipeline) and the load generator of
bench_serving.py (aiohttp, keep-alive, fixed concurrency), which here also sends GETs, warms every
connection (a single warm-up connection would warm one process of several), and records what the
cores were spent on: CPU seconds per wall second of the generator and of the server's process tree, the
1-minute load average before each row, and how the keep-alive connections spread over the server's
processes (the kernel hands each connection to one process for its lifetime).

Usage: .venv/bin/python benchmarks/bench_protocols.py [--requests 3000] [--concurrency 8]
           [--workers 1,2,4] [--protocol-workers 1,2] [--mlserver-workers 1,0] [--no-mlserver-as-shipped]
           [--no-mlserver]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from importlib.metadata import version as installed
from pathlib import Path
from typing import Any

import psutil
from benchkit import BIN, REPO, Bench, dataframe_split, tree_rss_mb, write_result

from cd4ml_dev.netutil import free_port

MODEL = "bench"
JSON = {"Content-Type": "application/json"}
IDLE_SECONDS = 3.0
# uvloop 0.22 raises in `asyncio.get_event_loop()` with no running loop, which MLServer 1.7.1's
# inference worker calls first: every worker died ("no current event loop") and no model loaded.
MLSERVER = ("mlserver==1.7.1", "mlserver-mlflow==1.7.1", "uvloop<0.22")
# The model's own libraries pinned to this venv's versions, so MLServer loads the same skops file with
# the same scikit-learn, MLflow and pandas (unpinned, its resolver took pandas 3.1).
SAME_AS_OURS = ("mlflow", "scikit-learn", "pandas", "numpy", "skops", "scipy")


def tree(pid: int) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def connections_per_process(pid: int, port: int) -> list[int]:
    """Established connections to `port` held by each process of the server's tree (busiest first)."""
    counts = []
    for p in tree(pid):
        try:
            conns = p.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        n = sum(1 for c in conns if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)
        if n:
            counts.append(n)
    return sorted(counts, reverse=True)


async def load(
    method: str, url: str, body: bytes | None, n: int, concurrency: int, server_pid: int
) -> dict[str, Any]:
    """bench_serving.load, plus GET, a warm-up on every connection and the CPU both sides spent."""
    import aiohttp

    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    headers = JSON if body is not None else {}

    async def send(session: aiohttp.ClientSession) -> int:
        async with session.request(method, url, data=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t = time.perf_counter()
            if await send(session) != 200:
                failures += 1
            latencies.append(time.perf_counter() - t)

    port = int(url.split(":")[2].split("/")[0])
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm-up: `concurrency` requests at once open every connection, so each process that holds
        # one has answered before the clock starts (>= 20 requests in all, as bench_serving.py).
        for _ in range(max(3, -(-20 // concurrency))):
            await asyncio.gather(*(send(session) for _ in range(concurrency)))
        spread = connections_per_process(server_pid, port)
        server_cpu, client_cpu = tree_cpu_seconds(server_pid), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - started
        server_cpu = tree_cpu_seconds(server_pid) - server_cpu
        client_cpu = time.process_time() - client_cpu
    latencies.sort()
    return {
        "requests": n,
        "failures": failures,
        "throughput_rps": n / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "client_cpu_cores": client_cpu / wall,
        "server_cpu_cores": server_cpu / wall,
        "connections_per_process": spread,
    }


def call(method: str, url: str, body: bytes | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method, headers=JSON if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")[:500]


def label(status: int, answer: Any, protocol: str) -> Any:
    """The single row's predicted label out of each protocol's answer; a wrong answer stops the run
    (a fast 4xx would otherwise pass for throughput)."""
    if status != 200:
        raise SystemExit(f"{protocol}: HTTP {status}: {answer}")
    if protocol in ("native", "mlflow"):
        predictions = answer["predictions"]
    else:
        # ours names its label tensor `predict`; MLServer's MLflow runtime has one unnamed output
        outputs = answer["outputs"]
        predictions = next((o["data"] for o in outputs if o["name"] == "predict"), outputs[0]["data"])
    if len(predictions) != 1:
        raise SystemExit(f"{protocol}: expected one prediction, got {answer}")
    return predictions[0]


def wait_ready(url: str, processes: int, proc: subprocess.Popen[bytes], log_file: Path) -> None:
    """Until `url` answers 200 several times in a row: each check is a new connection, which the
    kernel may hand to any process, so every process is likely up before the clock starts."""
    deadline = time.monotonic() + 180
    streak = 0
    while streak < 4 * processes:
        if proc.poll() is not None or time.monotonic() > deadline:
            what = "exited" if proc.poll() is not None else "never became ready"
            raise SystemExit(f"{url}: the server {what}:\n{log_file.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                streak = streak + 1 if resp.status == 200 else 0
        except (urllib.error.URLError, OSError):
            streak = 0
            time.sleep(0.5)


def mlserver_venv(path: Path, uv: str) -> Path:
    """A venv of MLServer's own, reused while its pins are unchanged."""
    pins = [*MLSERVER, *(f"{name}=={installed(name)}" for name in SAME_AS_OURS)]
    marker = path / "cd4ml-pins.txt"
    if marker.exists() and marker.read_text() == "\n".join(pins):
        return path / "bin"
    shutil.rmtree(path, ignore_errors=True)
    env = {**os.environ, "UV_NATIVE_TLS": os.environ.get("UV_NATIVE_TLS", "1")}
    env.pop("VIRTUAL_ENV", None)
    started = time.perf_counter()
    subprocess.run([uv, "venv", "--quiet", "--python", f"{sys.version_info[0]}.{sys.version_info[1]}",
                    str(path)], check=True, env=env)  # fmt: skip
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(path / "bin" / "python"), *pins],
                   check=True, env=env)  # fmt: skip
    marker.write_text("\n".join(pins))
    print(f"MLServer venv at {path} in {time.perf_counter() - started:.0f} s", flush=True)
    return path / "bin"


def mlserver_folder(folder: Path, version: str, parallel_workers: int) -> tuple[Path, int]:
    """MLServer's settings.json and model-settings.json: the registered version by its models:/ URI."""
    port = free_port()
    folder.mkdir(parents=True)
    settings = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "metrics_dir": str(folder / "metrics"),
        "environments_dir": str(folder / "envs"),
        "parallel_workers": parallel_workers,
        "debug": False,  # debug (the default) logs every request; ours logs none
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    model = {
        "name": MODEL,
        "implementation": "mlserver_mlflow.MLflowRuntime",
        "parameters": {"uri": f"models:/{MODEL}/{version}"},
    }
    (folder / "model-settings.json").write_text(json.dumps(model))
    return folder, port


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000, help="timed requests per row")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", default="1,2,4", help="CD4ML_SERVICE_WORKERS values (no-op, predict)")
    parser.add_argument("--protocol-workers", default="1,2", help="of those, where every protocol runs")
    parser.add_argument("--mlserver-workers", default="1,0",
                        help="MLServer parallel_workers values (1: its default, an inference process "
                             "beside the HTTP one; 0: inference in the HTTP process)")  # fmt: skip
    parser.add_argument(
        "--no-mlserver-as-shipped",
        action="store_true",
        help="skip MLServer without the one-thread limit (run at a fifth of --requests)",
    )
    parser.add_argument("--no-mlserver", action="store_true")
    parser.add_argument("--mlserver-venv", type=Path,
                        default=Path(tempfile.gettempdir()) / "cd4ml-bench-mlserver-venv")  # fmt: skip
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    protocol_workers = {int(w) for w in args.protocol_workers.split(",")}
    # (parallel_workers, one OpenMP/BLAS thread?) Our service limits its model to one thread in-process
    # (threadpoolctl); MLServer has no such setting, so its rows run with OMP_NUM_THREADS=1, which
    # made it ~5x faster here, and once as shipped.
    mlserver: list[tuple[int, bool]] = []
    if not args.no_mlserver:
        mlserver = [(int(w), True) for w in args.mlserver_workers.split(",")]
        mlserver += [] if args.no_mlserver_as_shipped else [(1, False)]
    sys.path.insert(0, str(REPO))

    from cd4ml.core.spec import load_spec
    from cd4ml.ml.training import features
    from cd4ml_dev.datagen import generate_churn

    mls_bin = None
    if mlserver:
        uv = str(BIN / "uv") if (BIN / "uv").exists() else shutil.which("uv")
        if uv is None:
            raise SystemExit("uv is needed for MLServer's venv (or pass --no-mlserver)")
        mls_bin = mlserver_venv(args.mlserver_venv, uv)

    bench = Bench("protocols", MODEL)
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "concurrency": args.concurrency,
        "requests": args.requests,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        # The service runs from the work tree (editable install): uncommitted changes are measured too.
        "uncommitted": subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "include"],
            capture_output=True,
            text=True,
        ).stdout.split("\n")[:-1],
        "rows": [],
    }
    began = time.perf_counter()
    idle: dict[int, float] = {}

    def run_server(
        cmd: list[str], env: dict[str, str], name: str, ready: str, port: int, n: int
    ) -> subprocess.Popen[bytes]:
        log_file = bench.home / f"{name}-{port}.log"
        proc = bench.spawn(cmd, log_file, env)
        wait_ready(f"http://127.0.0.1:{port}{ready}", n, proc, log_file)
        # What the server's tree spends with no request at all (pollers, state publication, the
        # supervisor): part of every row's server CPU below.
        before = tree_cpu_seconds(proc.pid)
        time.sleep(IDLE_SECONDS)
        idle[proc.pid] = (tree_cpu_seconds(proc.pid) - before) / IDLE_SECONDS
        return proc

    def row(target: str, processes: int, endpoint: str, method: str, url: str, body: bytes | None,
            pid: int, requests: int | None = None) -> None:  # fmt: skip
        loadavg = os.getloadavg()[0]
        r = asyncio.run(load(method, url, body, requests or args.requests, args.concurrency, pid))
        r |= {"target": target, "processes": processes, "endpoint": endpoint, "loadavg_1m": loadavg,
              "server_processes": len(tree(pid)), "rss_mb": tree_rss_mb(pid),
              "server_idle_cpu_cores": idle[pid],
              "server_cpu_ms_per_request": 1000 * r["server_cpu_cores"] / r["throughput_rps"]}  # fmt: skip
        results["rows"].append(r)
        print(json.dumps(r), flush=True)

    try:
        bench.start_mlflow()
        spec = load_spec(bench.spec_path)
        version = str(bench.train()["version"])
        results["model_version"] = version
        # One row with no missing value: MLServer's V2 decoding has no null for a BYTES or FP64 tensor.
        one = features(spec, generate_churn(100, seed=42, batch=2)).dropna().head(1)
        split = dataframe_split(one)
        tensors = [
            {"name": c, "datatype": "FP64", "shape": [1], "data": [float(one[c].iloc[0])]}
            for c in spec.numerical
        ] + [
            {"name": c, "datatype": "BYTES", "shape": [1], "data": [str(one[c].iloc[0])]}
            for c in spec.categorical
        ]
        infer = json.dumps({"inputs": tensors}).encode()
        results["bodies_bytes"] = {"dataframe_split": len(split), "v2": len(infer)}
        labels: dict[str, Any] = {}

        for n in workers:
            port = free_port()
            env = {**bench.env, "CD4ML_SERVICE_WORKERS": str(n)}
            cmd = [str(BIN / "cd4ml"), "serve", "--port", str(port)]
            server = run_server(cmd, env, f"cd4ml-{n}", "/health/ready", port, n)
            pid = server.pid
            base = f"http://127.0.0.1:{port}"
            endpoints = [
                ("GET /health/live (no-op)", "GET", "/health/live", None, None),
                (f"POST /v1/models/{MODEL}/predict", "POST", f"/v1/models/{MODEL}/predict", split, "native"),
            ]
            if n in protocol_workers:
                endpoints += [
                    ("POST /invocations", "POST", "/invocations", split, "mlflow"),
                    (f"POST /v2/models/{MODEL}/infer", "POST", f"/v2/models/{MODEL}/infer", infer, "oip"),
                ]
            for endpoint, method, path, body, protocol in endpoints:
                if protocol is not None:
                    labels[f"cd4ml {protocol}"] = label(*call(method, base + path, body), protocol)
                row("cd4ml serve", n, endpoint, method, base + path, body, pid)
            bench.stop(server)

        for w, one_thread in mlserver:
            assert mls_bin is not None
            name = f"mlserver-{w}-{'omp1' if one_thread else 'shipped'}"
            folder, port = mlserver_folder(bench.home / name, version, w)
            env = {**bench.env, "PATH": f"{mls_bin}:{os.environ.get('PATH', '')}",
                   # as for `mlflow models serve`: MLflow loads no model without it
                   "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"}  # fmt: skip
            env.pop("VIRTUAL_ENV", None)
            if one_thread:
                env["OMP_NUM_THREADS"] = "1"
            cmd = [str(mls_bin / "mlserver"), "start", str(folder)]
            server = run_server(cmd, env, name, f"/v2/models/{MODEL}/ready", port, 1)
            pid = server.pid
            base = f"http://127.0.0.1:{port}"
            target = (
                f"MLServer (parallel_workers={w}{', OMP_NUM_THREADS=1' if one_thread else ', as shipped'})"
            )
            labels[target] = label(*call("POST", base + f"/v2/models/{MODEL}/infer", infer), "oip")
            n = args.requests if one_thread else max(200, args.requests // 5)
            row(target, 1, "GET /v2/health/live (no-op)", "GET", base + "/v2/health/live", None, pid, n)
            row(target, 1, f"POST /v2/models/{MODEL}/infer", "POST", base + f"/v2/models/{MODEL}/infer",
                infer, pid, n)  # fmt: skip
            bench.stop(server)
        results["labels"] = labels
        if len({str(v) for v in labels.values()}) > 1:
            print(f"WARNING: the servers disagree on the row's label: {labels}", flush=True)
        if mls_bin is not None:
            results["mlserver_venv"] = (args.mlserver_venv / "cd4ml-pins.txt").read_text().splitlines()
    finally:
        bench.close()
    results["seconds"] = time.perf_counter() - began
    write_result("protocols", results)
    print(report(results))


def report(r: dict[str, Any]) -> str:
    lines = [
        f"{r['cpus']} cores, concurrency {r['concurrency']}, {r['requests']} timed requests per row, "
        f"commit {r['commit']}{' + uncommitted changes in include/' if r['uncommitted'] else ''}, "
        f"{r['seconds']:.0f} s",
        "",
        "| server | processes | endpoint (1 row) | requests | req/s | p50 ms | p99 ms | failed "
        "| CPU cores client / server (idle) | server CPU ms per request | connections per process "
        "| load avg 1 min before | RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['target']} | {x['processes']} ({x['server_processes']} in tree) | {x['endpoint']} | "
            f"{x['requests']} | "
            f"{x['throughput_rps']:.0f} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | {x['failures']} | "
            f"{x['client_cpu_cores']:.2f} / {x['server_cpu_cores']:.2f} ({x['server_idle_cpu_cores']:.2f}) | "
            f"{x['server_cpu_ms_per_request']:.2f} | "
            f"{'/'.join(map(str, x['connections_per_process']))} | {x['loadavg_1m']:.2f} | "
            f"{x['rss_mb']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
