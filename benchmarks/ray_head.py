"""A throw-away Ray head on 127.0.0.1 with its own free ports and temp dir (tests, chaos run).

Several heads on one machine never collide: every port is chosen free and the session files
live in their own temp dir. It is stopped by killing its own process group, never with
``ray stop`` (which stops every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


START_ATTEMPTS = 3
"""A head that exits while starting (a port taken between choosing and binding it, a slow
machine) is started again on fresh ports; its own log names the cause when every attempt fails."""


def stop_process_group(process: subprocess.Popen, term_wait_s: float = 5.0) -> None:
    """SIGTERM the process group started with ``start_new_session=True``, SIGKILL it when it is
    still there after ``term_wait_s`` (never ``ray stop``: that stops every Ray on the machine)."""
    for sig, wait in ((signal.SIGTERM, term_wait_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _start_head(num_cpus: int, temp_dir: str, env: dict[str, str], ready_timeout_s: float) -> tuple[subprocess.Popen, int, int]:
    """(process, GCS port, dashboard port) of a head whose GCS port accepts connections."""
    log = Path(temp_dir) / "head.log"
    for attempt in range(1, START_ATTEMPTS + 1):
        port, dashboard = free_port(), free_port()
        agent, agent_grpc, runtime_env, metrics = (free_port() for _ in range(4))
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", f"--num-cpus={num_cpus}", "--include-dashboard=true", "--disable-usage-stats",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}", f"--temp-dir={temp_dir}",
        ]
        with log.open("ab") as out:
            process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ready_timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return process, port, dashboard
            except OSError:
                time.sleep(0.5)
        stop_process_group(process)
    tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
    raise RuntimeError(f"the Ray head did not start in {START_ATTEMPTS} attempts; its log ends:\n{tail}")


@contextlib.contextmanager
def local_head(num_cpus: int = 2, ready_timeout_s: float = 90.0) -> Iterator[dict[str, Any]]:
    """Start ``ray start --head --block`` with the dashboard (job and state API); yields
    ``{"address", "dashboard", "env", "pid"}`` once the GCS port accepts connections."""
    # Short: Ray's socket paths must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
    # Token auth off for this throw-away head: it listens on 127.0.0.1 only, and a pytest
    # process cannot switch its (import-time) Ray auth config to match a fresh token.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    # a job's `python` entrypoint must be this interpreter, also when the venv is not activated
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    process = port = None
    try:
        process, port, dashboard = _start_head(num_cpus, temp_dir, env, ready_timeout_s)
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env, "pid": process.pid}
    finally:
        if process is not None:
            stop_process_group(process)
        # `ray start` recorded this head as the machine's default cluster; forget it so later
        # ray.init() calls (ours or anyone's) do not try to join a dead head.
        for current in (Path("/tmp/ray/ray_current_cluster"), Path(temp_dir) / "ray_current_cluster"):
            if port is not None and current.is_file() and current.read_text().strip().endswith(f":{port}"):
                current.unlink()
        shutil.rmtree(temp_dir, ignore_errors=True)
