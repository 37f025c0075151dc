"""Reference images of a toy world: one of the prompt's objects, drawn by the seed, from the front.

A real text-to-image sampler at CFG 7.5 draws diverse images of a prompt; in the toy world that
is a draw from the prompt's text prior π_k ∝ ρ^k (``model.weight_ratio``), so the dominant
object is the most likely reference but every object can be one. The draw is a CPU
``torch.Generator`` seeded by the call's seed alone, so the same (prompt, seed) gives the same
image alone or inside :meth:`ToyWorldReferenceSampler.sample_many`. The image is the object
rendered from the world's reference camera (``reference:`` in the world file; by default the
project's turntable camera at azimuth 0) at ``reference.resolution``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from stages.toyworld.guidance import reference_camera
from stages.toyworld.render import render_objects
from stages.toyworld.world import World, load_world

REFERENCE_SUPERSAMPLE = 4
"""Rays per pixel side of a reference image (smooth edges; it is rendered once per asset)."""


class ToyWorldReferenceSampler:
    """``sample(prompt, seed)`` / ``sample_many(prompts, seeds)`` → PIL images (the
    :class:`stages.models.reference.ReferenceSampler` interface; sampler arguments such as
    ``num_inference_steps`` are accepted and ignored)."""

    def __init__(self, world: World | str | Path = "default") -> None:
        self.world = world if isinstance(world, World) else load_world(world)

    def object_index(self, prompt: str, seed: int) -> int:
        """The prompt's object the reference of ``seed`` shows (a draw from π)."""
        self.world.check_prompt(prompt)
        weights = self.world.log_weights(prompt).exp()
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        return int(torch.multinomial(weights, 1, generator=generator))

    def render(self, prompt: str, index: int) -> Image.Image:
        """Object ``index`` of ``prompt`` from the reference camera, as a PIL RGB image."""
        size = self.world.reference.resolution
        c2w, fovy = reference_camera(self.world)
        table = self.world.prompt_table(prompt).select(torch.tensor([index]))
        rgb = render_objects(table, c2w, fovy, size, size, self.world.shading, REFERENCE_SUPERSAMPLE).rgb[0, 0]
        array = (rgb.permute(1, 2, 0).clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(array, mode="RGB")

    def sample(self, prompt: str, seed: int, **_: Any) -> Image.Image:
        return self.render(prompt, self.object_index(prompt, seed))

    def sample_many(self, prompts: Sequence[str], seeds: Sequence[int], **_: Any) -> list[Image.Image]:
        if len(prompts) != len(seeds):
            raise ValueError(f"sample_many: {len(prompts)} prompts but {len(seeds)} seeds")
        return [self.sample(prompt, seed) for prompt, seed in zip(prompts, seeds)]
