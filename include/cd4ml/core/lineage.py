"""Where a model came from: code version, dependency lock, spec and data fingerprints."""

from __future__ import annotations

import hashlib
import subprocess
from functools import cache

import cd4ml
from cd4ml.core.settings import PROJECT_ROOT

LOCK_FILE = PROJECT_ROOT / "constraints.txt"


@cache
def code_version() -> str:
    """The git commit of the checkout (with `-dirty` if it has local changes), else the package version."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return cd4ml.__version__
        dirty = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return cd4ml.__version__


@cache
def lock_hash() -> str:
    try:
        return hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()
    except OSError:
        return "unknown"
