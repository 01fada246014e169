"""code_version(): the version baked into the image first, then git, then the package version."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import cd4ml
from cd4ml.core import lineage
from cd4ml.core.settings import PROJECT_ROOT


@pytest.fixture(autouse=True)
def fresh_git_cache() -> Iterator[None]:
    lineage.git_version.cache_clear()
    yield
    lineage.git_version.cache_clear()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


def test_the_baked_version_wins_over_git(monkeypatch: pytest.MonkeyPatch) -> None:
    assert lineage.git_version(PROJECT_ROOT) is not None  # this checkout is a git repo
    monkeypatch.setenv("CD4ML_CODE_VERSION", "0123abcd-dirty")
    assert lineage.code_version() == "0123abcd-dirty"


def test_without_a_baked_version_git_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CD4ML_CODE_VERSION", raising=False)
    head = git(PROJECT_ROOT, "rev-parse", "HEAD")
    assert lineage.code_version().removesuffix("-dirty") == head


def test_without_git_the_package_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """As inside an image built without the build arg: no git binary, no .git."""
    monkeypatch.setenv("CD4ML_CODE_VERSION", "")  # empty = not baked (the Dockerfile's default)
    monkeypatch.setenv("PATH", "")
    assert lineage.git_version(PROJECT_ROOT) is None
    assert lineage.code_version() == cd4ml.__version__


def test_git_version_of_a_checkout_clean_and_dirty(tmp_path: Path) -> None:
    assert lineage.git_version(tmp_path) is None  # not a repository
    lineage.git_version.cache_clear()
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git(tmp_path, "add", "a.txt")
    git(tmp_path, "commit", "-q", "-m", "one")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert lineage.git_version(tmp_path) == head
    lineage.git_version.cache_clear()
    (tmp_path / "a.txt").write_text("2")
    assert lineage.git_version(tmp_path) == f"{head}-dirty"
    lineage.git_version.cache_clear()
    (tmp_path / "untracked.txt").write_text("x")  # untracked files do not make it dirty
    (tmp_path / "a.txt").write_text("1")
    assert lineage.git_version(tmp_path) == head
