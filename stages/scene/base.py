"""What every 3D representation offers the per-asset optimiser.

Conventions (threestudio / MVDream-threestudio): world is z-up; cameras are OpenGL-style
camera-to-world matrices (the camera looks along its −z axis, +y is up in the image);
renders are channels-first (B, C, H, W) with rgb in [0, 1], so they feed the guidance
protocol directly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


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


def grid_points(radius: float, resolution: int, device: torch.device | str = "cpu") -> Tensor:
    """Vertices of a regular grid over [-r, r]³ (endpoints included), (R, R, R, 3), ``ij`` order:
    entry [i, j, k] is the point (x_i, y_j, z_k). Mesh export samples density fields here."""
    axis = torch.linspace(-radius, radius, resolution, device=device)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)
