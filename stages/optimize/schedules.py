"""Schedules of one optimisation run: loss weights α/β, timestep annealing, milestones.

All functions are pure functions of the iteration ``step`` (0-based) and the run length
``total``; the only randomness is :func:`sample_timesteps`, which takes an explicit
``torch.Generator``.

- :func:`ramp` is threestudio's ``C()``: a constant, or ``[start_step, start_value, end_value,
  end_step]`` interpolated linearly and clamped (a 3-element list gets ``start_step = 0``).
- :func:`loss_weights`: α (ISD) 0.4→0.8 and β (SDS-MVD) 0.6→0.02, linear over the run.
- :func:`timestep_range`: MVDream-threestudio's anneal (``min_step_percent: [0, 0.98, 0.02,
  8000]``, ``max_step_percent: [0, 0.98, 0.50, 8000]`` of a 10000-step run), i.e. linear over
  the first ``anneal_fraction`` (0.8) of the run.
- :func:`sample_timesteps`: one integer t per image (ISD side) or one t per group of 4 views
  (MVDream side), drawn like threestudio: ``randint(min_step, max_step + 1)``.
- :func:`milestone_value`: piecewise-constant schedules (render resolution 64→256, batch 8→4).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from stages.guidance.protocol import NUM_TRAIN_TIMESTEPS

RampSpec = float | int | Sequence[float]


def ramp(spec: RampSpec, step: int) -> float:
    """threestudio ``C(value, epoch, global_step)`` for global steps.

    ``spec`` is a number (returned as float) or ``[start_step, start_value, end_value,
    end_step]`` (``[start_value, end_value, end_step]`` means ``start_step = 0``): the value
    moves linearly from ``start_value`` at ``start_step`` to ``end_value`` at ``end_step`` and
    is held constant outside that interval.
    """
    if isinstance(spec, bool):
        raise TypeError(f"ramp spec must be a number or a 3/4-element list, got {spec!r}")
    if isinstance(spec, (int, float)):
        return float(spec)
    values = list(spec)
    if len(values) == 3:
        values = [0, *values]
    if len(values) != 4:
        raise ValueError(
            f"ramp spec must be [start_step, start_value, end_value, end_step] or "
            f"[start_value, end_value, end_step], got {spec!r}"
        )
    start_step, start_value, end_value, end_step = (float(v) for v in values)
    if end_step <= start_step:
        raise ValueError(f"ramp spec {spec!r}: end_step must be greater than start_step")
    fraction = min(1.0, max(0.0, (step - start_step) / (end_step - start_step)))
    return start_value + (end_value - start_value) * fraction


def _run_fraction(step: int, total: int) -> float:
    """step / total clamped into [0, 1]; ``total`` must be positive."""
    if total <= 0:
        raise ValueError(f"total iterations must be > 0, got {total}")
    return min(1.0, max(0.0, step / total))


def loss_weights(
    step: int,
    total: int,
    alpha: tuple[float, float] = (0.4, 0.8),
    beta: tuple[float, float] = (0.6, 0.02),
) -> tuple[float, float]:
    """(α, β) at ``step`` of a ``total``-iteration run, each linear from start to end value."""
    f = _run_fraction(step, total)
    return (
        alpha[0] + (alpha[1] - alpha[0]) * f,
        beta[0] + (beta[1] - beta[0]) * f,
    )


def timestep_range(
    step: int,
    total: int,
    min_start: float = 0.98,
    min_end: float = 0.02,
    max_start: float = 0.98,
    max_end: float = 0.50,
    anneal_fraction: float = 0.8,
) -> tuple[float, float]:
    """(t_min, t_max) as fractions of the 1000 train timesteps at ``step``.

    Both bounds move linearly over the first ``anneal_fraction`` of the run and stay at their
    end values afterwards (MVDream-threestudio ``[0, 0.98, 0.02, 8000]`` / ``[0, 0.98, 0.5,
    8000]`` for a 10000-step run). ``anneal_fraction = 0`` means the end values from step 0.
    """
    if not 0.0 <= anneal_fraction <= 1.0:
        raise ValueError(f"anneal_fraction must be in [0, 1], got {anneal_fraction}")
    if total <= 0:
        raise ValueError(f"total iterations must be > 0, got {total}")
    anneal_steps = anneal_fraction * total
    f = 1.0 if anneal_steps == 0 else min(1.0, max(0.0, step / anneal_steps))
    return (min_start + (min_end - min_start) * f, max_start + (max_end - max_start) * f)


def timestep_bounds(
    t_min_frac: float, t_max_frac: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> tuple[int, int]:
    """Integer (min_step, max_step), inclusive, as threestudio: ``int(N * fraction)``.

    ``max_step`` is clamped to ``N - 1`` so a fraction of 1.0 stays a valid index.
    """
    if num_train_timesteps <= 0:
        raise ValueError(f"num_train_timesteps must be > 0, got {num_train_timesteps}")
    for name, value in (("t_min_frac", t_min_frac), ("t_max_frac", t_max_frac)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    if t_min_frac > t_max_frac:
        raise ValueError(f"t_min_frac ({t_min_frac}) must be <= t_max_frac ({t_max_frac})")
    last = num_train_timesteps - 1
    return min(int(num_train_timesteps * t_min_frac), last), min(
        int(num_train_timesteps * t_max_frac), last
    )


def sample_timesteps(
    generator: torch.Generator,
    batch: int,
    t_min_frac: float,
    t_max_frac: float,
    group: int = 1,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> Tensor:
    """(batch,) int64 timesteps, uniform on ``[min_step, max_step]`` (both inclusive).

    ``group = 1``: one t per image (ISD side). ``group = 4``: one t shared by each run of 4
    consecutive images, i.e. by each MVDream 4-view group; ``batch`` must be a multiple of
    ``group``. Drawn on ``generator``'s device and returned on the CPU.
    """
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    if batch % group:
        raise ValueError(f"batch ({batch}) must be a multiple of group ({group})")
    low, high = timestep_bounds(t_min_frac, t_max_frac, num_train_timesteps)
    per_group = torch.randint(
        low, high + 1, (batch // group,), generator=generator, device=generator.device
    )
    return per_group.repeat_interleave(group).to("cpu", torch.int64)


def milestone_value(step: int, milestones: Sequence[int], values: Sequence[Any]) -> Any:
    """Piecewise-constant schedule: ``values[bisect_right(milestones, step)]``.

    As threestudio's datamodule ``update_step``: with milestones [5000] and values [64, 256],
    steps 0..4999 give 64 and steps >= 5000 give 256.
    """
    if len(values) != len(milestones) + 1:
        raise ValueError(
            f"need len(values) == len(milestones) + 1, got {len(values)} values for "
            f"{len(milestones)} milestones"
        )
    if any(b < a for a, b in zip(milestones, milestones[1:])):
        raise ValueError(f"milestones must be non-decreasing, got {list(milestones)}")
    return values[bisect.bisect_right(list(milestones), step)]


@dataclass
class ScheduleConfig:
    """Schedules of one run (OmegaConf-structured friendly: primitives and lists only).

    Defaults: α 0.4→0.8 and β 0.6→0.02 linear over the run (the paper); the timestep range of
    MVDream-threestudio; 8 views at 64² then 4 views at 256² from half-way on (this project's
    reconstruction of MVDream-threestudio's render schedule; the paper does not state one).
    """

    alpha_start: float = 0.4
    """Weight of the ISD term at step 0."""
    alpha_end: float = 0.8
    """Weight of the ISD term at the last step."""
    beta_start: float = 0.6
    """Weight of the SDS-MVD term at step 0."""
    beta_end: float = 0.02
    """Weight of the SDS-MVD term at the last step."""
    min_step_start: float = 0.98
    """Lower bound of t (fraction of 1000) at step 0."""
    min_step_end: float = 0.02
    """Lower bound of t after the anneal."""
    max_step_start: float = 0.98
    """Upper bound of t at step 0."""
    max_step_end: float = 0.50
    """Upper bound of t after the anneal."""
    anneal_fraction: float = 0.8
    """Fraction of the run over which the t bounds move (then they stay at their end values)."""
    milestones: list[float] = field(default_factory=lambda: [0.5])
    """Fractions of the run where resolution / batch size switch."""
    resolutions: list[int] = field(default_factory=lambda: [64, 256])
    """Render resolution before / after each milestone (len(milestones) + 1 values). The default
    8 views at 64² then 4 at 256² from half-way is this project's reconstruction from
    MVDream-threestudio (``mvdream-sd21.yaml``), not a setting the ModeDreamer paper states."""
    batch_sizes: list[int] = field(default_factory=lambda: [8, 4])
    """Views per iteration before / after each milestone (multiples of 4 for MVDream; default:
    MVDream-threestudio's, see ``resolutions``)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for name in (
            "min_step_start", "min_step_end", "max_step_start", "max_step_end", "anneal_fraction",
        ):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"ScheduleConfig.{name} must be in [0, 1], got {value!r}")
        for name in ("alpha_start", "alpha_end", "beta_start", "beta_end"):
            value = getattr(self, name)
            if not (math.isfinite(float(value)) and float(value) >= 0.0):
                raise ValueError(f"ScheduleConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.min_step_start > self.max_step_start:
            raise ValueError(
                "ScheduleConfig.min_step_start must be <= max_step_start, got "
                f"{self.min_step_start} > {self.max_step_start}"
            )
        if self.min_step_end > self.max_step_end:
            raise ValueError(
                "ScheduleConfig.min_step_end must be <= max_step_end, got "
                f"{self.min_step_end} > {self.max_step_end}"
            )
        milestones = list(self.milestones)
        if any(not 0.0 <= float(m) <= 1.0 for m in milestones) or milestones != sorted(milestones):
            raise ValueError(
                f"ScheduleConfig.milestones must be non-decreasing fractions in [0, 1], got {milestones}"
            )
        for name in ("resolutions", "batch_sizes"):
            values = list(getattr(self, name))
            if len(values) != len(milestones) + 1:
                raise ValueError(
                    f"ScheduleConfig.{name} needs len(milestones) + 1 = {len(milestones) + 1} "
                    f"values, got {values}"
                )
            if any(int(v) <= 0 for v in values):
                raise ValueError(f"ScheduleConfig.{name} must be positive integers, got {values}")

    def weights(self, step: int, total: int) -> tuple[float, float]:
        """(α, β) at ``step``."""
        return loss_weights(
            step, total, (self.alpha_start, self.alpha_end), (self.beta_start, self.beta_end)
        )

    def timestep_range(self, step: int, total: int) -> tuple[float, float]:
        """(t_min_frac, t_max_frac) at ``step``."""
        return timestep_range(
            step, total, self.min_step_start, self.min_step_end,
            self.max_step_start, self.max_step_end, self.anneal_fraction,
        )

    def milestone_steps(self, total: int) -> list[int]:
        """The milestones as iteration indices of a ``total``-iteration run."""
        return [int(round(float(m) * total)) for m in self.milestones]

    def resolution(self, step: int, total: int) -> int:
        """Render resolution (pixels per side) at ``step``."""
        return int(milestone_value(step, self.milestone_steps(total), list(self.resolutions)))

    def batch_size(self, step: int, total: int) -> int:
        """Number of views rendered at ``step``."""
        return int(milestone_value(step, self.milestone_steps(total), list(self.batch_sizes)))
