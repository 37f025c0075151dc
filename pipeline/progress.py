"""Driver-side progress: assets done / failed / in flight, iterations per second, ETA.

Optimiser tasks report to a :class:`ProgressActor` (fire-and-forget calls); the driver polls
its snapshot and prints one line every ``every_s`` seconds. The actor also records which
worker pid runs each asset and how many attempts it took (fault-tolerance tests use both).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import ray


class ProgressState:
    """Iterations done per asset in flight, plus attempt counts and worker pids."""

    def __init__(self) -> None:
        self.iterations: dict[str, int] = {}
        self.finished_iterations = 0
        self.pids: dict[str, int] = {}
        self.attempts: dict[str, int] = {}

    def started(self, asset_id: str, pid: int) -> None:
        self.pids[asset_id] = pid
        self.attempts[asset_id] = self.attempts.get(asset_id, 0) + 1

    def report(self, asset_id: str, done: int, total: int) -> None:
        self.iterations[asset_id] = done

    def finished(self, asset_id: str) -> None:
        self.finished_iterations += self.iterations.pop(asset_id, 0)
        self.pids.pop(asset_id, None)

    def snapshot(self) -> dict[str, Any]:
        return {
            "iterations": self.finished_iterations + sum(self.iterations.values()),
            "running": dict(self.iterations),
            "pids": dict(self.pids),
            "attempts": dict(self.attempts),
        }


ProgressActor = ray.remote(num_cpus=0)(ProgressState)


@dataclass
class ProgressPrinter:
    """Prints ``done/failed/in flight``, it/s (over the whole run) and ETA."""

    total_assets: int
    iterations_per_asset: int
    every_s: float = 5.0
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    done: int = 0
    failed: int = 0
    in_flight: int = 0
    _start: float = field(default_factory=time.monotonic)
    _last_print: float = 0.0
    _base_iterations: int | None = None

    def line(self, iterations: int, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        if self._base_iterations is None:
            self._base_iterations = iterations
        elapsed = max(now - self._start, 1e-9)
        rate = (iterations - self._base_iterations) / elapsed
        remaining = max(self.total_assets * self.iterations_per_asset - iterations, 0)
        eta = _clock(remaining / rate) if rate > 0 else "?"
        return (
            f"[pipeline] assets {self.done + self.failed}/{self.total_assets} "
            f"(done {self.done}, failed {self.failed}, in flight {self.in_flight}) "
            f"| {rate:.1f} it/s | elapsed {_clock(elapsed)} | ETA {eta}"
        )

    def maybe_print(self, iterations: int, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_print >= self.every_s:
            self._last_print = now
            print(self.line(iterations, now), file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
