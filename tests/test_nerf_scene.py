"""NeRFScene: render contract, gradients, blob init, determinism, checkpoints, regularisers."""

import io
import math

import pytest
import torch
from omegaconf import OmegaConf

from stages.scene.base import Scene
from stages.scene.nerf import DEFAULT_LR, NeRFConfig, NeRFScene
from stages.scene.nerf.background import sh_encode
from stages.scene.nerf.renderer import camera_rays, sphere_bounds
from test_splats_helpers import orbit_cameras


def tiny(**background) -> NeRFConfig:
    cfg = NeRFConfig.tiny()
    for key, value in background.items():
        setattr(cfg.background, key, value)
    return cfg


def test_implements_scene_protocol_and_config_is_structured():
    scene = NeRFScene(NeRFConfig.tiny(), seed=0)
    assert isinstance(scene, Scene)
    assert scene.backend == "torch"
    structured = OmegaConf.structured(NeRFConfig)
    merged = OmegaConf.merge(structured, {"renderer": {"num_samples_per_ray": 64}, "background": {"kind": "solid"}})
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, NeRFConfig) and cfg.renderer.num_samples_per_ray == 64
    assert cfg.hash_grid.log2_hashmap_size == 19 and cfg.hash_grid.n_levels == 16


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("backend", "cuda", "nerf.backend"),
        ("density_bias", "blob", "nerf.density_bias"),
        ("radius", 0.0, "nerf.radius"),
    ],
)
def test_bad_config_names_the_key(key, value, message):
    cfg = NeRFConfig.tiny()
    setattr(cfg, key, value)
    with pytest.raises(ValueError, match=message):
        NeRFScene(cfg, seed=0)


@pytest.mark.parametrize("shading", ["albedo", "diffuse", "textureless"])
def test_render_shapes_and_ranges(shading):
    scene = NeRFScene(NeRFConfig.tiny(), seed=0)
    out = scene.render(orbit_cameras(2), 12, 16, shading=shading, sample_outputs=True)
    assert out["rgb"].shape == (2, 3, 12, 16)
    assert out["opacity"].shape == out["depth"].shape == (2, 1, 12, 16)
    assert 0.0 <= out["rgb"].min() and out["rgb"].max() <= 1.0
    assert 0.0 <= out["opacity"].min() and out["opacity"].max() <= 1.0 + 1e-5
    # depth = Σ w t lies within the sphere's near/far span times the opacity
    assert out["depth"].min() >= 0.0 and out["depth"].max() <= 2.5 + 1.0
    assert out["weights"].shape == out["ray_indices"].shape and out["ray_indices"].max() < 2 * 12 * 16
    if shading == "albedo":
        assert "normal" not in out
    else:
        norms = out["normal"].norm(dim=1)
        covered = out["opacity"][:, 0] > 0.5
        assert torch.allclose(norms[covered], torch.ones_like(norms[covered]), atol=1e-4)


def test_rgb_composites_foreground_over_background():
    scene = NeRFScene(tiny(kind="solid", color=[0.0, 1.0, 0.0]), seed=0).eval()
    with torch.no_grad():
        out = scene.render(orbit_cameras(1), 16, 16)
    corner = out["rgb"][0, :, 0, 0]  # ray misses the sphere: pure background
    assert torch.allclose(corner, torch.tensor([0.0, 1.0, 0.0]))
    assert out["opacity"][0, 0, 0, 0] == 0.0


def test_blob_init_is_opaque_at_the_centre_and_normals_face_the_camera():
    scene = NeRFScene(NeRFConfig.tiny(), seed=0).eval()
    cams = orbit_cameras(1)
    with torch.no_grad():
        out = scene.render(cams, 17, 17, shading="diffuse")
    centre, edge = out["opacity"][0, 0, 8, 8], out["opacity"][0, 0, 8, 2]
    assert centre > 0.9 and edge < 0.1
    to_camera = cams.c2w[0, :3, 3] / cams.c2w[0, :3, 3].norm()
    assert torch.dot(out["normal"][0, :, 8, 8], to_camera) > 0.9
    grid = scene.density_grid(9)
    assert grid[4, 4, 4] > 5.0 > grid[0, 0, 0]


def test_gradients_reach_every_parameter_group():
    scene = NeRFScene(tiny(random_aug=False), seed=0)
    groups = scene.param_groups({"encoding": 0.02})
    assert [g["name"] for g in groups] == ["encoding", "density", "feature", "background"]
    assert groups[0]["lr"] == 0.02 and groups[1]["lr"] == DEFAULT_LR["density"]
    out = scene.render(orbit_cameras(2), 8, 8, shading="diffuse")
    regs = scene.regularizers(out)
    loss = out["rgb"].square().mean() + regs["orient"] + regs["normal_smooth"] + regs["opaque"]
    loss.backward()
    for group in groups:
        grad = sum(p.grad.abs().sum() for p in group["params"] if p.grad is not None)
        assert grad > 0, f"no gradient reaches group {group['name']}"
    with pytest.raises(ValueError, match="geometry"):
        scene.param_groups({"geometry": 0.1})


def test_same_seed_same_renders_and_different_seed_differs():
    cams = orbit_cameras(2)
    a, b, c = (NeRFScene(NeRFConfig.tiny(), seed=s) for s in (3, 3, 4))
    renders = [scene.render(cams, 8, 8, shading="diffuse")["rgb"] for scene in (a, b, c)]
    assert torch.equal(renders[0], renders[1])
    assert not torch.equal(renders[0], renders[2])
    # the second training render differs from the first (new jitter / light), identically for a and b
    again_a, again_b = a.render(cams, 8, 8)["rgb"], b.render(cams, 8, 8)["rgb"]
    assert torch.equal(again_a, again_b)


def test_state_dict_round_trip_renders_identically():
    cams = orbit_cameras(2)
    source = NeRFScene(NeRFConfig.tiny(), seed=1)
    with torch.no_grad():
        source.field.encoding.params.normal_(0.0, 0.1)  # something no seed would produce
    source.update_occupancy()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = NeRFScene(NeRFConfig.tiny(), seed=2)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    for mode in ("train", "eval"):
        source.train(mode == "train")
        target.train(mode == "train")
        with torch.no_grad():
            want = source.render(cams, 8, 8, shading="diffuse")
            got = target.render(cams, 8, 8, shading="diffuse")
        assert torch.equal(want["rgb"], got["rgb"]), mode  # includes the RNG stream in train mode


def test_occupancy_pruning_skips_samples_without_changing_the_image():
    cams = orbit_cameras(1)
    pruned = NeRFScene(NeRFConfig.tiny(), seed=0).eval()
    assert 0.0 < pruned.occupancy.float().mean() < 0.5
    full_cfg = NeRFConfig.tiny()
    full_cfg.renderer.grid_prune = False
    full = NeRFScene(full_cfg, seed=0).eval()
    with torch.no_grad():
        a, b = pruned.render(cams, 16, 16, sample_outputs=True), full.render(cams, 16, 16, sample_outputs=True)
    assert a["weights"].numel() < 0.6 * b["weights"].numel()
    assert (a["opacity"] - b["opacity"]).abs().max() < 0.01


def test_regularizers_match_their_formulas():
    scene = NeRFScene(NeRFConfig.tiny(), seed=0)
    opacity = torch.full((1, 1, 4, 4), 0.5)
    normal = torch.zeros(1, 3, 4, 4)
    normal[:, 2] = 1.0
    normal[:, :, :, 3] = torch.tensor([1.0, 0.0, 0.0])[:, None]  # last column differs
    out = {
        "opacity": opacity,
        "normal": normal,
        "orient_sum": torch.tensor(0.5 * 0.8**2),
    }
    regs = scene.regularizers(out)
    assert regs["sparsity"].item() == pytest.approx(math.sqrt(0.25 + 0.01))
    assert regs["opaque"].item() == pytest.approx(math.log(2.0), rel=1e-5)
    assert regs["orient"].item() == pytest.approx(0.5 * 0.8**2 / 16)  # orient_sum / covered pixels
    # horizontal neighbours: 4 rows × 1 changed pair of 3, squared diff 2 per pair over 3 channels
    assert regs["normal_smooth"].item() == pytest.approx(4 * 2.0 / (3 * 4 * 3))


def test_camera_rays_and_sphere_bounds():
    cams = orbit_cameras(1, distance=3.0)
    origins, dirs = camera_rays(cams, 5, 5)
    centre = dirs[0, 2, 2]
    to_origin = -cams.c2w[0, :3, 3] / 3.0
    assert torch.allclose(centre, to_origin, atol=1e-6)
    # the top row looks up (+z of the world is up in the image)
    assert dirs[0, 0, 2, 2] > centre[2]
    near, far, hit = sphere_bounds(origins[0, 2, 2][None], centre[None], 1.0)
    assert hit.item() and near.item() == pytest.approx(2.0) and far.item() == pytest.approx(4.0)


def test_spherical_harmonics_are_orthonormal():
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(200_000, 3, generator=g, dtype=torch.float64), dim=-1)
    y = sh_encode(dirs, 4)
    gram = 4.0 * math.pi * (y.T @ y) / dirs.shape[0]
    assert torch.allclose(gram, torch.eye(16, dtype=torch.float64), atol=0.03)


@pytest.mark.gpu
def test_cuda_render_matches_cpu_render():
    cfg = NeRFConfig.tiny()
    cfg.backend = "torch"
    cpu = NeRFScene(cfg, seed=0).eval()
    gpu = NeRFScene(cfg, seed=0).cuda().eval()
    cams = orbit_cameras(2)
    with torch.no_grad():
        a = cpu.render(cams, 16, 16, shading="diffuse")
        b = gpu.render(cams.to("cuda"), 16, 16, shading="diffuse")
    torch.testing.assert_close(b["rgb"].cpu(), a["rgb"], atol=1e-4, rtol=1e-4)


def test_analytic_and_finite_difference_normals_agree_on_the_blob():
    cams = orbit_cameras(1)
    maps = {}
    for normal_type in ("finite_difference", "analytic"):
        cfg = NeRFConfig.tiny()
        cfg.shading.normal_type = normal_type
        scene = NeRFScene(cfg, seed=0).eval()
        with torch.no_grad():
            out = scene.render(cams, 9, 9, shading="textureless")
        maps[normal_type] = out["normal"]
        covered = out["opacity"][0, 0] > 0.9
    cosine = (maps["finite_difference"] * maps["analytic"]).sum(1)[0]
    assert covered.sum() > 4 and cosine[covered].min() > 0.95


def test_step_pre_backward_refreshes_the_occupancy_grid_every_n_steps():
    scene = NeRFScene(NeRFConfig.tiny(), seed=0)
    assert scene.occupancy.float().mean() < 0.5
    with torch.no_grad():  # a uniform density everywhere: every cell must become occupied
        scene.field.density_network[-1].weight.zero_()
    scene.config.density_bias = "none"
    scene.step_pre_backward(scene.config.renderer.grid_update_every + 1, {})
    assert scene.occupancy.float().mean() < 0.5  # not an update step
    scene.step_pre_backward(scene.config.renderer.grid_update_every, {})
    assert bool(scene.occupancy.all())


def test_rays_that_miss_the_sphere_render_background_only():
    scene = NeRFScene(tiny(kind="solid", color=[0.2, 0.4, 0.6], learned=True, random_aug=False), seed=0)
    cams = orbit_cameras(1)
    cams.c2w[0, :3, :3] = -cams.c2w[0, :3, :3]  # turn around: look away from the object
    out = scene.render(cams, 8, 8, shading="diffuse", sample_outputs=True)
    assert out["weights"].numel() == 0 and out["opacity"].max() == 0.0
    assert torch.allclose(out["rgb"], torch.tensor([0.2, 0.4, 0.6])[None, :, None, None].expand(1, 3, 8, 8))
    (out["rgb"].mean() + sum(scene.regularizers(out).values())).backward()  # still differentiable
    assert scene.background.color.grad.abs().sum() > 0


def test_orient_sum_is_the_per_sample_formula():
    cfg = NeRFConfig.tiny()
    cfg.renderer.chunk_samples = 300  # summed over several chunks
    scene = NeRFScene(cfg, seed=0).eval()
    with torch.no_grad():
        out = scene.render(orbit_cameras(2), 10, 10, shading="diffuse", sample_outputs=True)
    facing = (out["sample_normal"] * out["sample_dirs"]).sum(-1).clamp_min(0.0)
    want = (out["weights"] * facing**2).sum()
    assert want > 0 and torch.allclose(out["orient_sum"], want, rtol=1e-5)
