"""The GPU session scripts stay runnable: valid bash, and every benchmark they call takes the flags they pass."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ["gpu_session.sh", "gpu_wheels.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_valid_bash(name):
    result = subprocess.run(["bash", "-n", str(BENCHMARKS / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _benchmark_calls() -> list[tuple[str, list[str]]]:
    calls = []
    for line in (BENCHMARKS / "gpu_session.sh").read_text().splitlines():
        match = re.match(r"\s*step \w+ python3 -m (benchmarks\.\w+) (.*)$", line)
        if match:
            calls.append((match.group(1), [a for a in shlex.split(match.group(2)) if a.startswith("--")]))
    return calls


def test_every_benchmark_the_session_runs_accepts_its_flags():
    calls = _benchmark_calls()
    assert {module for module, _ in calls} == {"benchmarks.optimize", "benchmarks.guidance", "benchmarks.full"}
    for module, flags in calls:
        help_text = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True).stdout
        for flag in flags:
            assert flag in help_text, f"{module} has no {flag}"
