"""OptimizeConfig: paper defaults, OmegaConf round trip, validation errors that name the key."""

import pytest
from omegaconf import OmegaConf

from stages.guidance.losses import LOSS_NAMES
from stages.optimize.config import OptimizeConfig, load_optimize_config


def test_paper_defaults():
    cfg = OptimizeConfig()
    assert cfg.iterations == 6000 and cfg.loss == "isd" and cfg.representation == "nerf"
    assert cfg.schedule.weights(0, 6000) == pytest.approx((0.4, 0.6))
    assert cfg.schedule.weights(6000, 6000) == pytest.approx((0.8, 0.02))
    assert (cfg.schedule.resolution(2999, 6000), cfg.schedule.batch_size(2999, 6000)) == (64, 8)
    assert (cfg.schedule.resolution(3000, 6000), cfg.schedule.batch_size(3000, 6000)) == (256, 4)
    assert cfg.optimizer.betas == [0.9, 0.99] and cfg.optimizer.eps == 1e-15
    assert cfg.mvd.guidance_scale == 50.0 and cfg.isd.guidance_scale == 7.5 and cfg.isd.ip_scale == 0.5
    assert cfg.cameras.n_view == 4 and cfg.uses_ip and cfg.uses_mvd
    cfg.validate()


def test_structured_round_trip_and_overrides(tmp_path):
    OmegaConf.structured(OptimizeConfig())  # every field is OmegaConf-typed
    path = tmp_path / "method.yaml"
    path.write_text("method:\n  representation: splats\n  iterations: 30\n  schedule:\n    resolutions: [16, 32]\n")
    cfg = load_optimize_config(path, ["loss=ip_sds", "optimizer.lr.means=0.01", "regularizers.sparsity=0.5"])
    assert (cfg.representation, cfg.iterations, cfg.loss) == ("splats", 30, "ip_sds")
    assert cfg.schedule.resolutions == [16, 32] and cfg.optimizer.lr == {"means": 0.01}
    assert cfg.regularizers["sparsity"] == 0.5 and cfg.regularizers["orient"] == 0.0
    tiny = load_optimize_config(None, ["preset=tiny"])
    assert tiny.iterations == OptimizeConfig.tiny().iterations
    assert load_optimize_config({"iterations": 7}).iterations == 7


def test_digest_tracks_method_not_runtime_keys():
    a, b = OptimizeConfig(), OptimizeConfig()
    b.checkpoint_every, b.progress = 7, True
    assert a.resume_digest() == b.resume_digest()
    b.iterations = 10
    assert a.resume_digest() != b.resume_digest()
    # render chunks only trade memory for speed: nested runtime keys leave, their siblings stay
    c = OptimizeConfig()
    c.nerf.renderer.chunk_samples, c.nerf.renderer.march_block_samples, c.splats.chunk_views = 4096, 1 << 16, 3
    assert c.resume_digest() == a.resume_digest() and c.nerf.renderer.chunk_samples != a.nerf.renderer.chunk_samples
    c.nerf.renderer.num_samples_per_ray = 64
    assert c.resume_digest() != a.resume_digest()


@pytest.mark.parametrize(
    "override, key",
    [
        ("iterations=0", "method.iterations"),
        ("loss=nope", "method.loss"),
        ("representation=voxels", "method.representation"),
        ("schedule.beta_end=1.5", "method.schedule.beta_end"),
        ("schedule.alpha_start=-0.1", "method.schedule.alpha_start"),
        ("schedule.min_step_start=1.2", "method.schedule.min_step_start"),
        ("schedule.batch_sizes=[6,4]", "method.schedule.batch_sizes"),
        ("schedule.resolutions=[64]", "method.schedule.resolutions"),
        ("optimizer.betas=[0.9,1.5]", "method.optimizer.betas"),
        ("optimizer.lr.encoding=-1", "method.optimizer.lr.encoding"),
        ("regularizers.sparsity=-1", "method.regularizers.sparsity"),
        ("isd.sd_branch=both", "method.isd.sd_branch"),
        ("cameras.fovy_range=[60,15]", "method.cameras.fovy_range"),
        ("shading.albedo=0", "method.shading"),
        ("export.video_format=avi", "method.export.video_format"),
        ("nerf.radius=-1", "method.nerf.radius"),
    ],
)
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_optimize_config(None, [override])


def test_unknown_key_and_missing_file_are_named(tmp_path):
    with pytest.raises(ValueError, match="nosuch"):
        load_optimize_config(None, ["nosuch=1"])
    with pytest.raises(ValueError, match="missing.yaml"):
        load_optimize_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("loss", [*[n for n in LOSS_NAMES if n != "sds_mvd"], "mvdream"])
def test_every_loss_name_is_accepted(loss):
    cfg = load_optimize_config(None, [f"loss={loss}"])
    assert cfg.uses_ip == (loss != "mvdream")


def test_enum_keys_are_refused_by_omegaconf_with_the_full_key_and_the_allowed_values():
    with pytest.raises(ValueError) as info:
        load_optimize_config(None, ["representation=voxels"])
    assert "method.representation" in str(info.value) and "nerf, splats" in str(info.value)
    with pytest.raises(ValueError) as info:
        load_optimize_config({"isd": {"sd_branch": "both"}})
    assert "method.isd.sd_branch" in str(info.value) and "vanilla, ip_null" in str(info.value)


def test_choices_read_as_their_strings_and_match_the_guidance_names():
    import json

    from stages.guidance import losses
    from stages.optimize.config import Backprop, Representation, SdBranch

    cfg = load_optimize_config(None, ["backprop=direct", "representation=splats"])
    assert cfg.backprop is Backprop.direct and cfg.backprop == "direct" and f"{cfg.backprop}" == str(cfg.backprop) == "direct"
    assert json.dumps([cfg.representation]) == '["splats"]' and {"splats": 1}[cfg.representation] == 1
    assert set(SdBranch.values()) == set(losses.SD_BRANCHES)
    assert Representation.values() == ("nerf", "splats")
