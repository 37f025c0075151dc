"""Eval-mode renders of a scene from a set of cameras: what previews, exports, evaluation and the
toy world's fidelity scores look at."""

from __future__ import annotations

import torch
from torch import Tensor

from stages.scene.base import Cameras


def render_views(scene: torch.nn.Module, cameras: Cameras, resolution: int, chunk: int = 8, shading: str = "albedo") -> dict[str, Tensor]:
    """Eval-mode renders of ``cameras`` in chunks, no grad, on the CPU: rgb / opacity (V, C, R, R)."""
    device = next(iter(scene.parameters())).device
    was_training = scene.training
    scene.eval()
    outputs: dict[str, list[Tensor]] = {"rgb": [], "opacity": []}
    try:
        with torch.no_grad():
            for start in range(0, len(cameras), chunk):
                out = scene.render(cameras[start : start + chunk].to(device), resolution, resolution, shading=shading)
                for key in outputs:
                    outputs[key].append(out[key].detach().float().cpu())
    finally:
        scene.train(was_training)
    return {k: torch.cat(v).clamp(0, 1) for k, v in outputs.items()}
