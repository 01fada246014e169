"""Draw docs/benchmarks.png from benchmarks/out/*.json (run the benchmarks first)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OUT = Path(__file__).resolve().parent / "out"
DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> None:
    training = json.loads((OUT / "training.json").read_text())
    serving = json.loads((OUT / "serving.json").read_text())
    drift = json.loads((OUT / "drift.json").read_text())["results"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    ax = axes[0]
    reps = training["orchestration"]
    x = range(len(reps))
    ax.bar([i - 0.2 for i in x], [r["dag"]["run_wall_s"] for r in reps], 0.4, label="Airflow DAG run")
    ax.bar([i + 0.2 for i in x], [r["plain"]["wall_s"] for r in reps], 0.4, label="plain Python process")
    ax.set_xticks(list(x), [f"rep {i + 1}" for i in x])
    ax.set_ylabel("seconds")
    ax.set_title(f"Training pipeline, {training['rows']:,} rows")
    ax.legend(loc="lower right")

    ax = axes[1]
    names = ["cd4ml (log on)", "mlflow models serve"]
    ax.bar(names, [serving[n]["single"]["throughput_rps"] for n in names], color=["tab:green", "tab:gray"])
    for i, n in enumerate(names):
        s = serving[n]["single"]
        ax.text(i, s["throughput_rps"], f"p99 {s['p99_ms']:.0f} ms", ha="center", va="bottom")
    ax.set_ylabel("requests / s (1 row, 8 connections)")
    ax.set_title("Prediction service vs MLflow's scoring server")

    ax = axes[2]
    scenarios = list(drift)
    ours = [drift[s]["cd4ml"]["wall_s"] for s in scenarios]
    theirs = [drift[s]["evidently"]["wall_s"] for s in scenarios]
    y = range(len(scenarios))
    ax.barh([i + 0.2 for i in y], theirs, 0.4, label="Evidently DataDriftPreset", color="tab:gray")
    ax.barh([i - 0.2 for i in y], ours, 0.4, label="cd4ml check (same verdicts)", color="tab:green")
    ax.set_yticks(list(y), scenarios, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per check, 1M rows each side")
    ax.set_xlim(0, max(theirs) * 1.45)  # room for the legend
    ax.set_title("Drift check")
    ax.legend(loc="lower right", fontsize=8)

    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    fig.savefig(DOCS / "benchmarks.png", dpi=90)
    print(DOCS / "benchmarks.png")


if __name__ == "__main__":
    main()
