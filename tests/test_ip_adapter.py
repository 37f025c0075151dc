"""IP-Adapter: original-layout files through diffusers' converter, per-sample scale, wrong files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stages.models.ip_adapter import (
    PerSampleIPAttnProcessor,
    load_ip_adapter,
    per_sample_ip_scale,
    save_ip_adapter_file,
    set_global_ip_scale,
    tiny_ip_adapter_state_dict,
)
from stages.models.sd import build_tiny_sd
from stages.models.sources import ModelSourceError
from stages.models.tiny import tiny_clip_vision_config


@pytest.fixture(scope="module")
def loaded():
    sd = build_tiny_sd(0)
    ip = load_ip_adapter(sd.unet, "tiny", "tiny", seed=0)
    return sd, ip


def _cross_processors(unet):
    return [p for name, p in unet.attn_processors.items() if name.endswith("attn2.processor")]


@pytest.mark.parametrize("layout, filename", [("base", "a.safetensors"), ("base", "a.bin"), ("plus", "p.bin")])
def test_original_layout_file_lands_in_the_unet(tmp_path, layout, filename):
    sd = build_tiny_sd(0)
    state = tiny_ip_adapter_state_dict(sd.unet, tiny_clip_vision_config(), layout, seed=7)
    path = save_ip_adapter_file(state, tmp_path / filename)
    ip = load_ip_adapter(sd.unet, str(path), "tiny")
    assert ip.layout == layout and ip.weight_file == str(path)
    procs = _cross_processors(sd.unet)
    assert procs and all(isinstance(p, PerSampleIPAttnProcessor) for p in procs)
    # the original numbering: the k-th cross-attention is processor 2k+1 of the UNet
    for k, proc in enumerate(procs):
        assert torch.equal(proc.to_k_ip[0].weight, state["ip_adapter"][f"{2 * k + 1}.to_k_ip.weight"])
        assert torch.equal(proc.to_v_ip[0].weight, state["ip_adapter"][f"{2 * k + 1}.to_v_ip.weight"])
    projection = sd.unet.encoder_hid_proj.image_projection_layers[0]
    if layout == "base":
        assert ip.num_tokens == 4
        assert torch.equal(projection.image_embeds.weight, state["image_proj"]["proj.weight"])
        assert torch.equal(projection.norm.bias, state["image_proj"]["norm.bias"])
    else:
        assert ip.num_tokens == 16
        assert torch.equal(projection.proj_in.weight, state["image_proj"]["proj_in.weight"])
        assert torch.equal(projection.latents, state["image_proj"]["latents"])


def test_reference_and_null_embeddings(loaded):
    _, ip = loaded
    image = Image.fromarray((np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8))
    embeds = ip.encode_reference(image)
    assert embeds.shape == (1, tiny_clip_vision_config().projection_dim)
    assert torch.count_nonzero(embeds) > 0
    assert torch.equal(ip.null_embedding(), torch.zeros_like(embeds))
    # a (3, H, W) tensor in [0, 1] is the same image
    as_tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(ip.encode_reference(as_tensor), embeds)


def _forward(sd, ip, x, t, text, image):
    return sd.unet(x, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": ip.unet_embeds(image)}).sample


def test_mixed_scales_in_one_batch_equal_separate_forwards(loaded):
    sd, ip = loaded
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([10, 300, 600, 999])
    text = sd.encode_prompts(["a", "b", "c", "d"])
    ref = ip.encode_reference(np.random.RandomState(1).rand(32, 32, 3))
    image = torch.cat([ref, ip.null_embedding(), ref, ref])
    scales = torch.tensor([0.5, 0.5, 0.0, 1.25])
    with torch.no_grad(), per_sample_ip_scale(sd.unet, scales):
        mixed = _forward(sd, ip, x, t, text, image)
    for b, s in enumerate(scales.tolist()):
        set_global_ip_scale(sd.unet, s)
        with torch.no_grad():
            alone = _forward(sd, ip, x[b : b + 1], t[b : b + 1], text[b : b + 1], image[b : b + 1])
        torch.testing.assert_close(mixed[b : b + 1], alone, rtol=1e-5, atol=1e-5)
    set_global_ip_scale(sd.unet, 1.0)
    # the IP term matters: rows 2 (scale 0) and 3 (scale 1.25) differ although inputs share ref
    assert not torch.allclose(mixed[2], _forward(sd, ip, x[2:3], t[2:3], text[2:3], image[2:3])[0], atol=1e-3)

    # scale 0 is the UNet without any adapter
    plain = build_tiny_sd(0).unet
    with torch.no_grad(), per_sample_ip_scale(sd.unet, torch.zeros(4)):
        zero = _forward(sd, ip, x, t, text, image)
        torch.testing.assert_close(zero, plain(x, t, encoder_hidden_states=text).sample, rtol=1e-5, atol=1e-5)


def test_per_sample_scale_errors(loaded):
    sd, ip = loaded
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), sd.encode_prompts(["a", "b"])
    with pytest.raises(ValueError, match="UNet batch is 2"), per_sample_ip_scale(sd.unet, torch.ones(3)):
        _forward(sd, ip, x, t, text, torch.zeros(2, 16))
    assert all(p.sample_scale is None for p in _cross_processors(sd.unet))  # reset after the block
    with pytest.raises(ValueError, match="no IP-Adapter processors"), per_sample_ip_scale(build_tiny_sd(0).unet, torch.ones(1)):
        pass


def test_wrong_files_are_rejected_with_the_file_name(tmp_path):
    sd = build_tiny_sd(0)
    vision = tiny_clip_vision_config()
    random = tmp_path / "random.safetensors"
    from safetensors.torch import save_file

    save_file({"down.0.weight": torch.zeros(2, 2)}, str(random))
    with pytest.raises(ModelSourceError, match=r"models\.ip_adapter: .*random\.safetensors.* not an IP-Adapter weight file"):
        load_ip_adapter(sd.unet, str(random), "tiny")

    # an SDXL-like adapter: 2048-wide cross-attention keys and 70 layers
    xl = tiny_ip_adapter_state_dict(sd.unet, vision, "base")
    xl["ip_adapter"] = {f"{2 * k + 1}.to_k_ip.weight": torch.zeros(64, 2048) for k in range(70)}
    xl["ip_adapter"] |= {f"{2 * k + 1}.to_v_ip.weight": torch.zeros(64, 2048) for k in range(70)}
    path = save_ip_adapter_file(xl, tmp_path / "ip-adapter_sdxl.bin")
    with pytest.raises(ModelSourceError, match=r"ip-adapter_sdxl\.bin.* 70 IP cross-attention layers.*SD1\.5"):
        load_ip_adapter(sd.unet, str(path), "tiny")

    wide = tiny_ip_adapter_state_dict(sd.unet, vision, "base")
    wide["ip_adapter"] = {k: torch.zeros(v.shape[0], 2048) for k, v in wide["ip_adapter"].items()}
    path = save_ip_adapter_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ModelSourceError, match=r"wide\.safetensors.* input width \[2048\].*cross_attention_dim is 32"):
        load_ip_adapter(sd.unet, str(path), "tiny")

    full_face = {"image_proj": {"proj.0.weight": torch.zeros(2, 2), "proj.3.weight": torch.zeros(2)},
                 "ip_adapter": {"1.to_k_ip.weight": torch.zeros(2, 2)}}
    path = save_ip_adapter_file(full_face, tmp_path / "full.bin")
    with pytest.raises(ModelSourceError, match=r"full\.bin.* variant this project does not support"):
        load_ip_adapter(sd.unet, str(path), "tiny")

    with pytest.raises(ModelSourceError, match=r"no IP-Adapter weight file 'ip-adapter_sd15\.bin'"):
        load_ip_adapter(sd.unet, str(tmp_path), "tiny")
    # nothing above touched the UNet
    assert not any(isinstance(p, PerSampleIPAttnProcessor) for p in sd.unet.attn_processors.values())


def test_unreachable_hub_names_the_key_and_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet = build_tiny_sd(0).unet
    with pytest.raises(ModelSourceError) as info:
        load_ip_adapter(unet, "no-such-org/IP-Adapter", "tiny", subfolder="models", weight_name="ip-adapter_sd15.bin")
    message = str(info.value)
    assert message.startswith("models.ip_adapter:")
    assert "no-such-org/IP-Adapter:models/ip-adapter_sd15.bin" in message and "local" in message
    with pytest.raises(ModelSourceError, match=r"^models\.image_encoder: .*no-such-org/IP-Adapter:models/image_encoder"):
        load_ip_adapter(unet, "tiny", "no-such-org/IP-Adapter:models/image_encoder")


def test_image_encoder_file_must_be_a_vit_h_state_dict(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "image_encoder.safetensors"
    save_file({"vision_model.embeddings.class_embedding": torch.zeros(8)}, str(path))
    with pytest.raises(ModelSourceError, match=r"models\.image_encoder: .*image_encoder\.safetensors.* ViT-H/14"):
        load_ip_adapter(build_tiny_sd(0).unet, "tiny", str(path))
