"""What an asset *is*: the one rule for asset ids and seeds, shared by the dataset pipeline and
the one-asset CLI (``python -m stages.optimize``).

An asset is identified by (prompt, variant, identity digest). The digest covers everything that
changes the optimised scene: the method config without its runtime and export keys
(:data:`~stages.optimize.config.RUNTIME_KEYS`: checkpoint cadence, previews, device, progress,
export settings, and the memory/speed knobs: back-propagation mode, render chunks, compilation),
the model sources (with the toy world's content when a model is the toy world), and the base seed. So an export-only change (mesh threshold, face count,
turntable frames) or a smaller render chunk to fit a GPU keeps every asset id, and
``python -m pipeline.export`` can redo the exports from the checkpoints instead of optimising again.

The reference-image and optimiser seeds derive from (base seed, prompt, variant): the CLI with
``--seed S --variant K`` makes the same asset as a dataset run with ``seed: S`` does for that
prompt's variant K.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict
from typing import Any

from stages.digest import digest
from stages.models.factory import TOYWORLD
from stages.optimize.config import OptimizeConfig, without_runtime_keys

DIGEST_HEX = 12
"""Hex digits of the identity digest (48 bits)."""


def method_identity(method: OptimizeConfig) -> dict[str, Any]:
    """The method keys that change the optimised scene (everything but :data:`RUNTIME_KEYS`)."""
    return without_runtime_keys(asdict(method))


def identity_digest(method: OptimizeConfig, models: Any, seed: int) -> str:
    """``DIGEST_HEX`` hex digits over (method identity, model sources, base seed, and the toy
    world's content when a model is the toy world: the file's content, not just its name, makes
    those assets)."""
    payload = {"method": method_identity(method), "models": asdict(models), "seed": int(seed)}
    if any(value == TOYWORLD for value in payload["models"].values()):
        from stages.toyworld.world import load_world

        payload["toyworld"] = load_world(models.toyworld).digest()
    return digest(payload, DIGEST_HEX)


def slugify(prompt: str, max_len: int = 40) -> str:
    """A file-name-safe lower-case slug of a prompt: ``[a-z0-9_]``, at most ``max_len`` chars."""
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")
    return slug[:max_len].rstrip("_") or "prompt"


def asset_id_for(prompt: str, variant: int, config_digest: str) -> str:
    """``<slug>-v<variant>-<10 hex>``: readable, safe as a directory name, unique per
    (prompt, variant, identity digest)."""
    key = hashlib.sha256(f"{prompt}\x1f{variant}\x1f{config_digest}".encode()).hexdigest()[:10]
    return f"{slugify(prompt)}-v{variant}-{key}"


def derived_seed(base_seed: int, prompt: str, variant: int, stream: str) -> int:
    """A 32-bit seed of one stream (``reference`` | ``optimize``) of one asset."""
    blob = "\x1f".join(str(part) for part in (base_seed, prompt, variant, stream))
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16)
