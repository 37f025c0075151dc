"""Toy-world fidelity in evaluation: a toy-world dataset (its models are ``toyworld``:
``stages/toyworld``) is also scored against its prompts' known objects (``toy_*`` columns:
identity, recovered, novel-view PSNR to the reference's object, consistency across views, mesh
IoU; and distinct objects per prompt), see docs/TOYWORLD.md "Scores"."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline.config import ConfigError
from stages.asset_layout import METHOD_FILE, REFERENCE_FILE
from stages.evaluate.render import AssetViewsError

TOY_SUMMARY = ("toy_recovered", "toy_psnr_reference", "toy_consistency", "toy_iou", "toy_distinct")
"""The toy-world rows of the summary (:func:`pipeline.evaluate.report.summarise`)."""


def toyworld_of(config: Any, pipeline_config: Any | None) -> Any | None:
    """The toy world to score against (the evaluation config's ``toyworld`` key; ``auto``: the
    world of ``pipeline_config``, the dataset's config, when its models are the toy world), or None."""
    from stages.toyworld.world import WorldError, load_world

    if config.toyworld == "none":
        return None
    source = config.toyworld
    if source == "auto":
        if pipeline_config is None:
            return None
        from pipeline.toyworld import toyworld_groups

        if not toyworld_groups(pipeline_config):
            return None
        source = pipeline_config.models.toyworld
    try:
        return load_world(source)
    except WorldError as error:
        raise ConfigError(f"config key 'toyworld': {error}") from None


def toy_scores(asset_dir: Path, prompt: str, method: Any | None, world: Any, device: torch.device) -> dict[str, float]:
    """:meth:`~stages.toyworld.fidelity.Fidelity.metrics` of one asset (its ``method.yaml`` wins
    over ``method``); raises :class:`AssetViewsError` naming what is missing."""
    from stages.evaluate.render import load_asset_scene, read_method_config
    from stages.toyworld.fidelity import score_scene

    method = read_method_config(asset_dir) or method
    if method is None:
        raise AssetViewsError(f"{asset_dir}: toy-world scores need the asset's method config ({METHOD_FILE} or dataset_config)")
    if prompt not in world.prompts:
        raise AssetViewsError(f"{asset_dir}: {world.unknown(prompt)}")
    scene = load_asset_scene(asset_dir, method, device)
    reference = asset_dir / REFERENCE_FILE
    threshold = method.export.mesh_threshold
    fidelity = score_scene(
        scene, world, prompt, reference if reference.is_file() else None,
        mesh_resolution=method.export.mesh_resolution,
        mesh_threshold=threshold if threshold == "auto" else float(threshold),
        distance=method.cameras.eval_distance, fovy=method.cameras.eval_fovy,
    )
    return fidelity.metrics()


def toy_diversity(scores: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Distinct toy-world objects recovered per (prompt, config digest): the number of different
    identities among the variants (and of different references, for comparison)."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in scores:
        if row.get("toy_identity") is not None:
            grouped.setdefault((row["prompt"], row["config_digest"]), []).append(row)
    return [
        {
            "prompt": prompt, "config_digest": digest, "variants": len(rows),
            "distinct": len({int(r["toy_identity"]) for r in rows}),
            "distinct_references": len({int(r["toy_reference"]) for r in rows if _finite(r.get("toy_reference"))}),
        }
        for (prompt, digest), rows in sorted(grouped.items())
    ]


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)
