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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
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


LEVELS_PER_SCATTER = 4
"""Levels whose table gradients are scattered at once in the hash grid's backward."""


class HashGridLookup(torch.autograd.Function):
    """Σ_corners w · table[row] for all levels at once, differentiable in the table only.

    ``rows`` / ``weights`` are level-major (L, N, 8): each level's gathers and scatters then
    stay inside that level's table (cache-friendly; mixing levels made the CPU backward 3×
    slower). The forward is one ``embedding_bag`` (weighted sum per point and level, no
    (L, N, 8, F) temporary); the backward needs just the rows and weights (saved as int32 +
    float32: 8 bytes per corner and level, against 20 for autograd's index_select + mul) and
    scatters with ``index_add`` a group of levels at a time (int64 indices: int32 ones take a
    5× slower CPU path), so its temporaries stay a fraction of the saved tensors. Used when the
    points need no gradient (every render; analytic normals take the plain autograd path)."""

    @staticmethod
    def forward(ctx: Any, table: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
        levels, n, corners = weights.shape
        ctx.save_for_backward(rows, weights)
        ctx.table_shape = table.shape
        out = F.embedding_bag(
            rows.reshape(-1, corners), table, per_sample_weights=weights.reshape(-1, corners), mode="sum"
        )
        return out.view(levels, n, table.shape[1])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        rows, weights = ctx.saved_tensors
        grad_table = None
        if ctx.needs_input_grad[0]:
            grad_table = grad_out.new_zeros(ctx.table_shape)
            step = LEVELS_PER_SCATTER
            for lo in range(0, rows.shape[0], step):
                source = weights[lo : lo + step, :, :, None] * grad_out[lo : lo + step, :, None, :]
                grad_table.index_add_(0, rows[lo : lo + step].reshape(-1).long(), source.reshape(-1, grad_out.shape[-1]))
        return grad_table, None, None


class TorchHashGrid(nn.Module):
    """Pure-torch ``HashGrid``: (N, 3) in [0, 1] → (N, n_levels · F), level-major features.

    All levels are evaluated at once (a handful of (L, N, 8) tensor ops, whatever the number of
    levels): per-axis corner terms, combined into dense or hashed table rows per level."""

    def __init__(self, config: HashGridConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.config = config
        self.layout = grid_layout(config)
        self.n_output_dims = config.n_levels * config.n_features_per_level
        self.params = nn.Parameter(init_grid_params(config, generator))
        levels = self.layout

        def per_level(values: list[Any], dtype: torch.dtype, *trailing: int) -> Tensor:
            return torch.tensor(values, dtype=dtype).reshape(len(levels), *trailing)

        self.register_buffer("scales", per_level([lv.scale for lv in levels], torch.float32, 1, 1), persistent=False)
        # per axis: [1, R, R²] for dense levels and 0 for hashed ones; the hash masks the other way round
        strides = [[1, lv.resolution, lv.resolution**2] if lv.dense else [0, 0, 0] for lv in levels]
        self.register_buffer("dense_strides", per_level(strides, torch.int32, 1, 1, 3), persistent=False)
        masks = [0 if lv.dense else lv.size - 1 for lv in levels]  # hashed tables are powers of two
        self.register_buffer("hash_masks", per_level(masks, torch.int64, 1, 1, 1), persistent=False)
        self.register_buffer("primes", torch.tensor(PRIMES, dtype=torch.int64), persistent=False)
        self.register_buffer("sizes", per_level([lv.size for lv in levels], torch.int32, 1, 1, 1, 1), persistent=False)
        self.register_buffer("offsets", per_level([lv.offset for lv in levels], torch.int32, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, 3) in [0, 1] → features (N, L·F) float32."""
        if self.config.checkpoint and torch.is_grad_enabled():
            return checkpoint(self._encode, x, self.params, use_reentrant=False)
        return self._encode(x, self.params)

    def corners(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Table rows (L, N, 8) int32 and trilinear weights (L, N, 8) of the 8 corners around
        each point at every level; corner c = bx + 2·by + 4·bz. Weights are differentiable in x.

        Per axis, a dense level contributes coordinate × stride and a hashed level
        (coordinate × prime) mod table size, the other kind's term being 0 (zero strides /
        masks); a corner's row is then (Σ dense terms mod size) + (⊕ hashed terms) + offset, in
        int32 (every term is below 2³¹), so all levels share one set of ops. Temporaries are
        freed as soon as used: this runs on the largest tensors of a render."""
        pos = x.float()[None] * self.scales + 0.5  # (L, N, 3)
        with torch.no_grad():
            lower = torch.floor(pos)
        frac = pos - lower
        del pos
        with torch.no_grad():
            lo = lower.int()
            del lower
            both = torch.stack([lo, lo + 1], dim=2)  # (L, N, 2, 3): [lower, upper] per axis
            del lo
            dense = both * self.dense_strides
            hashed = ((both.long() * self.primes) & self.hash_masks).int()
            del both
            rows = dense[..., None, None, :, 0] + dense[..., None, :, None, 1]
            rows = rows + dense[..., :, None, None, 2]
            del dense
            rows.remainder_(self.sizes)
            xored = hashed[..., None, None, :, 0] ^ hashed[..., None, :, None, 1]
            rows.add_(xored ^ hashed[..., :, None, None, 2])
            del xored, hashed
            rows = rows.flatten(2).add_(self.offsets)
        w = torch.stack([1.0 - frac, frac], dim=2)  # (L, N, 2, 3)
        del frac
        weights = (w[..., None, None, :, 0] * w[..., None, :, None, 1]) * w[..., :, None, None, 2]
        return rows, weights.flatten(2)

    def _encode(self, x: Tensor, params: Tensor) -> Tensor:
        table = params.view(-1, self.config.n_features_per_level)
        n = x.shape[0]
        rows, weights = self.corners(x)
        if x.requires_grad and torch.is_grad_enabled():  # analytic normals: differentiable in x
            feats = table.index_select(0, rows.reshape(-1)).view(len(self.layout), n, 8, -1)
            out = (feats * weights[..., None]).sum(dim=2)
        else:
            out = HashGridLookup.apply(table, rows, weights.detach())
        return out.transpose(0, 1).reshape(n, self.n_output_dims)


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
