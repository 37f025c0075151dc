"""SD1.5 parts, model sources, device/dtype resolution: tiny preset, directory round-trip, errors."""

from __future__ import annotations

import pickle

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from stages.models.device import resolve_device, resolve_dtype
from stages.models.sd import build_tiny_sd, load_sd
from stages.models.sources import ModelSourceError, load_checkpoint, resolve_source


@pytest.fixture(scope="module")
def tiny():
    return load_sd("tiny", seed=0)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_uses_the_real_classes_and_is_seeded(tiny):
    assert isinstance(tiny.unet, UNet2DConditionModel)
    assert isinstance(tiny.vae, AutoencoderKL)
    assert isinstance(tiny.text_encoder, CLIPTextModel)
    assert isinstance(tiny.scheduler, DDPMScheduler)
    again, other = build_tiny_sd(0), build_tiny_sd(1)
    assert _same_weights(tiny.unet, again.unet) and _same_weights(tiny.vae, again.vae)
    assert not _same_weights(tiny.unet, other.unet)
    assert not any(p.requires_grad for p in tiny.unet.parameters())


def test_tiny_vae_downsamples_by_8_to_4_channels(tiny):
    latents = tiny.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    assert tiny.vae_scale_factor == 8


def test_tiny_tokenizer_and_text_encoder(tiny):
    ids = tiny.tokenizer(["a red car"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    # byte-level vocabulary: 'a', ' r' ... decode back to the prompt
    assert tiny.tokenizer.decode(ids[0], skip_special_tokens=True).replace(" ", "") == "aredcar"
    embeds = tiny.encode_prompts(["a red car", ""])
    assert embeds.shape == (2, 77, tiny.unet.config.cross_attention_dim)
    assert not torch.allclose(embeds[0], embeds[1])
    # the tokenizer survives pickling (Ray ships it to actors)
    assert pickle.loads(pickle.dumps(tiny.tokenizer))("a").input_ids == tiny.tokenizer("a").input_ids


def test_scheduler_is_sd15_scaled_linear(tiny):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, 0).float()
    assert tiny.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(tiny.alphas_cumprod, expected, rtol=1e-5, atol=1e-6)


def test_diffusers_directory_round_trip(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "sd")
    loaded = load_sd(str(tmp_path / "sd"))
    assert _same_weights(loaded.unet, tiny.unet) and _same_weights(loaded.text_encoder, tiny.text_encoder)
    torch.testing.assert_close(loaded.encode_prompts(["a cat"]), tiny.encode_prompts(["a cat"]))


@pytest.mark.parametrize(
    "value, kind, location, subfolder, filename",
    [
        ("tiny", "tiny", "tiny", None, None),
        ("org/name", "hub", "org/name", None, None),
        ("h94/IP-Adapter:models/image_encoder", "hub", "h94/IP-Adapter", "models/image_encoder", None),
        ("MVDream/MVDream:sd-v2.1-base-4view.pt", "hub", "MVDream/MVDream", None, "sd-v2.1-base-4view.pt"),
        ("h94/IP-Adapter:models/ip-adapter_sd15.bin", "hub", "h94/IP-Adapter", "models", "ip-adapter_sd15.bin"),
    ],
)
def test_resolve_source_forms(value, kind, location, subfolder, filename):
    src = resolve_source(value, "models.sd")
    assert (src.kind, src.location, src.subfolder, src.filename) == (kind, location, subfolder, filename)


def test_resolve_source_local_paths(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert resolve_source(str(tmp_path), "models.sd").kind == "directory"
    assert resolve_source(str(tmp_path / "w.safetensors"), "models.sd").kind == "file"
    with pytest.raises(ModelSourceError, match=r"models\.sd: .*notes\.txt.* is neither a diffusers directory"):
        resolve_source(str(tmp_path / "notes.txt"), "models.sd")
    with pytest.raises(ModelSourceError, match=r"models\.reference: '/x/y' is neither a diffusers directory"):
        resolve_source("/x/y", "models.reference")
    with pytest.raises(ModelSourceError, match="models.sd"):
        resolve_source("", "models.sd")


def test_missing_hub_model_offline_says_how_to_use_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as info:
        load_sd("no-such-org/no-such-model")
    message = str(info.value)
    assert message.startswith("models.sd:") and "no-such-org/no-such-model" in message
    assert "HF_HUB_OFFLINE" in message and "local diffusers directory or checkpoint file" in message


def test_directory_without_model_index_is_rejected(tmp_path):
    with pytest.raises(ModelSourceError, match="no model_index.json"):
        load_sd(str(tmp_path))


def test_non_sd_single_file_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "random.safetensors"
    save_file({"foo": torch.zeros(3)}, str(path))
    with pytest.raises(ModelSourceError, match=r"models\.sd: .*random\.safetensors"):
        load_sd(str(path))


class NotATensor:
    """An arbitrary pickled object: ``torch.load(weights_only=True)`` must refuse it."""


def test_load_checkpoint_safetensors_and_weights_only_pickle(tmp_path):
    state = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.ckpt")
    for name in ("w.safetensors", "w.ckpt"):
        loaded = load_checkpoint(tmp_path / name, "models.sd")
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["a"], state["a"])

    torch.save({"x": NotATensor()}, tmp_path / "evil.pt")  # refused by weights_only=True
    with pytest.raises(ModelSourceError, match=r"models\.sd: cannot read checkpoint .*evil\.pt"):
        load_checkpoint(tmp_path / "evil.pt", "models.sd")
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", "models.sd")


def test_device_and_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="models.dtype"):
        resolve_dtype("float64x", cpu)
    with pytest.raises(ValueError, match="models.device"):
        resolve_device("tpu:9")
