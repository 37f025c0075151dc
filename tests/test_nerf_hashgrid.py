"""Hash grid: torch backend vs an independent per-point Instant-NGP formula, and vs tinycudann."""

import math

import numpy as np
import pytest
import torch

from stages.scene.nerf import HashGridConfig, NeRFConfig
from stages.scene.nerf.hashgrid import TorchHashGrid


def naive_hashgrid(x: np.ndarray, table: np.ndarray, cfg: HashGridConfig) -> np.ndarray:
    """Instant-NGP / tiny-cuda-nn HashGrid for ONE point x in [0,1]^3, written per corner."""
    f32 = np.float32
    n_feat = cfg.n_features_per_level
    out = []
    offset = 0
    for level in range(cfg.n_levels):
        scale = f32(np.exp2(f32(level) * f32(math.log2(cfg.per_level_scale)))) * f32(cfg.base_resolution) - f32(1)
        res = int(math.ceil(scale)) + 1
        size = min(-(-(res**3) // 8) * 8, 2**cfg.log2_hashmap_size)
        pos = [f32(scale) * f32(v) + f32(0.5) for v in x]
        base = [math.floor(p) for p in pos]
        frac = [float(p - b) for p, b in zip(pos, base)]
        feat = np.zeros(n_feat)
        for corner in range(8):
            c = [base[d] + ((corner >> d) & 1) for d in range(3)]
            w = 1.0
            for d in range(3):
                w *= frac[d] if (corner >> d) & 1 else 1.0 - frac[d]
            if res**3 <= size:
                idx = c[0] + c[1] * res + c[2] * res * res
            else:
                idx = ((c[0] * 1) ^ (c[1] * 2654435761) ^ (c[2] * 805459861)) & 0xFFFFFFFF
            idx %= size
            feat += w * table[offset + idx]
        out.append(feat)
        offset += size
    return np.concatenate(out)


@pytest.mark.parametrize(
    "cfg",
    [
        HashGridConfig(
            n_levels=4, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0
        ),
        NeRFConfig.tiny().hash_grid,
    ],
)
def test_torch_hashgrid_matches_naive_formula(cfg):
    grid = TorchHashGrid(cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():  # O(1) values so that every entry matters
        grid.params.copy_(torch.randn(grid.params.shape, generator=torch.Generator().manual_seed(1)))
    pts = torch.rand(24, 3, generator=torch.Generator().manual_seed(2))
    pts[0] = 0.0
    pts[1] = 1.0
    pts[2] = torch.tensor([0.0, 0.5, 1.0])
    got = grid(pts).detach().numpy()
    table = grid.params.detach().numpy().reshape(-1, cfg.n_features_per_level)
    want = np.stack([naive_hashgrid(p, table, cfg) for p in pts.numpy()])
    assert got.shape == (24, cfg.n_levels * cfg.n_features_per_level)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_hashgrid_gradient_reaches_only_touched_entries():
    cfg = HashGridConfig(
        n_levels=2, n_features_per_level=2, log2_hashmap_size=6, base_resolution=4, per_level_scale=2.0
    )
    grid = TorchHashGrid(cfg, torch.Generator().manual_seed(0))
    grid(torch.tensor([[0.3, 0.6, 0.2]])).sum().backward()
    touched = (grid.params.grad.view(-1, 2).abs().sum(-1) > 0).sum().item()
    assert touched == 16  # 8 corners on each of 2 levels, all distinct
    # trilinear weights of one point sum to 1 per level and feature
    assert grid.params.grad.sum().item() == pytest.approx(2 * 2 * 1.0, rel=1e-5)


@pytest.mark.gpu
def test_tcnn_and_torch_backends_agree():
    pytest.importorskip("tinycudann")
    from stages.scene.nerf.hashgrid import make_tcnn_grid

    cfg = NeRFConfig().hash_grid
    tcnn_grid = make_tcnn_grid(cfg, torch.Generator().manual_seed(0))
    torch_grid = TorchHashGrid(cfg, torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        torch_grid.params.copy_(tcnn_grid.params)
    assert torch.equal(torch_grid.params, tcnn_grid.params)  # same seed, same init
    with torch.no_grad():
        values = torch.randn(tcnn_grid.params.shape, generator=torch.Generator().manual_seed(1)).cuda()
        tcnn_grid.params.copy_(values)
        torch_grid.params.copy_(values)
    x = torch.rand(4096, 3, generator=torch.Generator().manual_seed(2)).cuda()
    torch.testing.assert_close(tcnn_grid(x).float(), torch_grid(x), atol=1e-3, rtol=1e-3)


def test_checkpointed_grid_gives_the_same_values_and_gradients():
    cfg = NeRFConfig.tiny().hash_grid
    plain = TorchHashGrid(cfg, torch.Generator().manual_seed(0))
    cfg_ckpt = HashGridConfig(**{**cfg.__dict__, "checkpoint": True})
    ckpt = TorchHashGrid(cfg_ckpt, torch.Generator().manual_seed(0))
    x = torch.rand(64, 3, generator=torch.Generator().manual_seed(1))
    target = torch.randn(64, cfg.n_levels * cfg.n_features_per_level, generator=torch.Generator().manual_seed(2))
    for grid in (plain, ckpt):
        (grid(x) * target).sum().backward()
    torch.testing.assert_close(ckpt.params.grad, plain.params.grad)
