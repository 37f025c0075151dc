"""Evaluation scores against independent formulas, and the tiny CLIP / aesthetic presets."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from stages.evaluate.aesthetic import AestheticHead, load_aesthetic_head
from stages.evaluate.clip import load_clip, to_pil
from stages.evaluate.scores import clip_alignment, pairwise_diversity, quality_score
from stages.models.sources import ModelSourceError


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_clip_alignment_is_100_times_mean_cosine():
    g = torch.Generator().manual_seed(0)
    images = _unit(torch.randn(5, 8, generator=g))
    text = _unit(torch.randn(8, generator=g))
    expected = 100.0 * np.mean([float(np.dot(images[i].numpy(), text.numpy())) for i in range(5)])
    assert clip_alignment(images, text) == pytest.approx(expected, rel=1e-5)
    assert clip_alignment(text.expand(3, 8), text) == pytest.approx(100.0, rel=1e-5)


def test_pairwise_diversity_matches_loop_and_is_zero_for_identical_variants():
    g = torch.Generator().manual_seed(1)
    variants = [_unit(torch.randn(4, 6, generator=g)) for _ in range(3)]
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = np.mean(
        [np.mean([1 - float(variants[i][v] @ variants[j][v]) for v in range(4)]) for i, j in pairs]
    )
    assert pairwise_diversity(variants) == pytest.approx(expected, rel=1e-5)
    assert pairwise_diversity([variants[0], variants[0].clone()]) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(pairwise_diversity(variants[:1]))
    with pytest.raises(ValueError, match="shapes"):
        pairwise_diversity([variants[0], variants[1][:2]])


def test_tiny_clip_features_are_unit_norm_and_seeded():
    clip = load_clip("tiny", torch.device("cpu"), seed=0)
    images = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    features = clip.images(images)
    assert features.shape == (2, 16)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(features[0], features[1])
    again = load_clip("tiny", torch.device("cpu"), seed=0).images(images)
    assert torch.allclose(features, again)
    text = clip.texts(["a red cube"])
    assert text.shape == (1, 16)
    score = clip_alignment(features, text[0])
    assert -100.0 <= score <= 100.0


def test_clip_from_missing_directory_names_the_key(tmp_path):
    with pytest.raises(ModelSourceError, match="evaluate.clip"):
        load_clip(str(tmp_path / "nope" / "file.txt"), torch.device("cpu"))


def test_aesthetic_head_loads_laion_layout_and_checks_width(tmp_path):
    head = AestheticHead(16)
    path = tmp_path / "head.pth"
    torch.save(head.state_dict(), path)
    loaded = load_aesthetic_head(str(path), feature_dim=16)
    features = _unit(torch.randn(3, 16))
    assert quality_score(loaded, features) == pytest.approx(float(head.eval()(features).detach().mean()), rel=1e-5)
    with pytest.raises(ModelSourceError, match="768"):
        bad = AestheticHead(768)
        torch.save(bad.state_dict(), tmp_path / "wide.pth")
        load_aesthetic_head(str(tmp_path / "wide.pth"), feature_dim=16)
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ModelSourceError, match="layers.0.weight"):
        load_aesthetic_head(str(tmp_path / "other.pth"), feature_dim=16)
    assert load_aesthetic_head("none", 16) is None


def test_to_pil_accepts_channels_first_floats():
    image = to_pil(torch.ones(3, 5, 7) * 0.5)
    assert image.size == (7, 5) and image.getpixel((0, 0)) == (128, 128, 128)
