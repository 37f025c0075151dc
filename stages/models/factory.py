"""Which class serves each model of a run: the diffusers models, or the toy world.

Every ``models.*`` key takes ``toyworld`` (besides ``tiny``, a hub id, a directory or a file):
then that model is the exact toy world named by ``models.toyworld`` (:mod:`stages.toyworld`).
The SD1.5 side is one model (``sd``, ``ip_adapter``, ``image_encoder``) and so is MVDream
(``mvdream``, ``mvdream_text``): their keys are toy-world keys together or not at all
(:func:`check_toyworld_keys`). The pipeline's actors and the one-asset CLI both build their
models here.
"""

from __future__ import annotations

from typing import Any

from stages.guidance.protocol import Guidance
from stages.guidance.runtime import GuidanceRuntime
from stages.models.config import ModelsConfig

TOYWORLD = "toyworld"
MODEL_GROUPS = {"ip": ("sd", "ip_adapter", "image_encoder"), "mvd": ("mvdream", "mvdream_text"), "reference": ("reference",)}
"""Keys that form one model: a toy world for all of them or for none."""


def uses_toyworld(models: ModelsConfig, group: str) -> bool:
    """Whether the model ``group`` (``ip`` / ``mvd`` / ``reference``) is the toy world."""
    return getattr(models, MODEL_GROUPS[group][0]) == TOYWORLD


def check_toyworld_keys(models: ModelsConfig) -> None:
    """Raise ``ValueError`` naming the key when one model's keys mix the toy world and real weights."""
    for keys in MODEL_GROUPS.values():
        toy = [k for k in keys if getattr(models, k) == TOYWORLD]
        if toy and len(toy) != len(keys):
            other = next(k for k in keys if k not in toy)
            raise ValueError(
                f"models.{other}={getattr(models, other)!r} but models.{toy[0]}=toyworld: "
                f"{', '.join('models.' + k for k in keys)} form one model; set all of them to toyworld or none"
            )


def toyworld_guidance(models: ModelsConfig) -> Guidance:
    from stages.toyworld import ToyWorldGuidance

    return ToyWorldGuidance(models.toyworld)


def build_ip_guidance(models: ModelsConfig, runtime: GuidanceRuntime | None = None) -> Guidance:
    """The SD1.5 + IP-Adapter side: ``IPGuidance`` (renders resized to 512 for SD1.5, 32 for
    ``tiny``) answering in passes bounded by ``runtime``; or the toy world (exact and small:
    ``runtime`` does not apply). The method's settings come with each asset's registration."""
    if uses_toyworld(models, "ip"):
        return toyworld_guidance(models)
    from stages.guidance.ip_guidance import IPGuidance

    return IPGuidance.from_config(models, runtime=runtime)


def build_mvd_guidance(models: ModelsConfig, runtime: GuidanceRuntime | None = None) -> Guidance:
    """The multi-view side: ``MVDreamGuidance`` (passes bounded by ``runtime``), or the toy world's
    multi-view branch. The method's settings come with each asset's registration."""
    if uses_toyworld(models, "mvd"):
        return toyworld_guidance(models)
    from stages.guidance.mvdream_guidance import MVDreamGuidance

    return MVDreamGuidance.from_config(models, runtime=runtime)


def build_reference_sampler(models: ModelsConfig) -> Any:
    """A sampler with ``sample(prompt, seed)`` / ``sample_many(prompts, seeds)``: the diffusers
    ``ReferenceSampler`` on the configured device/dtype, or the toy world's."""
    if uses_toyworld(models, "reference"):
        from stages.toyworld import ToyWorldReferenceSampler

        return ToyWorldReferenceSampler(models.toyworld)
    from stages.models.device import resolve_device, resolve_dtype
    from stages.models.reference import ReferenceSampler

    device = resolve_device(models.device)
    return ReferenceSampler(models.reference, resolve_dtype(models.dtype, device), device, seed=models.seed)
