"""Chaos run: many faults during one dataset run, then a rerun; is every asset there once?

``python -m benchmarks.chaos [--assets 16] [--iterations 300] [--step-s 0.05] [--kill-every-s 20]
[--max-kills 8] [--max-seconds 900] [--seed 0] [--out benchmarks/out/chaos.json]``

On its own Ray head (127.0.0.1, free ports), a driver process runs a ``--assets``-asset dataset
(the fakes of ``tests/pipeline_fakes.py``: IP, MVDream and reference actors, a checkpointing
optimiser; CPU quickstart scale) with MLflow tracking. Every ``--kill-every-s`` (±25 %) it
SIGKILLs one random target (each kind once per round, in a random order): an optimiser worker
(of an asset in flight), the IP, the MVDream or the reference actor; once, the driver itself, after which the same run is started again (the
rerun), under the same fire, until it ends. Kills stop after ``--max-kills`` or
``--max-seconds``. The model actors get ``max_restarts`` and the tasks ``task_max_retries`` above
``--max-kills``: the run is to survive the kills, not to use up its restart budgets (that case
stops the run by design; ``tests/test_faults.py`` covers it).

Checks: every asset committed exactly once (its ``asset.json`` never rewritten once seen, one
manifest row per asset, all succeeded, nothing left in staging); reports how many kills each
asset lived through (kills while it was in flight) and the work redone (optimiser iterations
computed, counted by a wrapper around the optimiser, ÷ iterations needed), plus the MLflow facts
(child runs per committed asset, runs left RUNNING). Writes a JSON and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
PROMPTS = ["a red apple", "a wooden chair", "a ceramic teapot", "a small cactus", "a blue car", "a stone lion", "a tin robot", "a paper boat"]
TARGETS = ("worker", "ip", "mvd", "reference")
ACTOR_CLASSES = {"ip": "IPGuidanceActor", "mvd": "MVDreamGuidanceActor", "reference": "ReferenceActor"}


# --------------------------------------------------------------------------- the driver


def counting_optimize(config, guidance, reference, seed, checkpoint_dir, prompt, asset_id, callback=None, *, inner, steps_dir: str, step_s: float):
    """``inner`` (``fake_optimize``) appending one byte per iteration it computes to ``steps_dir/<asset_id>``."""
    fd = os.open(Path(steps_dir) / asset_id, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def count(step, metrics, previews):
        os.write(fd, b".")
        if callback is not None:
            callback(step, metrics, previews)

    try:
        return inner(config, guidance, reference, seed, checkpoint_dir, prompt, asset_id, count, step_s=step_s)
    finally:
        os.close(fd)


def chaos_config(spec: dict[str, Any]):
    from omegaconf import OmegaConf

    from pipeline.config import build_config

    variants = 2
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} #{i}" for i in range(spec["assets"] // variants)]
    budget = spec["max_kills"] + 1
    dotlist = [
        f"output={spec['out']}", f"variants={variants}", "method_preset=tiny",
        f"method.iterations={spec['iterations']}", f"method.checkpoint_every={spec['checkpoint_every']}",
        "resources.tasks_in_flight=4", "resources.task_num_cpus=0.5", f"resources.task_max_retries={budget}",
        *(f"resources.{kind}.max_restarts={budget}" for kind in ("ip", "mvd", "reference")),
        "resources.ip.max_wait_ms=20", "resources.mvd.max_wait_ms=20",
        "tracking.enabled=true", "progress_every_s=10",
    ]
    return OmegaConf.to_object(build_config({"prompts": {"inline": prompts}}, dotlist))


def drive(spec: dict[str, Any]) -> int:
    """One driver: join the head, run the dataset (exit 0), or exit 1 if the run stopped."""
    sys.path.insert(0, str(TESTS))
    import ray

    import pipeline_fakes
    from pipeline.faults import RunStopped
    from pipeline.run import run_dataset

    ray.init(address=spec["address"], log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(pipeline_fakes)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    components = pipeline_fakes.fake_components(mvd=True, reference=True)
    components.optimize = functools.partial(counting_optimize, inner=pipeline_fakes.fake_optimize, steps_dir=spec["steps"], step_s=spec["step_s"])
    try:
        summary = run_dataset(chaos_config(spec), components)
    except RunStopped as stop:
        print(f"[chaos] driver stopped: {stop.reason}", file=sys.stderr, flush=True)
        return 1
    print(f"[chaos] driver done: {summary.succeeded} succeeded, {summary.failed} failed, {summary.skipped_done} skipped", file=sys.stderr, flush=True)
    return 0


# --------------------------------------------------------------------------- the chaos


class Chaos:
    """Picks and kills targets; records each kill with the assets in flight at that moment."""

    def __init__(self, spec: dict[str, Any], head: dict[str, Any], rng: random.Random) -> None:
        self.spec, self.head, self.rng = spec, head, rng
        self.out = Path(spec["out"])
        self.kills: list[dict[str, Any]] = []
        self.committed_at: dict[str, int] = {}  # asset_id -> asset.json mtime when first seen
        self.rewritten: set[str] = set()
        self.bag: list[str] = []

    def in_flight(self) -> dict[str, int]:
        """asset_id -> optimiser worker pid, for assets with a work dir and no commit yet."""
        running = {}
        for pid_file in (self.out / ".work").glob("*/pid"):
            asset_id = pid_file.parent.name
            if not (self.out / "assets" / asset_id / "asset.json").exists():
                try:
                    running[asset_id] = int(pid_file.read_text())
                except (OSError, ValueError):
                    continue
        return running

    def watch_commits(self) -> None:
        for record in (self.out / "assets").glob("*/asset.json"):
            asset_id, mtime = record.parent.name, record.stat().st_mtime_ns
            first = self.committed_at.setdefault(asset_id, mtime)
            if mtime != first:
                self.rewritten.add(asset_id)

    def actor_pid(self, kind: str) -> int | None:
        """The pid of a live ``kind`` actor: a process of this head titled ``ray::<ActorClass>``."""
        title = f"ray::{ACTOR_CLASSES[kind]}".encode()
        for pid in descendants(self.head["pid"]):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title):
                    return pid
            except OSError:
                continue
        return None

    def next_targets(self) -> list[str]:
        """Targets in a random order that visits each kind once per round (a shuffled bag), so
        a short run still hits every kind; the rest of the bag is the fallback order."""
        if not self.bag:
            self.bag = self.rng.sample(TARGETS, len(TARGETS))
        return self.bag[:]

    def kill_one(self, elapsed: float) -> None:
        running = self.in_flight()
        for target in self.next_targets():  # the next target of the bag that exists now
            if target == "worker":
                if not running:
                    continue
                asset_id = self.rng.choice(sorted(running))
                pid, victims = running[asset_id], [asset_id]
            else:
                pid = self.actor_pid(target)
                if pid is None:
                    continue
                victims = sorted(running)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.bag.remove(target)
            self.kills.append({"t_s": round(elapsed, 1), "target": target, "pid": pid, "in_flight": victims})
            print(f"[chaos] t={elapsed:.0f}s killed {target} (pid {pid}); in flight: {len(victims)}", file=sys.stderr, flush=True)
            return

    def kill_driver(self, driver: subprocess.Popen, elapsed: float) -> None:
        victims = sorted(self.in_flight())
        driver.kill()
        driver.wait()
        self.kills.append({"t_s": round(elapsed, 1), "target": "driver", "pid": driver.pid, "in_flight": victims})
        print(f"[chaos] t={elapsed:.0f}s killed the driver (pid {driver.pid}); in flight: {len(victims)}", file=sys.stderr, flush=True)


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def start_driver(spec: dict[str, Any], head: dict[str, Any], log: Path) -> subprocess.Popen:
    env = {**head["env"], "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    with open(log, "ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "benchmarks.chaos", "--drive", json.dumps(spec)],
            cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
        )


def run_chaos(spec: dict[str, Any], head: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(spec["seed"])
    chaos = Chaos(spec, head, rng)
    log = Path(spec["out"]).parent / "drivers.log"
    began = time.monotonic()
    driver = start_driver(spec, head, log)
    drivers, driver_killed, exits = 1, False, []
    next_kill = began + spec["kill_every_s"] * rng.uniform(0.75, 1.25)
    while True:
        time.sleep(0.2)
        now = time.monotonic()
        elapsed = now - began
        chaos.watch_commits()
        code = driver.poll()
        if code is not None:  # the run (or the rerun) ended
            exits.append(code)
            break
        kills_left = len(chaos.kills) < spec["max_kills"] and elapsed < spec["max_seconds"]
        if kills_left and now >= next_kill:
            committed = len(chaos.committed_at)
            if not driver_killed and committed >= spec["assets"] // 4:
                chaos.kill_driver(driver, elapsed)
                exits.append("killed")
                driver_killed = True
                driver = start_driver(spec, head, log)
                drivers += 1
            else:
                chaos.kill_one(elapsed)
            next_kill = now + spec["kill_every_s"] * rng.uniform(0.75, 1.25)
        if elapsed > spec["max_seconds"] * 2:
            driver.kill()
            exits.append("timeout")
            break
    if not driver_killed:
        # the run ended before the driver kill came due: kill-free rerun still checks resumption
        driver = start_driver(spec, head, log)
        drivers += 1
        exits.append(driver.wait())
    chaos.watch_commits()
    return {"seconds": round(time.monotonic() - began, 1), "drivers": drivers, "driver_exits": exits, **facts(spec, chaos)}


# --------------------------------------------------------------------------- the facts


def facts(spec: dict[str, Any], chaos: Chaos) -> dict[str, Any]:
    from pipeline.writer import DatasetWriter

    out = Path(spec["out"])
    writer = DatasetWriter(str(out))
    rows = writer.manifest_rows()
    latest = writer.latest_rows()
    committed = sorted(p.parent.name for p in (out / "assets").glob("*/asset.json"))
    steps = {p.name: p.stat().st_size for p in Path(spec["steps"]).iterdir()}
    needed = spec["assets"] * spec["iterations"]
    survived = {asset_id: sum(asset_id in kill["in_flight"] for kill in chaos.kills) for asset_id in committed}
    checks = {
        "all_committed": len(committed) == spec["assets"],
        "one_manifest_row_each": len(rows) == len(latest) == spec["assets"],
        "all_succeeded": all(row["status"] == "succeeded" for row in latest.values()),
        "asset_json_never_rewritten": not chaos.rewritten,
        "staging_empty": not any((out / ".tmp").glob("*")) if (out / ".tmp").exists() else True,
    }
    return {
        "checks": checks,
        "ok": all(checks.values()),
        "kills": chaos.kills,
        "kills_by_target": {t: sum(k["target"] == t for k in chaos.kills) for t in (*TARGETS, "driver")},
        "kills_survived_per_asset": survived,
        "assets_by_kills_survived": {str(n): sum(v == n for v in survived.values()) for n in sorted(set(survived.values()))},
        "iterations_computed": sum(steps.values()),
        "iterations_needed": needed,
        "work_redone": round(sum(steps.values()) / needed, 4) if needed else 0.0,
        "mlflow": mlflow_facts(out, committed),
    }


def mlflow_facts(out: Path, committed: list[str]) -> dict[str, Any]:
    """Child runs per committed asset and runs left RUNNING (parents and children)."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, max_results=5000)
    except Exception as error:  # noqa: BLE001 - reported: the tracking facts are not the run's
        return {"error": f"{type(error).__name__}: {error}"}
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    per_asset = {asset_id: sum(r.data.tags.get("asset_id") == asset_id for r in children) for asset_id in committed}
    return {
        "parent_runs": len(runs) - len(children),
        "running": [{"run_id": r.info.run_id, "child": "mlflow.parentRunId" in r.data.tags} for r in runs if r.info.status == "RUNNING"],
        "child_runs_per_committed_asset": {str(n): sum(v == n for v in per_asset.values()) for n in sorted(set(per_asset.values()))},
        "exactly_one_child_run_each": all(v == 1 for v in per_asset.values()),
    }


def print_table(result: dict[str, Any]) -> None:
    from benchmarks.common import format_table

    rows = [{"kills survived": int(n), "assets": count} for n, count in result["assets_by_kills_survived"].items()]
    print(format_table(rows))
    print(
        f"kills {result['kills_by_target']}; work redone {result['work_redone']:.3f} "
        f"({result['iterations_computed']} / {result['iterations_needed']} iterations); checks {result['checks']}; "
        f"MLflow {result['mlflow']}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any] | int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--step-s", type=float, default=0.05, help="seconds each fake iteration sleeps")
    parser.add_argument("--kill-every-s", type=float, default=20.0)
    parser.add_argument("--max-kills", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the dataset goes (default: a new temp dir)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "chaos.json"))
    parser.add_argument("--drive", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drive:
        return drive(json.loads(args.drive))
    import tempfile

    from benchmarks.common import environment, write_json
    from benchmarks.ray_head import local_head

    work = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-"))
    (work / "steps").mkdir(parents=True, exist_ok=True)
    spec = {
        "assets": args.assets, "iterations": args.iterations, "checkpoint_every": args.checkpoint_every,
        "step_s": args.step_s, "kill_every_s": args.kill_every_s, "max_kills": args.max_kills,
        "max_seconds": args.max_seconds, "seed": args.seed, "out": str(work / "ds"), "steps": str(work / "steps"),
    }
    with local_head(num_cpus=2) as head:
        spec["address"] = head["address"]
        result = run_chaos(spec, head)
    result = {"spec": {k: v for k, v in spec.items() if k != "address"}, "environment": environment("cpu"), "load": os.getloadavg(), **result}
    write_json(result, args.out)
    print_table(result)
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(outcome if isinstance(outcome, int) else 0)
