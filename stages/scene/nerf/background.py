"""Backgrounds: a neural environment map (MLP on SH-encoded view direction) or a solid colour,
both with MVDream-threestudio's ``random_aug`` (a random solid colour with probability p while
training)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import BackgroundConfig
from .field import make_mlp


def sh_encode(dirs: Tensor, degree: int) -> Tensor:
    """Real spherical harmonics of unit directions (N, 3) → (N, degree²), tiny-cuda-nn's
    ``SphericalHarmonics`` convention (bands 0..degree−1, same signs and order)."""
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, 0.28209479177387814)]
    if degree > 1:
        out += [-0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x]
    if degree > 2:
        xy, xz, yz, x2, y2, z2 = x * y, x * z, y * z, x * x, y * y, z * z
        out += [
            1.0925484305920792 * xy,
            -1.0925484305920792 * yz,
            0.94617469575755997 * z2 - 0.31539156525251999,
            -1.0925484305920792 * xz,
            0.54627421529603959 * (x2 - y2),
        ]
    if degree > 3:
        out += [
            0.59004358992664352 * y * (-3.0 * x2 + y2),
            2.8906114426405538 * xy * z,
            0.45704579946446572 * y * (1.0 - 5.0 * z2),
            0.3731763325901154 * z * (5.0 * z2 - 3.0),
            0.45704579946446572 * x * (1.0 - 5.0 * z2),
            1.4453057213202769 * z * (x2 - y2),
            0.59004358992664352 * x * (-x2 + 3.0 * y2),
        ]
    return torch.stack(out, dim=-1)


class Background(nn.Module):
    """Colour (B, H, W, 3) in [0, 1] for unit view directions (B, H, W, 3)."""

    def __init__(self, config: BackgroundConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.config = config
        self.network: nn.Module | None = None
        if config.kind == "neural":
            self.network = make_mlp(config.sh_degree**2, 3, config.n_neurons, config.n_hidden_layers, generator)
        else:
            color = torch.tensor(config.color, dtype=torch.float32)
            if config.learned:
                self.color = nn.Parameter(color)
            else:
                self.register_buffer("color", color)

    def draw_augmentation(self, n_views: int, generator: torch.Generator) -> Tensor | None:
        """``random_aug`` of one training render, drawn on ``generator`` (a CPU generator: a
        host-side decision, no device sync): with probability ``random_aug_prob`` random colours
        (1 or ``n_views``, 3), else None (and always None when ``random_aug`` is off)."""
        c = self.config
        if not (self.training and c.random_aug):
            return None
        draw = torch.rand(1 + 3 * n_views, generator=generator)
        if float(draw[0]) >= c.random_aug_prob:
            return None
        n_colors = 1 if c.share_aug_bg else n_views
        return draw[1 : 1 + 3 * n_colors].reshape(n_colors, 3)

    def forward(self, dirs: Tensor, replacement: Tensor | None = None) -> Tensor:
        """Colours (..., 3) for unit directions (..., 3); ``replacement`` (broadcastable to
        them, from :meth:`draw_augmentation`) replaces the colour of a training render."""
        if self.network is not None:
            flat = dirs.reshape(-1, 3)
            color = torch.sigmoid(self.network(sh_encode(flat, self.config.sh_degree))).reshape(dirs.shape)
        else:
            color = self.color.to(dirs).expand(dirs.shape)
        if replacement is not None:
            # `color * 0 +` keeps the parameters in the graph (threestudio does the same)
            color = color * 0.0 + replacement.to(dirs).expand(dirs.shape)
        return color
