"""Config checks of a run whose models are the toy world (``models.*: toyworld``).

Run when the config loads, before any work: one model's keys are all toy world or none, the
world file (``models.toyworld``) reads, and every prompt is one the world knows (the error names
the prompt and where it came from: file and line, or ``prompts.inline[i]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from pipeline.components import models_needed
from pipeline.prompts import read_prompts_with_origin
from stages.config_loading import ConfigError
from stages.models.factory import check_toyworld_keys, uses_toyworld
from stages.toyworld.world import WORLD_KEY, World, WorldError, load_world

if TYPE_CHECKING:  # pipeline.config runs these checks while it validates
    from pipeline.config import PipelineConfig


def toyworld_groups(config: PipelineConfig, actors: Sequence[str] | None = None) -> list[str]:
    """The models of this run's method (``reference`` / ``ip`` / ``mvd``; or of ``actors``) that
    are the toy world."""
    needed = models_needed(config.method) if actors is None else actors
    return [group for group in needed if uses_toyworld(config.models, group)]


def resolve_world_path(value: str, base: Path) -> str:
    """``default`` as is; a relative world file against the config file's directory when it exists there."""
    if value in ("", "default") or Path(value).is_absolute() or not (base / value).is_file():
        return value
    return str((base / value).resolve())


def check_toyworld(config: PipelineConfig, actors: Sequence[str] | None = None) -> World | None:
    """Raise :class:`ConfigError` for a bad toy-world setup; the world when the run's models
    (those of ``actors`` when given: ``()`` for tools that load no model) use it."""
    try:
        check_toyworld_keys(config.models)
    except ValueError as error:
        raise ConfigError(f"config key {error}") from None
    if not toyworld_groups(config, actors):
        return None
    try:
        world = load_world(config.models.toyworld)
    except WorldError as error:
        message = str(error).removeprefix(f"{WORLD_KEY}: ")
        raise ConfigError(f"config key '{WORLD_KEY}': {message}") from None
    for prompt, where in read_prompts_with_origin(config.prompts):
        if prompt not in world.prompts:
            raise ConfigError(str(world.unknown(prompt, where)))
    return world
