"""The multi-view UNet: views of one object attend to each other (and only they do), the
camera enters through the time embedding, MVDream's camera normalisation, the loader."""

from __future__ import annotations

import math

import pytest
import torch

from stages.models.mvdream import (
    MultiViewAttnProcessor,
    build_tiny_mvdream,
    mvdream_forward,
    normalize_camera,
)
from stages.models.mvdream_load import load_mvdream


@pytest.fixture(scope="module")
def tiny():
    return load_mvdream("tiny", seed=0)


def _inputs(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 4, 4, generator=g)  # 4² latents: the tiny UNet goes 4 → 2 → 1
    t = torch.full((n,), 400)
    context = torch.randn(n, 77, 32, generator=g)
    camera = torch.randn(n, 16, generator=g)
    return x, t, context, camera


def test_views_of_a_group_mix_and_groups_do_not(tiny):
    x, t, context, camera = _inputs(4)
    changed = x.clone()
    changed[1] += 1.0  # view 2 of the object
    both = torch.cat([x, changed])  # two objects in one batch: the original and the changed one
    with torch.no_grad():
        multi = mvdream_forward(tiny.unet, both, t.repeat(2), context.repeat(2, 1, 1), camera.repeat(2, 1))
        single = mvdream_forward(
            tiny.unet, both, t.repeat(2), context.repeat(2, 1, 1), camera.repeat(2, 1), num_frames=1
        )
        alone = mvdream_forward(tiny.unet, x, t, context, camera)
    assert (multi[4] - multi[0]).abs().max() > 1e-4  # view 1 sees view 2
    torch.testing.assert_close(single[4], single[0], atol=1e-6, rtol=0)  # num_frames=1: no mixing
    assert (single[0] - multi[0]).abs().max() > 1e-4
    torch.testing.assert_close(multi[:4], alone, atol=1e-5, rtol=1e-5)  # a batch mate changes nothing


def test_multiview_processor_is_joint_attention_over_the_group(tiny):
    """Against a hand-written multi-head attention over the concatenated tokens of 4 views."""
    attn = tiny.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert isinstance(attn.processor, MultiViewAttnProcessor)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(8, 5, attn.to_q.in_features, generator=g)
    with torch.no_grad():
        out = attn(hidden, num_frames=4)
        grouped = hidden.reshape(2, 20, -1)
        q, k, v = attn.to_q(grouped), attn.to_k(grouped), attn.to_v(grouped)
        heads = attn.heads
        split = lambda y: y.reshape(2, 20, heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        expected = attn.to_out[0]((weights @ v).transpose(1, 2).reshape(2, 20, -1)).reshape(8, 5, -1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    processors = tiny.unet.attn_processors
    self_attn = [n for n in processors if n.endswith("attn1.processor")]
    assert self_attn and all(isinstance(processors[n], MultiViewAttnProcessor) for n in self_attn)


def test_camera_changes_the_prediction(tiny):
    x, t, context, camera = _inputs(4)
    with torch.no_grad():
        a = mvdream_forward(tiny.unet, x, t, context, camera)
        b = mvdream_forward(tiny.unet, x, t, context, camera + 0.5)
    assert (a - b).abs().max() > 1e-4


def test_batch_not_a_multiple_of_num_frames_is_an_error(tiny):
    x, t, context, camera = _inputs(6)
    with pytest.raises(ValueError, match="multiple of num_frames 4"):
        mvdream_forward(tiny.unet, x, t, context, camera)
    with pytest.raises(ValueError, match="camera must have shape"):
        mvdream_forward(tiny.unet, x[:4], t[:4], context[:4], camera[:4, :12])


def test_normalize_camera_puts_translation_on_unit_sphere_row_major():
    c2w = torch.eye(4).repeat(2, 1, 1)
    c2w[0, :3, :3] = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    c2w[0, :3, 3] = torch.tensor([0.0, 3.0, 4.0])
    c2w[1, :3, 3] = torch.tensor([-2.0, 0.0, 0.0])
    flat = normalize_camera(c2w)
    assert flat.shape == (2, 16)
    expected0 = [0.0, -1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.6, 0.0, 0.0, 1.0, 0.8, 0.0, 0.0, 0.0, 1.0]
    torch.testing.assert_close(flat[0], torch.tensor(expected0))
    torch.testing.assert_close(flat[1, [3, 7, 11]], torch.tensor([-1.0, 0.0, 0.0]))
    assert c2w[0, 2, 3] == 4.0  # input untouched
    with pytest.raises(ValueError, match=r"\(N, 4, 4\)"):
        normalize_camera(torch.eye(4))


def test_tiny_weights_follow_the_seed_and_leave_global_rng_alone(tiny):
    state = torch.random.get_rng_state()
    again = build_tiny_mvdream(seed=0)
    other = build_tiny_mvdream(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    w = "class_embedding.linear_1.weight"
    assert torch.equal(again.unet.state_dict()[w], tiny.unet.state_dict()[w])
    assert not torch.equal(other.unet.state_dict()[w], tiny.unet.state_dict()[w])
    assert all(not p.requires_grad for p in tiny.unet.parameters())


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="models.mvdream: .*no-such-file.pt"):
        load_mvdream(str(tmp_path / "no-such-file.pt"))
    with pytest.raises(ValueError, match="no mvdream.json"):
        load_mvdream(str(tmp_path))
    bogus = tmp_path / "model.pt"
    torch.save({"model.diffusion_model.time_embed.0.weight": torch.zeros(2, 2)}, bogus)
    with pytest.raises(ValueError, match="models.mvdream_text is needed"):
        load_mvdream(str(bogus))
    with pytest.raises(KeyError, match=r"lacks 'input_blocks.0.0.weight'.*MVDream \(ldm\) checkpoint"):
        load_mvdream(str(bogus), text_source="tiny")


@pytest.mark.gpu
def test_full_size_unet_runs_in_fp16_on_cuda():
    """sd-v2.1-base-4view's UNet (random weights) at 256² renders → 32² latents, 2 objects."""
    from stages.models.mvdream import build_mvdream_unet, mvdream_unet_config

    with torch.device("cuda"):
        unet = build_mvdream_unet(mvdream_unet_config()).half().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 32, 32, generator=g).cuda().half()
    t = torch.full((8,), 500, device="cuda")
    context = torch.randn(8, 77, 1024, generator=g).cuda().half()
    camera = normalize_camera(torch.eye(4).repeat(8, 1, 1)).cuda().half()
    with torch.no_grad():
        both = mvdream_forward(unet, x, t, context, camera)
        first = mvdream_forward(unet, x[:4], t[:4], context[:4], camera[:4])
    assert both.shape == x.shape and torch.isfinite(both).all()
    torch.testing.assert_close(both[:4], first, atol=2e-2, rtol=2e-2)
