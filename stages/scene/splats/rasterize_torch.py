"""Pure-PyTorch Gaussian rasteriser with gsplat's ``rasterization`` interface and conventions.

For small scenes on CPU (tests, quickstart) and as a readable reference. It reproduces what
gsplat 1.5 computes with ``packed=False, rasterize_mode="classic", render_mode="RGB+ED"``:

- projection: world -> camera with OpenCV ``viewmats``; EWA 2D covariance J W Σ Wᵀ Jᵀ with the
  Jacobian evaluated at the mean clamped to 1.3 × the field of view; ``eps2d`` (0.3 px²) added
  to the diagonal (no opacity compensation);
- culling: depth outside (near, far), det ≤ 0, opacity < 1/255 or the opacity-aware 3.33σ box
  outside the image -> radius 0;
- compositing: pixel centres at (j + 0.5, i + 0.5); α = min(0.999, o·exp(-σ)), skipped when
  σ < 0 or α < 1/255; front to back by camera depth; a pixel stops before the Gaussian that
  would bring its transmittance to ≤ 1e-4;
- depth: expected camera-space z, Σ wᵢ zᵢ / Σ wᵢ (0 where nothing was hit).

Evaluation is dense: every pixel of a ``tile_size`` × ``tile_size`` chunk against every
Gaussian whose box touches the chunk (the box bounds where α ≥ 1/255, so the culling is exact).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .sh import eval_sh

ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.999
TRANSMITTANCE_EPS = 1e-4


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Quaternions (..., 4) in wxyz order (not necessarily normalised) -> rotations (..., 3, 3)."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )  # fmt: skip
    return rot.reshape(quats.shape[:-1] + (3, 3))


def covariances(quats: Tensor, scales: Tensor) -> Tensor:
    """World covariances Σ = R S Sᵀ Rᵀ (N, 3, 3) from quats (N, 4) and scales (N, 3)."""
    m = quat_to_rotmat(quats) * scales[..., None, :]
    return m @ m.transpose(-1, -2)


def project(
    means: Tensor,
    covars: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
) -> dict[str, Tensor]:
    """Project N Gaussians into C cameras (gsplat's fused EWA projection, unpacked).

    Returns ``means2d`` (C, N, 2) px, ``conics`` (C, N, 3) upper triangle of the inverse 2D
    covariance, ``depths`` (C, N) camera z, ``radii`` (C, N, 2) int32 (0 = culled).
    """
    rot = viewmats[:, :3, :3]
    trans = viewmats[:, :3, 3]
    means_c = torch.einsum("cij,nj->cni", rot, means) + trans[:, None, :]
    covars_c = torch.einsum("cij,njk,clk->cnil", rot, covars, rot)

    tx, ty, tz = means_c.unbind(-1)
    depth_ok = (tz > near_plane) & (tz < far_plane)
    tz_safe = torch.where(depth_ok, tz, torch.ones_like(tz))  # keeps culled entries finite
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    jx = tz_safe * torch.minimum(torch.maximum(tx / tz_safe, -lim_x_neg), lim_x_pos)
    jy = tz_safe * torch.minimum(torch.maximum(ty / tz_safe, -lim_y_neg), lim_y_pos)
    zero = torch.zeros_like(tz)
    jac = torch.stack(
        [fx / tz_safe, zero, -fx * jx / tz_safe**2, zero, fy / tz_safe, -fy * jy / tz_safe**2], dim=-1
    ).reshape(tz.shape + (2, 3))
    cov2d = jac @ covars_c @ jac.transpose(-1, -2)
    cov2d = cov2d + eps2d * torch.eye(2, dtype=cov2d.dtype, device=cov2d.device)
    means2d = torch.stack([fx * tx / tz_safe + cx, fy * ty / tz_safe + cy], dim=-1)

    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det = a * c - b * b
    det_safe = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)

    with torch.no_grad():
        opac = opacities.detach().expand_as(tz)
        extend = torch.sqrt(2.0 * torch.log(opac.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)).clamp_max(3.33)
        radius = torch.stack(
            [torch.ceil(extend * a.clamp_min(0).sqrt()), torch.ceil(extend * c.clamp_min(0).sqrt())], dim=-1
        )
        m2d = means2d.detach()
        inside = (
            (m2d[..., 0] + radius[..., 0] > 0)
            & (m2d[..., 0] - radius[..., 0] < width)
            & (m2d[..., 1] + radius[..., 1] > 0)
            & (m2d[..., 1] - radius[..., 1] < height)
        )
        valid = depth_ok & (det > 0) & (opac >= ALPHA_THRESHOLD) & inside
        radii = torch.where(valid[..., None], radius, torch.zeros_like(radius)).to(torch.int32)
    return {"means2d": means2d, "conics": conics, "depths": tz, "radii": radii}


def _composite_tiles(
    offsets: Tensor, means2d: Tensor, conics: Tensor, opacities: Tensor, feats: Tensor
) -> Tensor:
    """Front-to-back compositing over a batch of T tiles of P pixels.

    ``offsets`` (P, 2) pixel centres relative to the tile origin; per tile the depth-sorted
    Gaussians with ``means2d`` (T, M, 2) relative to the tile origin, ``conics`` (T, M, 3),
    ``opacities`` (T, M) (0 for padding) and ``feats`` (T, M, D). Returns (T, P, D + 1):
    the accumulated ``feats`` and the pixel alpha.
    """
    # log(o) - σ(u, v) is a quadratic polynomial in the pixel position: one batched matmul
    # against the monomials [1, u, v, u², v², uv] (local coordinates keep it well conditioned).
    a, b, c = conics.unbind(-1)
    mx, my = means2d.unbind(-1)
    log_o = torch.log(opacities.clamp_min(1e-30))
    coeffs = torch.stack(
        [
            log_o - (0.5 * a * mx * mx + 0.5 * c * my * my + b * mx * my),
            a * mx + b * my,
            c * my + b * mx,
            -0.5 * a,
            -0.5 * c,
            -b,
        ],
        dim=-2,
    )  # (T, 6, M)
    u, v = offsets.unbind(-1)
    monomials = torch.stack([torch.ones_like(u), u, v, u * u, v * v, u * v], dim=-1)  # (P, 6)
    alpha = torch.exp(monomials @ coeffs)  # (T, P, M) = o · exp(-σ)
    alpha = torch.where(alpha >= ALPHA_THRESHOLD, alpha.clamp_max(MAX_ALPHA), torch.zeros_like(alpha))
    log_t = torch.cumsum(torch.log1p(-alpha), dim=-1)  # log transmittance after each Gaussian
    log_t_before = F.pad(log_t[..., :-1], (1, 0))
    weights = torch.where(log_t > math.log(TRANSMITTANCE_EPS), alpha * torch.exp(log_t_before), torch.zeros_like(alpha))
    ones = torch.ones_like(feats[..., :1])
    return weights @ torch.cat([feats, ones], dim=-1)


def rasterize_torch(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    sh_degree: Optional[int] = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int = 16,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Render C cameras of N Gaussians; same arguments and outputs as ``gsplat.rasterization``
    with ``render_mode="RGB+ED", packed=False`` and no background.

    ``means`` (N, 3), ``quats`` (N, 4) wxyz, ``scales`` (N, 3) activated, ``opacities`` (N,)
    activated, ``colors`` (N, D) | (C, N, D) or SH coefficients (N, K, 3) with ``sh_degree``,
    ``viewmats`` (C, 4, 4) OpenCV world-to-camera, ``Ks`` (C, 3, 3).
    Returns ``render`` (C, H, W, D + 1) (last channel: expected depth), ``alphas`` (C, H, W, 1)
    and ``meta`` with ``means2d`` (C, N, 2), ``radii`` (C, N, 2), ``depths``, ``conics``,
    ``width``, ``height``, ``n_cameras``, ``gaussian_ids`` (None: unpacked), as gsplat's.
    """
    n_cams = viewmats.shape[0]
    proj = project(
        means, covariances(quats, scales), opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane
    )
    if sh_degree is not None:
        campos = torch.linalg.inv(viewmats)[:, :3, 3]
        dirs = means[None, :, :] - campos[:, None, :]
        colors = torch.clamp_min(eval_sh(sh_degree, colors[None].expand(n_cams, *colors.shape), dirs) + 0.5, 0.0)
    elif colors.ndim == 2:
        colors = colors[None].expand(n_cams, *colors.shape)

    renders, alphas = [], []
    for cam in range(n_cams):
        render, alpha = _render_camera(
            proj["means2d"][cam],
            proj["conics"][cam],
            proj["depths"][cam],
            proj["radii"][cam],
            opacities,
            colors[cam],
            width,
            height,
            tile_size,
        )
        renders.append(render)
        alphas.append(alpha)
    render = torch.stack(renders)
    alpha = torch.stack(alphas)
    depth = render[..., -1:] / alpha.clamp_min(1e-10)
    render = torch.cat([render[..., :-1], depth], dim=-1)
    meta = {
        "means2d": proj["means2d"],
        "radii": proj["radii"],
        "depths": proj["depths"],
        "conics": proj["conics"],
        "opacities": opacities[None].expand(n_cams, -1),
        "gaussian_ids": None,
        "camera_ids": None,
        "width": width,
        "height": height,
        "n_cameras": n_cams,
    }
    return render, alpha, meta


def _render_camera(
    means2d: Tensor,
    conics: Tensor,
    depths: Tensor,
    radii: Tensor,
    opacities: Tensor,
    colors: Tensor,
    width: int,
    height: int,
    tile_size: int,
    max_elements: int = 1 << 22,
) -> tuple[Tensor, Tensor]:
    """One camera: accumulated [colors, depth] (H, W, D + 1) and alpha (H, W, 1).

    The image is cut into ``tile_size``² tiles; each tile composites, in depth order, the
    Gaussians whose box touches it (padded to the busiest tile of a batch of tiles, with
    batches sized to about ``max_elements`` pixel-Gaussian pairs).
    """
    device, dtype = means2d.device, means2d.dtype
    n_feat = colors.shape[-1] + 1
    visible = torch.nonzero((radii > 0).all(dim=-1)).squeeze(-1)
    visible = visible[torch.argsort(depths[visible].detach(), stable=True)]
    m2d, con, opa = means2d[visible], conics[visible], opacities[visible]
    feats = torch.cat([colors[visible], depths[visible, None]], dim=-1)

    tiles_y, tiles_x = -(-height // tile_size), -(-width // tile_size)
    n_tiles, n_pix = tiles_y * tiles_x, tile_size * tile_size
    ty, tx = torch.meshgrid(torch.arange(tiles_y, device=device), torch.arange(tiles_x, device=device), indexing="ij")
    origin = torch.stack([tx.reshape(-1), ty.reshape(-1)], dim=-1).to(dtype) * tile_size  # (T, 2) x, y
    local = torch.arange(tile_size, device=device)
    py, px = torch.meshgrid(local, local, indexing="ij")
    offsets = torch.stack([px.reshape(-1), py.reshape(-1)], dim=-1).to(dtype) + 0.5  # (P, 2)

    with torch.no_grad():
        lo = m2d.detach() - radii[visible]
        hi = m2d.detach() + radii[visible]
        touch = (
            (hi[None, :, 0] >= origin[:, None, 0])
            & (lo[None, :, 0] <= origin[:, None, 0] + tile_size)
            & (hi[None, :, 1] >= origin[:, None, 1])
            & (lo[None, :, 1] <= origin[:, None, 1] + tile_size)
        )  # (T, M)
        counts = touch.sum(dim=1)
        # Per tile: touching Gaussians first, still in depth order (stable sort).
        order = torch.argsort((~touch).to(torch.int8), dim=1, stable=True)

    parts = []
    start = 0
    while start < n_tiles:
        stop = start + 1
        busiest = int(counts[start])
        while stop < n_tiles and (stop + 1 - start) * n_pix * max(busiest, int(counts[stop]), 1) <= max_elements:
            busiest = max(busiest, int(counts[stop]))
            stop += 1
        if busiest == 0:
            parts.append(means2d.new_zeros(stop - start, n_pix, n_feat + 1))
        else:
            idx = order[start:stop, :busiest]  # (t, m)
            real = torch.arange(busiest, device=device)[None, :] < counts[start:stop, None]
            parts.append(
                _composite_tiles(
                    offsets,
                    m2d[idx] - origin[start:stop, None, :],
                    con[idx],
                    torch.where(real, opa[idx], torch.zeros_like(opa[idx])),
                    feats[idx],
                )
            )
        start = stop
    image = torch.cat(parts)  # (T, P, F + 1)
    image = image.reshape(tiles_y, tiles_x, tile_size, tile_size, n_feat + 1).permute(0, 2, 1, 3, 4)
    image = image.reshape(tiles_y * tile_size, tiles_x * tile_size, n_feat + 1)[:height, :width]
    return image[..., :n_feat], image[..., n_feat:]
