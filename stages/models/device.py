"""Resolve ``ModelsConfig.device`` / ``ModelsConfig.dtype`` ("auto" included) to torch objects."""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → ``cuda`` when available else ``cpu``; otherwise ``torch.device(device)``.

    Raises ``ValueError`` naming ``models.device`` for an unparsable or unavailable device.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"models.device: cannot parse {device!r} ({exc})") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"models.device: {device!r} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto`` → fp16 on CUDA, fp32 elsewhere; names like ``float16``/``fp16``/``bfloat16``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"models.dtype: unknown dtype {dtype!r}; expected auto or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]
