"""The GPU session scripts stay runnable: valid bash, the full-size benchmark first, every step under
its own timeout within the 8-minute budget, and every benchmark they call takes the flags they pass."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SESSION = BENCHMARKS / "gpu_session.sh"
SCRIPTS = ["gpu_session.sh", "gpu_wheels.sh"]
STEP = re.compile(r"^\s*step (\w+) (\d+) (.*)$")


def _steps() -> list[tuple[str, int, str]]:
    return [(m.group(1), int(m.group(2)), m.group(3)) for line in SESSION.read_text().splitlines() if (m := STEP.match(line))]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_valid_bash(name):
    result = subprocess.run(["bash", "-n", str(BENCHMARKS / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_full_size_benchmark_runs_first_and_every_step_fits_the_budget():
    steps = _steps()
    names = [name for name, _, _ in steps]
    assert names == ["setup", "full", "pipeline", "tests", "guidance", "optimize", "gsplat"]
    assert sum(limit for _, limit, _ in steps) <= 480
    assert re.search(r"^BUDGET=\$\{BUDGET:-480\}$", SESSION.read_text(), re.M)
    commands = dict((name, command) for name, _, command in steps)
    assert "--ignore=tests/test_splats_gpu.py" in commands["tests"] and "test_splats_gpu.py" in commands["gsplat"]
    assert "--representations nerf" in commands["optimize"] and "--representations splats" in commands["gsplat"]
    assert "ray-core.tar.xz" in commands["setup"]


def test_every_benchmark_the_session_runs_accepts_its_flags():
    calls = []
    for _, _, command in _steps():
        for match in re.finditer(r"python3 -m (benchmarks\.\w+) ([^&\"]*)", command):
            calls.append((match.group(1), [a for a in shlex.split(match.group(2).replace("'", "")) if a.startswith("--")]))
    assert {module for module, _ in calls} == {"benchmarks.full", "benchmarks.pipeline", "benchmarks.optimize", "benchmarks.guidance"}
    for module, flags in calls:
        help_text = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True).stdout
        for flag in flags:
            assert flag in help_text, f"{module} has no {flag}"


def test_the_travelling_ray_is_the_version_the_project_runs():
    import ray

    wheels = (BENCHMARKS / "gpu_wheels.sh").read_text()
    assert f"ray_version={ray.__version__}\n" in wheels
    assert "ray-core.tar.xz" in wheels and "strip --strip-unneeded" in wheels


def test_a_step_is_cut_to_the_budget_left_and_later_steps_are_skipped(tmp_path):
    """With a stand-in python3 that hangs in the benchmark, a 16 s budget: `full` gets what is
    left (under 16 s) and times out, every later step is skipped and listed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python3"
    stub.write_text('#!/usr/bin/env bash\ncase " $* " in *" -m benchmarks.full "*) sleep 60;; esac\nexit 0\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"), "BUDGET": "16", "SKIP": "setup"}
    result = subprocess.run(["bash", str(SESSION)], capture_output=True, text=True, env=env, timeout=60)
    log = (tmp_path / "out" / "full.log").read_text()
    assert "(timed out)" in log and "exit 124" in log
    skipped = (tmp_path / "out" / "skipped.log").read_text().splitlines()
    assert skipped[0] == "skipped setup"
    assert [line.split()[1].rstrip(":") for line in skipped[1:]] == ["pipeline", "tests", "guidance", "optimize", "gsplat"]
    assert "budget" in result.stdout
