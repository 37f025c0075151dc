"""What every 3D representation offers the per-asset optimiser.

Conventions (threestudio / MVDream-threestudio): world is z-up; cameras are OpenGL-style
camera-to-world matrices (the camera looks along its −z axis, +y is up in the image);
renders are channels-first (B, C, H, W) with rgb in [0, 1], so they feed the guidance
protocol directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor

SHADINGS = ("albedo", "diffuse", "textureless")
"""How a render is shaded (threestudio's diffuse-with-point-light material): ``albedo`` (the
colour alone), ``diffuse`` (lambertian under a random point light), ``textureless`` (white
material under that light)."""


@dataclass
class Cameras:
    """A batch of B pinhole cameras. ``c2w`` (B, 4, 4); ``fovy`` (B,) radians.

    ``elevation`` / ``azimuth`` (degrees) and ``distance`` are what the camera sampler drew;
    they drive view-dependent prompts and MVDream's camera embedding.
    """

    c2w: Tensor
    fovy: Tensor
    elevation: Tensor
    azimuth: Tensor
    distance: Tensor

    def __len__(self) -> int:
        return int(self.c2w.shape[0])

    def to(self, device: torch.device | str) -> "Cameras":
        return replace(
            self,
            **{k: getattr(self, k).to(device) for k in ("c2w", "fovy", "elevation", "azimuth", "distance")},
        )

    def __getitem__(self, index: Any) -> "Cameras":
        return Cameras(
            c2w=self.c2w[index],
            fovy=self.fovy[index],
            elevation=self.elevation[index],
            azimuth=self.azimuth[index],
            distance=self.distance[index],
        )


RenderOutput = dict[str, Tensor]
"""Keys: ``rgb`` (B,3,H,W) in [0,1], ``opacity`` (B,1,H,W) in [0,1], ``depth`` (B,1,H,W),
optionally ``normal`` (B,3,H,W) world-space unit normals (zeros where empty)."""


@runtime_checkable
class Scene(Protocol):
    """A differentiable 3D scene θ with renders x = g(θ, c). Implementations are nn.Modules."""

    def render(self, cameras: Cameras, height: int, width: int, shading: str = "albedo") -> RenderOutput:
        """Render every camera; ``shading`` is ``albedo`` | ``diffuse`` | ``textureless``."""

    def param_groups(self, lr: dict[str, float]) -> list[dict[str, Any]]:
        """Adam parameter groups, learning rates looked up by group name in ``lr``."""

    def regularizers(self, out: RenderOutput) -> dict[str, Tensor]:
        """Named scalar regularisation terms for this render (the loop weights them)."""

    def step_pre_backward(self, step: int, out: RenderOutput) -> None:
        """Hook before ``backward`` (splat densification bookkeeping); a no-op for NeRF."""

    def step_post_backward(self, step: int, out: RenderOutput, optimizer: torch.optim.Optimizer) -> None:
        """Hook after ``backward`` and before ``optimizer.step`` (densify / prune)."""


@dataclass
class RenderChunk:
    """One part of a planned render, recomputed with autograd by deferred back-propagation.

    Chunks of a plan partition the render's pixels in their flat (B, H, W) order: this one
    holds pixels [``start``, ``stop``). ``maps`` gives, for each of the plan's ``map_keys``,
    those pixels' values as rows (stop − start, C); ``sums`` gives, for each of its
    ``sum_keys``, the chunk's share of an additive scalar (the full render's value is the sum
    over chunks)."""

    start: int
    stop: int
    maps: dict[str, Tensor]
    sums: dict[str, Tensor] = field(default_factory=dict)


@runtime_checkable
class RenderPlan(Protocol):
    """Everything random or state-dependent of one render, drawn once (see :class:`DeferredScene`)."""

    map_keys: tuple[str, ...]
    """Per-pixel outputs (B, C, H, W) that the chunks recompute."""
    sum_keys: tuple[str, ...]
    """Scalar outputs that are sums over chunks."""


@runtime_checkable
class DeferredScene(Protocol):
    """A scene whose render can be split for deferred back-propagation: render once without
    autograd, then recompute it chunk by chunk with autograd and back-propagate each chunk's
    share of the image gradient at once, so the peak graph is one chunk's. Both passes read the
    same plan, so they compute the same function (same random draws, same samples)."""

    def plan_render(self, cameras: Cameras, height: int, width: int, shading: str = "albedo") -> RenderPlan:
        """Draw the render's randomness (and fix what depends on mutable state) once."""

    def render_planned(self, plan: RenderPlan) -> RenderOutput:
        """The whole render of ``plan`` (what :meth:`Scene.render` returns for it)."""

    def render_chunks(self, plan: RenderPlan, out: RenderOutput, step: int) -> Iterator[RenderChunk]:
        """The render again, chunk by chunk, with autograd; the caller back-propagates each chunk
        before asking for the next. ``out`` is the plan's first render and ``step`` the
        optimiser step: a scene may run per-chunk hooks and complete ``out`` when the last chunk
        is done (gsplat's screen-space gradients, for ``step_post_backward``)."""


def image_rows(image: Tensor) -> Tensor:
    """(B, C, H, W) → (B·H·W, C): pixels in flat (B, H, W) order, as :class:`RenderChunk` rows."""
    return image.permute(0, 2, 3, 1).reshape(-1, image.shape[1])


def rows_image(rows: Tensor, batch: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`image_rows`: (B·H·W, C) → (B, C, H, W)."""
    return rows.reshape(batch, height, width, rows.shape[-1]).permute(0, 3, 1, 2)


def grid_points(radius: float, resolution: int, device: torch.device | str = "cpu") -> Tensor:
    """Vertices of a regular grid over [-r, r]³ (endpoints included), (R, R, R, 3), ``ij`` order:
    entry [i, j, k] is the point (x_i, y_j, z_k). Mesh export samples density fields here."""
    axis = torch.linspace(-radius, radius, resolution, device=device)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)
