"""Driver-side progress: what the optimiser tasks report, and the console line made of it.

Optimiser tasks report to a :class:`ProgressActor` (fire-and-forget calls, at most one a second
per task): iterations done, the metric points and preview images to track (which the driver
drains into MLflow), and when the export starts and ends. The actor also records which worker
pid runs each asset and how many attempts it took (fault-tolerance tests use both).

:class:`ProgressPrinter` turns snapshots into one status line: on a terminal a single line
redrawn in place (tqdm), in logs (``ray job logs``, a file) a line every ``every_s`` seconds.
The ETA counts the iterations left at the measured rate plus the exports left at their measured
duration; until one export has finished it says that the export time is not known yet.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import ray


class ProgressState:
    """Iterations done per asset in flight, attempts, worker pids, export timings, and the
    metric points / preview images waiting to be tracked."""

    def __init__(self) -> None:
        self.iterations: dict[str, int] = {}
        self.finished_iterations = 0
        self.pids: dict[str, int] = {}
        self.attempts: dict[str, int] = {}
        self.exporting: dict[str, float] = {}
        self.export_seconds: list[float] = []
        self.points: dict[str, list[Any]] = {}
        self.previews: dict[str, list[Any]] = {}

    def started(self, asset_id: str, pid: int) -> None:
        self.pids[asset_id] = pid
        self.attempts[asset_id] = self.attempts.get(asset_id, 0) + 1

    def report(self, asset_id: str, done: int, total: int, points: list[Any] | None = None, previews: list[Any] | None = None) -> None:
        """``points``: ``(step, unix ms, {metric: value})``; ``previews``: ``(step, unix ms, png bytes)``."""
        self.iterations[asset_id] = done
        if points:
            self.points.setdefault(asset_id, []).extend(points)
        if previews:
            self.previews.setdefault(asset_id, []).extend(previews)

    def export_started(self, asset_id: str) -> None:
        self.exporting[asset_id] = time.monotonic()

    def export_finished(self, asset_id: str) -> None:
        began = self.exporting.pop(asset_id, None)
        if began is not None:
            self.export_seconds.append(time.monotonic() - began)

    def finished(self, asset_id: str) -> None:
        self.finished_iterations += self.iterations.pop(asset_id, 0)
        self.pids.pop(asset_id, None)
        self.exporting.pop(asset_id, None)

    def snapshot(self) -> dict[str, Any]:
        return {
            "iterations": self.finished_iterations + sum(self.iterations.values()),
            "running": dict(self.iterations),
            "pids": dict(self.pids),
            "attempts": dict(self.attempts),
            "exporting": len(self.exporting),
            "export_seconds": list(self.export_seconds),
        }

    def drain(self) -> dict[str, Any]:
        """The points and previews reported since the last drain (and forget them)."""
        drained = {"points": self.points, "previews": self.previews}
        self.points, self.previews = {}, {}
        return drained


ProgressActor = ray.remote(num_cpus=0)(ProgressState)


@dataclass
class ProgressPrinter:
    """Assets done / failed / in flight, iterations per second and a truthful ETA."""

    total_assets: int
    iterations_per_asset: int
    every_s: float = 5.0
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    parallel: int = 1
    """Assets optimised at once (exports of different assets overlap by this much)."""
    done: int = 0
    failed: int = 0
    in_flight: int = 0
    tty: bool | None = None
    """Redraw one line in place (default: whether ``stream`` is a terminal)."""
    _start: float = field(default_factory=time.monotonic)
    _last_print: float = 0.0
    _first: tuple[float, int] | None = None
    _bar: Any = None

    def __post_init__(self) -> None:
        if self.tty is None:
            isatty = getattr(self.stream, "isatty", None)
            self.tty = bool(isatty and isatty())

    # ---------------------------------------------------------------- the numbers
    def eta_seconds(self, iterations: int, export_seconds: list[float], now: float, running: dict[str, int] | None = None) -> tuple[float | None, bool]:
        """(seconds left or None when no rate is known yet, whether export time is included).

        Rate: iterations since the first one this driver saw, over the time since then (model
        loading and queueing before it are not counted as optimisation speed). Work left: the
        iterations of the assets not finished (failed ones count as finished) minus what the
        running ones have done, plus their exports."""
        if self._first is None:
            if iterations <= 0:
                return None, False
            self._first = (now, iterations)
            return None, False
        began, base = self._first
        if now <= began or iterations <= base:
            return None, False
        rate = (iterations - base) / (now - began)
        exports_left = max(self.total_assets - self.done - self.failed, 0)
        left = max(exports_left * self.iterations_per_asset - sum((running or {}).values()), 0) / rate
        if not export_seconds:
            return left, exports_left == 0
        mean_export = sum(export_seconds) / len(export_seconds)
        return left + mean_export * exports_left / max(self.parallel, 1), True

    def line(
        self, iterations: int, now: float | None = None, export_seconds: list[float] | None = None,
        exporting: int = 0, running: dict[str, int] | None = None,
    ) -> str:
        now = time.monotonic() if now is None else now
        eta, complete = self.eta_seconds(iterations, export_seconds or [], now, running)
        elapsed = now - self._start
        rate = ""
        if self._first is not None and now > self._first[0]:
            rate = f" | {(iterations - self._first[1]) / (now - self._first[0]):.1f} it/s"
        eta_text = "?" if eta is None else _clock(eta) + ("" if complete else " + export (not measured yet)")
        busy = f", exporting {exporting}" if exporting else ""
        return (
            f"[pipeline] assets {self.done + self.failed}/{self.total_assets} "
            f"(done {self.done}, failed {self.failed}, in flight {self.in_flight}{busy}) "
            f"| iterations {iterations}/{self.total_assets * self.iterations_per_asset}{rate} "
            f"| elapsed {_clock(elapsed)} | ETA {eta_text}"
        )

    # ---------------------------------------------------------------- output
    def update(self, snapshot: dict[str, Any], force: bool = False) -> None:
        """Show the state of ``snapshot`` (``ProgressState.snapshot()``): redraw the terminal line,
        or print a log line when ``every_s`` has passed (or ``force``)."""
        now = time.monotonic()
        text = self.line(snapshot["iterations"], now, snapshot.get("export_seconds"), snapshot.get("exporting", 0), snapshot.get("running"))
        if self.tty:
            self._draw(text.removeprefix("[pipeline] "), snapshot["iterations"])
            if force:
                self.close()
            return
        if force or now - self._last_print >= self.every_s:
            self._last_print = now
            print(text, file=self.stream, flush=True)

    def maybe_print(self, iterations: int, force: bool = False) -> None:
        """``update`` from an iteration count alone."""
        self.update({"iterations": iterations}, force)

    def note(self, message: str) -> None:
        """A message line that does not break the in-place status line."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def _draw(self, text: str, iterations: int) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm

            total = max(self.total_assets * self.iterations_per_asset, 1)
            self._bar = tqdm(total=total, bar_format="{percentage:3.0f}%|{bar:16}| {desc}", file=self.stream, dynamic_ncols=True, leave=True)
        self._bar.n = min(iterations, self._bar.total)
        self._bar.set_description_str(text, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
