"""Jobs: one (prompt, variant) of a dataset run, with its deterministic asset_id and seeds
(the rule lives in :mod:`stages.optimize.identity`, shared with the one-asset CLI)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import PipelineConfig
from stages.optimize.identity import asset_id_for, derived_seed, identity_digest


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
    mlflow_run_id: str | None = None
    """The asset's MLflow child run (set by the driver when tracking is on)."""


def config_digest(config: PipelineConfig) -> str:
    """The identity digest of ``config``'s assets (:func:`stages.optimize.identity.identity_digest`):
    method (without runtime and export keys), models (and the toy world's content), seed. Prompts, resources, output,
    tracking and export settings do not change an asset and are left out."""
    return identity_digest(config.method, config.models, config.seed)


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
                    reference_seed=derived_seed(config.seed, prompt, variant, "reference"),
                    seed=derived_seed(config.seed, prompt, variant, "optimize"),
                    config_digest=digest,
                )
            )
    return jobs


__all__ = ["Job", "asset_id_for", "config_digest", "make_jobs"]
