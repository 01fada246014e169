"""Feedback ingestion: labels/s over HTTP, and a 1M-row label file joined to 1M logged predictions.

HTTP: a real MLflow server, a champion trained by the pipeline, and the real service (`cd4ml serve`,
one uvicorn process) on 127.0.0.1. Request ids come from real predict calls (100-row requests, so
one id names 100 rows). N concurrent clients (aiohttp, keep-alive, as bench_serving.py) then post
labels, side by side:
  - one label per POST (what a client labelling events one at a time does),
  - 100 labels per POST (batched),
  - both again after a restart, when every id is found through the on-disk request index, not memory.

File: 1M logged predictions (9 feature columns, 10 rows per request, parts of 5,000 rows as the
writer flushes them, spread over `--days` days) and a 1M-row CSV of labels for all of them, shuffled.
  - cd4ml: `ingest_label_files` (read, validate, match ids, store) then `labelled_predictions` (join),
  - the obvious alternative: pandas `read_csv` + `read_predictions` (the whole log) + `merge`.
Each runs in a fresh interpreter, so its peak RSS is its own.

Usage: .venv/bin/python benchmarks/bench_feedback.py [--labels 3000] [--concurrency 8] [--rows 1000000]
       [--skip-http] [--skip-file]
Writes benchmarks/out/feedback.json and prints a table.
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
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchkit import BIN, Bench, dataframe_split, reset_peak, status_mb, write_result

from cd4ml_dev.netutil import free_port, wait_http

MODEL = "fbbench"
ROWS_PER_PREDICT = 100
BATCH = 100
START = datetime(2026, 3, 1, tzinfo=UTC)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- HTTP ---------------------------------------------------------------------------------------


async def post_all(url: str, bodies: list[bytes], concurrency: int) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    failures = 0
    pending = list(reversed(bodies))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        while pending:
            body = pending.pop()
            t = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                failures += resp.status != 200
            latencies.append(time.perf_counter() - t)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(bodies),
        "failures": failures,
        "seconds": round(wall, 3),
        "requests_per_s": round(len(bodies) / wall, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2),
    }


async def predict_ids(url: str, body: bytes, n: int, concurrency: int) -> list[str]:
    import aiohttp

    ids: list[str] = []

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 200, await resp.text()
            ids.append((await resp.json())["request_id"])

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        for i in range(0, n, concurrency):
            await asyncio.gather(*(one(session) for _ in range(min(concurrency, n - i))))
    return ids


def label_bodies(ids: list[str], per_post: int) -> list[bytes]:
    labels = [
        {"request_id": rid, "row": r, "outcome": (hash(rid) + r) % 2}
        for rid in ids
        for r in range(ROWS_PER_PREDICT)
    ]
    return [
        json.dumps(labels[i : i + per_post] if per_post > 1 else labels[i]).encode()
        for i in range(0, len(labels), per_post)
    ]


def http_bench(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    """Its MLflow server and service stop before it returns: the file benchmark runs on idle cores."""
    from cd4ml.core.spec import load_spec
    from cd4ml.ml.training import features
    from cd4ml_dev.datagen import generate_churn

    env = {**bench.env, "CD4ML_SERVICE_MAX_ROWS": "1000"}
    out: dict[str, Any] = {"concurrency": args.concurrency}
    try:
        bench.start_mlflow(300)
        bench.train(3000, seed=61, run_id="fb")
        rows = features(load_spec(bench.spec_path), generate_churn(ROWS_PER_PREDICT, seed=62, batch=2))
        predict_body = dataframe_split(rows)

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [str(BIN / "cd4ml"), "serve", "--port", str(port)]
        proc = bench.spawn(cmd, bench.home / "service.log", env)
        wait_http(f"{base}/health/ready", 300)
        scenarios = [
            ("one label per POST", 1, args.labels),
            (f"{BATCH} labels per POST", BATCH, args.batched_labels),
        ]
        ids = {}
        for restart in (False, True):
            for name, _, n_labels in scenarios:
                n_predicts = max(1, n_labels // ROWS_PER_PREDICT)
                ids[(restart, name)] = asyncio.run(
                    predict_ids(
                        f"{base}/v1/models/{MODEL}/predict", predict_body, n_predicts, args.concurrency
                    )
                )
        feedback = f"{base}/v1/models/{MODEL}/feedback"
        for restart in (False, True):
            if restart:
                bench.stop(proc)
                proc = bench.spawn(cmd, bench.home / "service-2.log", env)
                wait_http(f"{base}/health/ready", 300)
            for name, per_post, _ in scenarios:
                load_before = load_avg()
                result = asyncio.run(
                    post_all(feedback, label_bodies(ids[(restart, name)], per_post), args.concurrency)
                )
                labels = len(ids[(restart, name)]) * ROWS_PER_PREDICT
                result.update(
                    labels=labels, labels_per_s=round(labels / result["seconds"], 1), load_before=load_before
                )
                key = f"{name}{' (after restart: ids from disk)' if restart else ''}"
                out[key] = result
                print(key, json.dumps(result), flush=True)
        parts = list((bench.home / "data" / MODEL / "feedback" / "labels").rglob("part-*.parquet"))
        out["label_parts_written"] = len(parts)
    finally:
        bench.stop_all()
    return out


# -- file ---------------------------------------------------------------------------------------


def make_log(root: Path, rows: int, days: int) -> Path:
    """`rows` logged predictions as the writer lays them out, and a shuffled CSV labelling them all."""
    import numpy as np
    import pandas as pd

    from cd4ml.core.paths import ModelPaths
    from cd4ml_dev.datagen import generate_churn

    paths = ModelPaths.in_data_dir(root, MODEL)
    base = generate_churn(50_000, seed=7).drop(columns=["event_time", "churned"])
    reps = -(-rows // len(base))
    feats = pd.concat([base] * reps, ignore_index=True).iloc[:rows].reset_index(drop=True)
    per_request = 10
    n_req = rows // per_request
    rids = np.array([uuid.uuid4().hex for _ in range(n_req)], dtype=object)
    feats["prediction"] = np.arange(rows) % 2
    feats["model_version"] = "1"
    feats["request_id"] = np.repeat(rids, per_request)
    feats["row"] = np.tile(np.arange(per_request), n_req)
    span = timedelta(days=days).total_seconds()
    feats["ts"] = pd.to_datetime(
        START.timestamp() + np.repeat(np.linspace(0, span - 1, n_req), per_request), unit="s", utc=True
    )
    part_rows = 5_000
    for i in range(0, rows, part_rows):
        part = feats.iloc[i : i + part_rows]
        day = paths.prediction_day(part["ts"].iloc[0].date())
        day.mkdir(parents=True, exist_ok=True)
        part.to_parquet(day / f"part-{i:012d}-1-{i // part_rows:06d}.parquet", index=False)
    labels = feats[["request_id", "row"]].sample(frac=1.0, random_state=3)
    labels["outcome"] = np.random.default_rng(4).integers(0, 2, len(labels))
    label_file = root / "labels-1m.csv"
    labels.to_csv(label_file, index=False)
    return label_file


STEPS = ("pandas", "pandas_last_day", "ingest", "join", "join_last_day")


def step(name: str, root: Path) -> dict[str, Any]:
    """One measured step, in this (fresh) interpreter: pandas and pyarrow are imported before the
    clock starts, for every step alike. Its peak RSS is its own: ru_maxrss would start at the parent's
    peak (Linux keeps it across exec), so the peak is reset first and read from VmHWM."""
    reset_peak()
    import pandas as pd
    import pyarrow  # noqa: F401

    from cd4ml.core.paths import ModelPaths
    from cd4ml.data.feedback import ingest_label_files, labelled_predictions
    from cd4ml.serving.predlog import read_predictions

    paths = ModelPaths.in_data_dir(root, MODEL)
    last_day = START + timedelta(days=6)
    out: dict[str, Any] = {}
    if name == "ingest":
        paths.feedback_landing.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "labels-1m.csv", paths.feedback_landing / "labels-1m.csv")
    t = time.perf_counter()
    if name == "ingest":
        ingest = ingest_label_files(paths, now=START + timedelta(days=30))
        assert not ingest.quarantined, ingest
        out["rows"] = ingest.rows
    elif name in ("join", "join_last_day"):
        out["rows"] = len(labelled_predictions(paths, since=last_day if name == "join_last_day" else None))
    else:
        labels = pd.read_csv(root / "labels-1m.csv", dtype={"request_id": str})
        log = read_predictions(root, MODEL, since=last_day if name == "pandas_last_day" else None)
        # No prediction logged on the last day (a tiny --rows): nothing to join, and no columns to join on.
        out["rows"] = 0 if log.empty else len(log.merge(labels, on=["request_id", "row"], how="inner"))
    out["seconds"] = round(time.perf_counter() - t, 2)
    out["peak_rss_mb"] = round(status_mb("VmHWM"))
    return out


def file_bench(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    root = home / "filebench"
    root.mkdir()
    t = time.perf_counter()
    make_log(root, args.rows, args.days)
    out: dict[str, Any] = {"rows": args.rows, "days": args.days, "setup_s": round(time.perf_counter() - t, 1)}
    for name in STEPS:
        load_before = load_avg()
        done = subprocess.run([sys.executable, __file__, "--step", name, "--root", str(root)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode:
            raise SystemExit(f"{name} step failed:\n{done.stderr[-3000:]}")
        out[name] = {**json.loads(done.stdout.strip().splitlines()[-1]), "load_before": load_before}
        print(name, json.dumps(out[name]), flush=True)
    return out


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def report(r: dict[str, Any]) -> str:
    lines = []
    if "http" in r:
        h = r["http"]
        lines.append(f"HTTP (concurrency {h['concurrency']})")
        lines.append(
            _row("scenario", "labels", "labels/s", "POST/s", "p50 ms", "p99 ms", "failures", "load before")
        )
        lines.append(_row(*["---"] * 8))
        for key, x in h.items():
            if isinstance(x, dict):
                cells = (x["labels"], x["labels_per_s"], x["requests_per_s"], x["p50_ms"], x["p99_ms"])
                lines.append(_row(key, *cells, x["failures"], x["load_before"]))
        lines.append(f"label parts written: {h['label_parts_written']}")
    if "file" in r:
        f = r["file"]
        n = f["rows"]
        lines += [
            "",
            f"File: {n:,} labels, {n:,} logged predictions over {f['days']} days (fresh process each)",
        ]
        lines.append(_row("step", "rows out", "seconds", "labels/s", "peak RSS MB", "load before"))
        lines.append(_row(*["---"] * 6))
        names = {
            "ingest": "cd4ml ingest_label_files (read, check, match ids, store)",
            "join": "cd4ml labelled_predictions (all days)",
            "join_last_day": "cd4ml labelled_predictions (since the last day)",
            "pandas": "pandas read_csv + read_predictions + merge (all days)",
            "pandas_last_day": "pandas read_csv + read_predictions(since) + merge",
        }
        for key, label in names.items():
            x = f[key]
            lines.append(_row(label, f"{x['rows']:,}", x["seconds"], f"{n / x['seconds']:,.0f}",
                              x["peak_rss_mb"], x["load_before"]))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--labels", type=int, default=3000, help="labels posted one per POST (x100)")
    parser.add_argument("--batched-labels", type=int, default=30000, help="labels posted 100 per POST (x100)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-file", action="store_true")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.step, Path(args.root))))
        return
    bench = Bench("feedback", MODEL)
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "load_at_start": load_avg(),
        "at": datetime.now(UTC).isoformat(),
    }
    try:
        if not args.skip_http:
            results["http"] = http_bench(args, bench)
        if not args.skip_file:
            results["file"] = file_bench(args, bench.home)
    finally:
        bench.close()
    results["load_at_end"] = load_avg()
    write_result("feedback", results)
    print(report(results))


if __name__ == "__main__":
    main()
