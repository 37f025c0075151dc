"""The toy world against independent closed forms: cameras and intersections, the mixture's ε,
the guidance's branches, the reference sampler, the world file and the fidelity scores."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from stages.guidance.protocol import GuidanceRequest, IPSettings, MVDreamSettings, UnknownAssetError
from stages.scene.cameras import CameraConfig, make_cameras, orbit_cameras, sample_cameras
from stages.teacher.mixture import GaussianMixture, alphas_cumprod
from stages.toyworld import ToyWorldGuidance, ToyWorldReferenceSampler, WorldError, load_world, nearest_object
from stages.toyworld.fidelity import distinct_identities, score_views, solid_iou
from stages.toyworld.mixture import posterior_eps, responsibilities
from stages.toyworld.render import camera_rays, inside, render_objects
from stages.toyworld.world import MAX_RADIUS, ToyObject, bounding_radius, parse_object, primitive_table

WORLD = load_world()
PROMPT = "a toy block"


def _cams(batch=4, seed=0):
    return sample_cameras(torch.Generator().manual_seed(seed), batch, CameraConfig())


def _object(spec):
    return primitive_table([parse_object({"name": "x", "parts": [spec]}, "test")])


# ------------------------------------------------------------------ renderer
def test_rays_match_the_nerf_renderer():
    from stages.scene.nerf.renderer import camera_rays as nerf_rays

    cams = _cams(8, seed=3)
    origins, dirs = camera_rays(cams.c2w, cams.fovy, 12, 16)
    ref_origins, ref_dirs = nerf_rays(cams, 12, 16)
    torch.testing.assert_close(origins, ref_origins)
    torch.testing.assert_close(dirs, ref_dirs, atol=1e-6, rtol=1e-5)


def test_image_orientation_and_silhouette_follow_the_camera_maths():
    # camera at azimuth 0 sits on +x looking at the origin: world +y is image right, +z image up
    cams = make_cameras(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([3.0]), torch.tensor([40.0]))
    size = 64
    for position, where in (((0, 0.5, 0), "right"), ((0, 0, 0.5), "top")):
        table = _object({"shape": "sphere", "radius": 0.15, "position": list(position), "colour": "red"})
        alpha = render_objects(table, cams.c2w, cams.fovy, size, size).alpha[0, 0, 0]
        rows, cols = alpha.nonzero(as_tuple=True)
        if where == "right":
            assert cols.float().mean() > size / 2 + 5 and abs(rows.float().mean() - size / 2 + 0.5) < 1
        else:
            assert rows.float().mean() < size / 2 - 5 and abs(cols.float().mean() - size / 2 + 0.5) < 1
    # a centred sphere's silhouette: a disc of radius focal·tan(asin(r/d)) pixels
    r, d = 0.5, 3.0
    table = _object({"shape": "sphere", "radius": r})
    area = float(render_objects(table, cams.c2w, cams.fovy, 128, 128, supersample=4).alpha.sum())
    focal = 64 / math.tan(math.radians(20))
    expected = math.pi * (focal * math.tan(math.asin(r / d))) ** 2
    assert area == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize(
    "spec",
    [
        {"shape": "ellipsoid", "radii": [0.3, 0.2, 0.25]},
        {"shape": "box", "size": [0.5, 0.3, 0.4], "rotation": [30, 10, 5]},
        {"shape": "cylinder", "radius": 0.25, "height": 0.6, "rotation": [0, 40, 0]},
        {"shape": "cone", "radius": 0.3, "height": 0.5, "rotation": [10, 0, 30]},
        {"shape": "torus", "radius": 0.35, "thickness": 0.1, "rotation": [20, 0, 70]},
    ],
)
def test_hits_are_on_the_surface_and_normals_face_the_ray(spec):
    from stages.toyworld.render import _hits

    table = _object({**spec, "position": [0.1, -0.05, 0.05]})
    cams = _cams(4, seed=1)
    _, dirs = camera_rays(cams.c2w, cams.fovy, 24, 24)
    parts, rays, t, normal = _hits(table, cams.c2w[:, :3, 3], dirs.reshape(4, -1, 3))
    assert t.numel() > 50
    origin = cams.c2w[:, :3, 3].repeat_interleave(24 * 24, 0)[rays]
    d = dirs.reshape(-1, 3)[rays]
    after, before = origin + (t + 2e-3)[:, None] * d, origin + (t - 2e-3)[:, None] * d
    assert inside(table, after)[0].float().mean() > 0.97
    assert not inside(table, before)[0].any()
    assert torch.allclose(normal.norm(dim=-1), torch.ones_like(t), atol=1e-4)
    assert ((normal * d).sum(-1) < 1e-4).float().mean() > 0.99


def test_torus_and_box_hit_distances_match_closed_forms():
    cams = make_cameras(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([3.0]), torch.tensor([1.0]))
    c2w, fovy = cams.c2w, cams.fovy  # a narrow camera: its centre ray runs along −x through the origin
    from stages.toyworld.render import _hits

    _, dirs = camera_rays(c2w, fovy, 1, 1)
    cases = [
        ({"shape": "torus", "radius": 0.4, "thickness": 0.1}, 3.0 - 0.5),  # lying ring: outer edge at R + r
        ({"shape": "box", "size": [0.6, 0.2, 0.2]}, 3.0 - 0.3),
        ({"shape": "cone", "radius": 0.4, "height": 1.0}, 3.0 - 0.2),  # half the base radius at mid-height
        ({"shape": "cylinder", "radius": 0.25, "height": 0.2}, 3.0 - 0.25),
    ]
    for spec, expected in cases:
        _, _, t, _ = _hits(_object(spec), c2w[:, :3, 3], dirs.reshape(1, 1, 3))
        assert float(t.min()) == pytest.approx(expected, abs=1e-4), spec["shape"]


def test_lambert_shading_with_the_fixed_light():
    light = torch.tensor(WORLD.shading.light_direction)
    light = light / light.norm()
    cams = make_cameras(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([3.0]), torch.tensor([1.0]))
    table = _object({"shape": "box", "size": [0.4, 0.4, 0.4], "colour": [0.8, 0.4, 0.2]})
    rgb = render_objects(table, cams.c2w, cams.fovy, 1, 1, WORLD.shading).rgb[0, 0, :, 0, 0]
    lambert = max(0.0, float(light[0]))  # the face hit looks along +x
    expected = torch.tensor([0.8, 0.4, 0.2]) * (WORLD.shading.ambient + WORLD.shading.diffuse * lambert)
    torch.testing.assert_close(rgb, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ mixture
def test_exact_mixture_eps_equals_the_teacher_and_autograd():
    gen = torch.Generator().manual_seed(0)
    k, d, std = 5, 12, 0.1
    means = torch.rand(k, d, generator=gen, dtype=torch.float64) * 2 - 1
    log_w = torch.randn(k, generator=gen, dtype=torch.float64)
    acp = alphas_cumprod()
    t = torch.tensor([30, 300, 700, 950])
    x_t = torch.randn(4, d, generator=gen, dtype=torch.float64)
    eps, _ = posterior_eps(x_t, acp[t], means.expand(4, k, d), log_w, std)
    teacher = GaussianMixture(means, torch.full((k,), std, dtype=torch.float64), log_w)
    torch.testing.assert_close(eps, teacher.eps(x_t, acp[t]))
    # ε̂ = −√(1−ᾱ) ∇ log p_t (independent of both formulas)
    x = x_t.clone().requires_grad_(True)
    a = acp[t].view(-1, 1, 1)
    s2 = a * std**2 + 1 - a
    log_p = torch.logsumexp(log_w - ((x[:, None] - a.sqrt() * means) ** 2).sum(-1) / (2 * s2[..., 0]), dim=1)
    (grad,) = torch.autograd.grad(log_p.sum(), x)
    torch.testing.assert_close(eps, -(1 - acp[t]).sqrt().view(-1, 1) * grad)


def test_tempered_group_responsibilities_sum_the_views():
    gen = torch.Generator().manual_seed(1)
    log_lik = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    log_w = torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64)
    r = responsibilities(log_w, log_lik, group=4)
    for g in range(2):
        expected = torch.softmax(log_w + log_lik[4 * g : 4 * g + 4].sum(0), 0)
        for v in range(4):
            torch.testing.assert_close(r[4 * g + v], expected)
    # the temperature scales the distance term by d / D
    x_t, means = torch.zeros(1, 10, dtype=torch.float64), torch.ones(1, 2, 10, dtype=torch.float64)
    means[0, 1] = -2.0
    from stages.toyworld.mixture import log_likelihoods

    exact = log_likelihoods(x_t, torch.tensor([0.5]), means, 0.1, None)
    tempered = log_likelihoods(x_t, torch.tensor([0.5]), means, 0.1, 2.0)
    torch.testing.assert_close(tempered, exact * 2.0 / 10)


# ------------------------------------------------------------------ guidance
REFERENCES: dict = {}
"""The test assets and their references (None: registered without one)."""


def _request(guidance, asset, rgb, cams, t, seed=0, loss="isd", **fields):
    """A request of ``asset``, registered first with the settings ``loss`` and ``fields`` name
    (settings come with the registration; ``sds_mvd`` is the multi-view family, at CFG 7.5 and
    plain SDS unless given)."""
    if loss == "sds_mvd":
        fields = {"guidance_scale": 7.5, "recon_loss": False, **fields}
        settings = MVDreamSettings(**fields)
    else:
        settings = IPSettings(loss=loss, **fields)
    if asset in REFERENCES:
        guidance.register(asset, PROMPT, REFERENCES[asset], settings)
    return GuidanceRequest(asset, rgb, torch.as_tensor(t), seed, family=settings.family, c2w=cams.c2w, fovy=cams.fovy)


@pytest.fixture(scope="module")
def guidance():
    REFERENCES.update(ref5=ToyWorldReferenceSampler(WORLD).render(PROMPT, 5), plain=None)
    return ToyWorldGuidance(WORLD)


def test_reference_images_identify_their_objects():
    small = dataclasses.replace(WORLD, reference=dataclasses.replace(WORLD.reference, resolution=48))
    sampler = ToyWorldReferenceSampler(small)
    for prompt in WORLD.prompts:
        for k in (0, 3, 6, 9, 11):
            assert nearest_object(small, prompt, sampler.render(prompt, k))[0] == k


def test_sds_on_one_view_equals_the_exact_teacher_with_cfg():
    """With d = D the guidance's SDS is w(t)·(cfg(ε_c, ε_u) − ε) of the exact mixture over the
    renders of the request's camera (independent: the teacher's GaussianMixture)."""
    exact = dataclasses.replace(WORLD, model=dataclasses.replace(WORLD.model, evidence_dims=3 * 8 * 8))
    g = ToyWorldGuidance(exact)
    g.register("a", PROMPT, None, IPSettings(loss="sds"))
    cams = _cams(4, seed=5)[:1]
    rgb = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    response = g.grad([_request(g, "a", rgb, cams, [400], seed=9, loss="sds")])[0]
    mu = render_objects(exact.prompt_table(PROMPT), cams.c2w, cams.fovy, 8, 8, exact.shading).rgb[:, 0].reshape(12, -1) * 2 - 1
    acp = alphas_cumprod()
    noise = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(9)).double().reshape(1, -1)
    x_t = acp[400].sqrt() * (rgb.double().reshape(1, -1) * 2 - 1) + (1 - acp[400]).sqrt() * noise
    stds = torch.full((12,), 0.1, dtype=torch.float64)
    cond = GaussianMixture(mu.double(), stds, exact.log_weights(PROMPT)).eps(x_t, acp[400].view(1))
    uncond = GaussianMixture(mu.double(), stds, torch.zeros(12, dtype=torch.float64)).eps(x_t, acp[400].view(1))
    expected = 2 * (1 - acp[400]) * (uncond + 7.5 * (cond - uncond) - noise)
    torch.testing.assert_close(response.grad_rgb.double().reshape(1, -1), expected, atol=2e-4, rtol=1e-4)


def test_a_response_does_not_depend_on_its_batch_mates(guidance):
    cams = _cams(4)
    rgb = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mine = _request(guidance, "ref5", rgb, cams, [500, 300, 800, 100], seed=3)
    alone = guidance.grad([mine])[0]
    mates = guidance.grad([_request(guidance, "plain", rgb.flip(0), cams, [200] * 4, seed=1, loss="sds"), mine,
                           _request(guidance, "ref5", rgb, cams, [900] * 4, seed=3, loss="sds_mvd", guidance_scale=50.0)])
    assert torch.equal(alone.grad_rgb, mates[1].grad_rgb)
    assert not torch.equal(mates[0].grad_rgb, alone.grad_rgb)


def test_isd_vanishes_at_ip_scale_zero_and_pulls_toward_the_reference(guidance):
    cams = _cams(4, seed=2)
    objects = render_objects(WORLD.prompt_table(PROMPT), cams.c2w, cams.fovy, 16, 16, WORLD.shading).rgb
    start = objects.mean(0)  # between all objects
    zero = guidance.grad([_request(guidance, "ref5", start, cams, [600] * 4, ip_scale=0.0)])[0]
    assert zero.grad_rgb.abs().max() < 1e-6
    pulls = []
    for seed in range(8):
        grad = guidance.grad([_request(guidance, "ref5", start, cams, [600] * 4, seed=seed)])[0].grad_rgb
        pulls.append(float((-grad * (objects[5] - start)).sum()))
    assert sum(p > 0 for p in pulls) >= 7  # gradient descent moves the renders toward object 5


def test_the_tilt_and_the_prior_set_the_responsibilities(guidance):
    """r of the reference (cond-ref branch) and of the dominant object (cond) against a
    hand-written tempered posterior: weights (1 − ν s)·log π + s·τ·[ref], evidence d/D."""
    from stages.guidance.protocol import request_noise

    cams = _cams(4, seed=4)
    rgb = torch.full((4, 3, 16, 16), 0.5)
    acp = alphas_cumprod()
    mu = render_objects(WORLD.prompt_table(PROMPT), cams.c2w, cams.fovy, 16, 16, WORLD.shading).rgb * 2 - 1
    for t, loss, asset, index in ((999, "ip_sds", "ref5", 5), (700, "ip_sds", "ref5", 5), (700, "sds", "plain", 0)):
        info = guidance.grad([_request(guidance, asset, rgb, cams, [t] * 4, seed=7, loss=loss, ip_scale=0.5)])[0].info
        log_w = WORLD.log_weights(PROMPT).clone()
        if loss == "ip_sds":
            log_w = (1 - 0.3 * 0.5) * log_w
            log_w[5] += 0.5 * 5.0
        a = float(acp[t])
        x_t = math.sqrt(1 - a) * request_noise(7, rgb.shape).double()  # x0 = 2·0.5 − 1 = 0
        distance = ((x_t[None] - math.sqrt(a) * mu.double()) ** 2).sum(dim=(2, 3, 4))  # (K, B)
        logits = log_w[:, None] - 128 / (3 * 16 * 16) * distance / (2 * (a * 0.01 + 1 - a))
        expected = torch.softmax(logits, 0)[index].mean()
        key = "resp_reference" if loss == "ip_sds" else "resp_dominant"
        assert info[key] == pytest.approx(float(expected), rel=1e-6), (t, loss)
    # at t = 999 the evidence is small: the reference's weight is about its prior share
    prior = torch.softmax((1 - 0.15) * WORLD.log_weights(PROMPT) + 2.5 * (torch.arange(12) == 5), 0)[5]
    assert guidance.grad([_request(guidance, "ref5", rgb, cams, [999] * 4, seed=7, loss="ip_sds")])[0].info["resp_reference"] == pytest.approx(float(prior), abs=0.06)


def test_the_multiview_branch_ties_the_views_to_one_object(guidance):
    """Three views of object 4 and one of object 9: per image, view 3 is pulled to 9; in the
    multi-view branch all four are pulled to 4."""
    cams = _cams(4, seed=6)
    objects = render_objects(WORLD.prompt_table(PROMPT), cams.c2w, cams.fovy, 16, 16, WORLD.shading).rgb
    rgb = objects[4].clone()
    rgb[3] = objects[9, 3]
    toward = lambda grad, k: float((-grad[3] * (objects[k, 3] - rgb[3])).sum())  # noqa: E731
    per_image = guidance.grad([_request(guidance, "plain", rgb, cams, [250] * 4, loss="sds", guidance_scale=1.0)])[0]
    joint = guidance.grad([_request(guidance, "plain", rgb, cams, [250] * 4, loss="sds_mvd", guidance_scale=1.0)])[0]
    # per image, view 3 already is object 9: only noise moves it (|pull| ~0.1); jointly it is
    # pulled to object 4 by about 2·w(t)·ᾱ-weighted |μ_4 − μ_9|² (≈ 120 here)
    assert abs(toward(per_image.grad_rgb, 4)) < 1.0 and per_image.info["top_object"] == 4
    assert toward(joint.grad_rgb, 4) > 50.0
    recon = guidance.grad([_request(guidance, "plain", rgb, cams, [250] * 4, loss="sds_mvd", recon_loss=True)])[0]
    assert recon.info["recon_loss"] == 1.0 and recon.info["view_group"] == 4.0


def test_bad_requests_and_prompts_name_the_problem(guidance):
    cams = _cams(4)
    rgb = torch.rand(4, 3, 8, 8)
    with pytest.raises(UnknownAssetError):
        guidance.grad([_request(guidance, "ghost", rgb, cams, [1] * 4)])
    with pytest.raises(ValueError, match="registered without a reference"):
        guidance.grad([_request(guidance, "plain", rgb, cams, [1] * 4)])
    guidance.register("plain", PROMPT, None, IPSettings(loss="sds"))
    with pytest.raises(ValueError, match=r"GuidanceRequest.fovy"):
        guidance.grad([GuidanceRequest("plain", rgb, torch.ones(4, dtype=torch.long), 0, c2w=cams.c2w)])
    with pytest.raises(ValueError, match="equal within each group"):
        guidance.grad([_request(guidance, "plain", rgb, cams, [1, 2, 3, 4], loss="sds_mvd")])
    with pytest.raises(ValueError, match="'a purple chair' is not in the toy world"):
        guidance.register("x", "a purple chair")


# ------------------------------------------------------------------ reference sampler
def test_reference_sampler_draws_from_the_prior_and_is_seeded():
    sampler = ToyWorldReferenceSampler(WORLD)
    draws = [sampler.object_index(PROMPT, seed) for seed in range(2000)]
    prior = WORLD.log_weights(PROMPT).exp()
    counts = torch.bincount(torch.tensor(draws), minlength=12).double() / len(draws)
    assert (counts - prior).abs().max() < 0.03
    many = sampler.sample_many([PROMPT, "a ring"], [11, 12])
    assert many[1].tobytes() == sampler.sample("a ring", 12).tobytes()
    assert many[0].size == (128, 128)


# ------------------------------------------------------------------ world file
def test_default_world_objects_are_distinct_inside_the_ball_and_the_dominant_is_unlike_the_start():
    from stages.toyworld.world import _four_views, _mean_psnr

    start = _four_views(primitive_table([ToyObject("start", (WORLD.start,))]), WORLD.shading)[0]
    for prompt, objects in WORLD.prompts.items():
        assert len(objects) == 12 and all(bounding_radius(o) <= MAX_RADIUS for o in objects)
        views = _four_views(primitive_table(objects), WORLD.shading)
        to_start = _mean_psnr(start, views)
        assert int(to_start.argmin()) == 0, prompt
        for k in range(12):
            others = torch.cat([views[:k], views[k + 1 :]])
            assert float(_mean_psnr(views[k], others).max()) < 17.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("prompts: {x: {objects: [{parts: [{shape: prism}]}]}}", r"shape: unknown shape 'prism'"),
        ("prompts: {x: {objects: [{parts: [{shape: cone, radius: 0.2}]}]}}", r"a cone needs 'height'"),
        ("prompts: {x: {objects: [{parts: [{shape: sphere, radius: 0.2, colour: mauve}]}]}}", r"colour: unknown colour 'mauve'"),
        ("model: {tilt: -1}\nprompts: {x: {generate: {count: 2}}}", r"model\.tilt: must be >= 0"),
        ("prompts: {x: {generate: {count: 2, shapes: [hexagon]}}}", r"shapes: 'hexagon'"),
        ("prompts: {x: {objects: [], generate: {}}}", r"exactly one of 'objects'"),
        ("lights: {}\nprompts: {}", r"lights: unknown section"),
    ],
)
def test_world_file_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "world.yaml"
    path.write_text(text)
    with pytest.raises(WorldError, match=message):
        load_world(path)


def test_a_users_world_file_with_explicit_objects(tmp_path):
    path = tmp_path / "world.yaml"
    path.write_text(
        "prompts:\n  a snowman:\n    objects:\n"
        "      - {name: small, parts: [{shape: sphere, radius: 0.3, colour: white}, {shape: sphere, radius: 0.2, position: [0, 0, 0.4], colour: grey}]}\n"
        "      - {name: hat, parts: [{shape: cylinder, radius: 0.2, height: 0.3, colour: black}]}\n"
    )
    world = load_world(path)
    assert [o.name for o in world.prompts["a snowman"]] == ["small", "hat"]
    assert world.prompt_table("a snowman").num_objects == 2 and world.digest() != WORLD.digest()


# ------------------------------------------------------------------ fidelity
def test_scores_of_known_views():
    cams = orbit_cameras(8, -10.0, 3.0, 40.0, azimuth_start=22.5)
    objects = render_objects(WORLD.prompt_table(PROMPT), cams.c2w, cams.fovy, 32, 32, WORLD.shading, 2).rgb
    faithful = score_views(WORLD, PROMPT, objects[6], cams, reference=6)
    assert faithful["identity"] == 6 and faithful["consistency"] == 1.0 and faithful["psnr_reference"] > 60
    janus = objects[6].clone()
    janus[4:] = objects[2, 4:]  # half the views show another object
    scores = score_views(WORLD, PROMPT, janus, cams, reference=6)
    assert scores["consistency"] == pytest.approx(0.5) and scores["identity"] in (2, 6)
    from stages.scene.base import grid_points

    points = grid_points(1.0, 24).reshape(-1, 3)
    solid = inside(WORLD.prompt_table(PROMPT), points)[6].reshape(24, 24, 24)
    assert solid_iou(solid, WORLD, PROMPT, 6, 1.0) == 1.0
    assert solid_iou(solid, WORLD, PROMPT, 1, 1.0) < 0.5
    assert distinct_identities([3, 3, 5]) == 2
