"""The guidance protocol's request validation and per-request noise."""

import pytest
import torch

from stages.guidance.protocol import GuidanceRequest, request_noise


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
    request = _request(c2w=torch.eye(4).expand(2, 4, 4), elevation=torch.zeros(2))
    assert request.loss == "isd" and request.ip_scale == 0.5 and request.rgb.shape == (2, 3, 8, 8)


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
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(ip_scale=-0.1), "ip_scale"),
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
