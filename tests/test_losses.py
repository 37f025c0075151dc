"""The shared loss table (stages.guidance.losses) against hand-written formulas."""

import pytest
import torch
from diffusers import DDPMScheduler

from stages.guidance import losses
from stages.guidance.losses import Evaluation, LossParams, loss_spec


def _preds(n, shape=(2, 4, 3, 3), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def test_cfg_formula():
    c, u = _preds(2)
    assert torch.allclose(losses.cfg(c, u, 7.5), 7.5 * c - 6.5 * u, atol=1e-5)
    assert torch.allclose(losses.cfg(c, u, 1.0), c)
    assert torch.allclose(losses.cfg(c, u, 0.0), u)


def test_add_noise_and_weight_match_diffusers_scheduler():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    acp = scheduler.alphas_cumprod
    x0, noise = _preds(2)
    t = torch.tensor([10, 900])
    expected = scheduler.add_noise(x0, noise, t)
    assert torch.allclose(losses.add_noise(x0, noise, acp, t), expected, atol=1e-5)
    assert torch.allclose(losses.sds_weight(acp, t), 1 - acp[t])


def test_shifted_timesteps_clamps():
    t = torch.tensor([0, 500, 990])
    assert losses.shifted_timesteps(t, 20).tolist() == [20, 520, 999]


@pytest.mark.parametrize(
    "name, branch, expected_evals",
    [
        ("sds", "vanilla", [("cond", "none"), ("uncond", "none")]),
        ("sds_mvd", "vanilla", [("cond", "none"), ("uncond", "none")]),
        ("ip_sds", "vanilla", [("cond", "ref"), ("uncond", "null")]),
        ("cv_random", "vanilla", [("cond", "ref"), ("uncond", "null")]),
        ("isd", "vanilla", [("cond", "ref"), ("uncond", "null"), ("cond", "none"), ("uncond", "none")]),
        ("isd", "ip_null", [("cond", "ref"), ("cond", "null")]),
        ("cv_random_cfg100", "vanilla", [("cond", "ref"), ("uncond", "null")]),
        ("cv_sd_cfg100", "vanilla", [("cond", "ref"), ("uncond", "null"), ("cond", "none"), ("uncond", "none")]),
        ("cv_sd_cfg100", "ip_null", [("cond", "ref"), ("uncond", "null"), ("cond", "null"), ("uncond", "null")]),
        ("cv_t_delta_sd", "vanilla", [("cond", "ref"), ("uncond", "null"), ("cond", "none"), ("uncond", "none")]),
        ("cv_t_delta_ip", "vanilla", [("cond", "ref"), ("uncond", "null"), ("cond", "ref"), ("uncond", "null")]),
    ],
)
def test_spec_evaluations(name, branch, expected_evals):
    spec = loss_spec(name, branch)
    assert [(e.text, e.image) for e in spec.evaluations] == expected_evals
    assert spec.uses_image_prompt == any(img != "none" for _, img in expected_evals)


def test_residuals_against_formulas():
    p = _preds(4)
    noise, noise2 = _preds(2, seed=1)
    g = 7.5
    k = LossParams(guidance_scale=g, cv_guidance_scale=100.0)
    cfg = lambda c, u, s: u + s * (c - u)  # noqa: E731  independent of losses.cfg
    expected = {
        "sds": cfg(p[0], p[1], g) - noise,
        "ip_sds": cfg(p[0], p[1], g) - noise,
        "isd": cfg(p[0], p[1], g) - cfg(p[2], p[3], g),
        "cv_random": cfg(p[0], p[1], g) - noise,
        "cv_random_cfg100": cfg(p[0], p[1], 100.0) - noise,
        "cv_sd_cfg100": cfg(p[0], p[1], g) - cfg(p[2], p[3], 100.0),
        "cv_t_delta_sd": cfg(p[0], p[1], g) - cfg(p[2], p[3], g),
        "cv_t_delta_ip": cfg(p[0], p[1], g) - cfg(p[2], p[3], g),
        "cv_independent_noise": (cfg(p[0], p[1], g) - noise) - (cfg(p[2], p[3], g) - noise2),
    }
    for name, value in expected.items():
        spec = loss_spec(name)
        r = spec.residual(p[: len(spec.evaluations)], noise, noise2, k)
        assert torch.allclose(r, value, atol=1e-4), name
    ip_null = loss_spec("isd", "ip_null")
    assert torch.allclose(ip_null.residual(p[:2], noise, None, k), g * (p[0] - p[1]), atol=1e-5)


def test_ip_null_equals_vanilla_when_uncond_is_shared():
    # With eps(uncond, null) == eps(uncond, none) == u and eps(cond, none) replaced by the
    # null-image prediction, both readings of ISD agree: s·(e_ref − e_null).
    c_ref, c_null, u = _preds(3)
    k = LossParams(guidance_scale=5.0)
    vanilla = loss_spec("isd", "vanilla").residual([c_ref, u, c_null, u], u, None, k)
    ip_null = loss_spec("isd", "ip_null").residual([c_ref, c_null], u, None, k)
    assert torch.allclose(vanilla, ip_null, atol=1e-5)


def test_independent_noise_and_t_delta_flags():
    assert loss_spec("cv_independent_noise").needs_independent_noise
    assert not loss_spec("isd").needs_independent_noise
    assert any(e.timestep == "t_delta" for e in loss_spec("cv_t_delta_ip").evaluations)
    assert Evaluation("cond", "ref", "t_delta") in loss_spec("cv_t_delta_ip").evaluations
    with pytest.raises(ValueError, match="independent noise"):
        loss_spec("cv_independent_noise").residual(_preds(4), _preds(1)[0], None, LossParams())


def test_latent_gradient_weights_per_sample_and_checks_count():
    spec = loss_spec("sds")
    p = _preds(2)
    noise = _preds(1, seed=3)[0]
    w = torch.tensor([0.25, 2.0])
    grad = losses.latent_gradient(spec, p, noise, w, LossParams(guidance_scale=3.0))
    r = p[1] + 3.0 * (p[0] - p[1]) - noise
    assert torch.allclose(grad[0], 0.25 * r[0], atol=1e-5)
    assert torch.allclose(grad[1], 2.0 * r[1], atol=1e-5)
    with pytest.raises(ValueError, match="needs 2 predictions"):
        losses.latent_gradient(spec, p[:1], noise, w, LossParams())
    assert float(losses.surrogate_loss(grad)) == pytest.approx(0.5 * float(grad.pow(2).sum()) / 2, rel=1e-6)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        loss_spec("nope")
    with pytest.raises(ValueError, match="sd_branch"):
        loss_spec("isd", "zero")
    for name in losses.LOSS_NAMES:
        assert loss_spec(name).name == name


def test_t_delta_readings_put_the_right_branch_at_t_plus_delta():
    sd = loss_spec("cv_t_delta_sd")  # the paper's: the control variate ε_SD at t + δt
    assert [(e.image, e.timestep) for e in sd.evaluations] == [("ref", "t"), ("null", "t"), ("none", "t_delta"), ("none", "t_delta")]
    ip = loss_spec("cv_t_delta_ip")  # extra: the IP UNet itself at t + δt
    assert [(e.image, e.timestep) for e in ip.evaluations] == [("ref", "t"), ("null", "t"), ("ref", "t_delta"), ("null", "t_delta")]
    assert loss_spec("cv_independent_noise").needs_independent_noise and not sd.needs_independent_noise


def test_table3_rows_name_existing_losses():
    assert set(losses.TABLE3_ROWS) <= set(losses.LOSS_NAMES)
    assert losses.TABLE3_ROWS["isd"] == "UNet (same t)"


@pytest.mark.parametrize(
    "old, successors",
    [("cv_cfg100", ("cv_sd_cfg100", "cv_random_cfg100")), ("cv_t_delta", ("cv_t_delta_ip", "cv_t_delta_sd")), ("cv_same_t", ("cv_independent_noise", "isd"))],
)
def test_renamed_losses_are_refused_with_their_successors(old, successors):
    from stages.optimize.config import OptimizeConfig

    for call in (lambda: loss_spec(old), lambda: OptimizeConfig(loss=old).validate()):
        with pytest.raises(ValueError, match="renamed") as error:
            call()
        assert all(f"'{name}'" in str(error.value) for name in successors)
    with pytest.raises(ValueError, match=r"method\.loss"):
        OptimizeConfig(loss=old).validate()
