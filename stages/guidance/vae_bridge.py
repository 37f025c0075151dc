"""Between renders and latents: VAE-encode renders *with grad* and pull latent gradients back.

Both guidance families (SD1.5 + IP-Adapter at 512 px, MVDream at 256 px) use this: renders of
the requests of one pass are resized to the model's resolution, concatenated and encoded, and
the latent-space gradients w(t)·r are back-propagated through the encoder (input gradients
only, the VAE weights stay frozen) to give each request its grad_rgb.

Memory: the encoder's graph at 512² holds ~1.5 GiB per image in fp16, so at most ``chunk``
images keep theirs. The guidances slice requests so that a pass fits ``chunk``; when it cannot
(an MVDream 4-view group larger than ``chunk``), every chunk is first encoded without grad, the
last chunk keeping its graph; :func:`backprop_to_renders` then back-propagates that chunk and
re-encodes every other chunk with grad, one at a time, freeing each chunk's graph before the
next (the exact gradient at the cost of one more encoder forward per re-encoded image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from stages.guidance.runtime import GuidanceRuntime, RowBounded

Encoder = Callable[[Tensor], Tensor]
"""Pixels in [-1, 1], (N, 3, R, R) → scaled latents (N, 4, R/8, R/8), e.g. a :class:`PosteriorMean`."""


class PosteriorMean(torch.nn.Module):
    """The deterministic latents of a diffusers ``AutoencoderKL``: posterior mean × scaling factor.

    A module of its own so that ``torch.compile`` compiles the encoder alone (compiling the VAE
    compiles its ``forward``, encode *and* decode)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, pixels: Tensor) -> Tensor:
        return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor


def bounded_encoder(vae: torch.nn.Module, runtime: GuidanceRuntime) -> RowBounded:
    """:class:`PosteriorMean` of ``vae`` in calls of at most ``runtime.vae_chunk`` images,
    compiled with batch buckets when ``runtime.compile``."""
    return RowBounded(
        _call, PosteriorMean(vae), runtime.vae_chunk, compile=runtime.compile, backend=runtime.compile_backend
    )


def _call(module: torch.nn.Module, pixels: Tensor) -> Tensor:
    return module(pixels)


@dataclass
class EncodedBatch:
    """Latents of the renders of one pass, and what is needed to back-propagate into them."""

    inputs: list[Tensor]
    """One leaf tensor per request: its rgb on the model's device/dtype, requires_grad."""
    pixels: Tensor
    """(ΣB, 3, R, R) in [-1, 1], attached to ``inputs`` (the resize's graph holds no activations)."""
    latents: Tensor
    """(ΣB, 4, h, w) scaled latents, detached."""
    sizes: list[int]
    """Batch size of each request, to split ``latents``."""
    encoder: Encoder
    chunk: int
    """Images whose encoder graph is held at once."""
    kept: tuple[Tensor, Tensor]
    """(pixel leaf, latents with graph) of the last chunk."""

    def split(self, tensor: Tensor) -> list[Tensor]:
        return list(torch.split(tensor, self.sizes, dim=0))

    def chunks(self) -> list[slice]:
        total = self.pixels.shape[0]
        return [slice(start, min(start + self.chunk, total)) for start in range(0, total, self.chunk)]


def encode_renders(
    encoder: Encoder,
    renders: Sequence[Tensor],
    resolution: int,
    device: torch.device,
    dtype: torch.dtype,
    chunk: int | None = None,
) -> EncodedBatch:
    """Resize each (B, 3, H, W) render in [0, 1] to ``resolution``², encode; ``chunk`` images
    (all when None) at a time, only the last chunk keeping its graph."""
    inputs = [r.detach().to(device=device, dtype=dtype).requires_grad_(True) for r in renders]
    with torch.enable_grad():
        resized = [
            x if x.shape[-2:] == (resolution, resolution)
            else F.interpolate(x, (resolution, resolution), mode="bilinear", align_corners=False)
            for x in inputs
        ]
        pixels = torch.cat(resized, dim=0) * 2.0 - 1.0
    total = pixels.shape[0]
    chunk = total if chunk is None else max(1, min(int(chunk), total))
    last = slice(((total - 1) // chunk) * chunk, total)
    with torch.no_grad():
        early = [encoder(pixels[start : start + chunk]) for start in range(0, last.start, chunk)]
    leaf = pixels[last].detach().requires_grad_(True)
    with torch.enable_grad():
        kept = encoder(leaf)
    latents = torch.cat([*early, kept.detach()]) if early else kept.detach()
    return EncodedBatch(inputs, pixels, latents, [int(r.shape[0]) for r in renders], encoder, chunk, (leaf, kept))


def backprop_to_renders(encoded: EncodedBatch, grad_latents: Tensor) -> list[Tensor]:
    """dL/d(rgb) for each request, given dL/d(latents) for the whole pass.

    Returned tensors are float32 on the CPU, shaped like the original renders. Frees the kept
    chunk's graph; the other chunks are re-encoded with grad one at a time.
    """
    if grad_latents.shape != encoded.latents.shape:
        raise ValueError(
            f"latent gradient shape {tuple(grad_latents.shape)} does not match latents "
            f"{tuple(encoded.latents.shape)}"
        )
    grad_latents = grad_latents.to(encoded.latents.dtype)
    grad_pixels = torch.empty_like(encoded.pixels)
    leaf, kept = encoded.kept
    *others, last = encoded.chunks()
    (grad_pixels[last],) = torch.autograd.grad(kept, leaf, grad_outputs=grad_latents[last])
    encoded.kept = (leaf.detach(), kept.detach())  # drop the graph now
    del leaf, kept
    for part in others:
        with torch.enable_grad():
            chunk_leaf = encoded.pixels[part].detach().requires_grad_(True)
            (grad_pixels[part],) = torch.autograd.grad(
                encoded.encoder(chunk_leaf), chunk_leaf, grad_outputs=grad_latents[part]
            )
    grads = torch.autograd.grad(encoded.pixels, encoded.inputs, grad_outputs=grad_pixels)
    return [g.detach().float().cpu() for g in grads]
