"""Drift check vs Evidently's DataDriftPreset on the full data, 1M rows, side by side in one run.

Fourteen scenarios on 13 columns (8 numerical, 5 categorical incl. the label), reference and current
1,000,000 rows each. For each scenario and each method a fresh subprocess builds the data (seeded),
then runs the check; we report wall time of the check, the rise in peak RSS the check caused, and
whether the per-column tests and verdicts agree. Two scenarios have columns with nulls that change
Evidently's choice: a reference with only 900 values in a million rows (K-S, not Wasserstein), and a
column entirely null in the current window (no test: "no data" in cd4ml, left out of Evidently's
drift metrics).

Usage: .venv/bin/python benchmarks/bench_drift.py [--rows 1000000] [--methods cd4ml,evidently]
       [--scenarios none,sparse_reference]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NUMERICAL = [f"n{i}" for i in range(8)]
CATEGORICAL = ["c0", "c1", "c2", "c3", "label"]

SCENARIOS = {
    "none": "no change",
    "mean_shift": "n0 mean +0.5 sd",
    "variance": "n1 standard deviation x2",
    "new_category": "c0 gets a new value in 15% of rows",
    "category_frequency": "c1 frequencies reversed",
    "missing_rate": "n2 20% missing (distances ignore nulls; reported as missing-rate rise)",
    "single_feature": "only n3 shifts, +0.3 sd, 12 columns stable",
    "label_shift": "label positive rate 25% -> 45%",
    "gradual": "n4 drifts linearly from 0 to +1 sd over the window",
    "many_features": "n0, n5, n6, c2, c3 all drift",
    "subtle": "n7 mean +0.02 sd (below the 0.1 threshold)",
    "outliers": "1% of n5 become 50 sd outliers",
    "sparse_reference": "n6 has 900 values in the reference (rest null), current +0.15 sd: K-S",
    "all_null_current": "c3 entirely null in the current window: no data, not drifted",
}


def make(rows: int, scenario: str, current: bool, seed: int) -> Any:  # a DataFrame
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng([seed, int(current)])
    data = {f"n{i}": rng.normal(0, 1, rows) for i in range(8)}
    data["n1"] = rng.gamma(2.0, 1.0, rows)
    cats = {
        "c0": (["a", "b", "c", "d"], [0.4, 0.3, 0.2, 0.1]),
        "c1": (["x", "y", "z"], [0.6, 0.3, 0.1]),
        "c2": ([f"k{i}" for i in range(10)], [0.1] * 10),
        "c3": (["p", "q"], [0.7, 0.3]),
        "label": (["0", "1"], [0.75, 0.25]),
    }
    if current:
        if scenario == "category_frequency":
            cats["c1"] = (["x", "y", "z"], [0.1, 0.3, 0.6])
        if scenario == "label_shift":
            cats["label"] = (["0", "1"], [0.55, 0.45])
        if scenario == "many_features":
            cats["c2"] = ([f"k{i}" for i in range(10)], [0.3, 0.3] + [0.05] * 8)
            cats["c3"] = (["p", "q"], [0.3, 0.7])
    for name, (values, p) in cats.items():
        data[name] = rng.choice(values, rows, p=p)
    frame = pd.DataFrame(data)
    if not current:
        if scenario == "sparse_reference":  # a feature logged only lately: 900 values, the rest null
            frame.loc[frame.index[900:], "n6"] = np.nan
        return frame
    if scenario == "mean_shift":
        frame["n0"] += 0.5
    elif scenario == "variance":
        frame["n1"] = frame["n1"].mean() + (frame["n1"] - frame["n1"].mean()) * 2
    elif scenario == "new_category":
        frame.loc[rng.random(rows) < 0.15, "c0"] = "NEW"
    elif scenario == "missing_rate":
        frame.loc[rng.random(rows) < 0.2, "n2"] = np.nan
    elif scenario == "single_feature":
        frame["n3"] += 0.3
    elif scenario == "gradual":
        frame["n4"] += np.linspace(0, 1, rows)
    elif scenario == "many_features":
        frame["n0"] += 0.4
        frame["n5"] *= 1.8
        frame["n6"] += 0.6
    elif scenario == "subtle":
        frame["n7"] += 0.02
    elif scenario == "outliers":
        frame.loc[rng.random(rows) < 0.01, "n5"] = 50.0
    elif scenario == "sparse_reference":
        frame["n6"] += 0.15
    elif scenario == "all_null_current":
        frame["c3"] = None
    return frame


def child(scenario: str, method: str, rows: int) -> None:
    import resource
    import time

    ref = make(rows, scenario, current=False, seed=7)
    cur = make(rows, scenario, current=True, seed=7)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started, cpu_started = time.perf_counter(), time.process_time()
    from cd4ml.ml.drift import dataset_drift, evidently_drift  # timed too: a monitor task starts cold

    imported, cpu_imported = time.perf_counter(), time.process_time()

    if method == "cd4ml":
        summary = dataset_drift(ref, cur, NUMERICAL, CATEGORICAL)
    else:
        summary = evidently_drift(ref, cur, NUMERICAL, CATEGORICAL)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "wall_s": wall,
        "cpu_s": cpu,  # this process only: less sensitive than wall time to what else the machine runs
        "import_s": imported - started,  # part of wall_s: importing cd4ml.ml.drift (scipy) or evidently
        "check_cpu_s": cpu - (cpu_imported - cpu_started),
        "peak_rise_mb": (peak - before) / 1024,
        "peak_total_mb": peak / 1024,
        "drifted": sorted(summary.drifted_columns),
        "no_data": summary.no_data_columns,
        "methods": {c.column: c.method for c in summary.columns},
        "scores": {c.column: None if c.method == "no data" else c.score for c in summary.columns},
        "missing_rate_rise": summary.missing_rate_rise,
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--methods", default="cd4ml,evidently", help="comma-separated: cd4ml, evidently")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated scenario names")
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.rows)
        return
    methods = args.methods.split(",")
    load_before = os.getloadavg()
    results = {}
    for scenario in args.scenarios.split(","):
        row: dict = {}
        for method in methods:
            out = subprocess.run(
                [sys.executable, __file__, "--rows", str(args.rows), "--child", scenario, method],
                capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
            )  # fmt: skip
            row[method] = json.loads(out.stdout.strip().splitlines()[-1])
        if len(row) == 2:
            row["same_verdicts"] = row["cd4ml"]["drifted"] == row["evidently"]["drifted"]
            row["same_methods"] = row["cd4ml"]["methods"] == row["evidently"]["methods"]
        results[scenario] = row
        print(scenario, json.dumps({m: {k: row[m][k] for k in ("wall_s", "peak_rise_mb", "drifted")}
                                    for m in methods}), flush=True)  # fmt: skip
    out_dir = REPO / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    # A partial run writes its own file, so it does not replace the last complete side-by-side one.
    complete = len(methods) == 2 and list(results) == list(SCENARIOS)
    name = "drift.json" if complete else f"drift-partial-{'-'.join(methods)}.json"
    load = {"before": load_before, "after": os.getloadavg()}  # 1/5/15-minute load averages
    (out_dir / name).write_text(json.dumps({"rows": args.rows, "load": load, "results": results}, indent=2))
    print(f"load average before {load_before}, after {load['after']}")
    print(report(args.rows, results) if len(methods) == 2 else partial(args.rows, methods[0], results))


def partial(rows: int, method: str, results: dict) -> str:
    lines = [
        f"| scenario ({rows:,} rows each side, {method} only) | drifted | tests other than the "
        "large-reference defaults | wall s (import s) | cpu s (check cpu s) | peak MB (+rise) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        m = r[method]
        special = {c: t for c, t in m["methods"].items() if t not in ("wasserstein", "jensenshannon")}
        lines.append(
            f"| {name} | {', '.join(m['drifted']) or '—'} | "
            f"{', '.join(f'{c}: {t}' for c, t in special.items()) or '—'} | "
            f"{m['wall_s']:.2f} ({m['import_s']:.2f}) | {m['cpu_s']:.2f} ({m['check_cpu_s']:.2f}) | "
            f"{m['peak_total_mb']:.0f} (+{m['peak_rise_mb']:.0f}) |"
        )
    return "\n".join(lines)


def report(rows: int, results: dict) -> str:
    lines = [
        f"| scenario ({rows:,} rows each side) | drifted columns (cd4ml) | same as Evidently | "
        "cd4ml s (import s; cpu s) | Evidently s | cd4ml peak MB (+rise) | Evidently peak MB (+rise) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ours, theirs = r["cd4ml"], r["evidently"]
        same = "yes" if r["same_verdicts"] else "NO: " + ", ".join(theirs["drifted"])
        differ = [f"{c} {m} vs {theirs['methods'].get(c)}" for c, m in ours["methods"].items()
                  if theirs["methods"].get(c) != m]  # fmt: skip
        if differ:
            same += f" (tests differ: {', '.join(differ)})"
        special = {c: m for c, m in ours["methods"].items() if m not in ("wasserstein", "jensenshannon")}
        if special:
            same += " — " + ", ".join(f"{c}: {m}" for c, m in special.items())
        lines.append(
            f"| {name}: {SCENARIOS[name]} | {', '.join(ours['drifted']) or '—'} | {same} | "
            f"{ours['wall_s']:.2f} ({ours['import_s']:.2f}; {ours['cpu_s']:.2f}) | {theirs['wall_s']:.1f} | "
            f"{ours['peak_total_mb']:.0f} (+{ours['peak_rise_mb']:.0f}) | "
            f"{theirs['peak_total_mb']:.0f} (+{theirs['peak_rise_mb']:.0f}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
