"""The library pieces the pipeline wires together, named explicitly (no registry).

:func:`default_components` returns the real ``stages`` classes for a config (diffusers models or
the toy world, chosen per model key by :mod:`stages.models.factory`); tests and the benchmark
pass their own :class:`Components` with small fakes of the same signatures.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from stages.guidance.losses import loss_spec
from stages.guidance.protocol import Guidance
from stages.guidance.runtime import GuidanceRuntime
from stages.models.config import ModelsConfig
from stages.models.factory import build_ip_guidance, build_mvd_guidance, build_reference_sampler
from stages.optimize.config import OptimizeConfig

__all__ = ["Components", "build_ip_guidance", "build_mvd_guidance", "build_reference_sampler", "default_components", "models_needed"]


@dataclass
class Components:
    """``optimize``: :func:`stages.optimize.loop.optimize_asset`; ``export``:
    :func:`stages.export.export_asset`; the three factories build the models inside their actors
    (called with no arguments; ``None`` when the method does not use that model)."""

    optimize: Callable[..., Any]
    export: Callable[..., dict[str, str]]
    ip_guidance: Callable[[], Guidance] | None = None
    mvd_guidance: Callable[[], Guidance] | None = None
    reference_sampler: Callable[[], Any] | None = None


def models_needed(method: OptimizeConfig) -> tuple[str, ...]:
    """Which model actors a method uses, among ``reference``, ``ip``, ``mvd``."""
    needed = []
    if method.uses_ip:
        if loss_spec(method.loss, method.isd.sd_branch).uses_image_prompt:
            needed.append("reference")
        needed.append("ip")
    if method.uses_mvd:
        needed.append("mvd")
    return tuple(needed)


def guidance_runtime(actor: Any) -> GuidanceRuntime:
    """The :class:`GuidanceRuntime` of a guidance actor's ``resources.<ip|mvd>`` keys."""
    return GuidanceRuntime(vae_chunk=actor.vae_chunk, unet_rows=actor.unet_rows, compile=actor.compile)


def default_components(method: OptimizeConfig, models: ModelsConfig, resources: Any | None = None) -> Components:
    """The real library for ``method``: only the models it uses get a factory. ``resources``
    (a ``ResourcesConfig``) gives the guidance actors their memory bounds and compile switch."""
    from stages.export import export_asset
    from stages.optimize.loop import optimize_asset

    needed = models_needed(method)
    ip_runtime = guidance_runtime(resources.ip) if resources is not None else None
    mvd_runtime = guidance_runtime(resources.mvd) if resources is not None else None
    return Components(
        optimize=optimize_asset,
        export=export_asset,
        ip_guidance=functools.partial(build_ip_guidance, models, ip_runtime) if "ip" in needed else None,
        mvd_guidance=functools.partial(build_mvd_guidance, models, mvd_runtime) if "mvd" in needed else None,
        reference_sampler=functools.partial(build_reference_sampler, models) if "reference" in needed else None,
    )
