"""The analytic teacher: exact ε against independent computations, branches, loss table."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from stages.guidance import losses
from stages.guidance.losses import LossParams, loss_spec
from stages.teacher import (
    AnalyticTeacher,
    GaussianMixture,
    TeacherConfig,
    alphas_cumprod,
    prompt_mixture,
    reference_component,
    unconditional_mixture,
)
from teacher_fixtures import one_thread  # noqa: F401  (autouse: one intra-op thread)


def _teacher(prompt, config, reference=None):
    """The teacher of ``prompt`` (empty negative prompt), tilted toward ``reference``."""
    return AnalyticTeacher(prompt_mixture(prompt, config), prompt_mixture("", config), reference, config.tilt, config.null_flatten)


def _mixture(d=2, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand((k, d), generator=gen, dtype=torch.float64) * 2 - 1
    stds = 0.05 + 0.2 * torch.rand(k, generator=gen, dtype=torch.float64)
    weights = 0.2 + torch.rand(k, generator=gen, dtype=torch.float64)
    return GaussianMixture.from_weights(means, stds, weights)


def _torch_noised(mixture, a):
    """The noised mixture as torch.distributions (an independent implementation)."""
    scale = (a * mixture.stds**2 + 1 - a).sqrt().unsqueeze(-1).expand_as(mixture.means)
    comp = Independent(Normal(math.sqrt(a) * mixture.means, scale), 1)
    return MixtureSameFamily(Categorical(probs=mixture.weights), comp)


def test_alphas_cumprod_is_sd_schedule():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.allclose(alphas_cumprod().float(), scheduler.alphas_cumprod, atol=1e-6)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("t", [5, 300, 900])
def test_eps_is_minus_sigma_times_score(d, t):
    mixture = _mixture(d=d, seed=d)
    a = float(alphas_cumprod()[t])
    x = (torch.randn((16, d), generator=torch.Generator().manual_seed(t), dtype=torch.float64)).requires_grad_()
    log_p = _torch_noised(mixture, a).log_prob(x)
    (score,) = torch.autograd.grad(log_p.sum(), x)
    eps = mixture.eps(x.detach(), torch.full((16,), a, dtype=torch.float64))
    assert torch.allclose(eps, -math.sqrt(1 - a) * score, atol=1e-9)
    assert torch.allclose(mixture.log_prob(x.detach(), a), log_p.detach(), atol=1e-9)


def test_eps_is_the_posterior_mean_of_the_noise():
    # E[ε − ε̂(x_t)] = 0 and E[(ε − ε̂(x_t)) x_t] = 0 (orthogonality of the MMSE estimator),
    # checked by Monte Carlo, independent of the score formula.
    mixture = _mixture(d=2, seed=5)
    gen = torch.Generator().manual_seed(0)
    n, a = 200_000, float(alphas_cumprod()[400])
    x0 = mixture.sample(n, gen)
    eps = torch.randn((n, 2), generator=gen, dtype=torch.float64)
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    err = eps - mixture.eps(x_t, torch.full((n,), a, dtype=torch.float64))
    tol = 5 * err.std() / math.sqrt(n)
    assert err.mean(0).abs().max() < tol
    assert (err.unsqueeze(-1) * x_t.unsqueeze(1)).mean(0).abs().max() < 5 * (err.std() * x_t.std()) / math.sqrt(n)
    # ...and it is a much better predictor than the prior mean 0
    assert err.pow(2).mean() < 0.9 * eps.pow(2).mean()


def test_image_eps_is_per_pixel():
    teacher = _teacher("a chair", TeacherConfig())
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 800])
    eps = teacher.eps(x, t, "cond", "none")
    for b in range(2):
        points = x[b].permute(1, 2, 0).reshape(-1, 3)
        flat = teacher.eps(points, t[b].repeat(points.shape[0]))
        assert torch.allclose(eps[b].permute(1, 2, 0).reshape(-1, 3), flat, atol=1e-6)
    with pytest.raises(ValueError, match="x_t must be"):
        teacher.eps(torch.zeros(1, 2, 4, 4), torch.tensor([1]))
    with pytest.raises(ValueError, match="out of range"):
        teacher.eps(torch.zeros(1, 3), torch.tensor([1000]))


def test_branch_weights_follow_documented_model():
    cond = _mixture(d=2, k=3, seed=1)
    uncond = _mixture(d=2, k=2, seed=2)
    tau, nu, s = 3.0, 0.25, 0.6
    ref_point = cond.means[2] + 0.01
    teacher = AnalyticTeacher(cond, uncond, ref_point, tilt=tau, null_flatten=nu)
    assert teacher.reference_index == 2
    pi = cond.weights
    null = pi ** (1 - nu * s)
    ref = null * torch.tensor([1.0, 1.0, math.exp(s * tau)], dtype=torch.float64)
    assert torch.allclose(teacher.mixture("cond", "none", s).weights, pi)
    assert torch.allclose(teacher.mixture("cond", "null", s).weights, null / null.sum())
    assert torch.allclose(teacher.mixture("cond", "ref", s).weights, ref / ref.sum())
    # the uncond text branch is tilted toward its own component nearest the reference
    k_u = int(((uncond.means - ref_point) ** 2).sum(1).argmin())
    w_u = teacher.mixture("uncond", "ref", s).weights
    assert int(w_u.argmax()) == k_u or w_u[k_u] > uncond.weights[k_u]
    with pytest.raises(ValueError, match="needs a reference"):
        AnalyticTeacher(cond, uncond).mixture("cond", "ref", s)
    with pytest.raises(ValueError, match="image branch"):
        teacher.mixture("cond", "picture", s)


def test_reference_component_majority_vote():
    means = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    mixture = GaussianMixture.from_weights(means, 0.1, torch.tensor([0.6, 0.3, 0.1]))
    pts = torch.cat([mixture.means[1].expand(5, 3), mixture.means[0].expand(2, 3)])
    assert reference_component(mixture, pts) == 1
    assert reference_component(mixture, mixture.means[2]) == 2
    with pytest.raises(ValueError, match="reference must be"):
        reference_component(mixture, torch.zeros(2))


def test_prompt_mixture_deterministic_and_separated():
    config = TeacherConfig()
    a, b = prompt_mixture("a red chair", config), prompt_mixture("a red chair", config)
    assert torch.equal(a.means, b.means)
    assert not torch.equal(a.means, prompt_mixture("a blue car", config).means)
    assert float(torch.pdist(a.means).min()) >= 4 * config.component_std
    assert a.means.abs().max() <= config.mean_range
    assert torch.allclose(a.weights[1:] / a.weights[:-1], torch.full((3,), config.weight_ratio, dtype=torch.float64))
    empty = prompt_mixture("  ", config)
    assert torch.equal(empty.means, unconditional_mixture(config).means) and empty.num_components == 1


@pytest.mark.parametrize(
    "field, value", [("dim", 0), ("component_std", 0.0), ("weight_ratio", 1.5), ("tilt", -1.0), ("null_flatten", 1.0)]
)
def test_teacher_config_errors_name_field(field, value):
    with pytest.raises(ValueError, match=f"TeacherConfig.{field}"):
        TeacherConfig(**{field: value})


def _setup():
    teacher = _teacher("a vase", TeacherConfig(), prompt_mixture("a vase", TeacherConfig()).means[2])
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    return teacher, x0, torch.tensor([150, 700]), noise


def test_every_loss_runs_through_the_teacher():
    teacher, x0, t, noise = _setup()
    noise2 = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    for name in losses.LOSS_NAMES:
        for branch in losses.SD_BRANCHES:
            grad = teacher.latent_gradient(loss_spec(name, branch), x0, t, noise, independent_noise=noise2)
            assert grad.shape == x0.shape and torch.isfinite(grad).all(), (name, branch)


def test_isd_readings_against_direct_eps_calls():
    teacher, x0, t, noise = _setup()
    g, s = 7.5, 0.5
    acp = teacher.alphas_cumprod
    x_t = losses.add_noise(x0, noise, acp, t)
    e = lambda text, image: teacher.eps(x_t, t, text, image, s)  # noqa: E731
    w = (1 - acp[t]).float().view(-1, 1, 1, 1)
    vanilla = teacher.latent_gradient(loss_spec("isd", "vanilla"), x0, t, noise, LossParams(g), s)
    expected = w * (
        (e("uncond", "null") + g * (e("cond", "ref") - e("uncond", "null")))
        - (e("uncond", "none") + g * (e("cond", "none") - e("uncond", "none")))
    )
    assert torch.allclose(vanilla, expected, atol=1e-5)
    ip_null = teacher.latent_gradient(loss_spec("isd", "ip_null"), x0, t, noise, LossParams(g), s)
    assert torch.allclose(ip_null, w * g * (e("cond", "ref") - e("cond", "null")), atol=1e-5)
    assert not torch.allclose(vanilla, ip_null, atol=1e-3)  # the null branch is not "none"
    # at IP scale 0 every image branch is the vanilla model: ISD vanishes
    zero = teacher.latent_gradient(loss_spec("isd"), x0, t, noise, LossParams(g), 0.0)
    assert zero.abs().max() < 1e-6


def test_t_delta_and_independent_noise_are_used():
    teacher, x0, t, noise = _setup()
    acp, g, s = teacher.alphas_cumprod, 7.5, 0.5
    t2 = losses.shifted_timesteps(t, 40)
    x_t, x_t2 = losses.add_noise(x0, noise, acp, t), losses.add_noise(x0, noise, acp, t2)
    cfg = lambda x, tt: teacher.eps(x, tt, "uncond", "null", s) + g * (  # noqa: E731
        teacher.eps(x, tt, "cond", "ref", s) - teacher.eps(x, tt, "uncond", "null", s)
    )
    w = (1 - acp[t]).float().view(-1, 1, 1, 1)
    got = teacher.latent_gradient(loss_spec("cv_t_delta_ip"), x0, t, noise, LossParams(g), s, delta_t=40)
    assert torch.allclose(got, w * (cfg(x_t, t) - cfg(x_t2, t2)), atol=1e-5)
    # the paper's reading: the control variate ε_SD (IP scale 0) at t + δt
    sd = lambda x, tt: teacher.eps(x, tt, "uncond", "none") + g * (  # noqa: E731
        teacher.eps(x, tt, "cond", "none") - teacher.eps(x, tt, "uncond", "none")
    )
    got = teacher.latent_gradient(loss_spec("cv_t_delta_sd"), x0, t, noise, LossParams(g), s, delta_t=40)
    assert torch.allclose(got, w * (cfg(x_t, t) - sd(x_t2, t2)), atol=1e-5)
    # Rand. noise (CFG 100): the IP prediction at the second CFG scale, minus the noise
    cfg100 = teacher.eps(x_t, t, "uncond", "null", s) + 100.0 * (
        teacher.eps(x_t, t, "cond", "ref", s) - teacher.eps(x_t, t, "uncond", "null", s)
    )
    got = teacher.latent_gradient(loss_spec("cv_random_cfg100"), x0, t, noise, LossParams(g, 100.0), s)
    assert torch.allclose(got, w * (cfg100 - noise), atol=1e-4)
    with pytest.raises(ValueError, match="independent noise"):
        teacher.latent_gradient(loss_spec("cv_independent_noise"), x0, t, noise)
