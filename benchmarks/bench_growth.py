"""How cost grows with history (issue 12; results: BENCHMARKS.md, "How cost grows with history").

Lands N batches of the demo churn data one at a time into a fresh data root and, after each, runs
the training DAG's steps in this process (`pipeline.TRAINING_STEPS`, the list the DAG and
`run_training` drive, each step timed on its own; no deployment) against a real MLflow server on a
free port. After every batch it measures the disk used by the data root, its gx/ part and MLflow
(database + artifacts).

Usage: .venv/bin/python benchmarks/bench_growth.py [--batches 100] [--rows 5000] [--label after]
       .venv/bin/python benchmarks/bench_growth.py --plot benchmarks/out/growth-*.json
Writes docs/img/growth-<label>.json (after every batch, so a cut-short run keeps its figures)
and docs/img/growth.png from every result given to --plot (default: this run's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from cd4ml_dev.netutil import free_port, local_mlflow_server, wait_http

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "img"  # small and worth keeping: the plot is drawn from it
IMG = REPO / "docs" / "img"
BIN = Path(sys.executable).parent
MODEL = "growth"
# As on every stack and in the tests: waiting OpenMP threads sleep. Spinning ones made a 5k-row fit
# take minutes on a loaded 2-core machine. Set before anything loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk (du), not apparent sizes: what the volume actually fills up with."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("great_expectations", "mlflow", "scikit-learn", "pandas")}


def run_batch(spec: Any, settings: Any, index: int) -> dict[str, float]:
    """One run of the training DAG's steps (all but the deployment) after one landed batch; seconds
    per step, by task id. Driven through the same step list as the DAG and `run_training`."""
    from cd4ml.steps import pipeline
    from cd4ml.steps.contracts import RunContext

    run_id = f"growth__{index:04d}"
    run_time = (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=index)).isoformat()
    run = RunContext(run_id=run_id, run_time=run_time, trigger="bench_growth", who="bench_growth")
    results = pipeline.Results()
    times: dict[str, float] = {}
    for step in pipeline.TRAINING_STEPS:
        if step.name == "deploy_champion":
            continue
        start = time.perf_counter()
        result = step.run(spec, settings, run, results)
        times[step.name] = time.perf_counter() - start
        results = results.with_result(step.name, result)
        if step.gate and not getattr(result, "needed", True):
            raise RuntimeError(f"batch {index}: nothing to train ({getattr(result, 'why', result)})")
    return times


def bench(args: argparse.Namespace) -> Path:
    home = Path(tempfile.mkdtemp(prefix="cd4ml-growth-"))
    specs, data, mlflow_home = home / "specs", home / "data", home / "mlflow"
    for d in (specs, data, mlflow_home):
        d.mkdir()
    raw = yaml.safe_load((REPO / "include/specs/churn.yaml").read_text())
    (specs / f"{MODEL}.yaml").write_text(yaml.safe_dump(raw))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    os.environ.update({"MLFLOW_TRACKING_URI": url, "GX_ANALYTICS_ENABLED": "false",
                       "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "CD4ML_HOME": str(home),
                       "CD4ML_DATA_DIR": str(data), "CD4ML_SPECS_DIR": str(specs)})  # fmt: skip
    server = subprocess.Popen(
        local_mlflow_server(BIN, mlflow_home, port),
        stdout=(mlflow_home / "server.log").open("wb"), stderr=subprocess.STDOUT, cwd=mlflow_home,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True,
    )  # fmt: skip
    from cd4ml.core.settings import get_settings
    from cd4ml.core.spec import load_spec
    from cd4ml_dev.datagen import generate_churn, write_batch

    settings = get_settings()
    spec = load_spec(specs / f"{MODEL}.yaml")
    zone = data / MODEL
    result: dict[str, Any] = {
        "label": args.label, "batches": args.batches, "rows": args.rows, "cpus": os.cpu_count(),
        "machine": platform.platform(), "python": platform.python_version(), "versions": versions(),
        "load_before": os.getloadavg(), "points": [],
    }  # fmt: skip
    out = OUT / f"growth-{args.label}.json"
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        wait_http(f"{url}/health", 600)  # a loaded 2-core machine starts MLflow slowly
        for i in range(1, args.batches + 1):
            frame = generate_churn(args.rows, seed=12, batch=i)
            write_batch(frame, zone / "landing", f"batch_{i:04d}.csv")
            start = time.perf_counter()
            steps = run_batch(spec, settings, i)
            point = {
                "batch": i, "wall_s": time.perf_counter() - start, "steps": steps,
                "load": os.getloadavg()[0],
                "disk": {"data": disk_bytes(zone), "gx": disk_bytes(zone / "gx"),
                         "runs": disk_bytes(zone / "runs"), "accepted": disk_bytes(zone / "accepted"),
                         "profiles": disk_bytes(zone / "profiles"),
                         "mlflow_db": disk_bytes(mlflow_home / "mlflow.db"),
                         "mlflow_artifacts": disk_bytes(mlflow_home / "artifacts")},
            }  # fmt: skip
            result["points"].append(point)
            out.write_text(json.dumps(result, indent=1))
            print(f"batch {i}: {point['wall_s']:.1f}s "
                  + " ".join(f"{k}={v:.2f}" for k, v in steps.items())
                  + f" data={point['disk']['data'] / 1e6:.1f}MB gx={point['disk']['gx'] / 1e6:.1f}MB",
                  flush=True)  # fmt: skip
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    return out


def slope(points: list[dict[str, Any]], value: Any, first: int, last: int) -> float:
    """Least-squares slope of `value(point)` per batch over batches first..last."""
    import numpy as np

    chosen = [p for p in points if first <= p["batch"] <= last]
    if len(chosen) < 2:
        return float("nan")
    x = np.array([p["batch"] for p in chosen], dtype=float)
    y = np.array([value(p) for p in chosen], dtype=float)
    return float(np.polyfit(x, y, 1)[0])


def report(result: dict[str, Any]) -> str:
    """Markdown: per-step seconds early and late, slopes, and disk at the end."""
    points = result["points"]
    n = len(points)
    # Batch 1 and 2 pay for first imports, GX's project set-up and MLflow's first model: not growth.
    early, late = (3, max(4, (n + 2) // 2)), ((n + 2) // 2 + 1, n)
    lines = [f"{result['label']}: {n} batches of {result['rows']:,} rows",
             "", f"| step | mean s, batches {early[0]}-{early[1]} | mean s, batches {late[0]}-{late[1]} "
             f"| slope s/batch ({early[0]}-{early[1]}) | slope s/batch ({late[0]}-{late[1]}) |",
             "|---|---|---|---|---|"]  # fmt: skip

    def mean(step: str, lo: int, hi: int) -> float:
        vals = [p["steps"][step] if step != "wall" else p["wall_s"] for p in points if lo <= p["batch"] <= hi]
        return sum(vals) / len(vals)

    for step in [*points[0]["steps"], "wall"]:

        def get(p: dict[str, Any], s: str = step) -> float:
            return float(p["wall_s"] if s == "wall" else p["steps"][s])

        lines.append(
            f"| {step} | {mean(step, *early):.2f} | {mean(step, *late):.2f} | "
            f"{slope(points, get, *early):.4f} | {slope(points, get, *late):.4f} |"
        )
    lines += ["", "| disk | after batch 1 (MB) | after last (MB) | MB per batch, late |", "|---|---|---|---|"]
    for key in points[0]["disk"]:

        def size(p: dict[str, Any], k: str = key) -> float:
            return float(p["disk"][k]) / 1e6

        lines.append(
            f"| {key} | {size(points[0]):.1f} | {size(points[-1]):.1f} | {slope(points, size, *late):.2f} |"
        )
    return "\n".join(lines)


def plot(paths: list[Path]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(p.read_text()) for p in paths]
    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4.2 * len(results)), squeeze=False)
    for row, r in zip(axes, results, strict=True):
        x = [p["batch"] for p in r["points"]]
        ax = row[0]
        for step in r["points"][0]["steps"]:
            ax.plot(x, [p["steps"][step] for p in r["points"]], label=step, lw=1.2)
        ax.set_xlabel("batch index (one batch landed and processed per run)")
        ax.set_ylabel("seconds per run")
        ax.set_title(f"{r['label']}: time per step, {r['rows']:,} rows per batch")
        ax.legend(fontsize=8, ncol=2, loc="upper right")
        # The machine is shared: its load explains more of the noise than the history does.
        load = ax.twinx()
        load.plot(x, [p["load"] for p in r["points"]], color="gray", ls=":", lw=1)
        load.set_ylabel("1-min load average (dotted)", color="gray")
        ax = row[1]
        for key, name in (("data", "data root"), ("gx", "data root: gx/"), ("runs", "data root: runs/"),
                          ("accepted", "data root: accepted/"), ("profiles", "data root: profiles/"),
                          ("mlflow_db", "MLflow db"),
                          ("mlflow_artifacts", "MLflow artifacts")):  # fmt: skip
            if key in r["points"][0]["disk"]:  # older result files measured fewer parts
                ax.plot(x, [p["disk"][key] / 1e6 for p in r["points"]], label=name, lw=1.2)
        ax.set_xlabel("batch index")
        ax.set_ylabel("MB on disk")
        ax.set_title(f"{r['label']}: disk after each run")
        ax.legend(fontsize=8)
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    target = IMG / "growth.png"
    fig.savefig(target, dpi=80)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--rows", type=int, default=5_000)
    parser.add_argument("--label", default="run", help="names the result file growth-<label>.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data root and MLflow")
    parser.add_argument("--plot", nargs="+", type=Path, help="only draw docs/img/growth.png from results")
    args = parser.parse_args()
    paths = args.plot or [bench(args)]
    for path in paths:
        print(report(json.loads(path.read_text())))
    print(plot(paths))


if __name__ == "__main__":
    main()
