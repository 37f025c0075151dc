"""Measure the device memory of real model code without a GPU and without weights.

Models are built at full size on the ``meta`` device (shapes and dtypes, no storage), and the
real code runs on them under :class:`LiveBytes`, a ``TorchDispatchMode`` that adds up the bytes
of every storage an op creates on the measured device and subtracts them when the storage dies
(a weak reference to the storage, as ``torch.distributed._tools.mem_tracker.MemTracker`` does),
so its ``peak`` is the largest sum of live tensors at any moment: the autograd graph's saved
tensors, skip connections held across a UNet, temporaries. Sizes are rounded like the CUDA
caching allocator's smallest block (512 bytes). Two things make meta behave like CUDA:

- :func:`fused_attention`: on meta (and on the CPU), ``F.scaled_dot_product_attention``
  decomposes into the math path, which materialises the L×L score matrix in fp32. On CUDA the
  fused kernels (flash / memory-efficient) keep only the output and a log-sum-exp; inside the
  context every SDPA call goes through ATen's fused CPU flash op, whose outputs and saved
  tensors are exactly those.
- host reads of meta tensors (``.item()``, ``float()``, ``.cpu()``) have no data: the tracker
  answers them with ones (so an "any IP scale non-zero?" check takes the branch that does more
  work) and zero-filled host tensors, so code that logs a loss still runs.

Not modelled: kernels' own workspaces (cuDNN convolution, cuBLAS), allocator fragmentation and
the CUDA context; ``tests/test_memory_model.py`` compares the model with the CPU allocator's
peak of a real run, and the memory plan adds a per-process allowance for the context.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ALLOCATION_ROUND = 512
"""Bytes: the CUDA caching allocator's smallest block; every storage is rounded up to it."""


def rounded(nbytes: int) -> int:
    return int(math.ceil(nbytes / ALLOCATION_ROUND) * ALLOCATION_ROUND)


def module_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of ``modules`` (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += rounded(tensor.numel() * tensor.element_size())
    return total


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of the storages created on ``device_type`` while the mode is active.

    Tensors that existed before (weights, inputs made outside) are not counted; pass them to
    :meth:`add` to count them. ``answer_host_reads``: answer ``.item()`` / ``.cpu()`` of meta
    tensors instead of failing (see the module docstring).
    """

    def __init__(self, device_type: str = "meta", answer_host_reads: bool = True) -> None:
        super().__init__()
        self.device_type = device_type
        self.answer_host_reads = answer_host_reads
        self.live = 0
        self.peak = 0
        self._storages: dict[int, weakref.ref] = {}

    def add(self, *tensors: torch.Tensor) -> None:
        """Count tensors made before the mode (e.g. the inputs) as live from now on."""
        for tensor in tensors:
            self._track(tensor)

    def reset_peak(self) -> None:
        self.peak = self.live

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != self.device_type:
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        ref = self._storages.get(key)
        if ref is not None and ref() is storage:
            return
        size = rounded(storage.nbytes())
        self._storages[key] = weakref.ref(storage, lambda _ref, key=key, size=size: self._free(key, size))
        self.live += size
        self.peak = max(self.peak, self.live)

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self._storages.pop(key, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.answer_host_reads:
            answered = self._host_read(func, args, kwargs)
            if answered is not None:
                return answered
        out = func(*args, **kwargs)
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out

    @staticmethod
    def _host_read(func: Any, args: tuple, kwargs: dict) -> Any:
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if source is None or source.device.type != "meta":
            return None
        if func is torch.ops.aten._local_scalar_dense.default:
            return True if source.dtype == torch.bool else (1 if not source.is_floating_point() else 1.0)
        if func is torch.ops.aten._to_copy.default and torch.device(kwargs.get("device") or "meta").type == "cpu":
            dtype = kwargs.get("dtype") or source.dtype
            return torch.zeros(source.shape, dtype=dtype)
        return None


def _fused_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )[0]


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Within the block, ``F.scaled_dot_product_attention`` keeps what a fused CUDA kernel keeps
    (output + log-sum-exp, no L×L scores). Module code looks the function up at call time
    (``F.scaled_dot_product_attention(...)``), so patching the attribute reaches diffusers."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def measure_peak(run: Callable[[], Any], inputs: tuple[torch.Tensor, ...] = (), device_type: str = "meta") -> int:
    """Peak live bytes on ``device_type`` while ``run()`` executes (``inputs`` counted from the
    start), with fused attention. Weights are not included: add :func:`module_bytes`."""
    with fused_attention(), LiveBytes(device_type) as tracker:
        tracker.add(*inputs)
        run()
    return tracker.peak
