"""The MVDream converter: an ORIGINAL-layout (ldm) state dict, generated here from MVDream's
own module structure (``openaimodel.MultiViewUNetModel``, ldm ``AutoencoderKL``, OpenCLIP
text tower) independently of the converter, lands tensor for tensor in the diffusers model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from stages.models.mvdream import (
    MARKER_FILE,
    mvdream_forward,
    mvdream_unet_config,
    normalize_camera,
    encode_prompts,
)
from stages.models.mvdream_load import load_mvdream
from stages.models.mvdream_convert import (
    CheckpointKeyError,
    components_from_converted,
    convert_mvdream_checkpoint,
    main,
)
from stages.models.tiny import tiny_tokenizer

# ------------------------------------------------------------------ ldm-layout shapes


def _resblock(prefix: str, cin: int, cout: int, emb: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        f"{prefix}.in_layers.0.weight": (cin,),
        f"{prefix}.in_layers.0.bias": (cin,),
        f"{prefix}.in_layers.2.weight": (cout, cin, 3, 3),
        f"{prefix}.in_layers.2.bias": (cout,),
        f"{prefix}.emb_layers.1.weight": (cout, emb),
        f"{prefix}.emb_layers.1.bias": (cout,),
        f"{prefix}.out_layers.0.weight": (cout,),
        f"{prefix}.out_layers.0.bias": (cout,),
        f"{prefix}.out_layers.3.weight": (cout, cout, 3, 3),
        f"{prefix}.out_layers.3.bias": (cout,),
    }
    if cin != cout:
        shapes[f"{prefix}.skip_connection.weight"] = (cout, cin, 1, 1)
        shapes[f"{prefix}.skip_connection.bias"] = (cout,)
    return shapes


def _transformer3d(prefix: str, ch: int, context: int, depth: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        f"{prefix}.norm.weight": (ch,),
        f"{prefix}.norm.bias": (ch,),
        f"{prefix}.proj_in.weight": (ch, ch),
        f"{prefix}.proj_in.bias": (ch,),
        f"{prefix}.proj_out.weight": (ch, ch),
        f"{prefix}.proj_out.bias": (ch,),
    }
    for d in range(depth):
        b = f"{prefix}.transformer_blocks.{d}"
        for attn, kv in (("attn1", ch), ("attn2", context)):
            shapes[f"{b}.{attn}.to_q.weight"] = (ch, ch)
            shapes[f"{b}.{attn}.to_k.weight"] = (ch, kv)
            shapes[f"{b}.{attn}.to_v.weight"] = (ch, kv)
            shapes[f"{b}.{attn}.to_out.0.weight"] = (ch, ch)
            shapes[f"{b}.{attn}.to_out.0.bias"] = (ch,)
        shapes[f"{b}.ff.net.0.proj.weight"] = (ch * 8, ch)  # GEGLU: 2 × (4·ch)
        shapes[f"{b}.ff.net.0.proj.bias"] = (ch * 8,)
        shapes[f"{b}.ff.net.2.weight"] = (ch, ch * 4)
        shapes[f"{b}.ff.net.2.bias"] = (ch,)
        for n in (1, 2, 3):
            shapes[f"{b}.norm{n}.weight"] = (ch,)
            shapes[f"{b}.norm{n}.bias"] = (ch,)
    return shapes


def ldm_unet_shapes(mc, mult, nrb, attention_resolutions, context, camera_dim=16, depth=1):
    """Names/shapes of MVDream's ``MultiViewUNetModel`` (use_linear_in_transformer, legacy False)."""
    emb = 4 * mc
    s = {
        "time_embed.0.weight": (emb, mc), "time_embed.0.bias": (emb,),
        "time_embed.2.weight": (emb, emb), "time_embed.2.bias": (emb,),
        "camera_embed.0.weight": (emb, camera_dim), "camera_embed.0.bias": (emb,),
        "camera_embed.2.weight": (emb, emb), "camera_embed.2.bias": (emb,),
        "input_blocks.0.0.weight": (mc, 4, 3, 3), "input_blocks.0.0.bias": (mc,),
    }
    chans, ch, ds, k = [mc], mc, 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            s |= _resblock(f"input_blocks.{k}.0", ch, m * mc, emb)
            ch = m * mc
            if ds in attention_resolutions:
                s |= _transformer3d(f"input_blocks.{k}.1", ch, context, depth)
            chans.append(ch)
            k += 1
        if level != len(mult) - 1:
            s[f"input_blocks.{k}.0.op.weight"] = (ch, ch, 3, 3)
            s[f"input_blocks.{k}.0.op.bias"] = (ch,)
            chans.append(ch)
            ds *= 2
            k += 1
    s |= _resblock("middle_block.0", ch, ch, emb)
    s |= _transformer3d("middle_block.1", ch, context, depth)
    s |= _resblock("middle_block.2", ch, ch, emb)
    k = 0
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(nrb + 1):
            s |= _resblock(f"output_blocks.{k}.0", ch + chans.pop(), m * mc, emb)
            ch = m * mc
            j = 1
            if ds in attention_resolutions:
                s |= _transformer3d(f"output_blocks.{k}.1", ch, context, depth)
                j = 2
            if level and i == nrb:
                s[f"output_blocks.{k}.{j}.conv.weight"] = (ch, ch, 3, 3)
                s[f"output_blocks.{k}.{j}.conv.bias"] = (ch,)
                ds //= 2
            k += 1
    s |= {"out.0.weight": (ch,), "out.0.bias": (ch,), "out.2.weight": (4, mc, 3, 3), "out.2.bias": (4,)}
    return s


def _vae_resnet(prefix, cin, cout):
    s = {
        f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
        f"{prefix}.conv1.weight": (cout, cin, 3, 3), f"{prefix}.conv1.bias": (cout,),
        f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
        f"{prefix}.conv2.weight": (cout, cout, 3, 3), f"{prefix}.conv2.bias": (cout,),
    }
    if cin != cout:
        s[f"{prefix}.nin_shortcut.weight"] = (cout, cin, 1, 1)
        s[f"{prefix}.nin_shortcut.bias"] = (cout,)
    return s


def _vae_mid(prefix, c):
    s = _vae_resnet(f"{prefix}.block_1", c, c) | _vae_resnet(f"{prefix}.block_2", c, c)
    s |= {f"{prefix}.attn_1.norm.weight": (c,), f"{prefix}.attn_1.norm.bias": (c,)}
    for n in ("q", "k", "v", "proj_out"):
        s[f"{prefix}.attn_1.{n}.weight"] = (c, c, 1, 1)
        s[f"{prefix}.attn_1.{n}.bias"] = (c,)
    return s


def ldm_vae_shapes(ch, mult, nrb, z=4):
    """Names/shapes of ldm's ``AutoencoderKL`` (Encoder/Decoder, double_z, embed_dim = z)."""
    s = {"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)}
    cin = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            s |= _vae_resnet(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i != len(mult) - 1:
            s[f"encoder.down.{i}.downsample.conv.weight"] = (cin, cin, 3, 3)
            s[f"encoder.down.{i}.downsample.conv.bias"] = (cin,)
    s |= _vae_mid("encoder.mid", cin)
    s |= {"encoder.norm_out.weight": (cin,), "encoder.norm_out.bias": (cin,),
          "encoder.conv_out.weight": (2 * z, cin, 3, 3), "encoder.conv_out.bias": (2 * z,),
          "quant_conv.weight": (2 * z, 2 * z, 1, 1), "quant_conv.bias": (2 * z,),
          "post_quant_conv.weight": (z, z, 1, 1), "post_quant_conv.bias": (z,),
          "decoder.conv_in.weight": (cin, z, 3, 3), "decoder.conv_in.bias": (cin,)}
    s |= _vae_mid("decoder.mid", cin)
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            s |= _vae_resnet(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i != 0:
            s[f"decoder.up.{i}.upsample.conv.weight"] = (cin, cin, 3, 3)
            s[f"decoder.up.{i}.upsample.conv.bias"] = (cin,)
    s |= {"decoder.norm_out.weight": (cin,), "decoder.norm_out.bias": (cin,),
          "decoder.conv_out.weight": (3, cin, 3, 3), "decoder.conv_out.bias": (3,)}
    return s


def open_clip_text_shapes(vocab, width, layers, context=77, embed=None):
    """Names/shapes of OpenCLIP's text tower (``model.visual`` deleted, as FrozenOpenCLIPEmbedder)."""
    s = {"token_embedding.weight": (vocab, width), "positional_embedding": (context, width),
         "ln_final.weight": (width,), "ln_final.bias": (width,),
         "text_projection": (width, embed or width), "logit_scale": ()}
    for i in range(layers):
        p = f"transformer.resblocks.{i}"
        s |= {f"{p}.ln_1.weight": (width,), f"{p}.ln_1.bias": (width,),
              f"{p}.attn.in_proj_weight": (3 * width, width), f"{p}.attn.in_proj_bias": (3 * width,),
              f"{p}.attn.out_proj.weight": (width, width), f"{p}.attn.out_proj.bias": (width,),
              f"{p}.ln_2.weight": (width,), f"{p}.ln_2.bias": (width,),
              f"{p}.mlp.c_fc.weight": (4 * width, width), f"{p}.mlp.c_fc.bias": (4 * width,),
              f"{p}.mlp.c_proj.weight": (width, 4 * width), f"{p}.mlp.c_proj.bias": (width,)}
    return s


SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
            "posterior_mean_coef1", "posterior_mean_coef2")

TEXT_LAYERS = 3  # the converted encoder keeps 2 (penultimate layer)


def full_shapes(tiny: bool = True) -> dict[str, tuple[int, ...]]:
    if tiny:
        unet = ldm_unet_shapes(32, (1, 2, 2), 1, (1, 2), context=32)
        vae = ldm_vae_shapes(32, (1, 2), 1)
        text = open_clip_text_shapes(len(tiny_tokenizer()), 32, TEXT_LAYERS)
    else:  # sd-v2.1-base-4view
        unet = ldm_unet_shapes(320, (1, 2, 4, 4), 2, (4, 2, 1), context=1024)
        vae = ldm_vae_shapes(128, (1, 2, 4, 4), 2)
        text = open_clip_text_shapes(49408, 1024, 24)
    shapes = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    shapes |= {f"first_stage_model.{k}": v for k, v in vae.items()}
    shapes |= {f"cond_stage_model.model.{k}": v for k, v in text.items()}
    shapes |= {k: (1000,) for k in SCHEDULE}
    return shapes


def tiny_original_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: 0.1 * torch.randn(shape, generator=g) for k, shape in full_shapes().items()}
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    sd["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    return sd


TINY_KW = dict(num_head_channels=8, text_num_heads=4)


@pytest.fixture(scope="module")
def original():
    return tiny_original_checkpoint()


@pytest.fixture(scope="module")
def components(original):
    return components_from_converted(convert_mvdream_checkpoint(original, **TINY_KW), tiny_tokenizer())


# ----------------------------------------------------------------------------- tests


def _fingerprint(t: torch.Tensor) -> tuple:
    flat = t.detach().reshape(-1)
    return (flat.numel(), float(flat[0]), float(flat[-1]), float(flat.sum()))


def test_every_original_tensor_lands_once_with_equal_values(original, components):
    targets = {}
    for part, module in (("unet", components.unet), ("vae", components.vae), ("text", components.text_encoder)):
        for name, tensor in module.state_dict().items():
            targets[f"{part}.{name.removeprefix('text_model.')}"] = tensor  # transformers 4 vs 5
    index: dict[tuple, list[str]] = {}
    for name, tensor in targets.items():
        index.setdefault(_fingerprint(tensor), []).append(name)
    hit: dict[str, str] = {}
    last = f"cond_stage_model.model.transformer.resblocks.{TEXT_LAYERS - 1}."
    unused = {f"cond_stage_model.model.{n}" for n in ("text_projection", "logit_scale")}
    for key, tensor in original.items():
        if key in SCHEDULE or key.startswith(last) or key in unused:
            continue
        pieces = tensor.chunk(3) if key.endswith(("in_proj_weight", "in_proj_bias")) else (tensor,)
        for n, piece in enumerate(pieces):
            names = index.get(_fingerprint(piece), [])
            assert len(names) == 1, f"{key} (piece {n}) found at {names}"
            assert torch.equal(targets[names[0]].reshape(-1), piece.reshape(-1)), key
            assert names[0] not in hit, f"{names[0]} filled by both {hit[names[0]]} and {key}"
            hit[names[0]] = key
    assert set(hit) == set(targets), f"never filled: {sorted(set(targets) - set(hit))[:10]}"
    # spot checks of the layout mapping
    expect = {
        "unet.class_embedding.linear_1.weight": "model.diffusion_model.camera_embed.0.weight",
        "unet.class_embedding.linear_2.bias": "model.diffusion_model.camera_embed.2.bias",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight":
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "unet.mid_block.attentions.0.proj_in.weight": "model.diffusion_model.middle_block.1.proj_in.weight",
        "unet.up_blocks.0.upsamplers.0.conv.weight": "model.diffusion_model.output_blocks.1.1.conv.weight",
        "unet.conv_out.weight": "model.diffusion_model.out.2.weight",
        "vae.encoder.mid_block.attentions.0.to_q.weight": "first_stage_model.encoder.mid.attn_1.q.weight",
        "text.encoder.layers.1.mlp.fc1.weight":
            "cond_stage_model.model.transformer.resblocks.1.mlp.c_fc.weight",
    }
    for target, source in expect.items():
        assert hit[target] == source


def test_converted_alphas_are_the_checkpoints(original, components):
    assert torch.equal(components.alphas_cumprod, original["alphas_cumprod"])


def test_converted_model_runs_and_camera_adds_to_time_embedding(original, components):
    """ldm: emb = time_embed(t) + camera_embed(cam). With one camera for the whole batch,
    swapping the camera equals shifting time_embedding.linear_2's bias by the difference of
    camera_embed outputs computed from the ORIGINAL tensors."""
    unet = components.unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 4, 4, generator=g)
    t = torch.full((4,), 300)
    context = encode_prompts(components, ["a chair"] * 4)
    assert context.shape == (4, 77, 32)
    pre = "model.diffusion_model.camera_embed."

    def camera_mlp(c):
        h = F.silu(c @ original[pre + "0.weight"].T + original[pre + "0.bias"])
        return h @ original[pre + "2.weight"].T + original[pre + "2.bias"]

    cam_a = torch.randn(1, 16, generator=g).expand(4, 16)
    cam_b = torch.randn(1, 16, generator=g).expand(4, 16)
    with torch.no_grad():
        out_b = mvdream_forward(unet, x, t, context, cam_b)
        bias = unet.time_embedding.linear_2.bias
        saved = bias.clone()
        bias += (camera_mlp(cam_b[:1]) - camera_mlp(cam_a[:1]))[0]
        try:
            out_shifted = mvdream_forward(unet, x, t, context, cam_a)
        finally:
            bias.copy_(saved)
        out_a = mvdream_forward(unet, x, t, context, cam_a)
    assert out_b.shape == x.shape and torch.isfinite(out_b).all()
    torch.testing.assert_close(out_shifted, out_b, atol=1e-4, rtol=1e-4)
    assert (out_a - out_b).abs().max() > 1e-3
    latents = components.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
    assert latents.shape == (1, 4, 32, 32)


def test_missing_and_extra_keys_are_listed(original):
    broken = dict(original)
    del broken["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"]
    with pytest.raises(CheckpointKeyError, match=r"missing 1: down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_v\.weight"):
        convert_mvdream_checkpoint(broken, **TINY_KW)
    extra = dict(original)
    extra["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.bogus"] = torch.zeros(2)
    extra["model_ema.decay"] = torch.zeros(())
    with pytest.raises(CheckpointKeyError, match="model_ema.decay"):
        convert_mvdream_checkpoint(extra, **TINY_KW)
    del extra["model_ema.decay"]
    with pytest.raises(CheckpointKeyError, match=r"unexpected 1: down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.bogus"):
        convert_mvdream_checkpoint(extra, **TINY_KW)
    stray = dict(original)
    stray["first_stage_model.loss.logvar"] = torch.zeros(())
    with pytest.raises(CheckpointKeyError, match=r"land nowhere: first_stage_model\.loss\.logvar"):
        convert_mvdream_checkpoint(stray, **TINY_KW)
    no_camera = {k: v for k, v in original.items() if "camera_embed" not in k}
    with pytest.raises(CheckpointKeyError, match="camera_embed"):
        convert_mvdream_checkpoint(no_camera, **TINY_KW)


def test_full_size_layout_infers_sd21_base_configs():
    """On meta tensors (no memory): the sd-v2.1-base-4view layout converts without a stray
    key and yields SD2.1-base's configs plus the 16-d camera projection."""
    meta = {k: torch.empty(s, device="meta") for k, s in full_shapes(tiny=False).items()}
    converted = convert_mvdream_checkpoint(meta)
    assert converted.unet_config == mvdream_unet_config()
    assert converted.unet_config["attention_head_dim"] == [5, 10, 20, 20]
    assert converted.vae_config["block_out_channels"] == [128, 256, 512, 512]
    assert converted.vae_config["layers_per_block"] == 2
    text = converted.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.intermediate_size) == (
        23, 1024, 16, 4096)
    assert converted.unet["class_embedding.linear_1.weight"].shape == (1280, 16)


def test_cli_writes_a_directory_that_loads_back(original, components, tmp_path):
    ckpt = tmp_path / "sd-v2.1-base-4view.pt"
    torch.save(original, ckpt)
    out = tmp_path / "converted"
    # the CLI's entry point in-process (a subprocess would spend its time importing torch)
    assert main([str(ckpt), str(out), "--tokenizer", "tiny", "--num-head-channels", "8", "--text-heads", "4"]) == 0
    assert json.loads((out / MARKER_FILE).read_text())["num_frames"] == 4
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.pt"), str(tmp_path / "other")])
    assert exit_info.value.code == 2
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert torch.equal(
            f.get_tensor("class_embedding.linear_1.weight"),
            original["model.diffusion_model.camera_embed.0.weight"],
        )
    loaded = load_mvdream(str(out))
    x = torch.randn(4, 4, 4, 4)
    t = torch.full((4,), 10)
    cam = normalize_camera(torch.eye(4).repeat(4, 1, 1))
    ctx = encode_prompts(loaded, ["x"] * 4)
    with torch.no_grad():
        torch.testing.assert_close(
            mvdream_forward(loaded.unet, x, t, ctx, cam), mvdream_forward(components.unet, x, t, ctx, cam)
        )
