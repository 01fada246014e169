"""Run every benchmark in turn (`make bench`); each prints its table and writes benchmarks/out/*.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script in ("bench_training.py", "bench_serving.py", "bench_drift.py"):
    print(f"== {script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True)
