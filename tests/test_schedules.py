"""Schedules: threestudio C() semantics, α/β, MVDream timestep anneal, t sampling, milestones."""

import pytest
import torch
from omegaconf import OmegaConf

from stages.optimize.schedules import (
    ScheduleConfig,
    loss_weights,
    milestone_value,
    ramp,
    sample_timesteps,
    timestep_bounds,
    timestep_range,
)


@pytest.mark.parametrize(
    "spec, step, expected",
    [
        (0.5, 123, 0.5),
        (3, 0, 3.0),
        ([0, 0.98, 0.02, 8000], 0, 0.98),
        ([0, 0.98, 0.02, 8000], 4000, 0.50),  # half-way: (0.98 + 0.02) / 2
        ([0, 0.98, 0.02, 8000], 8000, 0.02),
        ([0, 0.98, 0.02, 8000], 9000, 0.02),  # clamped after end_step
        ([1000, 1.0, 3.0, 2000], 500, 1.0),  # clamped before start_step
        ([1000, 1.0, 3.0, 2000], 1250, 1.5),
        ([0.6, 0.02, 100], 25, 0.6 - 0.58 * 0.25),  # 3 elements: start_step 0
    ],
)
def test_ramp_matches_hand_values(spec, step, expected):
    assert ramp(spec, step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("spec", [[1, 2], [0, 1, 2, 3, 4], [5, 1.0, 2.0, 5]])
def test_ramp_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="ramp spec"):
        ramp(spec, 0)


def test_loss_weights_linear_over_run():
    assert loss_weights(0, 6000) == pytest.approx((0.4, 0.6))
    assert loss_weights(3000, 6000) == pytest.approx((0.6, 0.31))
    assert loss_weights(6000, 6000) == pytest.approx((0.8, 0.02))
    assert loss_weights(1500, 6000, alpha=(1.0, 0.0), beta=(0.0, 2.0)) == pytest.approx((0.75, 0.5))


def test_timestep_range_is_mvdream_anneal():
    # MVDream-threestudio: [0, 0.98, 0.02, 8000] and [0, 0.98, 0.50, 8000] in a 10000-step run.
    total = 10000
    for step in (0, 1234, 4000, 7999, 8000, 9999):
        assert timestep_range(step, total) == pytest.approx(
            (ramp([0, 0.98, 0.02, 8000], step), ramp([0, 0.98, 0.50, 8000], step))
        )
    assert timestep_range(4000, total) == pytest.approx((0.50, 0.74))
    assert timestep_range(0, 10, anneal_fraction=0.0) == pytest.approx((0.02, 0.50))
    with pytest.raises(ValueError, match="anneal_fraction"):
        timestep_range(0, 10, anneal_fraction=1.5)
    with pytest.raises(ValueError, match="total"):
        timestep_range(0, 0)


def test_timestep_bounds_like_threestudio():
    assert timestep_bounds(0.02, 0.98) == (20, 980)
    assert timestep_bounds(0.0, 1.0) == (0, 999)  # 1000 is not a valid index
    with pytest.raises(ValueError, match="t_min_frac"):
        timestep_bounds(0.6, 0.5)
    with pytest.raises(ValueError, match="t_max_frac"):
        timestep_bounds(0.1, 1.2)
    with pytest.raises(ValueError, match="t_min_frac"):
        timestep_bounds(float("nan"), 0.5)


def test_sample_timesteps_range_inclusive_and_reproducible():
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(gen, 4000, 0.02, 0.05)
    assert t.dtype == torch.int64 and t.shape == (4000,)
    assert int(t.min()) == 20 and int(t.max()) == 50  # both ends are drawn
    again = sample_timesteps(torch.Generator().manual_seed(0), 4000, 0.02, 0.05)
    assert torch.equal(t, again)
    fixed = sample_timesteps(gen, 8, 0.98, 0.98)
    assert torch.equal(fixed, torch.full((8,), 980))


def test_sample_timesteps_groups_share_one_t():
    gen = torch.Generator().manual_seed(1)
    t = sample_timesteps(gen, 64, 0.02, 0.98, group=4)
    groups = t.view(16, 4)
    assert torch.equal(groups, groups[:, :1].expand(16, 4))
    assert len(set(groups[:, 0].tolist())) > 1  # different groups draw different t
    with pytest.raises(ValueError, match="multiple of group"):
        sample_timesteps(gen, 6, 0.02, 0.98, group=4)
    with pytest.raises(ValueError, match="group"):
        sample_timesteps(gen, 4, 0.02, 0.98, group=0)


def test_milestone_value_bisects_like_threestudio():
    assert milestone_value(0, [5000], [64, 256]) == 64
    assert milestone_value(4999, [5000], [64, 256]) == 64
    assert milestone_value(5000, [5000], [64, 256]) == 256
    assert milestone_value(7, [2, 5], ["a", "b", "c"]) == "c"
    with pytest.raises(ValueError, match="len"):
        milestone_value(0, [5000], [64])
    with pytest.raises(ValueError, match="non-decreasing"):
        milestone_value(0, [5, 2], [1, 2, 3])


def test_schedule_config_defaults_and_methods():
    config = ScheduleConfig()
    assert config.weights(0, 6000) == pytest.approx((0.4, 0.6))
    assert config.timestep_range(6000, 6000) == pytest.approx((0.02, 0.50))
    assert config.milestone_steps(6000) == [3000]
    assert [config.resolution(s, 6000) for s in (0, 2999, 3000)] == [64, 64, 256]
    assert [config.batch_size(s, 6000) for s in (0, 3000)] == [8, 4]
    structured = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ScheduleConfig), {"alpha_end": 1.0}))
    assert isinstance(structured, ScheduleConfig) and structured.alpha_end == 1.0


@pytest.mark.parametrize(
    "field, value",
    [
        ("min_step_end", 1.5),
        ("anneal_fraction", -0.1),
        ("alpha_start", -1.0),
        ("min_step_start", 0.99),  # above max_step_start 0.98
        ("milestones", [0.7, 0.2]),
        ("resolutions", [64]),
        ("batch_sizes", [8, 0]),
    ],
)
def test_schedule_config_errors_name_field(field, value):
    with pytest.raises(ValueError, match=f"ScheduleConfig.{field}"):
        ScheduleConfig(**{field: value})
