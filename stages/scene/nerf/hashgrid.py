"""Multi-resolution hash encoding with tiny-cuda-nn's exact parameter layout.

``TorchHashGrid`` re-implements tcnn's ``HashGrid`` (linear interpolation) in plain torch:
level l has scale s_l = base·b^l − 1 and resolution ceil(s_l) + 1; a point x ∈ [0, 1]³ maps to
p = s_l·x + 0.5, corners floor(p) + {0, 1}³, trilinear weights from frac(p). A corner indexes
its level densely (x + y·R + z·R²) when R³ fits the level's table, else by the Instant-NGP
spatial hash (x·1) ⊕ (y·2654435761) ⊕ (z·805459861) mod 2³², in both cases modulo the table
size. Tables are stored back to back in ONE flat parameter ``params`` (level-major, then
entry, then feature), like ``tcnn.Encoding.params``, so the two backends swap parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import HashGridConfig

PRIMES = (1, 2654435761, 805459861)
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class LevelLayout:
    """Where level ``level`` lives in ``params``: entries [offset, offset + size)."""

    level: int
    scale: float
    resolution: int
    offset: int
    size: int
    dense: bool


def _next_multiple(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def grid_layout(config: HashGridConfig) -> list[LevelLayout]:
    """Per-level scale, resolution and table slot, computed as tiny-cuda-nn does (float32 math)."""
    log2_scale = np.float32(math.log2(config.per_level_scale))
    hashmap_size = 1 << config.log2_hashmap_size
    levels = []
    offset = 0
    for level in range(config.n_levels):
        # tcnn: exp2f(level * log2(per_level_scale)) * base_resolution - 1.0f in float32.
        scale = float(np.exp2(np.float32(level) * log2_scale) * np.float32(config.base_resolution) - np.float32(1.0))
        resolution = int(math.ceil(scale)) + 1
        dense_size = _next_multiple(min(resolution**3, (1 << 31) - 1), 8)
        size = min(dense_size, hashmap_size)
        levels.append(LevelLayout(level, scale, resolution, offset, size, dense=resolution**3 <= size))
        offset += size
    return levels


def n_grid_params(config: HashGridConfig) -> int:
    """Length of the flat parameter vector (entries × features per level)."""
    last = grid_layout(config)[-1]
    return (last.offset + last.size) * config.n_features_per_level


def init_grid_params(config: HashGridConfig, generator: torch.Generator) -> Tensor:
    """tcnn's initialisation: uniform in [-1e-4, 1e-4]. Returns (n_grid_params,) float32."""
    return (torch.rand(n_grid_params(config), generator=generator) * 2.0 - 1.0) * 1e-4


def corner_indices(corners: Tensor, layout: LevelLayout) -> Tensor:
    """Table index of integer corners (..., 3) int64 within one level (before adding offset)."""
    if layout.dense:
        r = layout.resolution
        index = corners[..., 0] + corners[..., 1] * r + corners[..., 2] * (r * r)
    else:
        index = (corners[..., 0] * PRIMES[0]) & _MASK32
        index = index ^ ((corners[..., 1] * PRIMES[1]) & _MASK32)
        index = index ^ ((corners[..., 2] * PRIMES[2]) & _MASK32)
    return index % layout.size


class TorchHashGrid(nn.Module):
    """Pure-torch ``HashGrid``: (N, 3) in [0, 1] → (N, n_levels · F), level-major features."""

    def __init__(self, config: HashGridConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.config = config
        self.layout = grid_layout(config)
        self.n_output_dims = config.n_levels * config.n_features_per_level
        self.params = nn.Parameter(init_grid_params(config, generator))

    def forward(self, x: Tensor) -> Tensor:
        """x (N, 3) in [0, 1] → features (N, L·F) float32."""
        if self.config.checkpoint and torch.is_grad_enabled():
            return checkpoint(self._encode, x, self.params, use_reentrant=False)
        return self._encode(x, self.params)

    def _encode(self, x: Tensor, params: Tensor) -> Tensor:
        n_features = self.config.n_features_per_level
        table = params.view(-1, n_features)
        x = x.float()
        n = x.shape[0]
        # Corner c = bx + 2·by + 4·bz is built as a (2, 2, 2) block indexed [bz, by, bx]; index
        # terms and weights factor per axis, so each level costs a few (N, 8) ops only.
        index = torch.empty(n, len(self.layout), 8, dtype=torch.int64, device=x.device)
        weights = []
        for layout in self.layout:
            pos = x * layout.scale + 0.5
            grid = torch.floor(pos)
            frac = pos - grid  # differentiable in x (analytic normals)
            with torch.no_grad():
                lo = grid.long()
                both = torch.stack([lo, lo + 1], dim=1)  # (N, 2, 3): [lower, upper] per axis
                if layout.dense:
                    r = layout.resolution
                    terms = both * torch.tensor([1, r, r * r], device=x.device)
                    combined = terms[:, None, None, :, 0] + terms[:, None, :, None, 1] + terms[:, :, None, None, 2]
                    combined = combined.reshape(n, 8) % layout.size
                else:
                    # size is a power of two here, so masking each term first equals masking the XOR
                    mask = layout.size - 1
                    terms = (both * torch.tensor(PRIMES, device=x.device)) & mask
                    combined = terms[:, None, None, :, 0] ^ terms[:, None, :, None, 1] ^ terms[:, :, None, None, 2]
                    combined = combined.reshape(n, 8)
                index[:, layout.level] = combined + layout.offset
            wx, wy, wz = (torch.stack([1.0 - frac[:, d], frac[:, d]], dim=1) for d in range(3))  # (N, 2) each
            weights.append((wz[:, :, None, None] * wy[:, None, :, None] * wx[:, None, None, :]).reshape(n, 8))
        w = torch.stack(weights, dim=1)  # (N, L, 8)
        # index_select: its CPU backward (index_add) is ~10x faster than embedding's
        feats = table.index_select(0, index.reshape(-1)).view(n, len(self.layout), 8, n_features)
        out = (feats * w[..., None]).sum(dim=2)  # (N, L, F)
        return out.reshape(n, self.n_output_dims)


def tcnn_available() -> bool:
    try:
        import tinycudann  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build raising at import time
        return False
    return True


def make_tcnn_grid(config: HashGridConfig, generator: torch.Generator) -> nn.Module:
    """A ``tinycudann.Encoding`` HashGrid whose ``params`` are drawn from ``generator`` (so seeds
    mean the same on both backends). Its output is cast to float32."""
    import tinycudann as tcnn

    encoding = tcnn.Encoding(
        3,
        {
            "otype": "HashGrid",
            "n_levels": config.n_levels,
            "n_features_per_level": config.n_features_per_level,
            "log2_hashmap_size": config.log2_hashmap_size,
            "base_resolution": config.base_resolution,
            "per_level_scale": config.per_level_scale,
            "interpolation": "Linear",
        },
        dtype=torch.float32,
    )
    expected = n_grid_params(config)
    if encoding.params.numel() != expected:
        raise RuntimeError(
            f"tinycudann HashGrid has {encoding.params.numel()} parameters, the torch layout expects {expected}; "
            "this tinycudann version lays out its tables differently: use nerf.backend=torch"
        )
    with torch.no_grad():
        encoding.params.copy_(init_grid_params(config, generator).to(encoding.params.device))
    return encoding
