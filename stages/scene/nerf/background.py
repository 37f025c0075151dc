"""Backgrounds: a neural environment map (MLP on SH-encoded view direction) or a solid colour,
both with MVDream-threestudio's ``random_aug`` (a random solid colour with probability p while
training)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import BackgroundConfig
from .field import make_mlp


AXES = "xyz"
MONOMIALS = ("1", *AXES, *(a + b for a in AXES for b in AXES), *(a + b + c for a in AXES for b in AXES for c in AXES))
"""Products of a direction's coordinates up to degree 3, in the order :func:`monomials` builds
them (every ordered product, so that they come from two broadcast multiplications)."""

_SH_TERMS: tuple[dict[str, float], ...] = (
    {"1": 0.28209479177387814},
    {"y": -0.48860251190291987}, {"z": 0.48860251190291987}, {"x": -0.48860251190291987},
    {"xy": 1.0925484305920792}, {"yz": -1.0925484305920792},
    {"zz": 0.94617469575755997, "1": -0.31539156525251999},
    {"xz": -1.0925484305920792}, {"xx": 0.54627421529603959, "yy": -0.54627421529603959},
    {"xxy": -1.77013076977993056, "yyy": 0.59004358992664352},
    {"xyz": 2.8906114426405538},
    {"y": 0.45704579946446572, "yzz": -2.2852289973223286},
    {"zzz": 1.865881662950577, "z": -1.1195289977703462},
    {"x": 0.45704579946446572, "xzz": -2.2852289973223286},
    {"xxz": 1.4453057213202769, "yyz": -1.4453057213202769},
    {"xxx": -0.59004358992664352, "xyy": 1.77013076977993056},
)
"""tiny-cuda-nn's real spherical harmonics (bands 0..3) as polynomials in the monomials."""



def sh_matrix(degree: int) -> Tensor:
    """(monomials, degree²) float64: :func:`monomials` @ this = the SH features (each product
    enters once, through its first ordered spelling)."""
    n_monomials = 13 if degree <= 3 else len(MONOMIALS)
    matrix = torch.zeros(n_monomials, degree * degree, dtype=torch.float64)
    first = {}
    for index, name in enumerate(MONOMIALS[:n_monomials]):
        first.setdefault("".join(sorted(name)), index)
    for column, terms in enumerate(_SH_TERMS[: degree * degree]):
        for name, value in terms.items():
            matrix[first["".join(sorted(name))], column] = value
    return matrix


def monomials(dirs: Tensor, cubic: bool) -> Tensor:
    """(N, 13) or (N, 40) products of directions (N, 3), in ``MONOMIALS`` order."""
    outer = dirs[:, :, None] * dirs[:, None, :]  # (N, 3, 3)
    parts = [torch.ones_like(dirs[:, :1]), dirs, outer.flatten(1)]
    if cubic:
        parts.append((outer[:, :, :, None] * dirs[:, None, None, :]).flatten(1))
    return torch.cat(parts, dim=1)


def sh_encode(dirs: Tensor, degree: int, matrix: Tensor | None = None) -> Tensor:
    """Real spherical harmonics of unit directions (N, 3) → (N, degree²), tiny-cuda-nn's
    ``SphericalHarmonics`` convention (bands 0..degree−1, same signs and order): one matrix
    product of the direction's monomials (a few ops per call, whatever the degree)."""
    if matrix is None:
        matrix = sh_matrix(degree)
    return monomials(dirs, cubic=degree > 3) @ matrix.to(dirs)


class Background(nn.Module):
    """Colour (B, H, W, 3) in [0, 1] for unit view directions (B, H, W, 3)."""

    def __init__(self, config: BackgroundConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.config = config
        self.network: nn.Module | None = None
        if config.kind == "neural":
            self.network = make_mlp(config.sh_degree**2, 3, config.n_neurons, config.n_hidden_layers, generator)
            self.register_buffer("sh", sh_matrix(config.sh_degree).float(), persistent=False)
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
            color = torch.sigmoid(self.network(sh_encode(flat, self.config.sh_degree, self.sh))).reshape(dirs.shape)
        else:
            color = self.color.to(dirs).expand(dirs.shape)
        if replacement is not None:
            # `color * 0 +` keeps the parameters in the graph (threestudio does the same)
            color = color * 0.0 + replacement.to(dirs).expand(dirs.shape)
        return color
