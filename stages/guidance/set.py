"""The guidance models one asset's optimiser talks to: registering the asset with each family's
settings, and asking them for one iteration's gradients at once.

Re-registration after a restarted model lives in the client that can see restarts
(``pipeline.clients.ActorGuidance``); an in-process guidance never forgets an asset.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

from stages.guidance.protocol import Family, Guidance, GuidanceRequest, GuidanceResponse, GuidanceSettings


@dataclass
class GuidanceSet:
    """``ip``: the SD1.5 + IP-Adapter side (ISD, SDS, IP-SDS, ablations); ``mvd``: MVDream SDS.

    Either may be ``None`` when the configured loss does not need it; the same object may
    fill both slots (e.g. the toy world, or an image-target guidance in tests): it then holds one
    registration per family.
    """

    ip: Guidance | None = None
    mvd: Guidance | None = None
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False, compare=False)

    def slot(self, family: Family) -> Guidance:
        """The guidance of ``family``; ``ValueError`` when that slot is empty."""
        guidance = self.ip if family == "ip" else self.mvd if family == "mvd" else None
        if guidance is None:
            raise ValueError(f"GuidanceSet.{family} is None, but the {family!r} guidance was asked for")
        return guidance

    def register(
        self, asset_id: str, prompt: str, reference: Any | None, settings: Mapping[Family, GuidanceSettings]
    ) -> None:
        """Register the asset with each family in ``settings`` (the reference goes to the IP side only)."""
        for family, family_settings in settings.items():
            self.slot(family).register(asset_id, prompt, reference if family == "ip" else None, family_settings)

    def release(self, asset_id: str) -> None:
        """Free the asset's cached embeddings in every slot (one object in both slots: once)."""
        for guidance in {id(g): g for g in (self.ip, self.mvd) if g is not None}.values():
            guidance.release(asset_id)

    def ask(self, requests: Mapping[Family, GuidanceRequest]) -> dict[Family, GuidanceResponse]:
        """Every family's response to its request. Two remote guidances (``concurrent_calls``, e.g.
        Ray actors) are asked at once, so an iteration waits for the slower one instead of both in
        turn; local ones are asked one after the other (they would only compete for one device)."""
        if len(requests) < 2 or not self._concurrent():
            return {family: self._ask(family, request) for family, request in requests.items()}
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guidance-set")
        (first, first_request), *rest = requests.items()
        pending = self._pool.submit(self._ask, first, first_request)
        try:
            answered = {family: self._ask(family, request) for family, request in rest}
        finally:
            first_response = pending.result()  # waits (and raises) even when the other call failed
        return {first: first_response, **answered}

    def close(self) -> None:
        """Stop the helper thread of :meth:`ask` (if one was started)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _ask(self, family: Family, request: GuidanceRequest) -> GuidanceResponse:
        (response,) = self.slot(family).grad([request])
        if tuple(response.grad_rgb.shape) != tuple(request.rgb.shape):
            raise ValueError(
                f"{family} guidance returned grad_rgb of shape {tuple(response.grad_rgb.shape)} for rgb {tuple(request.rgb.shape)}"
            )
        return response

    def _concurrent(self) -> bool:
        ip, mvd = self.ip, self.mvd
        return ip is not mvd and all(getattr(g, "concurrent_calls", False) for g in (ip, mvd))
