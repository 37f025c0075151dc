"""MVDreamGuidance: one UNet forward for a batch of assets, results independent of batch
mates, grad_rgb equal to an autograd computation written out here, input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stages.guidance.mvdream_guidance import MVDreamGuidance
from stages.guidance.protocol import MVDREAM_NEGATIVE_PROMPT, Guidance, GuidanceRequest, MVDreamSettings, UnknownAssetError
from stages.guidance.runtime import GuidanceRuntime
from stages.models.mvdream_load import load_mvdream
from test_splats_helpers import look_at_c2w

RES = 32  # tiny VAE (factor 8): 32² renders → 4² latents
SDS = MVDreamSettings(recon_loss=False)
"""Plain SDS at CFG 50 with MVDream's negative prompt."""


@pytest.fixture(scope="module")
def models():
    return load_mvdream("tiny", seed=0)


@pytest.fixture(scope="module")
def guidance(models):
    g = MVDreamGuidance(models, render_resolution=RES)
    g.register("chair", "a wooden chair", None, SDS)
    g.register("lamp", "a desk lamp", None, MVDreamSettings(recon_loss=False, negative_prompt=""))
    g.register("lamp-recon", "a desk lamp", None, MVDreamSettings(recon_loss=True, negative_prompt=""))
    g.register("chair-recon0", "a wooden chair", None, MVDreamSettings(recon_loss=True, recon_std_rescale=0.0))
    return g


def orbit(n: int, elevation_deg: float = 15.0, radius: float = 2.5) -> torch.Tensor:
    """(n, 4, 4) camera-to-world looking at the origin, world z-up, camera −z forward."""
    el = math.radians(elevation_deg)
    mats = []
    for i in range(n):
        az = 2 * math.pi * i / 4 + 0.3 * (i // 4)
        eye = radius * torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        mats.append(look_at_c2w(eye))
    return torch.stack(mats)


def request(asset: str, views: int, t_per_group: list[int], seed: int, size: int = 16, **kw) -> GuidanceRequest:
    g = torch.Generator().manual_seed(seed + 1000)
    return GuidanceRequest(
        asset_id=asset,
        rgb=torch.rand(views, 3, size, size, generator=g),
        timesteps=torch.tensor(t_per_group).repeat_interleave(4),
        seed=seed,
        family=kw.pop("family", "mvd"),
        c2w=orbit(views),
        **kw,
    )


def test_is_a_guidance(guidance):
    assert isinstance(guidance, Guidance)


@pytest.mark.parametrize(
    "runtime, forwards, atol",
    [
        (GuidanceRuntime(vae_chunk=64, unet_rows=64), [2 * (8 + 4)], 1e-5),  # one pass, one forward
        # a pass per request, each re-encoded in chunks of 3 (3 + 3 + 2 and 3 + 1 images), forwards of
        # whole 4-view groups. CPU conv kernels round differently for a batch of 3 or 1 than of 4 (~1e-7
        # relative on the latents), which CFG 50 amplifies: hence the wider tolerance.
        (GuidanceRuntime(vae_chunk=3, unet_rows=10), [8, 8, 8], 1e-3),
    ],
    ids=["unbounded", "bounded"],
)
def test_batched_equals_separate_and_uses_bounded_unet_forwards(guidance, models, runtime, forwards, atol):
    bounded = MVDreamGuidance(models, render_resolution=RES, runtime=runtime)
    bounded.register("chair", "a wooden chair", None, SDS)
    bounded.register("lamp", "a desk lamp", None, MVDreamSettings(recon_loss=False, negative_prompt=""))
    a = request("chair", 8, [700, 200], seed=1)
    b = request("lamp", 4, [500], seed=2, size=RES)
    batches = []
    hook = models.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        together = bounded.grad([a, b])
    finally:
        hook.remove()
    assert batches == forwards
    alone = guidance.grad([a])[0], guidance.grad([b])[0]
    for joint, single, req in zip(together, alone, (a, b)):
        assert joint.asset_id == req.asset_id
        assert joint.grad_rgb.shape == req.rgb.shape and joint.grad_rgb.dtype == req.rgb.dtype
        scale = single.grad_rgb.abs().max()
        assert scale > 0
        torch.testing.assert_close(joint.grad_rgb, single.grad_rgb, atol=atol * float(scale), rtol=1e-4)
        assert joint.loss == pytest.approx(single.loss, rel=1e-4)
    assert guidance.grad([]) == []


def _reference_grad(models, req: GuidanceRequest, prompt: str, negative: str, recon: bool, rescale: float = 0.5):
    """SDS / recon gradient written out with plain autograd and a direct UNet call."""
    negative = MVDREAM_NEGATIVE_PROMPT if negative is None else negative
    tok = models.tokenizer([prompt, negative], padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt")
    with torch.no_grad():
        emb = models.text_encoder(tok.input_ids).last_hidden_state
    rgb = req.rgb.clone().requires_grad_(True)
    pixels = F.interpolate(rgb, (RES, RES), mode="bilinear", align_corners=False) * 2 - 1
    latents = models.vae.encode(pixels).latent_dist.mean * models.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(req.seed))
    a = models.alphas_cumprod[req.timesteps].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents.detach() + (1 - a).sqrt() * noise
    cam = req.c2w.clone()
    cam[:, :3, 3] = cam[:, :3, 3] / cam[:, :3, 3].norm(dim=1, keepdim=True)
    n = rgb.shape[0]
    with torch.no_grad():
        eps = models.unet(
            torch.cat([noisy, noisy]),
            torch.cat([req.timesteps, req.timesteps]),
            encoder_hidden_states=torch.cat([emb[:1].expand(n, -1, -1), emb[1:].expand(n, -1, -1)]),
            class_labels=torch.cat([cam.reshape(n, 16)] * 2),
            cross_attention_kwargs={"num_frames": 4},
        ).sample
    e_c, e_u = eps.chunk(2)
    e_cfg = e_u + 50.0 * (e_c - e_u)
    if recon:
        x0 = (noisy - (1 - a).sqrt() * e_cfg) / a.sqrt()
        x0_nocfg = (noisy - (1 - a).sqrt() * e_c) / a.sqrt()
        adjusted = []
        for k in range(0, n, 4):
            factor = x0_nocfg[k:k + 4].std() / x0[k:k + 4].std()
            adjusted.append(rescale * x0[k:k + 4] * factor + (1 - rescale) * x0[k:k + 4])
        loss = 0.5 * (latents - torch.cat(adjusted)).pow(2).sum()
    else:
        loss = ((1 - a) * (e_cfg - noise) * latents).sum()
    loss.backward()
    return rgb.grad


@pytest.mark.parametrize("recon", [False, True])
def test_grad_rgb_matches_direct_autograd(guidance, models, recon):
    req = request("lamp-recon" if recon else "lamp", 8, [650, 90], seed=5)
    got = guidance.grad([req])[0]
    expected = _reference_grad(models, req, "a desk lamp", "", recon)
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(got.grad_rgb, expected, atol=1e-4 * scale, rtol=1e-3)
    assert got.info["recon_loss"] == float(recon)


def test_recon_without_rescale_is_rescaled_sds(guidance):
    """latents − x̂0(ε_cfg) = √((1−ᾱ)/ᾱ)·(ε_cfg − ε): recon (rescale 0) and SDS differ by a
    per-t factor √((1−ᾱ)/ᾱ)/(1−ᾱ) on the latent gradient, hence on grad_rgb for one t."""
    sds = guidance.grad([request("chair", 4, [300], seed=9)])[0]
    recon = guidance.grad([request("chair-recon0", 4, [300], seed=9)])[0]
    a = float(guidance.models.alphas_cumprod[300])
    ratio = math.sqrt((1 - a) / a) / (1 - a)
    torch.testing.assert_close(recon.grad_rgb, sds.grad_rgb * ratio,
                               atol=1e-4 * float(recon.grad_rgb.abs().max()), rtol=1e-3)


def test_bad_requests_are_rejected_with_the_reason(guidance):
    with pytest.raises(ValueError, match="groups of 4 views.*batch 6"):
        guidance.grad([GuidanceRequest("chair", torch.rand(6, 3, 16, 16), torch.full((6,), 100), 0,
                                       family="mvd", c2w=orbit(6))])
    with pytest.raises(ValueError, match=r"equal within each group of 4.*groups \[1\]"):
        bad_t = request("chair", 8, [100, 100], seed=0)
        bad_t.timesteps[5] = 101
        guidance.grad([bad_t])
    with pytest.raises(UnknownAssetError, match="sofa"):
        guidance.grad([request("sofa", 4, [100], seed=0)])
    with pytest.raises(ValueError, match="needs GuidanceRequest.c2w"):
        guidance.grad([GuidanceRequest("chair", torch.rand(4, 3, 16, 16), torch.full((4,), 100), 0, family="mvd")])
    with pytest.raises(ValueError, match=r"family 'mvd'.*'ip'"):
        guidance.grad([request("chair", 4, [100], seed=0, family="ip")])
    with pytest.raises(TypeError, match="MVDreamSettings"):
        guidance.register("chair", "a wooden chair", None, object())


def test_register_is_idempotent_and_release_forgets(models):
    g = MVDreamGuidance(models, render_resolution=RES)
    g.register("a", "a red car")
    assert g._assets["a"].settings == MVDreamSettings()  # no settings: the method's defaults
    first = g._assets["a"].cond
    g.register("a", "a red car", None, SDS)  # new settings, same prompts: nothing encoded again
    assert g._assets["a"].cond is first and g._assets["a"].settings == SDS
    g.release("a")
    g.release("never-registered")
    with pytest.raises(UnknownAssetError):
        g.grad([request("a", 4, [10], seed=0)])


def test_each_asset_is_answered_with_its_own_settings():
    from stages.models.config import ModelsConfig

    g = MVDreamGuidance.from_config(ModelsConfig(mvdream="tiny", mvdream_text="tiny", device="cpu", dtype="float32"))
    assert g.render_resolution == 32
    g.register("low", "a mug", None, MVDreamSettings(guidance_scale=7.5))
    g.register("high", "a mug", None, MVDreamSettings(guidance_scale=50.0))
    low, high = g.grad([request("low", 4, [400], seed=3), request("high", 4, [400], seed=3)])
    assert (low.info["guidance_scale"], high.info["guidance_scale"]) == (7.5, 50.0)
    assert (low.grad_rgb - high.grad_rgb).abs().max() > 0
    g.register("eight", "a mug", None, MVDreamSettings(n_view=8))
    with pytest.raises(ValueError, match=r"n_view=8"):
        g.grad([request("eight", 8, [400, 400], seed=3)])
