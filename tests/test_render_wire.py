"""Renders on the way to the guidance actors: one object-store copy per render, fp16 on the wire.

The Ray round trip itself is tested in ``test_pipeline_ray.py``; here the client runs against the
in-process wire of ``benchmarks.hotpath`` (pickles every argument and result as Ray would).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.hotpath import StandInGuidance, wire_as_ray
from pipeline.clients import resolve_request_refs
from pipeline.task import GuidanceHandles
from stages.guidance.protocol import GuidanceRequest
from stages.scene.cameras import CameraConfig, sample_cameras


def _request(rgb: torch.Tensor, seed: int) -> GuidanceRequest:
    cams = sample_cameras(torch.Generator().manual_seed(seed), rgb.shape[0], CameraConfig())
    t = torch.full((rgb.shape[0],), 300 + seed)
    return GuidanceRequest("a", rgb, t, seed=seed, c2w=cams.c2w, elevation=cams.elevation,
                           azimuth=cams.azimuth, fovy=cams.fovy)


def test_both_clients_put_each_render_once_and_send_refs():
    with wire_as_ray() as wire:
        handles = GuidanceHandles(ip=[wire.handle(StandInGuidance(wire))], mvd=[wire.handle(StandInGuidance(wire))])
        clients = handles.guidance_set("a")
        for client in (clients.ip, clients.mvd):
            client.register("a", "a prompt")
        for step in range(3):
            rgb = torch.rand(4, 3, 32, 32)  # 48 KiB: six requests' cameras, timesteps and seeds weigh less
            answers = [client.grad([_request(rgb, step)])[0] for client in (clients.ip, clients.mvd)]
            for answer in answers:
                torch.testing.assert_close(answer.grad_rgb, 1e-3 * (rgb - 0.5))
        assert clients.ip.renders.puts == 3 and wire.renders_by_value == 0
        # the render's bytes crossed once per iteration, the requests themselves are small
        assert wire.bytes["put"] >= 3 * rgb.numel() * 4 and wire.bytes["grad_args"] < rgb.numel() * 4


def test_resolved_requests_are_validated_again():
    rgb = torch.rand(4, 3, 8, 8)
    sent = _request(rgb, 1)
    sent.rgb = "ref"
    [resolved] = resolve_request_refs([sent], get=lambda ref: rgb)
    assert resolved.rgb is rgb and sent.rgb == "ref"
    with pytest.raises(ValueError, match="GuidanceRequest.rgb"):
        resolve_request_refs([sent], get=lambda ref: torch.rand(4, 8, 8))


def test_fp16_renders_are_exact_for_fp16_guidance():
    """fp16 guidance casts renders to fp16 before anything else, so a render sent in fp16 gives
    the same gradient, bit for bit, at half the bytes (and its gradient comes back in fp16).
    Both guidance models encode renders through ``vae_bridge.encode_renders``; the IP one runs."""
    from stages.guidance.ip_guidance import IPGuidance
    from stages.models.config import ModelsConfig

    tiny = {k: "tiny" for k in ("sd", "ip_adapter", "image_encoder")}
    guidance = IPGuidance.from_config(ModelsConfig(**tiny, device="cpu", dtype="float16"))
    guidance.register("a", "a prompt", np.random.RandomState(0).rand(32, 32, 3))
    rgb = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (full,) = guidance.grad([_request(rgb, 3)])
    (half,) = guidance.grad([_request(rgb.half(), 3)])
    assert half.grad_rgb.dtype == torch.float16
    assert torch.equal(full.grad_rgb, half.grad_rgb.float()) and full.loss == half.loss
