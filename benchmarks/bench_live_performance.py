"""Live performance on 1M labelled predictions: cd4ml's monitor vs the naive way, side by side.

The data: the demo churn spec's champion (trained on 20,000 rows) "served" 1,000,000 rows over a
week in requests of 100 rows, written as the prediction log writes them (day partitions, Parquet
parts of 50,000 rows), and every row labelled afterwards through `feedback.record_labels` (10 label
parts, outcomes as text, as a label file or JSON may send them).

Each method runs in a fresh subprocess (so peak RSS is its own) and computes the same thing: the
champion's roc_auc on the labelled rows of its version in the window, a 90% bootstrap interval
(each bound one-sided 95%, `promotion.confidence`), the label coverage.

  cd4ml        `cd4ml.steps.monitor.live_check`: the label store's join (pyarrow, filtered per part),
               served rows, re-scoring with the champion, the metric and the interval (1,000
               resamples of a 20,000-row subsample, spread scaled by sqrt(m/n))
  cd4ml-full   the same, but the bootstrap resamples all 1M rows (LIVE_BOOTSTRAP_ROWS = n)
  naive        pandas: read every prediction and label part, `merge`, keep the latest label,
               sklearn `roc_auc_score`, and a plain loop resampling row indices with replacement
               (`--naive-resamples`, default 100: 1,000 would take ~10x as long; the figure is
               extrapolated and marked so)

We report wall time and the rise of peak RSS during the computation (VmHWM reset after imports and
loading the model), per phase, and the intervals, so the answers can be compared.

Usage: .venv/bin/python benchmarks/bench_live_performance.py [--rows 1000000] [--naive-resamples 100]
       [--methods cd4ml,cd4ml-full,naive]
Writes benchmarks/out/live_performance.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchkit import REPO, reset_peak, status_mb, write_result

END = datetime(2026, 11, 10, tzinfo=UTC)
PART_ROWS = 50_000
REQUEST_ROWS = 100
VERSION = "1"


def setup(root: Path, rows: int) -> None:
    """Spec, champion (pickled, as the monitor would load it from MLflow) and the two stores."""
    import pickle

    import numpy as np
    import pandas as pd

    from cd4ml.core.paths import ModelPaths
    from cd4ml.core.spec import load_spec
    from cd4ml.data.feedback import record_labels
    from cd4ml.ml import training
    from cd4ml_dev.datagen import generate_churn

    spec = load_spec(REPO / "include" / "specs" / "churn.yaml")
    model = training.train(spec, generate_churn(20_000, seed=1))
    (root / "model.pkl").write_bytes(pickle.dumps(model))
    paths = ModelPaths.in_data_dir(root / "data", spec.name)
    served = generate_churn(rows, seed=2, batch=1)
    features = training.features(spec, served)
    predictions = model.predict(features)
    request = np.arange(rows) // REQUEST_ROWS
    ts = END - timedelta(days=7) + pd.to_timedelta(np.linspace(0, 6.9 * 86400, rows), unit="s")
    frame = features.assign(
        prediction=predictions, model_version=VERSION, request_id=[f"req-{r:07d}" for r in request],
        row=np.arange(rows) % REQUEST_ROWS, ts=ts,
    )  # fmt: skip
    for i, start in enumerate(range(0, rows, PART_ROWS)):
        part = frame.iloc[start : start + PART_ROWS]
        day = paths.prediction_day(part["ts"].iloc[0].date())
        day.mkdir(parents=True, exist_ok=True)
        part.to_parquet(day / f"part-{i:06d}.parquet", index=False)
    labels = pd.DataFrame({"request_id": frame["request_id"], "row": frame["row"],
                           "outcome": served[spec.target].astype(str).to_numpy()})  # fmt: skip
    for start in range(0, rows, rows // 10):
        record_labels(paths, labels.iloc[start : start + rows // 10], source="bench",
                      received_at=END - timedelta(hours=1))  # fmt: skip


def peak_mb() -> float:
    return status_mb("VmHWM")


def child(root: Path, method: str, naive_resamples: int) -> dict[str, Any]:
    import pickle
    import time

    import numpy as np

    from cd4ml.core.settings import Settings
    from cd4ml.core.spec import load_spec
    from cd4ml.steps import monitor

    spec = load_spec(REPO / "include" / "specs" / "churn.yaml")
    model = pickle.loads((root / "model.pkl").read_bytes())
    settings = Settings(root, root / "data", root, "http://unused")
    import pandas as pd  # noqa: F401 - imported before the baseline, as the monitor's process has it
    import sklearn.metrics  # noqa: F401

    before = reset_peak()
    started = time.perf_counter()
    if method in ("cd4ml", "cd4ml-full"):
        if method == "cd4ml-full":
            monitor.LIVE_BOOTSTRAP_ROWS = 10**9
        live, _ = monitor.live_check(spec, settings, VERSION, {"challenger_score": 0.85}, END, lambda: model)
        wall, rise = time.perf_counter() - started, peak_mb() - before
        result = {"value": live.value, "low": live.low, "high": live.high, "rows": live.labelled_rows,
                  "coverage": live.coverage, "resamples": spec.promotion.bootstrap_resamples}  # fmt: skip
        # The same steps again, timed one by one, after the total and its peak were taken.
        peak_total = peak_mb()
        phases = _cd4ml_phases(spec, settings, model)
    else:
        result, phases = _naive(spec, settings, model, naive_resamples)
        wall, rise = time.perf_counter() - started, peak_mb() - before
        peak_total = peak_mb()
    return {"wall_s": wall, "peak_rise_mb": rise, "peak_total_mb": peak_total, "phases_s": phases, **result,
            "numpy": np.__version__}  # fmt: skip


def _cd4ml_phases(spec: Any, settings: Any, model: Any) -> dict[str, float]:
    """live_check's steps, timed one by one."""
    import time

    from cd4ml.core.paths import ModelPaths
    from cd4ml.data import feedback
    from cd4ml.ml import training
    from cd4ml.steps import monitor

    paths = ModelPaths.for_model(settings, spec.name)
    start = END - timedelta(hours=monitor.LIVE_WINDOW_HOURS)
    t0 = time.perf_counter()
    labelled = feedback.labelled_predictions(paths, since=start, until=END)
    rows, _ = monitor.live_rows(labelled, version=VERSION, start=start, end=END)
    t1 = time.perf_counter()
    feedback.served_rows(paths, since=start, until=END, version=VERSION)
    t2 = time.perf_counter()
    y, _ = monitor.cast_outcomes(rows["outcome"].to_numpy(), tuple(model.classes_.tolist()))
    scores = training.metric_inputs(spec, model, rows)
    t3 = time.perf_counter()
    monitor.bootstrap_interval(spec.metric, y, scores, resamples=spec.promotion.bootstrap_resamples,
                               confidence=spec.promotion.confidence, seed=spec.seed)  # fmt: skip
    t4 = time.perf_counter()
    return {"join": t1 - t0, "served_rows": t2 - t1, "rescore": t3 - t2, "metric_and_interval": t4 - t3}


def _naive(spec: Any, settings: Any, model: Any, resamples: int) -> tuple[dict[str, Any], dict[str, float]]:
    import time

    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from cd4ml.core.paths import ModelPaths
    from cd4ml.ml import training

    paths = ModelPaths.for_model(settings, spec.name)
    t0 = time.perf_counter()
    log = pd.concat([pd.read_parquet(p) for p in sorted(paths.predictions.rglob("part-*.parquet"))])
    labels = pd.concat([pd.read_parquet(p) for p in sorted(paths.labels.rglob("*.parquet"))])
    labels = labels.sort_values("labelled_at").drop_duplicates(["request_id", "row"], keep="last")
    joined = log.merge(labels, on=["request_id", "row"])
    joined = joined[(joined["model_version"].astype(str) == VERSION) & (joined["ts"] < pd.Timestamp(END))]
    served = int(((log["model_version"].astype(str) == VERSION) & (log["ts"] < pd.Timestamp(END))).sum())
    t1 = time.perf_counter()
    y = joined["outcome"].astype(int).to_numpy()
    proba = model.predict_proba(training.features(spec, joined))[:, 1]
    t2 = time.perf_counter()
    value = roc_auc_score(y, proba)
    rng = np.random.default_rng(spec.seed)
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        draws.append(roc_auc_score(y[idx], proba[idx]))
    alpha = 1 - spec.promotion.confidence
    t3 = time.perf_counter()
    low, high = float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))
    result = {"value": value, "low": low, "high": high, "rows": len(joined), "coverage": len(joined) / served,
              "resamples": resamples}  # fmt: skip
    phases = {"join": t1 - t0, "rescore": t2 - t1, "metric_and_interval": t3 - t2,
              "metric_and_interval_1000_extrapolated": (t3 - t2) * 1000 / max(1, resamples)}  # fmt: skip
    return result, phases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--naive-resamples", type=int, default=100)
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "METHOD"))
    parser.add_argument("--setup", metavar="ROOT")
    parser.add_argument("--methods", default="cd4ml,cd4ml-full,naive",
                        help="comma-separated; cd4ml-full alone takes minutes on 1M rows")  # fmt: skip
    args = parser.parse_args()
    if args.setup:
        setup(Path(args.setup), args.rows)
        return
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], args.naive_resamples)))
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "dev")])}
    root = Path(tempfile.mkdtemp(prefix="cd4ml-live-bench-"))
    try:
        # In its own process too: this one stays small, and the children measure only themselves.
        subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--setup", str(root)], check=True,
                       env=env)  # fmt: skip
        results = {}
        for method in args.methods.split(","):
            out = subprocess.run(
                [sys.executable, __file__, "--naive-resamples", str(args.naive_resamples),
                 "--child", str(root), method],
                capture_output=True, text=True, check=True, env=env,
            )  # fmt: skip
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
            print(method, json.dumps(results[method]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load = os.getloadavg()
    write_result(
        "live_performance",
        {"rows": args.rows, "load_avg_1_5_15": load, "cpus": os.cpu_count(), "results": results},
    )
    print(report(args.rows, results, load))


def report(rows: int, results: dict[str, Any], load: tuple[float, float, float]) -> str:
    lines = [
        f"Live performance on {rows:,} labelled predictions (load average {load[0]:.1f} / {load[1]:.1f}):",
        "| method | total s | join s | re-score s | metric + interval s | peak +MB | roc_auc [90% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        p = r["phases_s"]
        interval = f"{p['metric_and_interval']:.2f}"
        if "metric_and_interval_1000_extrapolated" in p:
            interval += (
                f" ({r['resamples']} resamples; ~{p['metric_and_interval_1000_extrapolated']:.0f} for 1,000)"
            )
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {p['join']:.2f} | {p['rescore']:.2f} | {interval} | "
            f"{r['peak_rise_mb']:.0f} | {r['value']:.4f} [{r['low']:.4f}, {r['high']:.4f}] |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
