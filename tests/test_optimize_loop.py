"""The per-asset loop on a toy scene: what it registers and asks the guidance, how it weights the
answers, determinism, the non-finite loss guard, checkpoints and exact resume after a kill."""

import math

import pytest
import torch
from PIL import Image
from torch import nn

from stages.guidance.protocol import GuidanceResponse, IPSettings, MVDreamSettings, UnknownAssetError
from stages.guidance.set import GuidanceSet
from stages.optimize.checkpoint import CheckpointError, load_checkpoint
from stages.optimize.config import OptimizeConfig
from stages.optimize.loop import NonFiniteLossError, optimize_asset

REFERENCE = Image.new("RGB", (8, 8), (200, 30, 30))


class ColourScene(nn.Module):
    """Every pixel of every view is sigmoid(logits): a scene whose gradient is easy to predict."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(seed)))
        self.grads: list[torch.Tensor] = []  # dL/dlogits of each iteration, as back-propagated
        self.logits.register_hook(lambda grad: self.grads.append(grad.detach().clone()))
        self.hooks: list[tuple[str, int]] = []

    def render(self, cameras, height, width, shading="albedo"):
        batch = len(cameras)
        # a little global-RNG noise: the loop must make it deterministic per iteration
        jitter = 1e-3 * torch.rand(())
        rgb = torch.sigmoid(self.logits + jitter).view(1, 3, 1, 1).expand(batch, 3, height, width)
        ones = torch.ones(batch, 1, height, width)
        return {"rgb": rgb, "opacity": ones, "depth": ones}

    def param_groups(self, lr):
        return [{"params": [self.logits], "lr": lr.get("colour", 0.05), "name": "colour"}]

    def regularizers(self, out):
        return {"dark": out["rgb"].square().mean()}

    def step_pre_backward(self, step, out):
        self.hooks.append(("pre", step))

    def step_post_backward(self, step, out, optimizer):
        self.hooks.append(("post", step))


class Recorder:
    """A guidance returning a constant gradient and recording every registration and request."""

    def __init__(self, value: float = 0.0, forget_at: int | None = None, loss: float = 0.5) -> None:
        self.value, self.forget_at, self.loss = value, forget_at, loss
        self.requests, self.registered, self.registrations = [], set(), 0
        self.settings: dict = {}

    def register(self, asset_id, prompt, reference=None, settings=None):
        self.registered.add(asset_id)
        self.settings[asset_id, settings.family] = settings
        self.registrations += 1

    def release(self, asset_id):
        self.registered.discard(asset_id)

    def grad(self, requests):
        if self.forget_at is not None and len(self.requests) == self.forget_at:
            self.registered.clear()  # a restarted actor
            self.forget_at = None
        out = []
        for r in requests:
            if r.asset_id not in self.registered:
                raise UnknownAssetError(r.asset_id)
            self.requests.append(r)
            out.append(GuidanceResponse(r.asset_id, torch.full_like(r.rgb, self.value), self.loss, 1.0, r.timesteps))
        return out


def _config(iterations=4, **overrides) -> OptimizeConfig:
    cfg = OptimizeConfig.tiny()
    cfg.iterations = iterations
    cfg.schedule.milestones = [0.5]
    cfg.schedule.resolutions = [4, 6]
    cfg.schedule.batch_sizes = [8, 4]
    cfg.checkpoint_every = 0
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _run(cfg, guidance, tmp_path, seed=0, scene=None, callback=None, reference=REFERENCE):
    scene = ColourScene() if scene is None else scene
    result = optimize_asset(cfg, guidance, reference, seed, tmp_path, "a red apple", "asset-1", callback, scene=scene)
    return result, scene


def test_one_render_feeds_both_terms_with_their_timestep_layout(tmp_path):
    ip, mvd = Recorder(), Recorder()
    _run(_config(), GuidanceSet(ip=ip, mvd=mvd), tmp_path)
    assert len(ip.requests) == len(mvd.requests) == 4
    for step, (a, b) in enumerate(zip(ip.requests, mvd.requests)):
        batch, res = (8, 4) if step < 2 else (4, 6)
        assert a.rgb.shape == (batch, 3, res, res)
        assert torch.equal(a.rgb, b.rgb) and torch.equal(a.c2w, b.c2w)
        assert (a.family, b.family) == ("ip", "mvd")
        groups = b.timesteps.view(-1, 4)
        assert (groups == groups[:, :1]).all()  # one t per 4-view group on the MVDream side
        assert a.timesteps.shape == (batch,)
        if step >= 2:  # once the bounds have opened: one t per image on the IP side
            assert len(set(a.timesteps.tolist())) > 1
        assert a.fovy.shape == (batch,) and a.seed != b.seed
    assert len({r.seed for r in ip.requests}) == 4
    # the settings came once, at registration: the method's, each family to its guidance
    assert (ip.registrations, mvd.registrations) == (1, 1)
    assert ip.settings == {("asset-1", "ip"): IPSettings(loss="isd", guidance_scale=7.5, ip_scale=0.5)}
    assert mvd.settings == {("asset-1", "mvd"): MVDreamSettings(guidance_scale=50.0, recon_loss=True)}
    # annealed bounds: t starts at 0.98·1000
    assert set(ip.requests[0].timesteps.tolist()) == {980}


def test_gradient_is_alpha_grad_ip_plus_beta_grad_mvd(tmp_path):
    ip, mvd = Recorder(2.0), Recorder(-3.0)
    cfg = _config(iterations=4)
    result, scene = _run(cfg, GuidanceSet(ip=ip, mvd=mvd), tmp_path)
    for step, grad in enumerate(scene.grads):
        alpha = 0.4 + 0.4 * step / 4
        beta = 0.6 + (0.02 - 0.6) * step / 4
        assert result.history[step]["alpha"] == pytest.approx(alpha)
        batch, res = (8, 4) if step < 2 else (4, 6)
        rgb = ip.requests[step].rgb[0, :, 0, 0]
        # d/dlogits Σ_pixels rgb · (α·2 − β·3) with rgb = sigmoid(logits + jitter)
        expected = rgb * (1 - rgb) * (alpha * 2.0 - beta * 3.0) * batch * res * res
        assert torch.allclose(grad, expected, rtol=1e-4)
    assert scene.hooks[:2] == [("pre", 0), ("post", 0)]


def test_regulariser_weight_adds_its_gradient(tmp_path):
    ip = Recorder()
    cfg = _config(iterations=1, regularizers={"dark": 2.0})
    result, scene = _run(cfg, GuidanceSet(ip=ip, mvd=Recorder()), tmp_path)
    rgb = ip.requests[0].rgb[0, :, 0, 0]
    assert result.history[0]["reg_dark"] == pytest.approx(float(rgb.square().mean()), rel=1e-5)
    # d/dlogits 2·mean(rgb²) over (B, 3, H, W) with constant channels
    expected = 2.0 * (2.0 / 3.0) * rgb * rgb * (1 - rgb)
    assert torch.allclose(scene.grads[0], expected, rtol=1e-4)
    with pytest.raises(ValueError, match="method.regularizers.shiny"):
        _run(_config(iterations=1, regularizers={"shiny": 1.0}), GuidanceSet(ip=Recorder(), mvd=Recorder()), tmp_path / "b")
    # normal-based terms are skipped on renders without normals; zero weights are ignored
    result, _ = _run(_config(iterations=1, regularizers={"orient": 1.0, "sparsity": 0.0}),
                     GuidanceSet(ip=Recorder(), mvd=Recorder()), tmp_path / "c")
    assert "reg_orient" not in result.history[0] and "loss_reg" not in result.history[0]


def test_loss_selection_uses_only_the_needed_guidance(tmp_path):
    ip, mvd = Recorder(), Recorder()
    cfg = _config(iterations=2, loss="mvdream")
    _run(cfg, GuidanceSet(ip=None, mvd=mvd), tmp_path / "a", reference=None)
    assert len(mvd.requests) == 2 and not ip.requests
    cfg = _config(iterations=2, loss="sds")
    cfg.mvd.enabled = False
    result, _ = _run(cfg, GuidanceSet(ip=ip, mvd=None), tmp_path / "b", reference=None)
    assert len(ip.requests) == 2 and result.history[0]["beta"] == 0.0
    assert ip.settings == {("asset-1", "ip"): IPSettings(loss="sds")}


def test_one_guidance_in_both_slots_is_registered_once_per_family(tmp_path):
    both = Recorder()
    _run(_config(iterations=1), GuidanceSet(ip=both, mvd=both), tmp_path)
    assert set(both.settings) == {("asset-1", "ip"), ("asset-1", "mvd")}
    assert [r.family for r in both.requests] == ["ip", "mvd"]


@pytest.mark.parametrize(
    "loss, guidance, reference, message",
    [
        ("isd", GuidanceSet(ip=None, mvd=Recorder()), REFERENCE, "GuidanceSet.ip"),
        ("isd", GuidanceSet(ip=Recorder(), mvd=None), REFERENCE, "GuidanceSet.mvd"),
        ("mvdream", GuidanceSet(ip=Recorder(), mvd=None), None, "GuidanceSet.mvd"),
        ("ip_sds", GuidanceSet(ip=Recorder(), mvd=Recorder()), None, "reference"),
    ],
)
def test_missing_guidance_or_reference_is_a_clear_error(tmp_path, loss, guidance, reference, message):
    with pytest.raises(ValueError, match=message):
        _run(_config(iterations=1, loss=loss), guidance, tmp_path, reference=reference)


def test_an_in_process_guidance_that_forgot_the_asset_is_an_error(tmp_path):
    """Re-registering after a restart is the actor client's job (``pipeline.clients``); the loop
    registers once and lets the error through."""
    ip, mvd = Recorder(forget_at=2), Recorder()
    with pytest.raises(UnknownAssetError):
        _run(_config(iterations=4), GuidanceSet(ip=ip, mvd=mvd), tmp_path)
    assert ip.registrations == 1 and len(ip.requests) == 2


def test_a_non_finite_loss_stops_the_run_naming_the_iteration(tmp_path):
    """The guard is the optimiser's (so the one-asset CLI stops too); the NaN iteration is not
    checkpointed."""
    cfg = _config(iterations=4)
    cfg.checkpoint_every = 1

    class NaNAt(Recorder):
        def grad(self, requests):
            self.loss = float("nan") if len(self.requests) == 2 else 0.5
            return super().grad(requests)

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at iteration 2 .*loss_ip=nan"):
        _run(cfg, GuidanceSet(ip=NaNAt(), mvd=Recorder()), tmp_path)
    assert load_checkpoint(tmp_path)["iteration"] == 2


def test_deterministic_for_a_seed(tmp_path):
    runs = [_run(_config(iterations=3), GuidanceSet(ip=Recorder(1.0), mvd=Recorder(1.0)), tmp_path / str(i), seed=s)
            for i, s in enumerate((5, 5, 6))]
    (a, sa), (b, sb), (c, sc) = runs
    assert torch.equal(sa.logits, sb.logits) and not torch.equal(sa.logits, sc.logits)
    torch.manual_seed(123)
    before = torch.rand(())
    torch.manual_seed(123)
    _run(_config(iterations=1), GuidanceSet(ip=Recorder(), mvd=Recorder()), tmp_path / "rng")
    assert torch.equal(torch.rand(()), before)  # the caller's global RNG is untouched


class Kill(Exception):
    pass


def _kill_at(step_to_die):
    def callback(step, metrics, previews):
        if step == step_to_die:
            raise Kill()
    return callback


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    cfg = _config(iterations=10)
    cfg.checkpoint_every = 3
    full, full_scene = _run(cfg, GuidanceSet(ip=Recorder(1.0), mvd=Recorder(-0.5)), tmp_path / "full")
    with pytest.raises(Kill):
        _run(cfg, GuidanceSet(ip=Recorder(1.0), mvd=Recorder(-0.5)), tmp_path / "killed", callback=_kill_at(7))
    assert load_checkpoint(tmp_path / "killed")["iteration"] == 6
    resumed, resumed_scene = _run(cfg, GuidanceSet(ip=Recorder(1.0), mvd=Recorder(-0.5)), tmp_path / "killed", scene=ColourScene())
    assert resumed.resumed_from == 6 and len(resumed.history) == 10
    assert torch.equal(resumed_scene.logits, full_scene.logits)
    keys = ("alpha", "beta", "t_ip", "t_mvd", "loss")
    assert [[h[k] for k in keys] for h in resumed.history] == [[h[k] for k in keys] for h in full.history]
    # a finished run resumes to its end without new iterations
    again, _ = _run(cfg, GuidanceSet(ip=Recorder(1.0), mvd=Recorder(-0.5)), tmp_path / "killed", scene=ColourScene())
    assert again.resumed_from == 10


def test_checkpoint_of_another_run_is_refused(tmp_path):
    cfg = _config(iterations=2)
    cfg.checkpoint_every = 1
    _run(cfg, GuidanceSet(ip=Recorder(), mvd=Recorder()), tmp_path, seed=0)
    with pytest.raises(CheckpointError, match="seed"):
        _run(cfg, GuidanceSet(ip=Recorder(), mvd=Recorder()), tmp_path, seed=1)
    other = _config(iterations=3)
    with pytest.raises(CheckpointError, match="config_digest"):
        _run(other, GuidanceSet(ip=Recorder(), mvd=Recorder()), tmp_path, seed=0)


def test_callback_gets_metrics_and_previews(tmp_path):
    cfg = _config(iterations=4)
    cfg.preview_every, cfg.preview_resolution = 2, 5
    seen = []
    _run(cfg, GuidanceSet(ip=Recorder(), mvd=Recorder()), tmp_path,
         callback=lambda step, metrics, previews: seen.append((step, metrics, previews)))
    assert [s for s, _, _ in seen] == [0, 1, 2, 3]
    assert [p is None for _, _, p in seen] == [True, False, True, False]
    assert seen[1][2].shape == (8, 3, 5, 5)
    for key in ("loss", "alpha", "beta", "t_ip", "t_mvd", "grad_norm_ip", "grad_norm_mvd", "its", "peak_memory_mb"):
        assert math.isfinite(seen[0][1][key]), key


def test_image_target_guidance_and_sphere_target():
    from stages.guidance.image_target import ImageTargetGuidance, SphereTarget
    from stages.guidance.protocol import GuidanceRequest
    from stages.scene.cameras import orbit_cameras

    cams = orbit_cameras(2, elevation=0.0, distance=3.0, fovy=40.0)  # azimuth 0 and 180
    target = SphereTarget(radius=0.5, background=(0.0, 0.0, 1.0))
    image = target(cams, 9, 9)
    assert torch.allclose(image[0, :, 4, 4], torch.tensor([0.9, 0.5, 0.5]), atol=0.02)  # normal +x
    assert torch.allclose(image[1, :, 4, 4], torch.tensor([0.1, 0.5, 0.5]), atol=0.02)  # normal −x
    assert torch.equal(image[:, :, 0, 0], torch.tensor([[0.0, 0.0, 1.0]] * 2))  # corners miss the ball
    guidance = ImageTargetGuidance(target, scale=2.0)
    rgb = torch.rand(2, 3, 9, 9)
    request = GuidanceRequest("a", rgb, torch.tensor([10, 10]), seed=0, c2w=cams.c2w, fovy=cams.fovy)
    with pytest.raises(UnknownAssetError):
        guidance.grad([request])
    guidance.register("a", "a ball")
    (response,) = guidance.grad([request])
    assert torch.allclose(response.grad_rgb, 2.0 * (rgb - image))
    request.fovy = None
    with pytest.raises(ValueError, match="fovy"):
        guidance.grad([request])


class Rendezvous(Recorder):
    """A remote-like guidance (``concurrent_calls``) whose ``grad`` returns only once the other
    guidance's ``grad`` is running too: asked one after the other, the barrier breaks."""

    concurrent_calls = True

    def __init__(self, value, barrier, threads):
        super().__init__(value)
        self.barrier, self.threads = barrier, threads

    def grad(self, requests):
        import threading

        self.threads.append(threading.get_ident())
        self.barrier.wait()
        return super().grad(requests)


def test_remote_guidances_are_asked_at_once_with_the_same_result(tmp_path):
    import threading

    threads: list[int] = []
    barrier = threading.Barrier(2, timeout=10)
    ip, mvd = Rendezvous(2.0, barrier, threads), Rendezvous(-3.0, barrier, threads)
    result, scene = _run(_config(iterations=3), GuidanceSet(ip=ip, mvd=mvd), tmp_path / "concurrent")
    assert len(ip.requests) == len(mvd.requests) == 3
    assert len(set(threads)) == 2  # a helper thread asked one of them
    assert not [t for t in threading.enumerate() if t.name.startswith("guidance-")]  # stopped at the end of the run

    ref_ip, ref_mvd = Recorder(2.0), Recorder(-3.0)
    reference, ref_scene = _run(_config(iterations=3), GuidanceSet(ip=ref_ip, mvd=ref_mvd), tmp_path / "sequential")
    assert all(torch.equal(a, b) for a, b in zip(scene.grads, ref_scene.grads))
    assert [h["loss"] for h in result.history] == [h["loss"] for h in reference.history]


def test_an_error_of_one_concurrent_guidance_reaches_the_loop(tmp_path):
    class Failing(Recorder):
        concurrent_calls = True

        def grad(self, requests):
            raise RuntimeError("MVDream actor exploded")

    ip = Recorder(1.0)
    ip.concurrent_calls = True
    with pytest.raises(RuntimeError, match="MVDream actor exploded"):
        _run(_config(iterations=2), GuidanceSet(ip=ip, mvd=Failing()), tmp_path)
