"""IPGuidance: one UNet forward for all evaluations of all requests, checked against an
independent implementation (separate forwards at global IP scales + autograd through the VAE)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.guidance.ip_guidance import IPComponents, IPGuidance
from stages.guidance.protocol import GuidanceRequest, UnknownAssetError
from stages.guidance.runtime import GuidanceRuntime
from stages.models.ip_adapter import load_ip_adapter, per_sample_ip_scale, set_global_ip_scale
from stages.models.sd import build_tiny_sd

RES = 64  # tiny VAE: 64 px renders -> 8x8 latents


@pytest.fixture(scope="module")
def components() -> IPComponents:
    sd = build_tiny_sd(0)
    ip = load_ip_adapter(sd.unet, "tiny", "tiny", seed=0)
    return IPComponents(sd, ip)


def _ref(seed: int) -> np.ndarray:
    return np.random.RandomState(seed).rand(32, 32, 3)


def _registered(components, runtime: GuidanceRuntime | None = None) -> IPGuidance:
    g = IPGuidance(components, render_resolution=RES, runtime=runtime)
    g.register("car", "a red car", _ref(0))
    g.register("boat", "a blue boat", _ref(1))
    g.register("plain", "a tree")
    return g


@pytest.fixture()
def guidance(components) -> IPGuidance:
    return _registered(components)


def _request(asset, batch=2, size=RES, seed=0, t=(100, 700), **kw) -> GuidanceRequest:
    rgb = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1000))
    return GuidanceRequest(asset, rgb, torch.tensor(t[:batch]), seed=seed, **kw)


# ----------------------------------------------------------------- independent implementation


def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def _eps(comp, x, t, text, image, scale):
    """One UNet forward at a GLOBAL IP scale (diffusers' own processor path)."""
    set_global_ip_scale(comp.sd.unet, scale)
    try:
        with torch.no_grad():
            return comp.sd.unet(
                x, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": comp.ip.unet_embeds(image)}
            ).sample
    finally:
        set_global_ip_scale(comp.sd.unet, 1.0)


def _independent_grad(comp, req, prompt, reference, residual, negative=""):
    """grad_rgb = d(latents · G)/d(rgb), G = w(t)·residual(eps, noise, x_t-builder)."""
    sd, ip = comp.sd, comp.ip
    rgb = req.rgb.clone().requires_grad_(True)
    pixels = F.interpolate(rgb, (RES, RES), mode="bilinear", align_corners=False) if rgb.shape[-1] != RES else rgb
    latents = sd.vae.encode(pixels * 2 - 1).latent_dist.mean * sd.vae.config.scaling_factor
    b = rgb.shape[0]
    gen = torch.Generator().manual_seed(req.seed)
    noise = torch.randn(latents.shape, generator=gen)
    ac = _alphas_cumprod()

    def x_t(t, eps=noise):
        a = ac[t].view(-1, 1, 1, 1)
        return a.sqrt() * latents.detach() + (1 - a).sqrt() * eps

    texts = sd.encode_prompts([prompt, negative])
    cond, uncond = texts[0:1].expand(b, -1, -1), texts[1:2].expand(b, -1, -1)
    ref = ip.encode_reference(reference).expand(b, -1) if reference is not None else None
    null = torch.zeros(b, ip.image_encoder.config.projection_dim)

    def eps(x, t, text, image, scale):
        return _eps(comp, x, t, text, image, scale)

    G = residual(eps, x_t, req.timesteps, cond, uncond, ref, null, noise)
    G = (1 - ac[req.timesteps]).view(-1, 1, 1, 1) * G
    (grad,) = torch.autograd.grad((latents * G).sum(), rgb)
    return grad


def _cfg(c, u, s):
    return u + s * (c - u)


def _isd_vanilla(s, g=7.5):
    def residual(eps, x_t, t, cond, uncond, ref, null, noise):
        x = x_t(t)
        ip = _cfg(eps(x, t, cond, ref, s), eps(x, t, uncond, null, s), g)
        sd = _cfg(eps(x, t, cond, null, 0.0), eps(x, t, uncond, null, 0.0), g)
        return ip - sd

    return residual


# ----------------------------------------------------------------- tests


def test_isd_four_predictions_in_one_forward_equal_four_forwards(components):
    """(a) the 4·B rows of ISD in ONE forward (per-sample scale) vs four forwards."""
    sd, ip = components.sd, components.ip
    b = 3
    gen = torch.Generator().manual_seed(5)
    x, t = torch.randn(b, 4, 8, 8, generator=gen), torch.tensor([50, 400, 950])
    texts = sd.encode_prompts(["a red car", ""])
    cond, uncond = texts[0:1].expand(b, -1, -1), texts[1:2].expand(b, -1, -1)
    ref, null = ip.encode_reference(_ref(0)).expand(b, -1), ip.null_embedding().expand(b, -1)
    evaluations = [(cond, ref, 0.5), (uncond, null, 0.5), (cond, null, 0.0), (uncond, null, 0.0)]
    with torch.no_grad(), per_sample_ip_scale(sd.unet, torch.cat([torch.full((b,), s) for *_, s in evaluations])):
        one = sd.unet(
            x.repeat(4, 1, 1, 1), t.repeat(4),
            encoder_hidden_states=torch.cat([e[0] for e in evaluations]),
            added_cond_kwargs={"image_embeds": ip.unet_embeds(torch.cat([e[1] for e in evaluations]))},
        ).sample
    for k, (text, image, scale) in enumerate(evaluations):
        torch.testing.assert_close(one[k * b : (k + 1) * b], _eps(components, x, t, text, image, scale), rtol=1e-5, atol=1e-5)


def test_isd_grad_matches_autograd_of_independent_latent_gradient(guidance, components):
    """(d) grad_rgb = d(latents·G)/d(rgb) with G from separate forwards; also resizing (48 px)."""
    for req in (_request("car", seed=3), _request("car", size=48, seed=4, t=(999, 0))):
        (resp,) = guidance.grad([req])
        expected = _independent_grad(components, req, "a red car", _ref(0), _isd_vanilla(0.5))
        assert resp.grad_rgb.shape == req.rgb.shape and resp.grad_rgb.dtype == req.rgb.dtype
        assert expected.abs().max() > 0
        torch.testing.assert_close(resp.grad_rgb, expected, rtol=1e-4, atol=1e-6)
        assert resp.grad_norm > 0 and resp.loss > 0 and torch.equal(resp.timesteps, req.timesteps)


def test_ip_null_branch_is_scale_times_ref_minus_null(components):
    """(c) sd_branch=ip_null: ε_IP^cfg − ε_SD^cfg = g·(e(y, ref) − e(y, null)), two evaluations."""
    g = IPGuidance(components, render_resolution=RES, sd_branch="ip_null")
    g.register("car", "a red car", _ref(0))
    req = _request("car", seed=9, guidance_scale=5.0, ip_scale=0.7)
    (resp,) = g.grad([req])

    def residual(eps, x_t, t, cond, uncond, ref, null, noise):
        x = x_t(t)
        return 5.0 * (eps(x, t, cond, ref, 0.7) - eps(x, t, cond, null, 0.7))

    expected = _independent_grad(components, req, "a red car", _ref(0), residual)
    torch.testing.assert_close(resp.grad_rgb, expected, rtol=1e-4, atol=1e-6)
    assert resp.info["evaluations"] == 2.0


def test_other_losses_match_independent_formulas(guidance, components):
    """sds (no image prompt), cv_t_delta_ip / cv_t_delta_sd (t+δt, shared noise),
    cv_random_cfg100 (the IP prediction at CFG 100) and cv_independent_noise (seed+1 noise)."""

    def sds(eps, x_t, t, cond, uncond, ref, null, noise):
        x = x_t(t)
        return _cfg(eps(x, t, cond, null, 0.0), eps(x, t, uncond, null, 0.0), 7.5) - noise

    def t_delta(eps, x_t, t, cond, uncond, ref, null, noise):
        x, td = x_t(t), (t + 30).clamp(max=999)
        xd = x_t(td)
        return _cfg(eps(x, t, cond, ref, 0.5), eps(x, t, uncond, null, 0.5), 7.5) - _cfg(
            eps(xd, td, cond, ref, 0.5), eps(xd, td, uncond, null, 0.5), 7.5
        )

    def t_delta_sd(eps, x_t, t, cond, uncond, ref, null, noise):
        x, td = x_t(t), (t + 30).clamp(max=999)
        xd = x_t(td)
        return _cfg(eps(x, t, cond, ref, 0.5), eps(x, t, uncond, null, 0.5), 7.5) - _cfg(
            eps(xd, td, cond, null, 0.0), eps(xd, td, uncond, null, 0.0), 7.5
        )

    def random_cfg100(eps, x_t, t, cond, uncond, ref, null, noise):
        x = x_t(t)
        return _cfg(eps(x, t, cond, ref, 0.5), eps(x, t, uncond, null, 0.5), 100.0) - noise

    def same_t(eps, x_t, t, cond, uncond, ref, null, noise):
        noise2 = torch.randn(noise.shape, generator=torch.Generator().manual_seed(11 + 1))
        x, x2 = x_t(t), x_t(t, noise2)
        ip = _cfg(eps(x, t, cond, ref, 0.5), eps(x, t, uncond, null, 0.5), 7.5) - noise
        return ip - (_cfg(eps(x2, t, cond, null, 0.0), eps(x2, t, uncond, null, 0.0), 7.5) - noise2)

    cases = [
        (_request("plain", seed=11, loss="sds"), "a tree", None, sds),
        (_request("car", seed=11, t=(100, 980), loss="cv_t_delta_ip", options={"delta_t": 30}), "a red car", _ref(0), t_delta),
        (_request("car", seed=11, t=(100, 980), loss="cv_t_delta_sd", options={"delta_t": 30}), "a red car", _ref(0), t_delta_sd),
        # CFG 100 multiplies the UNet's float rounding (batched vs alone) by 100/7.5
        (_request("car", seed=11, loss="cv_random_cfg100"), "a red car", _ref(0), random_cfg100),
        (_request("car", seed=11, loss="cv_independent_noise"), "a red car", _ref(0), same_t),
    ]
    responses = guidance.grad([c[0] for c in cases])
    for resp, (req, prompt, ref, residual) in zip(responses, cases):
        expected = _independent_grad(components, req, prompt, ref, residual)
        atol = 2e-5 if req.loss == "cv_random_cfg100" else 1e-6
        torch.testing.assert_close(resp.grad_rgb, expected, rtol=1e-4, atol=atol)


@pytest.mark.parametrize(
    "runtime, car_pass_rows",
    [
        (GuidanceRuntime(vae_chunk=64, unet_rows=64), 3 * 4 + 2 * 4 + 2 * 2 + 2 * 4),  # one pass, one forward
        (GuidanceRuntime(vae_chunk=2, unet_rows=3), 2 * 4),  # a pass per request, 3-view one re-encoded
    ],
    ids=["unbounded", "bounded"],
)
def test_a_request_does_not_depend_on_its_batch_mates(components, runtime, car_pass_rows):
    """(b) same grad alone or batched with other assets (other references, scales, t, sizes),
    whether the batch runs as one pass and one UNet forward or in bounded passes and forwards."""
    guidance = _registered(components, runtime)
    req = _request("car", seed=21)
    (alone,) = _registered(components).grad([req])
    mates = [
        _request("boat", batch=3, seed=5, t=(1, 500, 999), ip_scale=1.0),
        _request("plain", seed=6, loss="sds", size=32),
        _request("boat", seed=7, loss="cv_independent_noise", guidance_scale=3.0),
    ]
    batched = guidance.grad([mates[0], req, *mates[1:]])
    assert [r.asset_id for r in batched] == ["boat", "car", "plain", "boat"]
    assert batched[1].info["unet_batch"] == car_pass_rows
    assert max(guidance.denoiser.calls) <= runtime.unet_rows
    torch.testing.assert_close(batched[1].grad_rgb, alone.grad_rgb, rtol=1e-4, atol=1e-6)
    assert batched[1].loss == pytest.approx(alone.loss, rel=1e-4)
    (boat_alone,) = _registered(components).grad([mates[0]])  # the 3-view request, chunked or not
    torch.testing.assert_close(batched[0].grad_rgb, boat_alone.grad_rgb, rtol=1e-4, atol=1e-6)


def test_view_prompts_use_the_view_dependent_embedding(components):
    g = IPGuidance(components, render_resolution=RES)
    g.register("viewed", "a red car", _ref(0))
    g.register("suffixed", "a red car, back view", _ref(0))
    back = dict(elevation=torch.tensor([10.0, 5.0]), azimuth=torch.tensor([180.0, -170.0]))
    viewed = _request("viewed", seed=2, options={"view_prompts": True}, **back)
    (a, b, c) = g.grad([viewed, _request("suffixed", seed=2, **back), _request("viewed", seed=2, **back)])
    torch.testing.assert_close(a.grad_rgb, b.grad_rgb, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(a.grad_rgb, c.grad_rgb, atol=1e-6)


def test_register_is_idempotent_and_release_forgets(guidance):
    before = guidance._assets["car"]
    guidance.register("car", "a red car", _ref(0))
    assert guidance._assets["car"] is before
    guidance.register("car", "a green car", _ref(0))
    assert not torch.equal(guidance._assets["car"].cond, before.cond)
    guidance.release("car")
    guidance.release("never-registered")
    with pytest.raises(UnknownAssetError):
        guidance.grad([_request("car")])


def test_bad_requests_name_the_problem(guidance, components):
    with pytest.raises(UnknownAssetError, match="ghost"):
        guidance.grad([_request("ghost")])
    with pytest.raises(ValueError, match=r"loss 'isd' needs a reference image.*'plain'"):
        guidance.grad([_request("plain")])
    bad = _request("car")
    bad.rgb = torch.rand(2, 4, RES, RES)
    with pytest.raises(ValueError, match=r"GuidanceRequest\.rgb"):
        guidance.grad([bad])
    bad = _request("car")
    bad.timesteps = torch.tensor([5, 1000])
    with pytest.raises(ValueError, match=r"timesteps out of range"):
        guidance.grad([bad])
    with pytest.raises(ValueError, match=r"options\['delta_t'\]"):
        guidance.grad([_request("car", loss="cv_t_delta_sd", options={"delta_t": -3})])
    with pytest.raises(ValueError, match=r"view_prompts.*elevation"):
        guidance.grad([_request("car", options={"view_prompts": True})])
    bad = _request("car")
    bad.loss = "nope"
    with pytest.raises(ValueError, match=r"unknown loss 'nope'"):
        guidance.grad([bad])
    with pytest.raises(ValueError, match="sd_branch"):
        IPGuidance(components, sd_branch="maybe")
    with pytest.raises(ValueError, match="render_resolution"):
        IPGuidance(components, render_resolution=60)


@pytest.mark.gpu
def test_cuda_fp16_grad_agrees_with_cpu_fp32(guidance):
    from stages.models.ip_adapter import load_ip_adapter as load
    from stages.models.sd import load_sd

    sd = load_sd("tiny", dtype=torch.float16, device="cuda", seed=0)
    ip = load(sd.unet, "tiny", "tiny", dtype=torch.float16, device="cuda", seed=0)
    cuda = IPGuidance(IPComponents(sd, ip), render_resolution=RES)
    cuda.register("car", "a red car", _ref(0))
    req = _request("car", seed=3)
    (on_gpu,) = cuda.grad([req])
    (on_cpu,) = guidance.grad([req])
    assert on_gpu.grad_rgb.device.type == "cpu" and on_gpu.grad_rgb.dtype == req.rgb.dtype
    assert torch.isfinite(on_gpu.grad_rgb).all()
    cosine = F.cosine_similarity(on_gpu.grad_rgb.flatten(), on_cpu.grad_rgb.flatten(), dim=0)
    assert cosine > 0.98


def test_plus_adapter_runs_the_same_protocol():
    """ip-adapter-plus (16-token resampler, hidden-state image embeds, encoder-made null)."""
    sd = build_tiny_sd(0)
    ip = load_ip_adapter(sd.unet, "tiny", "tiny", tiny_layout="plus")
    g = IPGuidance(IPComponents(sd, ip), render_resolution=RES)
    g.register("car", "a red car", _ref(0))
    g.register("boat", "a blue boat", _ref(1))
    req = _request("car", seed=3)
    (alone,) = g.grad([req])
    batched = g.grad([_request("boat", seed=4, ip_scale=0.9), req])
    torch.testing.assert_close(batched[1].grad_rgb, alone.grad_rgb, rtol=1e-4, atol=1e-6)
    assert alone.grad_norm > 0 and g._assets["car"].reference.shape == (1, 17, 32)


def test_negative_prompt_default_and_override(components):
    g = IPGuidance(components, render_resolution=RES, negative_prompt="blurry")
    g.register("a", "a red car", _ref(0))
    first = g._assets["a"]
    g.register("a", "a red car", _ref(0), negative_prompt="")  # protocol default: same registration
    assert g._assets["a"] is first
    torch.testing.assert_close(first.uncond, components.sd.encode_prompts(["blurry"]))
    g.register("a", "a red car", _ref(0), negative_prompt="low quality")
    torch.testing.assert_close(g._assets["a"].uncond, components.sd.encode_prompts(["low quality"]))


def test_from_config_picks_the_resolution_of_the_models_and_keeps_the_method_settings():
    from stages.models.config import ModelsConfig

    tiny = ModelsConfig(sd="tiny", ip_adapter="tiny", image_encoder="tiny", device="cpu", dtype="float32")
    g = IPGuidance.from_config(tiny, sd_branch="ip_null", negative_prompt="blurry")
    assert (g.render_resolution, g.sd_branch, g.negative_prompt) == (32, "ip_null", "blurry")
    assert IPGuidance.from_config(tiny, render_resolution=64).render_resolution == 64
