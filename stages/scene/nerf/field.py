"""The implicit volume: hash-grid features → density (with blob bias) and albedo (sigmoid)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import NeRFConfig
from .hashgrid import TorchHashGrid, make_tcnn_grid, tcnn_available


def make_mlp(n_in: int, n_out: int, n_neurons: int, n_hidden_layers: int, generator: torch.Generator) -> nn.Sequential:
    """threestudio ``VanillaMLP``: bias-free Linear + ReLU layers, no output activation.
    Weights get PyTorch's default Linear init, drawn from ``generator``."""
    dims = [n_in] + [n_neurons] * n_hidden_layers + [n_out]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        linear = nn.Linear(a, b, bias=False)
        nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
        layers.append(linear)
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


MIN_COMPILE_BUCKET = 1 << 10


def compile_bucket(n: int) -> int:
    """Padded size of a compiled field query of n points: the next power of two, ≥ 2¹⁰."""
    return max(MIN_COMPILE_BUCKET, 1 << max(0, int(n) - 1).bit_length())


def resolve_backend(backend: str) -> str:
    """``auto`` → ``tcnn`` when tinycudann imports and CUDA is available, else ``torch``."""
    if backend == "auto":
        return "tcnn" if torch.cuda.is_available() and tcnn_available() else "torch"
    if backend == "tcnn" and not (torch.cuda.is_available() and tcnn_available()):
        raise ValueError("nerf.backend=tcnn needs CUDA and an importable tinycudann; use nerf.backend=torch or auto")
    return backend


class NeRFField(nn.Module):
    """Density σ(x) ≥ 0 and albedo a(x) ∈ [0, 1]³ for world points x (…, 3) inside the ball."""

    def __init__(self, config: NeRFConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.config = config
        self.backend = resolve_backend(config.backend)
        if self.backend == "tcnn":
            self.encoding = make_tcnn_grid(config.hash_grid, generator)
        else:
            self.encoding = TorchHashGrid(config.hash_grid, generator)
        n_enc = config.hash_grid.n_levels * config.hash_grid.n_features_per_level
        self.density_network = make_mlp(n_enc, 1, config.mlp.n_neurons, config.mlp.n_hidden_layers, generator)
        self.feature_network = make_mlp(n_enc, 3, config.mlp.n_neurons, config.mlp.n_hidden_layers, generator)

    def encode(self, points: Tensor) -> Tensor:
        """World points (N, 3) → hash features (N, L·F); the box [-r, r]³ maps to [0, 1]³."""
        r = self.config.radius
        unit = ((points + r) / (2.0 * r)).clamp(0.0, 1.0)
        return self.encoding(unit).float()

    def density_bias(self, points: Tensor) -> Tensor:
        """Pre-activation blob bias (N,) at world points (N, 3) (threestudio ``get_activated_density``)."""
        c = self.config
        if c.density_bias == "blob_magic3d":
            return c.density_blob_scale * (1.0 - points.norm(dim=-1) / c.density_blob_std)
        if c.density_bias == "blob_dreamfusion":
            return c.density_blob_scale * torch.exp(-0.5 * (points**2).sum(dim=-1) / c.density_blob_std**2)
        return torch.zeros_like(points[..., 0])

    def activate(self, raw: Tensor) -> Tensor:
        return F.softplus(raw) if self.config.density_activation == "softplus" else torch.exp(raw)

    def raw_density(self, points: Tensor, enc: Tensor | None = None) -> Tensor:
        """Pre-activation density (N,) at world points (N, 3)."""
        if enc is None:
            enc = self.encode(points)
        return self.density_network(enc)[:, 0] + self.density_bias(points)

    def density(self, points: Tensor) -> Tensor:
        """Activated density σ (N,) at world points (N, 3)."""
        return self.activate(self.raw_density(points))

    def forward(self, points: Tensor) -> dict[str, Tensor]:
        """points (N, 3) → ``density`` (N,) and ``albedo`` (N, 3)."""
        if self._compiled is None or self.backend != "torch" or (points.requires_grad and torch.is_grad_enabled()):
            density, albedo = self._density_albedo(points)
        else:
            # Shape buckets: pad N to a power of two (≥ 2¹⁰), so a run compiles one graph per
            # bucket (chunks are nearly all the same size, a chunk budget's bucket). The padding
            # points sit at the origin; their outputs are cut off, so they get no gradient.
            n = points.shape[0]
            size = compile_bucket(n)
            density, albedo = self._compiled(F.pad(points, (0, 0, 0, size - n)))
            density, albedo = density[:n], albedo[:n]
        return {"density": density, "albedo": albedo}

    def _density_albedo(self, points: Tensor) -> tuple[Tensor, Tensor]:
        enc = self.encode(points)
        return self.activate(self.raw_density(points, enc)), torch.sigmoid(self.feature_network(enc))

    @property
    def _compiled(self) -> Any:
        """``torch.compile`` of the hash grid + MLPs (``nerf.compile``), built on first use."""
        backend = self.config.compile
        if backend == "off":
            return None
        if self.__dict__.get("_compiled_fn") is None:
            self.__dict__["_compiled_fn"] = torch.compile(self._density_albedo, backend=backend, dynamic=False)
        return self.__dict__["_compiled_fn"]

    def normal(self, points: Tensor) -> Tensor:
        """Outward unit normals (N, 3) at world points (N, 3), by ``shading.normal_type``."""
        if self.config.shading.normal_type == "finite_difference":
            return self.finite_difference_normal(points)
        return self.analytic_normal(points)

    def analytic_normal(self, points: Tensor) -> Tensor:
        """−∇(raw density) / |·| by autograd (threestudio ``analytic``: raw, for stability);
        differentiable (double backward) when grad is enabled."""
        grad_enabled = torch.is_grad_enabled()
        with torch.enable_grad():
            p = points.detach().requires_grad_(True)
            grad = torch.autograd.grad(self.raw_density(p).sum(), p, create_graph=grad_enabled)[0]
        normal = F.normalize(-grad, dim=-1)
        return normal if grad_enabled else normal.detach()

    def finite_difference_normal(self, points: Tensor) -> Tensor:
        """Outward unit normals −∇σ / |∇σ| (N, 3) by central differences (threestudio's
        ``finite_difference`` normal: 6 density lookups, clamped to the box)."""
        eps = self.config.shading.finite_difference_eps
        r = self.config.radius
        offsets = torch.eye(3, device=points.device, dtype=points.dtype) * eps
        offsets = torch.stack([offsets, -offsets], dim=1).reshape(6, 3)  # +x, −x, +y, −y, +z, −z
        shifted = (points[:, None, :] + offsets).clamp(-r, r).reshape(-1, 3)
        sigma = self.density(shifted).reshape(-1, 3, 2)
        grad = (sigma[..., 0] - sigma[..., 1]) / (2.0 * eps)
        return F.normalize(-grad, dim=-1)
