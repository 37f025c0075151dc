"""A tiny committed dataset made by the real per-asset code (loop, export, dataset writer).

Each asset: ``optimize_asset`` for a few iterations of the tiny NeRF against an image-target
guidance (no diffusion model), ``export_asset`` with small exports, ``asset.json`` + commit +
a manifest shard through :class:`pipeline.writer.DatasetWriter`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from pipeline.integrity import file_checksums
from pipeline.jobs import Job
from stages.optimize.identity import asset_id_for
from pipeline.manifest import ManifestRow, utc_now
from pipeline.writer import DatasetWriter
from stages.asset_layout import ASSET_RECORD
from stages.export import export_asset
from stages.guidance.image_target import ImageTargetGuidance, SphereTarget
from stages.guidance.set import GuidanceSet
from stages.optimize.config import OptimizeConfig
from stages.optimize.loop import optimize_asset


# A pipeline YAML whose method is as cheap as tiny_method(); replace ITERATIONS before use.
TINY_PIPELINE_YAML = """
prompts:
  inline: [a red ball]
method_preset: tiny
models: {sd: tiny, ip_adapter: tiny, image_encoder: tiny, mvdream: tiny, mvdream_text: tiny, reference: tiny}
method:
  loss: mvdream
  iterations: ITERATIONS
  checkpoint_every: 0
  schedule: {milestones: [0.5], resolutions: [16, 16], batch_sizes: [4, 4]}
  export: {preview_resolution: 16, turntable_frames: 1, turntable_resolution: 16, video_format: gif, mesh: false}
  nerf:
    hash_grid: {n_levels: 4, log2_hashmap_size: 10}
    renderer: {grid_resolution: 8, num_samples_per_ray: 12}
"""


def tiny_method(iterations: int = 1) -> OptimizeConfig:
    """Tinier-than-tiny NeRF, MVDream-only loss (one guidance), 16² renders, minimal exports."""
    from stages.optimize.schedules import ScheduleConfig

    cfg = OptimizeConfig.tiny("nerf")
    cfg.loss = "mvdream"
    cfg.iterations = iterations
    cfg.checkpoint_every = 0
    cfg.schedule = ScheduleConfig(milestones=[0.5], resolutions=[16, 16], batch_sizes=[4, 4])
    cfg.export.preview_resolution = 16
    cfg.export.turntable_frames = 1
    cfg.export.turntable_resolution = 16
    cfg.export.video_format = "gif"
    cfg.export.mesh = False
    # smaller than the tiny NeRF preset: the occupancy-grid update dominates on CPU
    cfg.nerf.hash_grid.n_levels = 4
    cfg.nerf.hash_grid.log2_hashmap_size = 10
    cfg.nerf.renderer.grid_resolution = 8
    cfg.nerf.renderer.num_samples_per_ray = 12
    return cfg


def make_asset_scene(method: OptimizeConfig, seed: int, work: Path, prompt: str, asset_id: str, radius: float):
    """Run the real loop briefly; different ``seed``/``radius`` give different scenes."""
    guidance = ImageTargetGuidance(SphereTarget(radius=radius))
    result = optimize_asset(method, GuidanceSet(mvd=guidance), None, seed, work, prompt, asset_id)
    return result


def commit_asset(writer: DatasetWriter, method: OptimizeConfig, job: Job, scene, iterations: int) -> dict:
    """Export ``scene`` as ``job``'s asset and commit it; returns its manifest row."""
    staged = writer.staging_dir(job.asset_id)
    files = export_asset(scene, staged, method)
    started = utc_now()
    row = ManifestRow.for_job(
        job, method, status="succeeded", files=files, iterations=iterations, duration_s=0.0, started_at=started, finished_at=utc_now()
    ).to_dict()
    (staged / ASSET_RECORD).write_text(json.dumps({**row, "checksums": file_checksums(staged)}))  # as run_asset writes it
    assert writer.commit(job.asset_id, staged)
    return row


def build_dataset(root: Path, assets: Sequence[tuple[str, int, int, float]], method: OptimizeConfig, digest: str = "tinydigest01") -> list[dict]:
    """``assets``: (prompt, variant, seed, target radius); an identical (seed, radius) reuses the
    same optimised scene, so two such variants are identical assets. Returns manifest rows."""
    writer = DatasetWriter(str(root))
    prompts = list(dict.fromkeys(a[0] for a in assets))
    scenes: dict[tuple[int, float], object] = {}
    rows = []
    for prompt, variant, seed, radius in assets:
        job = Job(
            asset_id=asset_id_for(prompt, variant, digest),
            prompt=prompt,
            prompt_index=prompts.index(prompt),
            variant=variant,
            reference_seed=seed,
            seed=seed,
            config_digest=digest,
        )
        if (seed, radius) not in scenes:
            result = make_asset_scene(method, seed, root / ".work" / job.asset_id, prompt, job.asset_id, radius)
            scenes[(seed, radius)] = result.scene
        rows.append(commit_asset(writer, method, job, scenes[(seed, radius)], method.iterations))
    writer.write_manifest(rows)
    return rows
