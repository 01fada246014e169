"""Run every benchmark in turn (`make bench`); each prints its table and writes benchmarks/out/*.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

RUNS: tuple[tuple[str, ...], ...] = (
    ("bench_training.py",),
    ("bench_serving.py",),
    # Service processes and protocols; builds MLServer's own venv (uv, PyPI) on its first run.
    ("bench_protocols.py",),
    ("bench_drift.py",),
    ("bench_feedback.py",),
    ("bench_tracing.py",),
    ("bench_batch_score.py", "--rounds", "1"),
    # The full 1M-row bootstrap variant alone takes ~8 minutes: run it by hand with --methods.
    ("bench_live_performance.py", "--methods", "cd4ml,naive"),
)

for script, *args in RUNS:
    print(f"== {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)
