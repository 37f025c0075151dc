"""The guidance protocol: settings given once per asset, request validation, per-request noise."""

import dataclasses

import pytest
import torch

from stages.guidance.protocol import GuidanceRequest, IPSettings, MVDreamSettings, request_noise, settings_for


def _request(**overrides):
    fields = dict(
        asset_id="a",
        rgb=torch.rand(2, 3, 8, 8),
        timesteps=torch.tensor([10, 500]),
        seed=3,
    )
    fields.update(overrides)
    return GuidanceRequest(**fields)


def test_valid_request_keeps_its_fields():
    request = _request(c2w=torch.eye(4).expand(2, 4, 4), elevation=torch.zeros(2), fovy=torch.full((2,), 0.7))
    assert request.family == "ip" and request.rgb.shape == (2, 3, 8, 8) and request.fovy.shape == (2,)
    per_step = {f.name for f in dataclasses.fields(GuidanceRequest)}
    assert per_step == {"asset_id", "rgb", "timesteps", "seed", "family", "c2w", "elevation", "azimuth", "fovy"}


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(rgb=torch.rand(2, 4, 8, 8)), "rgb"),
        (dict(rgb=torch.randint(0, 255, (2, 3, 8, 8))), "rgb"),
        (dict(timesteps=torch.tensor([10])), "timesteps"),
        (dict(timesteps=torch.tensor([10.0, 20.0])), "timesteps"),
        (dict(timesteps=torch.tensor([10, 1000])), "timesteps"),
        (dict(timesteps=torch.tensor([-1, 5])), "timesteps"),
        (dict(c2w=torch.eye(4).expand(3, 4, 4)), "c2w"),
        (dict(azimuth=torch.zeros(5)), "azimuth"),
        (dict(fovy=torch.zeros(3)), "fovy"),
        (dict(family="sd"), "family"),
    ],
)
def test_bad_request_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        _request(**overrides)


def test_request_noise_is_reproducible_and_seed_dependent():
    a = request_noise(7, (2, 4, 8, 8))
    b = request_noise(7, (2, 4, 8, 8))
    c = request_noise(8, (2, 4, 8, 8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # A standard normal draw: mean near 0 and std near 1 over 512 values.
    assert abs(float(a.mean())) < 0.2 and abs(float(a.std()) - 1.0) < 0.15


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: IPSettings(guidance_scale=-1.0), "IPSettings.guidance_scale"),
        (lambda: IPSettings(ip_scale=-0.1), "IPSettings.ip_scale"),
        (lambda: IPSettings(loss="cv_cfg100"), "IPSettings.loss.*renamed"),
        (lambda: IPSettings(sd_branch="maybe"), "IPSettings.sd_branch"),
        (lambda: IPSettings(delta_t=-3), "IPSettings.delta_t"),
        (lambda: IPSettings(delta_t=1000), "IPSettings.delta_t"),
        (lambda: MVDreamSettings(recon_std_rescale=1.5), "MVDreamSettings.recon_std_rescale"),
        (lambda: MVDreamSettings(guidance_scale=float("nan")), "MVDreamSettings.guidance_scale"),
    ],
)
def test_bad_settings_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_settings_are_frozen_and_checked_against_their_family():
    settings = IPSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.loss = "sds"  # type: ignore[misc]
    assert settings_for("ip", None) == IPSettings() and settings_for("mvd", None) == MVDreamSettings()
    with pytest.raises(TypeError, match="MVDreamSettings"):
        settings_for("mvd", IPSettings())


def test_the_method_config_takes_its_defaults_from_the_settings():
    """One place for each default: ``method.isd`` / ``method.mvd`` are the settings' defaults."""
    from stages.optimize.config import OptimizeConfig

    config = OptimizeConfig()
    assert config.ip_settings() == IPSettings(loss=config.loss)
    assert config.mvd_settings() == MVDreamSettings(n_view=config.cameras.n_view)
