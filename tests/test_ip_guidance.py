"""IPGuidance: one UNet forward for all evaluations of all requests, checked against an
independent implementation (separate forwards at global IP scales + autograd through the VAE)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.guidance.ip_guidance import IPComponents, IPGuidance
from stages.guidance.protocol import GuidanceRequest, IPSettings, UnknownAssetError
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


def _settings(**fields) -> IPSettings:
    """An asset's settings; one prompt for every view (the test requests carry no cameras)."""
    return IPSettings(**{"view_prompts": False, **fields})


def _registered(components, runtime: GuidanceRuntime | None = None) -> IPGuidance:
    g = IPGuidance(components, render_resolution=RES, runtime=runtime)
    g.register("car", "a red car", _ref(0), _settings())
    g.register("boat", "a blue boat", _ref(1), _settings())
    g.register("plain", "a tree", None, _settings(loss="sds"))
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


def test_each_asset_is_answered_with_its_own_sd_branch(components):
    """(c) The asset's ``sd_branch`` is honoured (it was ignored when it came per request):
    ``ip_null``: ε_IP^cfg − ε_SD^cfg = g·(e(y, ref) − e(y, null)), two evaluations; ``vanilla``
    beside it in the same batch: four evaluations, ε_SD at IP scale 0."""
    g = IPGuidance(components, render_resolution=RES)
    g.register("null", "a red car", _ref(0), _settings(sd_branch="ip_null", guidance_scale=5.0, ip_scale=0.7))
    g.register("vanilla", "a red car", _ref(0), _settings(sd_branch="vanilla", guidance_scale=5.0, ip_scale=0.7))
    null_req, vanilla_req = _request("null", seed=9), _request("vanilla", seed=9)
    null, vanilla = g.grad([null_req, vanilla_req])

    def residual(eps, x_t, t, cond, uncond, ref, null, noise):
        x = x_t(t)
        return 5.0 * (eps(x, t, cond, ref, 0.7) - eps(x, t, cond, null, 0.7))

    expected = _independent_grad(components, null_req, "a red car", _ref(0), residual)
    torch.testing.assert_close(null.grad_rgb, expected, rtol=1e-4, atol=1e-6)
    assert null.info["evaluations"] == 2.0
    expected = _independent_grad(components, vanilla_req, "a red car", _ref(0), _isd_vanilla(0.7, 5.0))
    torch.testing.assert_close(vanilla.grad_rgb, expected, rtol=1e-4, atol=1e-6)
    assert vanilla.info["evaluations"] == 4.0 and not torch.allclose(null.grad_rgb, vanilla.grad_rgb, atol=1e-6)


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

    for loss in ("cv_t_delta_ip", "cv_t_delta_sd", "cv_random_cfg100", "cv_independent_noise"):
        guidance.register(loss, "a red car", _ref(0), _settings(loss=loss, delta_t=30))
    cases = [
        (_request("plain", seed=11), "a tree", None, sds),
        (_request("cv_t_delta_ip", seed=11, t=(100, 980)), "a red car", _ref(0), t_delta),
        (_request("cv_t_delta_sd", seed=11, t=(100, 980)), "a red car", _ref(0), t_delta_sd),
        # CFG 100 multiplies the UNet's float rounding (batched vs alone) by 100/7.5
        (_request("cv_random_cfg100", seed=11), "a red car", _ref(0), random_cfg100),
        (_request("cv_independent_noise", seed=11), "a red car", _ref(0), same_t),
    ]
    responses = guidance.grad([c[0] for c in cases])
    for resp, (req, prompt, ref, residual) in zip(responses, cases):
        expected = _independent_grad(components, req, prompt, ref, residual)
        atol = 2e-5 if req.asset_id == "cv_random_cfg100" else 1e-6
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
    def with_mates(guidance: IPGuidance) -> IPGuidance:
        guidance.register("boat", "a blue boat", _ref(1), _settings(ip_scale=1.0))
        guidance.register("boat-cv", "a blue boat", _ref(1), _settings(loss="cv_independent_noise", guidance_scale=3.0))
        return guidance

    guidance = with_mates(_registered(components, runtime))
    req = _request("car", seed=21)
    (alone,) = _registered(components).grad([req])
    mates = [
        _request("boat", batch=3, seed=5, t=(1, 500, 999)),
        _request("plain", seed=6, size=32),
        _request("boat-cv", seed=7),
    ]
    batched = guidance.grad([mates[0], req, *mates[1:]])
    assert [r.asset_id for r in batched] == ["boat", "car", "plain", "boat-cv"]
    assert batched[1].info["unet_batch"] == car_pass_rows
    assert max(guidance.denoiser.calls) <= runtime.unet_rows
    torch.testing.assert_close(batched[1].grad_rgb, alone.grad_rgb, rtol=1e-4, atol=1e-6)
    assert batched[1].loss == pytest.approx(alone.loss, rel=1e-4)
    (boat_alone,) = with_mates(_registered(components)).grad([mates[0]])  # the 3-view request, chunked or not
    torch.testing.assert_close(batched[0].grad_rgb, boat_alone.grad_rgb, rtol=1e-4, atol=1e-6)


def test_view_prompts_use_the_view_dependent_embedding(components):
    g = IPGuidance(components, render_resolution=RES)
    g.register("viewed", "a red car", _ref(0), IPSettings(view_prompts=True))
    g.register("suffixed", "a red car, back view", _ref(0), _settings())
    g.register("unviewed", "a red car", _ref(0), _settings())
    back = dict(elevation=torch.tensor([10.0, 5.0]), azimuth=torch.tensor([180.0, -170.0]))
    (a, b, c) = g.grad([_request(name, seed=2, **back) for name in ("viewed", "suffixed", "unviewed")])
    torch.testing.assert_close(a.grad_rgb, b.grad_rgb, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(a.grad_rgb, c.grad_rgb, atol=1e-6)


def test_register_is_idempotent_and_release_forgets(guidance):
    before = guidance._assets["car"]
    guidance.register("car", "a red car", _ref(0), _settings())
    assert guidance._assets["car"] is before
    guidance.register("car", "a red car", _ref(0), _settings(ip_scale=0.9))  # new settings, same embeddings
    assert guidance._assets["car"].cond is before.cond and guidance._assets["car"].settings.ip_scale == 0.9
    guidance.register("car", "a green car", _ref(0), _settings())
    assert not torch.equal(guidance._assets["car"].cond, before.cond)
    guidance.release("car")
    guidance.release("never-registered")
    with pytest.raises(UnknownAssetError):
        guidance.grad([_request("car")])


def test_bad_requests_name_the_problem(guidance, components):
    with pytest.raises(UnknownAssetError, match="ghost"):
        guidance.grad([_request("ghost")])
    guidance.register("plain-isd", "a tree", None, _settings())
    with pytest.raises(ValueError, match=r"loss 'isd' needs a reference image.*'plain-isd'"):
        guidance.grad([_request("plain-isd")])
    bad = _request("car")
    bad.rgb = torch.rand(2, 4, RES, RES)
    with pytest.raises(ValueError, match=r"GuidanceRequest\.rgb"):
        guidance.grad([bad])
    bad = _request("car")
    bad.timesteps = torch.tensor([5, 1000])
    with pytest.raises(ValueError, match=r"timesteps out of range"):
        guidance.grad([bad])
    guidance.register("viewed", "a red car", _ref(0), IPSettings(view_prompts=True))
    with pytest.raises(ValueError, match=r"view_prompts.*'viewed'.*elevation"):
        guidance.grad([_request("viewed")])
    with pytest.raises(ValueError, match=r"family 'ip'.*'mvd'"):
        guidance.grad([_request("car", family="mvd")])
    with pytest.raises(TypeError, match="IPSettings"):
        guidance.register("car", "a red car", _ref(0), settings=object())
    with pytest.raises(ValueError, match="render_resolution"):
        IPGuidance(components, render_resolution=60)


@pytest.mark.gpu
def test_cuda_fp16_grad_agrees_with_cpu_fp32(guidance):
    from stages.models.ip_adapter import load_ip_adapter as load
    from stages.models.sd import load_sd

    sd = load_sd("tiny", dtype=torch.float16, device="cuda", seed=0)
    ip = load(sd.unet, "tiny", "tiny", dtype=torch.float16, device="cuda", seed=0)
    cuda = IPGuidance(IPComponents(sd, ip), render_resolution=RES)
    cuda.register("car", "a red car", _ref(0), _settings())
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
    g.register("car", "a red car", _ref(0), _settings())
    g.register("boat", "a blue boat", _ref(1), _settings(ip_scale=0.9))
    req = _request("car", seed=3)
    (alone,) = g.grad([req])
    batched = g.grad([_request("boat", seed=4), req])
    torch.testing.assert_close(batched[1].grad_rgb, alone.grad_rgb, rtol=1e-4, atol=1e-6)
    assert alone.grad_norm > 0 and g._assets["car"].reference.shape == (1, 17, 32)


def test_negative_prompt_comes_with_the_settings(components):
    g = IPGuidance(components, render_resolution=RES)
    g.register("a", "a red car", _ref(0), _settings(negative_prompt="blurry"))
    first = g._assets["a"]
    g.register("a", "a red car", _ref(0), _settings(negative_prompt="blurry"))  # a re-registration: same embeddings
    assert g._assets["a"] is first
    torch.testing.assert_close(first.uncond, components.sd.encode_prompts(["blurry"]))
    g.register("a", "a red car", _ref(0), _settings(negative_prompt="low quality"))
    torch.testing.assert_close(g._assets["a"].uncond, components.sd.encode_prompts(["low quality"]))
    g.register("b", "a red car", _ref(0))  # no settings: the method's defaults (empty negative prompt)
    assert g._assets["b"].settings == IPSettings()
    torch.testing.assert_close(g._assets["b"].uncond, components.sd.encode_prompts([""]))


def test_from_config_picks_the_resolution_of_the_models():
    from stages.models.config import ModelsConfig

    tiny = ModelsConfig(sd="tiny", ip_adapter="tiny", image_encoder="tiny", device="cpu", dtype="float32")
    assert IPGuidance.from_config(tiny).render_resolution == 32
    assert IPGuidance.from_config(tiny, render_resolution=64).render_resolution == 64
