"""What the repository must not hold."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_no_mlflow_store_is_committed():
    """A manual run once committed tests/mlruns/ (the .gitignore rule was rooted)."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "--", "*mlruns/*", "*mlartifacts/*", "*mlflow.db"], cwd=REPO, capture_output=True, text=True, check=True)
    assert tracked.stdout.split() == []
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", "tests/mlruns/1/meta.yaml"], cwd=REPO)
    assert ignored.returncode == 0, "tests/mlruns/ is not ignored"
