"""Batch scoring 1M rows: `<model>__score`'s step against what a user would do instead, side by side.

The same registered champion (the demo churn spec's HistGradientBoosting pipeline, trained on 20,000
rows, served from a real MLflow server) scores the same 1,000,000 rows (demo features plus a
customer id), as CSV and as Parquet. Each method runs in a fresh process, so its peak RSS is its own:

  cd4ml-csv, cd4ml-parquet  `cd4ml.steps.batch_score.score_pending` on the file (the DAG task's
                 step): load the champion as the service does, hash the file, check every row as the
                 service checks a request, score in chunks of `scoring.chunk_rows` (100,000), write
                 predictions.parquet (label, both class probabilities, row, id, version, run, sha256)
  pyfunc-csv     MLflow's way: `mlflow.pyfunc.load_model("models:/bench@champion")`, `pd.read_csv`
                 of the whole file, `model.predict(frame)` (labels only), predictions to Parquet;
                 no row checks, the whole file in memory
  load-only      the champion loaded as cd4ml-* load it, nothing scored: the floor under their peaks
  online-<n>     the prediction service's HTTP path: `cd4ml serve` (one process, prediction log on,
                 as deployed) answers the file read in chunks of <n> rows (`pd.read_csv(chunksize)`)
                 and posted as `dataframe_split` by 2 client threads (2 cores); labels and
                 probabilities come back as JSON and are written to Parquet. n = 10,000 is the
                 service's largest request (CD4ML_SERVICE_MAX_ROWS)

Reported: wall time (model load included; for cd4ml also the scoring alone), rows/s over the wall,
peak RSS of the method's process (VmHWM; for online-<n> also the service's, sampled every 0.1 s).

Usage: .venv/bin/python benchmarks/bench_batch_score.py [--rows 1000000]
       [--methods cd4ml-csv,cd4ml-parquet,pyfunc-csv,online-10000]
Writes benchmarks/out/batch_score.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchkit import BIN, REPO, RUN_TIME, Bench, reset_peak, status_mb, train, tree_rss_mb, write_result

MODEL = "bench"


def setup(home: Path, rows: int) -> None:
    """A champion registered in MLflow (trained as every benchmark's is), and the 1M-row files."""
    import pandas as pd

    from cd4ml.core.spec import load_spec
    from cd4ml_dev.datagen import generate_churn

    spec_path = home / "specs" / f"{MODEL}.yaml"
    train(spec_path)
    spec = load_spec(spec_path)
    data = generate_churn(rows, seed=42, batch=2).drop(columns=[spec.target])
    data.insert(0, "customer_id", [f"c{i:07d}" for i in range(rows)])
    inputs = home / "inputs"
    inputs.mkdir()
    data.to_csv(inputs / "customers.csv", index=False)
    data.to_parquet(inputs / "customers.parquet", index=False)
    del pd


def child(home: Path, method: str) -> dict[str, Any]:
    import numpy as np  # noqa: F401 - loaded before the baseline, as in any scoring process
    import pandas as pd

    import cd4ml.registry  # noqa: F401 - MLflow's import is the process's, not the method's

    before = reset_peak()
    started = time.perf_counter()
    out: dict[str, Any]
    if method.startswith("cd4ml-"):
        out = _cd4ml(home, "customers.csv" if method == "cd4ml-csv" else "customers.parquet")
    elif method == "pyfunc-csv":
        out = _pyfunc(home)
    elif method.startswith("online-"):
        out = _online(home, int(method.split("-", 1)[1]))
    elif method == "load-only":  # the floor under the peaks: the champion loaded, nothing scored
        from cd4ml.core.settings import get_settings
        from cd4ml.steps.batch_score import load_scorer

        load_scorer(get_settings(), MODEL, "1", None)
        return {"wall_s": time.perf_counter() - started, "rows": 0, "rows_per_s": 0.0,
                "peak_mb": status_mb("VmHWM"), "baseline_mb": before}  # fmt: skip
    else:
        raise SystemExit(f"unknown method {method!r}")
    wall = time.perf_counter() - started
    rows = int(pd.read_parquet(out.pop("predictions"), columns=["row"]).shape[0])
    return {"wall_s": wall, "rows": rows, "rows_per_s": rows / wall, "peak_mb": status_mb("VmHWM"),
            "baseline_mb": before, **out}  # fmt: skip


def _cd4ml(home: Path, name: str) -> dict[str, Any]:
    from cd4ml.core.settings import get_settings
    from cd4ml.core.spec import load_spec
    from cd4ml.steps.batch_score import score_pending

    spec = load_spec(home / "specs" / f"{MODEL}.yaml")
    # A run of its own each round: the same run id would find its outputs done and score nothing.
    run_id = f"bench-{name}-{os.getpid()}"
    run = score_pending(spec, get_settings(), run_id=run_id, run_time=RUN_TIME, trigger="benchmark",
                        source=str(home / "inputs" / name))  # fmt: skip
    (result,) = run.inputs
    return {"predictions": result.predictions, "scoring_s": result.seconds, "rejected": result.rejected,
            "chunks": result.chunks}  # fmt: skip


def _pyfunc(home: Path) -> dict[str, Any]:
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    frame = pd.read_csv(home / "inputs" / "customers.csv")
    # pyfunc refuses int64 columns for the signature's doubles ("Can not safely convert int64 to
    # float64"): the cast every user of it ends up writing.
    features = frame[model.metadata.get_input_schema().input_names()]
    numbers = features.select_dtypes("number").columns
    labels = model.predict(features.astype(dict.fromkeys(numbers, float)))
    path = home / "pyfunc.parquet"
    pd.DataFrame(
        {"row": range(len(frame)), "customer_id": frame["customer_id"], "prediction": labels}
    ).to_parquet(path)
    return {"predictions": str(path)}


def _online(home: Path, request_rows: int) -> dict[str, Any]:
    import queue
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import pandas as pd

    url = (home / "service_url").read_text().strip() + f"/v1/models/{MODEL}/predict"
    results: dict[int, pd.DataFrame] = {}
    errors: list[str] = []
    work: queue.Queue[tuple[int, pd.DataFrame] | None] = queue.Queue(maxsize=4)

    def post(client: httpx.Client) -> None:
        while (item := work.get()) is not None:
            start, chunk = item
            split = chunk.drop(columns=["customer_id"]).to_json(orient="split", index=False)
            body = {"dataframe_split": json.loads(split)}
            resp = client.post(url, json=body, timeout=120)
            if resp.status_code != 200:
                errors.append(resp.text[:300])
                continue
            answer = resp.json()
            proba = answer["probabilities"]
            results[start] = pd.DataFrame({
                "row": range(start, start + len(chunk)), "customer_id": chunk["customer_id"].to_numpy(),
                "prediction": answer["predictions"], "probability_0": [p[0] for p in proba],
                "probability_1": [p[1] for p in proba], "model_version": answer["version"],
            })  # fmt: skip

    with httpx.Client() as client, ThreadPoolExecutor(2) as pool:
        senders = [pool.submit(post, client) for _ in range(2)]
        start = 0
        for chunk in pd.read_csv(home / "inputs" / "customers.csv", chunksize=request_rows):
            work.put((start, chunk))
            start += len(chunk)
        for _ in senders:
            work.put(None)
        for sender in senders:
            sender.result()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    path = home / f"online-{request_rows}.parquet"
    pd.concat([results[k] for k in sorted(results)]).to_parquet(path)
    return {"predictions": str(path), "request_rows": request_rows}


def _sample_rss(pid: int, stop: threading.Event, peak: list[float]) -> None:
    import psutil

    while not stop.is_set():
        try:
            rss = tree_rss_mb(pid)
        except psutil.Error:
            return
        peak[0] = max(peak[0], rss)
        stop.wait(0.1)


def run_method(bench: Bench, method: str) -> dict[str, Any]:
    """One method in a fresh process; online-<n> against a service started for it."""
    from cd4ml_dev.netutil import free_port, wait_http

    home, env = bench.home, bench.env
    service: subprocess.Popen[bytes] | None = None
    peak = [0.0]
    stop = threading.Event()
    if method.startswith("online-"):
        port = free_port()
        service = bench.spawn(
            [str(BIN / "cd4ml"), "serve", "--port", str(port)], home / f"service-{port}.log"
        )
        wait_http(f"http://127.0.0.1:{port}/health/ready", 120)
        (home / "service_url").write_text(f"http://127.0.0.1:{port}")
        threading.Thread(target=_sample_rss, args=(service.pid, stop, peak), daemon=True).start()
    out = subprocess.run([sys.executable, __file__, "--child", str(home), method], capture_output=True,
                         text=True, env=env)  # fmt: skip
    stop.set()
    if service is not None:
        bench.stop(service)
    if out.returncode:
        raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if service is not None:
        result["service_peak_mb"] = peak[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--methods", default="cd4ml-csv,cd4ml-parquet,pyfunc-csv,online-10000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("HOME", "METHOD"))
    parser.add_argument("--setup", metavar="HOME")
    args = parser.parse_args()
    if args.setup:
        setup(Path(args.setup), args.rows)
        return
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1])))
        return

    import yaml

    spec = yaml.safe_load((REPO / "include/specs/churn.yaml").read_text())
    spec["scoring"] = {"keep_columns": ["customer_id"]}
    results: dict[str, list[dict[str, Any]]] = {}
    with Bench("batch", MODEL, spec_text=yaml.safe_dump(spec)) as bench:
        bench.env.update({
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "dev")]),
            "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true",  # pyfunc loads the skops model only when allowed
        })  # fmt: skip
        bench.env.pop("CD4ML_SERVICE_ADMIN_TOKEN", None)
        bench.start_mlflow()
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--rows", str(args.rows), "--setup", str(bench.home)],
            check=True, env=bench.env,
        )  # fmt: skip
        print(f"setup {time.perf_counter() - t:.0f} s", flush=True)
        # Rounds interleave the methods, so a busy moment of a shared machine hits all of them.
        for round_ in range(args.rounds):
            for method in args.methods.split(","):
                result = run_method(bench, method)
                result["load_1m"] = os.getloadavg()[0]
                results.setdefault(method, []).append(result)
                print(f"round {round_ + 1}", method, json.dumps(result), flush=True)
    load = os.getloadavg()
    write_result(
        "batch_score",
        {"rows": args.rows, "load_avg_1_5_15": load, "cpus": os.cpu_count(), "results": results},
    )
    print(report(args.rows, results, load))


def report(rows: int, results: dict[str, list[dict[str, Any]]], load: tuple[float, float, float]) -> str:
    """Median of the rounds (and their range) per method; peak RSS is the highest of the rounds."""
    import statistics

    lines = [
        f"Batch scoring {rows:,} rows, {max(len(r) for r in results.values())} rounds "
        f"(load average at the end {load[0]:.1f} / {load[1]:.1f}):",
        "| method | wall s, median [range] | rows/s | scoring alone s | peak RSS MB | service RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        walls = [r["wall_s"] for r in runs]
        wall = statistics.median(walls)
        scoring = [r["scoring_s"] for r in runs if "scoring_s" in r]
        service = [r["service_peak_mb"] for r in runs if "service_peak_mb" in r]
        alone = f"{statistics.median(scoring):.1f}" if scoring else "-"
        peak = max(r["peak_mb"] for r in runs)
        lines.append(
            f"| {name} | {wall:.1f} [{min(walls):.1f}, {max(walls):.1f}] | {runs[0]['rows'] / wall:,.0f} | "
            f"{alone} | {peak:.0f} | {f'{max(service):.0f}' if service else '-'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
