"""AnalyticGuidance: the guidance protocol over the analytic teacher."""

import numpy as np
import pytest
import torch

from stages.guidance import losses
from stages.guidance.protocol import Guidance, GuidanceRequest, IPSettings, UnknownAssetError, request_noise
from stages.optimize.schedules import sample_timesteps, timestep_range
from stages.teacher import AnalyticGuidance, reference_image, reference_points
from teacher_fixtures import one_thread  # noqa: F401  (autouse: one intra-op thread)


PROMPT = "a ceramic teapot"
REGISTERED: dict = {}
"""(guidance id, asset id) → (prompt, reference) of the assets the tests registered."""


def _register(guidance, asset_id, prompt, reference=None, **settings):
    REGISTERED[id(guidance), asset_id] = (prompt, reference)
    guidance.register(asset_id, prompt, reference, IPSettings(**settings))


def _guidance(ref_mode=2):
    guidance = AnalyticGuidance()
    _register(guidance, "probe", PROMPT)
    colour = guidance.mode_colours("probe")[ref_mode]
    _register(guidance, "a", PROMPT, reference_image(colour))
    return guidance


def _request(guidance, asset_id="a", seed=7, loss="isd", batch=2, size=8, **settings):
    """A request of ``asset_id``, registered again first with the settings ``loss`` and
    ``settings`` name (settings come with the registration)."""
    if (id(guidance), asset_id) in REGISTERED:
        prompt, reference = REGISTERED[id(guidance), asset_id]
        guidance.register(asset_id, prompt, reference, IPSettings(loss=loss, **settings))
    rgb = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 100))
    t = torch.linspace(100, 900, batch).long()
    return GuidanceRequest(asset_id, rgb, t, seed=seed)


def test_implements_protocol_and_registry():
    guidance = _guidance()
    assert isinstance(guidance, Guidance)
    _register(guidance, "a", PROMPT, reference_image(guidance.mode_colours("a")[2]))  # idempotent
    request = _request(guidance)
    assert len(guidance.grad([request])) == 1
    guidance.release("a")
    guidance.release("never-registered")
    with pytest.raises(UnknownAssetError):
        guidance.grad([request])


def test_grad_matches_teacher_with_request_noise():
    guidance = _guidance()
    request = _request(guidance, ip_scale=0.7, guidance_scale=5.0)
    response = guidance.grad([request])[0]
    teacher = guidance.teacher("a")
    latents = request.rgb * 2 - 1
    noise = request_noise(request.seed, latents.shape)
    expected = teacher.latent_gradient(
        losses.loss_spec("isd"), latents, request.timesteps, noise, losses.LossParams(5.0), 0.7
    )
    assert torch.allclose(response.grad_rgb, 2 * expected, atol=1e-6)
    assert response.grad_rgb.shape == request.rgb.shape and response.grad_rgb.dtype == request.rgb.dtype
    assert response.grad_norm == pytest.approx(float(expected.norm()), rel=1e-5)
    assert response.loss == pytest.approx(0.5 * float(expected.pow(2).sum()) / 2, rel=1e-5)
    assert torch.equal(response.timesteps, request.timesteps)


def test_response_does_not_depend_on_batch_mates():
    guidance = _guidance()
    _register(guidance, "b", "a wooden boat", reference_image((0.2, 0.4, 0.9)))
    alone = guidance.grad([_request(guidance, "a", seed=3)])[0]
    _register(guidance, "b-ip", "a wooden boat", reference_image((0.2, 0.4, 0.9)), loss="ip_sds")
    mates = guidance.grad([_request(guidance, "b-ip", seed=1, loss="ip_sds"), _request(guidance, "a", seed=3), _request(guidance, "b", seed=3)])
    assert torch.equal(alone.grad_rgb, mates[1].grad_rgb)
    assert not torch.equal(mates[0].grad_rgb, mates[2].grad_rgb)  # the seed and the loss matter


def test_settings_select_sd_branch_and_delta_t():
    guidance = _guidance()
    vanilla = guidance.grad([_request(guidance)])[0].grad_rgb
    ip_null = guidance.grad([_request(guidance, sd_branch="ip_null")])[0].grad_rgb
    assert not torch.allclose(vanilla, ip_null, atol=1e-4)
    d50 = guidance.grad([_request(guidance, loss="cv_t_delta_sd")])[0].grad_rgb
    d80 = guidance.grad([_request(guidance, loss="cv_t_delta_sd", delta_t=80)])[0].grad_rgb
    assert not torch.allclose(d50, d80, atol=1e-4)
    same_t = guidance.grad([_request(guidance, loss="cv_independent_noise")])[0]
    assert torch.isfinite(same_t.grad_rgb).all()


def test_bad_input_errors():
    guidance = AnalyticGuidance()
    _register(guidance, "noref", PROMPT)
    with pytest.raises(ValueError, match="without a reference"):
        guidance.grad([_request(guidance, "noref", loss="isd")])
    assert guidance.grad([_request(guidance, "noref", loss="sds")])[0].grad_rgb.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown loss"):
        _request(guidance, "noref", loss="vsd")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        reference_points(torch.tensor([1.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="reference must be"):
        reference_points(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="dim must be 3"):
        AnalyticGuidance(config=type(guidance.config)(dim=2))


def test_reference_selects_majority_mode():
    guidance = AnalyticGuidance()
    guidance.register("probe", PROMPT)
    colours = guidance.mode_colours("probe")
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    image[:7] = (colours[1].numpy() * 255).round()
    image[7:] = (colours[3].numpy() * 255).round()
    guidance.register("x", PROMPT, image)
    assert torch.allclose(guidance.reference_colour("x"), colours[1])
    guidance.register("y", PROMPT, colours[3])  # a (3,) colour
    assert guidance.teacher("y").reference_index == 3
    assert torch.equal(guidance.mode_index("x", colours.T.reshape(3, 2, 2)).flatten(), torch.arange(4))


def _optimise_image(guidance, asset_id, steps=150, seed=0):
    """Adam on sigmoid colours of a (2, 3, 4, 4) "render"; t annealed as MVDream."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(2, 3, 4, 4, generator=gen).requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.05)
    for step in range(steps):
        rgb = torch.sigmoid(theta)
        t = sample_timesteps(gen, 2, *timestep_range(step, steps))
        response = guidance.grad([GuidanceRequest(asset_id, rgb.detach(), t, seed=seed * 10_000 + step)])[0]
        opt.zero_grad()
        rgb.backward(response.grad_rgb)
        opt.step()
    return torch.sigmoid(theta).detach()


def test_isd_image_reaches_each_references_mode():
    guidance = AnalyticGuidance()
    guidance.register("probe", PROMPT)
    colours = guidance.mode_colours("probe")
    reached = []
    for ref in (1, 3):
        guidance.register(f"ref{ref}", PROMPT, reference_image(colours[ref]), IPSettings(loss="isd"))
        modes = guidance.mode_index(f"ref{ref}", _optimise_image(guidance, f"ref{ref}"))
        assert (modes == ref).double().mean() >= 0.9, modes
        reached.append(ref)
    assert len(set(reached)) == 2


def test_cv_independent_noise_draws_its_independent_noise_from_seed_plus_one():
    guidance = _guidance()
    request = _request(guidance, loss="cv_independent_noise", seed=11)
    latents = request.rgb * 2 - 1
    expected = guidance.teacher("a").latent_gradient(
        losses.loss_spec("cv_independent_noise"), latents, request.timesteps,
        request_noise(11, latents.shape), losses.LossParams(7.5), 0.5,
        independent_noise=request_noise(12, latents.shape),
    )
    assert torch.allclose(guidance.grad([request])[0].grad_rgb, 2 * expected, atol=1e-6)
