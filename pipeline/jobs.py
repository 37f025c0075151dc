"""Jobs: one (prompt, variant) of a dataset run, with its deterministic asset_id and seeds."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from pipeline.config import PipelineConfig, to_container
from pipeline.toyworld import toyworld_groups
from stages.toyworld.world import load_world


@dataclass(frozen=True)
class Job:
    """Everything an optimiser task needs to know about its asset (besides the method config)."""

    asset_id: str
    prompt: str
    prompt_index: int
    variant: int
    reference_seed: int
    seed: int
    config_digest: str


def config_digest(config: PipelineConfig) -> str:
    """12 hex digits over everything that changes an asset's content: method, models (and the toy
    world's content when a model is the toy world), seed. Prompts, resources, output and tracking
    do not change an asset and are left out."""
    payload = {
        "method": to_container(config.method),
        "models": to_container(config.models),
        "seed": config.seed,
    }
    if toyworld_groups(config):  # the world file's content, not just its path, makes the assets
        payload["toyworld"] = load_world(config.models.toyworld).digest()
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def slugify(prompt: str, max_len: int = 40) -> str:
    """A file-name-safe lower-case slug of a prompt: ``[a-z0-9_]``, at most ``max_len`` chars."""
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")
    return slug[:max_len].rstrip("_") or "prompt"


def _hash_int(*parts: object) -> int:
    blob = "\x1f".join(str(part) for part in parts)
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16)


def asset_id_for(prompt: str, variant: int, digest: str) -> str:
    """``<slug>-v<variant>-<10 hex>``: readable, safe as a directory name, unique per
    (prompt, variant, config digest)."""
    key = hashlib.sha256(f"{prompt}\x1f{variant}\x1f{digest}".encode()).hexdigest()[:10]
    return f"{slugify(prompt)}-v{variant}-{key}"


def make_jobs(config: PipelineConfig, prompts: list[str]) -> list[Job]:
    """``variants`` jobs per prompt, in prompt order; seeds derive from (seed, prompt, variant)."""
    digest = config_digest(config)
    jobs = []
    for index, prompt in enumerate(prompts):
        for variant in range(config.variants):
            jobs.append(
                Job(
                    asset_id=asset_id_for(prompt, variant, digest),
                    prompt=prompt,
                    prompt_index=index,
                    variant=variant,
                    reference_seed=_hash_int(config.seed, prompt, variant, "reference"),
                    seed=_hash_int(config.seed, prompt, variant, "optimize"),
                    config_digest=digest,
                )
            )
    return jobs
