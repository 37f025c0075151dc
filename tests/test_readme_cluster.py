"""README's "On a Ray cluster" block, run as written: token, ``ray start --head``, ``ray job submit``
of the quickstart with its relative ``output``; then the ``mlflow ui`` command the job prints.

Only what a shared test machine needs is changed: ``ray start`` gets its own ports and temp dir
(and ``--block``, so the head is stopped by killing its process group instead of ``ray stop``,
which would stop every Ray on the machine), ``mlflow ui`` a free port, HOME is a temporary
directory (the token and ``~/modedreamer-ray`` land there), and the quickstart is shortened with
overrides appended to the documented command.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from benchmarks.ray_head import stop_process_group

REPO = Path(__file__).resolve().parents[1]
DOCUMENTED_ADDRESS = "http://127.0.0.1:8265"
SHORTER = ["method.iterations=4", "variants=1", "prompts.inline=[a ring]"]  # a prompt of the toy world (the quickstart's)


def readme_commands(marker: str = "<!-- cluster-commands -->") -> list[list[str]]:
    """The commands of the fenced block after ``marker``: continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text().split(marker, 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except urllib.error.HTTPError:
            return  # it answers (e.g. 401 without a token): it is up
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def test_readme_block_is_the_documented_path():
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["ray", "get-auth-token"], ["export", "RAY_AUTH_MODE=token"], ["ray", "start"], ["ray", "job"], ["ray", "stop"]]
    submit = commands[3]
    assert submit[submit.index("--") + 1:] == ["python", "-m", "pipeline.run", "configs/quickstart.yaml"]
    assert json.loads(submit[submit.index("--runtime-env-json") + 1]) == {"env_vars": {"HF_HUB_OFFLINE": "1"}}


@pytest.mark.slow
def test_readme_cluster_commands_run_as_written(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="rayr-", dir="/tmp")  # short: Ray's socket paths stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    port, dashboard = _free_port(), _free_port()
    head_ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                  f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
    address = f"http://127.0.0.1:{dashboard}"
    head = None
    log = ""
    try:
        for command in readme_commands():
            if command[0] == "export":
                key, value = command[1].split("=", 1)
                env[key] = value
            elif command[:3] == ["ray", "start", "--head"]:
                extra = ["--block", "--node-ip-address=127.0.0.1", f"--port={port}", f"--dashboard-port={dashboard}",
                         "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}", *head_ports]
                head = subprocess.Popen(command + extra, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
                _wait_http(f"{address}/api/version")
            elif command[:2] == ["ray", "stop"]:
                continue  # the head is stopped by its process group below
            else:
                command = [address if part == DOCUMENTED_ADDRESS else part for part in command]
                if command[:3] == ["ray", "job", "submit"]:
                    command += SHORTER
                result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=500)
                log += result.stdout + result.stderr
                assert result.returncode == 0, f"{shlex.join(command)}\n{log[-6000:]}"
        assert (home / ".ray" / "auth_token").is_file()
        assert "temporary copy of the working dir" in log and "job_output_root=~/modedreamer-ray" in log
        out = home / "modedreamer-ray" / "outputs" / "quickstart"
        from pipeline.writer import DatasetWriter

        rows = DatasetWriter(str(out)).latest_rows()
        assert len(rows) == 1 and all(r["status"] == "succeeded" for r in rows.values()), log[-4000:]
        (asset_id,) = rows
        assert (out / "gallery" / "index.html").is_file() and f"gallery: {out / 'gallery' / 'index.html'}" in log
        browse = f"MLflow runs: cd {out} && mlflow ui --backend-store-uri sqlite:///mlflow.db"
        assert browse in log
        # the dashboard's task list names the asset
        tasks = subprocess.run(["ray", "list", "tasks", "--address", address, "--filter", f"name=optimise[{asset_id}]", "--format", "json"],
                               env=env, capture_output=True, text=True, timeout=120)
        assert tasks.returncode == 0 and json.loads(tasks.stdout)[0]["name"] == f"optimise[{asset_id}]", tasks.stdout + tasks.stderr
    finally:
        if head is not None:
            stop_process_group(head, term_wait_s=10)
        # `ray start` recorded this head as the machine's default cluster: forget it (see the
        # `head` fixture of test_pipeline_ray.py)
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
        shutil.rmtree(temp_dir, ignore_errors=True)
    # the printed MLflow command, as written (plus a free port): the runs and the thumbnail of the asset
    ui_port = _free_port()
    printed = next(line for line in log.splitlines() if browse in line)
    command = shlex.split(printed.split(" && ", 1)[1].split("  (then", 1)[0]) + ["--port", str(ui_port), "--host", "127.0.0.1"]
    ui = subprocess.Popen(command, cwd=out, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{ui_port}/health")
        run_id = rows[asset_id]["mlflow_run_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/ajax-api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30) as response:
            run = json.loads(response.read())["run"]
        assert run["info"]["status"] == "FINISHED" and any(t["key"] == "asset_id" and t["value"] == asset_id for t in run["data"]["tags"])
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/get-artifact?path=thumbnail.jpg&run_uuid={run_id}", timeout=30) as response:
            assert response.headers["Content-Type"] == "image/jpeg" and response.read(3) == b"\xff\xd8\xff"
    finally:
        stop_process_group(ui, term_wait_s=10)
