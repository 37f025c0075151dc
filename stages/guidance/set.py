"""The guidance models one asset's optimiser talks to, and the re-register-on-restart call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from stages.guidance.protocol import Guidance, GuidanceRequest, GuidanceResponse, UnknownAssetError


@dataclass
class GuidanceSet:
    """``ip``: the SD1.5 + IP-Adapter side (ISD, SDS, IP-SDS, ablations); ``mvd``: MVDream SDS.

    Either may be ``None`` when the configured loss does not need it; the same object may
    fill both slots (e.g. an image-target guidance in tests).
    """

    ip: Guidance | None = None
    mvd: Guidance | None = None


@dataclass
class Registration:
    """What a guidance needs to (re-)register an asset."""

    asset_id: str
    prompt: str
    reference: Any | None = None
    negative_prompt: str = ""

    def apply(self, guidance: Guidance) -> None:
        guidance.register(self.asset_id, self.prompt, self.reference, negative_prompt=self.negative_prompt)


def grad_with_reregister(
    guidance: Guidance, requests: Sequence[GuidanceRequest], registration: Registration
) -> list[GuidanceResponse]:
    """``guidance.grad(requests)``; on :class:`UnknownAssetError` (the actor restarted and lost
    its registry) register the asset again and retry once."""
    try:
        return guidance.grad(requests)
    except UnknownAssetError:
        registration.apply(guidance)
        return guidance.grad(requests)
