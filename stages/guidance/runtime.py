"""How a guidance runs its models: memory bounds and optional ``torch.compile``.

None of these settings changes a gradient beyond floating-point rounding; they trade memory and
compile time for speed. A guidance cuts each request into slices of at most ``vae_chunk`` views
(:func:`view_slices`; whole 4-view groups for MVDream, whose views attend to each other) and
answers the slices in *passes* of at most ``vae_chunk`` images (:func:`passes`): each pass
encodes its renders with grad, evaluates the UNet over its rows in forwards of at most
``unet_rows`` rows, back-propagates through the encoder and frees the graph before the next
pass, so the peak holds one pass's encoder graph and one forward's activations whatever the
batch, and nothing is computed twice. With ``compile``, each forward's batch is padded
(by repeating its last row, outputs dropped) up to a *bucket*: ``multiple``·2^k rows, capped at
the bound, so a compiled model sees at most ``len(buckets(...))`` batch shapes (× grad modes).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from stages.guidance.protocol import GuidanceRequest, request_noise


UNBOUNDED = 1 << 20
"""A ``vae_chunk`` / ``unet_rows`` no batch reaches: one pass and one forward per batch."""


@dataclass(frozen=True)
class GuidanceRuntime:
    """Memory bounds and compilation of one guidance's models (``resources.ip`` / ``resources.mvd``)."""

    vae_chunk: int = 4
    """Images whose VAE-encoder graph is held at once (one pass). Requests are sliced to fit;
    only an MVDream 4-view group larger than this is re-encoded chunk by chunk for its input
    gradient (one extra encoder forward per image beyond the last chunk)."""
    unet_rows: int = 32
    """Largest UNet batch of one forward; a pass with more rows runs several forwards."""
    compile: bool = False
    """``torch.compile`` the UNet and the VAE encoder (shape buckets bound the recompiles)."""
    compile_backend: Any = "inductor"
    """``torch.compile`` backend (a name or a backend callable; tests use ``aot_eager``)."""

    def __post_init__(self) -> None:
        if int(self.vae_chunk) < 1:
            raise ValueError(f"vae_chunk must be >= 1, got {self.vae_chunk}")
        if int(self.unet_rows) < 1:
            raise ValueError(f"unet_rows must be >= 1, got {self.unet_rows}")


@dataclass(frozen=True)
class ViewSlice:
    """Views ``[start, stop)`` of request ``request`` of a batch."""

    request: int
    start: int
    stop: int

    @property
    def views(self) -> int:
        return self.stop - self.start


def view_slices(views: Sequence[int], limit: int, group: int = 1) -> list[ViewSlice]:
    """Every request's views cut into slices of at most ``limit`` views, whole groups of ``group``
    (MVDream's 4 views attend to each other; a slice holds at least one group). A view's
    gradient depends on its own group only, so slices give the gradient of the whole request."""
    step = row_limit(limit, group)
    return [ViewSlice(index, start, min(start + step, count)) for index, count in enumerate(views) for start in range(0, count, step)]


def slice_request(request: GuidanceRequest, start: int, stop: int) -> GuidanceRequest:
    """The request for views ``[start, stop)`` (renders, timesteps, cameras sliced; same seed and family)."""
    if start == 0 and stop == request.rgb.shape[0]:
        return request
    part = slice(start, stop)

    def cut(value: Tensor | None) -> Tensor | None:
        return None if value is None else value[part]

    return replace(
        request,
        rgb=request.rgb[part],
        timesteps=request.timesteps[part],
        c2w=cut(request.c2w),
        elevation=cut(request.elevation),
        azimuth=cut(request.azimuth),
        fovy=cut(request.fovy),
    )


def slice_noise(seed: int, views: int, latent_shape: Sequence[int], piece: ViewSlice) -> Tensor:
    """The slice's part of the noise its whole request draws (``request_noise(seed, (views, ...))``),
    so a sliced request is noised exactly as the whole one."""
    return request_noise(seed, (views, *latent_shape))[piece.start : piece.stop]


def passes(sizes: Sequence[int], limit: int) -> list[range]:
    """Consecutive groups of items (by index) whose sizes sum to at most ``limit``; an item
    larger than ``limit`` forms a group of its own."""
    groups: list[range] = []
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size > limit:
            groups.append(range(start, index))
            start, total = index, 0
        total += size
    if len(sizes) > start:
        groups.append(range(start, len(sizes)))
    return groups


def row_limit(limit: int, multiple: int = 1) -> int:
    """``limit`` rounded down to a multiple of ``multiple`` (at least one ``multiple``)."""
    return max(multiple, (int(limit) // multiple) * multiple)


def row_chunks(rows: int, limit: int, multiple: int = 1) -> list[slice]:
    """Slices of at most ``row_limit(limit, multiple)`` rows covering ``range(rows)``."""
    step = row_limit(limit, multiple)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def buckets(limit: int, multiple: int = 1) -> list[int]:
    """Batch sizes a compiled model is called with: ``multiple``·2^k below the bound, and the bound."""
    top = row_limit(limit, multiple)
    sizes, size = [], multiple
    while size < top:
        sizes.append(size)
        size *= 2
    return sizes + [top]


def bucket_of(rows: int, limit: int, multiple: int = 1) -> int:
    """The smallest bucket holding ``rows`` rows."""
    for size in buckets(limit, multiple):
        if size >= rows:
            return size
    raise ValueError(f"{rows} rows exceed the bound {row_limit(limit, multiple)}")


def pad_rows(tensor: Tensor, rows: int) -> Tensor:
    """``tensor`` with its last row repeated up to ``rows`` rows."""
    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


class RowBounded:
    """``fn(*rows)`` over the first dimension of its tensor arguments, in calls of at most
    ``limit`` rows (multiples of ``multiple``, e.g. MVDream's 4-view groups), outputs concatenated.

    With ``compile``, ``module`` (which ``fn`` calls) is replaced by its ``torch.compile``-d
    version inside ``fn`` (``fn(model, *rows)``), and every call is padded to its bucket.
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        module: Any,
        limit: int,
        multiple: int = 1,
        compile: bool = False,
        backend: Any = "inductor",
    ) -> None:
        self.fn = fn
        self.limit = row_limit(limit, multiple)
        self.multiple = multiple
        self.compiled = bool(compile)
        self.module = torch.compile(module, backend=backend, dynamic=False) if compile else module
        self.calls: Counter[int] = Counter()
        """How many model calls ran at each batch size (after padding)."""

    def __call__(self, *rows: Tensor) -> Tensor:
        total = rows[0].shape[0]
        outputs = []
        for part in row_chunks(total, self.limit, self.multiple):
            chunk = [r[part] for r in rows]
            size = chunk[0].shape[0]
            if self.compiled:  # one shape and one memory layout per bucket: no guard fails on strides
                padded = bucket_of(size, self.limit, self.multiple)
                chunk = [pad_rows(c, padded).contiguous() for c in chunk]
            self.calls[int(chunk[0].shape[0])] += 1
            outputs.append(self.fn(self.module, *chunk)[:size])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
