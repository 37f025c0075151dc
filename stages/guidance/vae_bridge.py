"""Between renders and latents: VAE-encode renders *with grad* and pull latent gradients back.

Both guidance families (SD1.5 + IP-Adapter at 512 px, MVDream at 256 px) use this: renders of
every request in a batch are resized to the model's resolution, concatenated, encoded in one
VAE forward, and the latent-space gradients w(t)·r are back-propagated through the encoder
(input gradients only, the VAE weights stay frozen) to give each request its grad_rgb.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class EncodedBatch:
    """Latents of a batch of renders, still attached to their (leaf) inputs."""

    inputs: list[Tensor]
    """One leaf tensor per request: its rgb on the model's device/dtype, requires_grad."""
    latents: Tensor
    """(ΣB, 4, h, w) scaled latents, attached to ``inputs``."""
    sizes: list[int]
    """Batch size of each request, to split ``latents``."""

    def split(self, tensor: Tensor) -> list[Tensor]:
        return list(torch.split(tensor, self.sizes, dim=0))


def encode_renders(
    vae: torch.nn.Module,
    renders: Sequence[Tensor],
    resolution: int,
    device: torch.device,
    dtype: torch.dtype,
) -> EncodedBatch:
    """Resize each (B, 3, H, W) render in [0, 1] to ``resolution``², encode with grad.

    Uses the posterior mean (deterministic) scaled by ``vae.config.scaling_factor``.
    """
    inputs = [r.detach().to(device=device, dtype=dtype).requires_grad_(True) for r in renders]
    resized = [
        x if x.shape[-2:] == (resolution, resolution)
        else F.interpolate(x, (resolution, resolution), mode="bilinear", align_corners=False)
        for x in inputs
    ]
    pixels = torch.cat(resized, dim=0) * 2.0 - 1.0
    with torch.enable_grad():
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean * vae.config.scaling_factor
    return EncodedBatch(inputs=inputs, latents=latents, sizes=[int(r.shape[0]) for r in renders])


def backprop_to_renders(encoded: EncodedBatch, grad_latents: Tensor) -> list[Tensor]:
    """dL/d(rgb) for each request, given dL/d(latents) for the whole batch.

    Returned tensors are float32 on the CPU, shaped like the original renders.
    """
    if grad_latents.shape != encoded.latents.shape:
        raise ValueError(
            f"latent gradient shape {tuple(grad_latents.shape)} does not match latents "
            f"{tuple(encoded.latents.shape)}"
        )
    grads = torch.autograd.grad(
        encoded.latents, encoded.inputs, grad_outputs=grad_latents.to(encoded.latents.dtype)
    )
    return [g.detach().float().cpu() for g in grads]
