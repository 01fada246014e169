"""Where a model came from: code version, dependency lock, spec and data fingerprints."""

from __future__ import annotations

import hashlib
import subprocess
from functools import cache
from pathlib import Path

import cd4ml
from cd4ml.core.settings import PROJECT_ROOT, get_settings

LOCK_FILE = PROJECT_ROOT / "constraints.txt"


def code_version() -> str:
    """The commit the code was built from: CD4ML_CODE_VERSION (baked into the image at build time,
    where there is no .git), else the checkout's git commit (`-dirty` with local changes), else the
    package version."""
    return get_settings().code_version or git_version(PROJECT_ROOT) or cd4ml.__version__


@cache
def git_version(root: Path) -> str | None:
    """HEAD of the git checkout at `root` (with `-dirty` if tracked files changed), or None."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


@cache
def lock_hash() -> str:
    try:
        return hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()
    except OSError:
        return "unknown"
