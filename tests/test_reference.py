"""ReferenceSampler: a seed per call, batched sampling equals one-at-a-time, bad sources."""

from __future__ import annotations

import numpy as np
import pytest

from stages.models.reference import ReferenceSampler
from stages.models.sources import ModelSourceError

STEPS = 3


@pytest.fixture(scope="module")
def sampler() -> ReferenceSampler:
    return ReferenceSampler("tiny", seed=0)


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_same_seed_same_image_different_seed_different(sampler):
    a = sampler.sample("a red car", seed=1, num_inference_steps=STEPS)
    b = sampler.sample("a red car", seed=1, num_inference_steps=STEPS)
    c = sampler.sample("a red car", seed=2, num_inference_steps=STEPS)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(_pixels(a), _pixels(b))
    assert np.abs(_pixels(a) - _pixels(c)).mean() > 5


def test_sample_many_equals_one_at_a_time(sampler):
    prompts, seeds = ["a red car", "a blue boat", "a red car"], [4, 5, 6]
    batched = sampler.sample_many(prompts, seeds, num_inference_steps=STEPS, height=32, width=48)
    for image, prompt, seed in zip(batched, prompts, seeds):
        alone = sampler.sample(prompt, seed, num_inference_steps=STEPS, height=32, width=48)
        assert image.size == (48, 32)
        assert np.abs(_pixels(image) - _pixels(alone)).max() <= 1  # uint8 rounding of fp noise
    assert np.abs(_pixels(batched[0]) - _pixels(batched[2])).mean() > 5  # same prompt, other seed


def test_bad_inputs(sampler, tmp_path):
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        sampler.sample_many(["a", "b"], [1])
    assert sampler.sample_many([], []) == []
    with pytest.raises(ModelSourceError, match=r"models\.reference: '/no/such/model' is neither"):
        ReferenceSampler("/no/such/model")
    with pytest.raises(ModelSourceError, match="no model_index.json"):
        ReferenceSampler(str(tmp_path))


def test_diffusers_directory_loads_through_auto_pipeline(sampler, tmp_path):
    sampler.pipeline.save_pretrained(tmp_path / "t2i")
    loaded = ReferenceSampler(str(tmp_path / "t2i"))
    assert type(loaded.pipeline).__name__ == "StableDiffusionPipeline"
    a = loaded.sample("a red car", seed=3, num_inference_steps=STEPS)
    b = sampler.sample("a red car", seed=3, num_inference_steps=STEPS)
    assert np.abs(_pixels(a) - _pixels(b)).max() <= 1
