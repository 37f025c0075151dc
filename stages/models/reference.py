"""Reference images: any diffusers text-to-image pipeline with a seed per call.

``ReferenceSampler("tiny")`` builds a ``StableDiffusionPipeline`` from the tiny SD parts
(:func:`stages.models.sd.build_tiny_sd`); a hub id or a diffusers directory loads with
``AutoPipelineForText2Image`` (SD1.5 by default, SDXL, ... whatever the directory holds);
a single checkpoint file loads with ``StableDiffusionPipeline.from_single_file``.

Each image gets its own CPU ``torch.Generator`` seeded from the call's seed, so the same
(prompt, seed) gives the same image whether it is sampled alone or inside ``sample_many``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import AutoPipelineForText2Image, DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline
from PIL import Image

from stages.models.sd import SDComponents, build_tiny_sd, load_pipeline, place
from stages.models.sources import ModelSource, resolve_source


class ReferenceSampler:
    """Text-to-image sampler for reference images (``models.reference``).

    ``sample(prompt, seed)`` → one PIL image; ``sample_many(prompts, seeds)`` → the same images
    in one batched pipeline call. ``height``/``width`` default to the pipeline's native size
    (512 for SD1.5, 64 for ``tiny``).
    """

    def __init__(
        self,
        source: str | ModelSource = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        key: str = "models.reference",
    ) -> None:
        src = source if isinstance(source, ModelSource) else resolve_source(source, key)
        self.source = src
        self.device = torch.device(device)
        self.pipeline = _build_pipeline(src, dtype, seed)
        self.pipeline.to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)

    def sample(
        self,
        prompt: str,
        seed: int,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str = "",
    ) -> Image.Image:
        """One image for ``prompt`` drawn with ``seed`` (same seed → same image)."""
        return self.sample_many([prompt], [seed], num_inference_steps, guidance_scale, height, width, negative_prompt)[0]

    def sample_many(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str = "",
    ) -> list[Image.Image]:
        """One image per (prompt, seed) in one pipeline call; equal to sampling them one by one
        (up to floating-point reduction order)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"sample_many: {len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            return []
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        kwargs: dict[str, Any] = {}
        if negative_prompt:
            kwargs["negative_prompt"] = [negative_prompt] * len(prompts)
        with torch.no_grad():
            result = self.pipeline(
                prompt=list(prompts),
                generator=generators,
                num_inference_steps=int(num_inference_steps),
                guidance_scale=float(guidance_scale),
                height=height,
                width=width,
                output_type="pil",
                **kwargs,
            )
        return list(result.images)


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` from the tiny SD parts (DDIM sampler, no safety checker)."""
    parts = build_tiny_sd(seed)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        place(module, "cpu", torch.float32)
    return pipeline_of(parts)


def pipeline_of(parts: SDComponents) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` over built SD parts (DDIM sampler, no safety checker)."""
    return StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )



def _build_pipeline(src: ModelSource, dtype: torch.dtype, seed: int) -> DiffusionPipeline:
    if src.kind == "tiny":
        pipeline = tiny_pipeline(seed)  # built in float32; diffusers warns on every dtype cast
        return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)
    return load_pipeline(src, dtype, AutoPipelineForText2Image, "text-to-image")
