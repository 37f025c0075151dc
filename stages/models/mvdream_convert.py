"""Convert an original MVDream checkpoint (ldm layout) into the diffusers-based model of
:mod:`stages.models.mvdream`.

The original ``sd-v2.1-base-4view.pt`` is the whole ``LatentDiffusionInterface`` state dict:

- ``model.diffusion_model.*``  the multi-view UNet (SD2.1 ldm UNet + ``camera_embed.0/2``)
- ``first_stage_model.*``      the KL VAE
- ``cond_stage_model.model.*`` OpenCLIP ViT-H text tower (``FrozenOpenCLIPEmbedder``, penultimate layer)
- ``betas``, ``alphas_cumprod``, ... the DDPM schedule buffers

Keys are mapped with diffusers' own converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_open_clip_checkpoint``) plus the camera embedding
(``camera_embed.0/2`` → ``class_embedding.linear_1/2``). Configs are inferred from tensor
shapes; what shapes cannot tell (head width 64, OpenCLIP-H's 16 text heads, GroupNorm's 32
groups) are parameters with MVDream's values as defaults.

Every source tensor is accounted for: the converters are first run on *tracer* tensors
(source key i → a stride-0 tensor filled with i) to learn where each target tensor comes
from; a source key that lands nowhere (beyond the documented ignored ones), an unknown
key, or a target key of the model that nothing fills raises :class:`CheckpointKeyError`
listing them.

CLI::

    python -m stages.models.mvdream_convert sd-v2.1-base-4view.pt OUT_DIR \
        [--tokenizer stabilityai/stable-diffusion-2-1-base] [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stages.models.mvdream import (
    MARKER_FILE,
    MVDREAM_SCALING_FACTOR,
    SCHEDULE_FILE,
    MVDreamComponents,
    mvdream_alphas_cumprod,
    mvdream_unet_config,
    set_multiview_attention,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
SCHEDULE_KEYS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    }
)
"""``LatentDiffusionInterface`` buffers; ``alphas_cumprod`` is kept, the rest derive from it."""
TEXT_UNUSED = ("text_projection", "logit_scale", "attn_mask")
"""OpenCLIP parts the text-conditioning path never uses (besides the last residual block:
``layer: penultimate`` stops one block early, as SD2.1's 23-layer diffusers text encoder)."""
CAMERA_KEYS = {
    "class_embedding.linear_1.weight": "camera_embed.0.weight",
    "class_embedding.linear_1.bias": "camera_embed.0.bias",
    "class_embedding.linear_2.weight": "camera_embed.2.weight",
    "class_embedding.linear_2.bias": "camera_embed.2.bias",
}


class CheckpointKeyError(KeyError):
    """The checkpoint's keys do not match the model: the message lists the offending keys."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass
class ConvertedMVDream:
    """Diffusers-layout state dicts and the configs inferred for them."""

    unet: dict[str, Tensor]
    vae: dict[str, Tensor]
    text_encoder: dict[str, Tensor] | None
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_config: CLIPTextConfig | None
    alphas_cumprod: Tensor
    """(T,) fp32: the checkpoint's own ``alphas_cumprod`` buffer when present."""


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Flat state dict of a ``.safetensors`` or ``.pt``/``.ckpt`` file (``weights_only=True``;
    a top-level ``state_dict`` entry, as Lightning writes, is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MVDream checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    return dict(loaded)


# ------------------------------------------------------------------- config inference


def _subdict(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _require(sd: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    if key not in sd:
        raise CheckpointKeyError(f"{what}: checkpoint lacks {key!r}; is this an MVDream (ldm) checkpoint?")
    return sd[key]


def unet_config_from_ldm(
    unet_sd: Mapping[str, Tensor], num_head_channels: int = 64, norm_num_groups: int = 32
) -> dict[str, Any]:
    """Infer the diffusers config of an MVDream UNet from its ldm state dict (prefix removed)."""
    conv_in = _require(unet_sd, "input_blocks.0.0.weight", "unet")
    camera = _require(unet_sd, "camera_embed.0.weight", "unet (camera embedding)")
    conv_out = _require(unet_sd, "out.2.weight", "unet")
    model_channels = int(conv_in.shape[0])
    indices = sorted({int(k.split(".")[1]) for k in unet_sd if k.startswith("input_blocks.")})
    levels: list[list[int]] = [[]]
    for i in indices[1:]:
        if f"input_blocks.{i}.0.op.weight" in unet_sd:
            levels.append([])
        else:
            levels[-1].append(i)
    layers = {len(level) for level in levels}
    if len(layers) != 1 or not levels[0]:
        raise ValueError(f"unet: uneven residual blocks per level {sorted(layers)}")
    channels = [int(_require(unet_sd, f"input_blocks.{lv[0]}.0.out_layers.3.weight", "unet").shape[0]) for lv in levels]
    attention = [f"input_blocks.{lv[0]}.1.proj_in.weight" in unet_sd for lv in levels]
    proj_in = _require(unet_sd, "middle_block.1.proj_in.weight", "unet (middle transformer)")
    depth = len({k.split(".")[3] for k in unet_sd if k.startswith("middle_block.1.transformer_blocks.")})
    cross = _require(unet_sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "unet")
    return mvdream_unet_config(
        block_out_channels=channels,
        attention_levels=attention,
        layers_per_block=layers.pop(),
        cross_attention_dim=int(cross.shape[1]),
        num_head_channels=num_head_channels,
        transformer_layers_per_block=depth,
        camera_dim=int(camera.shape[1]),
        norm_num_groups=norm_num_groups,
        in_channels=int(conv_in.shape[1]),
        out_channels=int(conv_out.shape[0]),
        use_linear_projection=proj_in.ndim == 2,
        sample_size=32 if model_channels >= 320 else 8,
    )


def vae_config_from_ldm(vae_sd: Mapping[str, Tensor], norm_num_groups: int = 32) -> dict[str, Any]:
    """Infer the ``AutoencoderKL`` config from the ldm VAE state dict (prefix removed)."""
    levels = sorted({int(k.split(".")[2]) for k in vae_sd if k.startswith("encoder.down.")})
    if not levels:
        raise CheckpointKeyError("vae: checkpoint has no first_stage_model.encoder.down.* keys")
    channels = [int(_require(vae_sd, f"encoder.down.{i}.block.0.conv1.weight", "vae").shape[0]) for i in levels]
    per_level = len({k.split(".")[4] for k in vae_sd if k.startswith("encoder.down.0.block.")})
    quant = _require(vae_sd, "quant_conv.weight", "vae")
    return {
        "in_channels": int(_require(vae_sd, "encoder.conv_in.weight", "vae").shape[1]),
        "out_channels": int(_require(vae_sd, "decoder.conv_out.weight", "vae").shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "latent_channels": int(quant.shape[0]) // 2,
        "norm_num_groups": int(norm_num_groups),
        "sample_size": 256,
        "scaling_factor": MVDREAM_SCALING_FACTOR,
    }


def text_config_from_ldm(text_sd: Mapping[str, Tensor], num_attention_heads: int = 16) -> CLIPTextConfig:
    """``CLIPTextConfig`` of the OpenCLIP text tower minus its last block (prefix removed)."""
    tokens = _require(text_sd, "token_embedding.weight", "text encoder")
    positions = _require(text_sd, "positional_embedding", "text encoder")
    blocks = len({k.split(".")[2] for k in text_sd if k.startswith("transformer.resblocks.")})
    if blocks < 2:
        raise ValueError(f"text encoder: {blocks} residual blocks; need at least 2 (penultimate layer)")
    hidden = int(tokens.shape[1])
    if hidden % num_attention_heads:
        raise ValueError(f"text encoder: width {hidden} not divisible by {num_attention_heads} heads")
    return CLIPTextConfig(
        vocab_size=int(tokens.shape[0]),
        hidden_size=hidden,
        intermediate_size=int(_require(text_sd, "transformer.resblocks.0.mlp.c_fc.weight", "text encoder").shape[0]),
        num_hidden_layers=blocks - 1,
        num_attention_heads=int(num_attention_heads),
        max_position_embeddings=int(positions.shape[0]),
        hidden_act="gelu",
        projection_dim=hidden,
        layer_norm_eps=1e-5,
        # CLIP's <|startoftext|>/<|endoftext|> ids; they are the last two ids of a small vocabulary
        bos_token_id=min(49406, int(tokens.shape[0]) - 2),
        eos_token_id=min(49407, int(tokens.shape[0]) - 1),
        pad_token_id=min(49407, int(tokens.shape[0]) - 1),
    )


# ------------------------------------------------------------------------ conversion


def _convert_parts(
    state_dict: Mapping[str, Tensor],
    unet_config: dict[str, Any],
    vae_config: dict[str, Any],
    text_blocks: int | None,
    text_keys_prefixed: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor] | None]:
    """Map keys with diffusers' converters (+ camera embedding). Pure key/shape surgery."""
    unet_in = {k: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    # diffusers would look for ldm ``label_emb`` under class_embed_type; MVDream calls it camera_embed
    unet = convert_ldm_unet_checkpoint(unet_in, {"layers_per_block": unet_config["layers_per_block"]})
    for target, source in CAMERA_KEYS.items():
        unet[target] = unet_in[UNET_PREFIX + source]
    vae_in = {k: v for k, v in state_dict.items() if k.startswith(VAE_PREFIX)}
    vae = convert_ldm_vae_checkpoint(vae_in, vae_config)
    text = None
    if text_blocks is not None:
        last = f"{TEXT_PREFIX}transformer.resblocks.{text_blocks - 1}."
        text_in = {
            k: v
            for k, v in state_dict.items()
            if k.startswith(TEXT_PREFIX) and not k.startswith(last) and k[len(TEXT_PREFIX):] not in TEXT_UNUSED
        }
        width = int(state_dict[TEXT_PREFIX + "token_embedding.weight"].shape[1])
        stub = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
        text = convert_open_clip_checkpoint(stub, text_in, prefix=TEXT_PREFIX)
        if not text_keys_prefixed:  # transformers >= 5 dropped CLIPTextModel's "text_model." level
            text = {k.removeprefix("text_model."): v for k, v in text.items()}
    return unet, vae, text


def _origins(
    state_dict: Mapping[str, Tensor], convert: Callable[[Mapping[str, Tensor]], tuple[dict | None, ...]]
) -> list[dict[str, str] | None]:
    """Run ``convert`` on tracer tensors: for each output dict, target key → source key."""
    keys = list(state_dict)
    if len(keys) >= 2**24:
        raise ValueError("too many tensors to trace")
    tracers = {k: torch.tensor(float(i)).expand(state_dict[k].shape) for i, k in enumerate(keys)}
    result = []
    for part in convert(tracers):
        if part is None:
            result.append(None)
            continue
        origin = {}
        for target, tensor in part.items():
            if tensor is None:
                raise CheckpointKeyError(f"converter produced no tensor for {target!r}")
            origin[target] = keys[int(tensor.reshape(-1)[0])] if tensor.numel() else ""
        result.append(origin)
    return result


def _model_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _listing(keys: Sequence[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(
    state_dict: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], what: str
) -> None:
    """Raise :class:`CheckpointKeyError` listing missing/unexpected keys and shape mismatches."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} != {expected[k]}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {len(mismatched)}: {_listing(mismatched)}")
    if problems:
        raise CheckpointKeyError(f"{what}: " + "; ".join(problems))


def convert_mvdream_checkpoint(
    state_dict: Mapping[str, Tensor],
    num_head_channels: int = 64,
    text_num_heads: int = 16,
    norm_num_groups: int = 32,
) -> ConvertedMVDream:
    """Original MVDream state dict (ldm layout) → diffusers-layout state dicts + configs.

    The text encoder is converted when ``cond_stage_model.model.*`` is present (else ``None``).
    Raises :class:`CheckpointKeyError` when a key is unknown, lands nowhere, or a model key
    stays unfilled (each listed).
    """
    unknown = [
        k for k in state_dict
        if not k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)) and k not in SCHEDULE_KEYS
    ]
    if unknown:
        raise CheckpointKeyError(f"MVDream checkpoint: unexpected {len(unknown)} keys: {_listing(unknown)}")
    unet_config = unet_config_from_ldm(_subdict(state_dict, UNET_PREFIX), num_head_channels, norm_num_groups)
    vae_config = vae_config_from_ldm(_subdict(state_dict, VAE_PREFIX), norm_num_groups)
    text_sd = _subdict(state_dict, TEXT_PREFIX)
    text_config = text_config_from_ldm(text_sd, text_num_heads) if text_sd else None
    text_blocks = text_config.num_hidden_layers + 1 if text_config is not None else None
    text_shapes = _model_shapes(lambda: CLIPTextModel(text_config)) if text_config is not None else {}
    prefixed = any(k.startswith("text_model.") for k in text_shapes)

    def convert(sd: Mapping[str, Tensor]) -> tuple[dict | None, ...]:
        return _convert_parts(sd, unet_config, vae_config, text_blocks, prefixed)

    origins = _origins(state_dict, convert)
    used = {source for origin in origins if origin for source in origin.values()}
    ignored = {TEXT_PREFIX + name for name in TEXT_UNUSED}
    if text_blocks is not None:
        last = f"{TEXT_PREFIX}transformer.resblocks.{text_blocks - 1}."
        ignored |= {k for k in state_dict if k.startswith(last)}
    stray = [k for k in state_dict if k not in used and k not in ignored and k not in SCHEDULE_KEYS]
    if stray:
        raise CheckpointKeyError(f"MVDream checkpoint: {len(stray)} keys land nowhere: {_listing(stray)}")

    unet, vae, text = (None if p is None else {k: v.contiguous() for k, v in p.items()} for p in convert(state_dict))
    check_state_dict(unet, _model_shapes(lambda: UNet2DConditionModel(**unet_config)), "unet")
    check_state_dict(vae, _model_shapes(lambda: AutoencoderKL(**vae_config)), "vae")
    if text is not None:
        check_state_dict(text, text_shapes, "text encoder")
    alphas = state_dict.get("alphas_cumprod")
    alphas = alphas.float().clone() if alphas is not None else mvdream_alphas_cumprod()
    return ConvertedMVDream(unet, vae, text, unet_config, vae_config, text_config, alphas)


# ---------------------------------------------------------------------- building/saving


def components_from_converted(converted: ConvertedMVDream, tokenizer: CLIPTokenizer) -> MVDreamComponents:
    """Build the models (fp32, CPU) and load the converted weights (strict)."""
    if converted.text_encoder is None or converted.text_config is None:
        raise CheckpointKeyError(
            "MVDream checkpoint has no cond_stage_model.model.* (text encoder); convert a full checkpoint"
        )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**converted.unet_config)
    unet.load_state_dict(converted.unet, strict=True, assign=True)
    unet = unet.float()
    vae = AutoencoderKL(**converted.vae_config)
    vae.load_state_dict(converted.vae, strict=True)
    text_encoder = CLIPTextModel(converted.text_config)
    text_encoder.load_state_dict(converted.text_encoder, strict=True)
    return MVDreamComponents(
        unet=set_multiview_attention(unet).eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        alphas_cumprod=converted.alphas_cumprod,
    )


def components_from_checkpoint(path: str | Path, tokenizer: CLIPTokenizer, **convert_kwargs: Any) -> MVDreamComponents:
    """Read, convert and build an original MVDream checkpoint file."""
    converted = convert_mvdream_checkpoint(read_checkpoint(path), **convert_kwargs)
    return components_from_converted(converted, tokenizer)


def save_components(components: MVDreamComponents, out_dir: str | Path, source: str = "") -> Path:
    """Write a directory :func:`stages.models.mvdream_load.load_mvdream` reads (safetensors)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    components.unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    components.vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    components.text_encoder.save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    if components.tokenizer is not None:
        components.tokenizer.save_pretrained(str(out / "tokenizer"))
    save_file({"alphas_cumprod": components.alphas_cumprod.float().contiguous()}, str(out / SCHEDULE_FILE))
    meta = {"format": "modedreamer-ray/mvdream", "version": 1, "num_frames": components.num_frames, "source": source}
    (out / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stages.models.mvdream_convert",
        description="Convert an original MVDream checkpoint into a diffusers-style directory.",
        epilog="examples:\n"
        "  python -m stages.models.mvdream_convert sd-v2.1-base-4view.pt models/mvdream --tokenizer stabilityai/stable-diffusion-2-1-base\n"
        "  # then: python -m pipeline.run configs/dataset.yaml models.mvdream=models/mvdream\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="sd-v2.1-base-4view.pt / .ckpt / .safetensors")
    parser.add_argument("out_dir", help="output directory (unet/, vae/, text_encoder/, tokenizer/, ...)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer source saved alongside: 'tiny', a hub id or a dir with tokenizer/ "
        "(e.g. stabilityai/stable-diffusion-2-1-base); omitted: load_mvdream needs models.mvdream_text",
    )
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--num-head-channels", type=int, default=64)
    parser.add_argument("--text-heads", type=int, default=16)
    parser.add_argument("--norm-groups", type=int, default=32)
    args = parser.parse_args(argv)

    from stages.models.mvdream import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer, Path(args.checkpoint), key="--tokenizer") if args.tokenizer else None
        converted = convert_mvdream_checkpoint(
            read_checkpoint(args.checkpoint),
            num_head_channels=args.num_head_channels,
            text_num_heads=args.text_heads,
            norm_num_groups=args.norm_groups,
        )
    except (OSError, ValueError, KeyError) as exc:
        parser.exit(2, f"error: {exc}\n")
    components = components_from_converted(converted, tokenizer)  # type: ignore[arg-type]
    dtype = getattr(torch, args.dtype)
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(dtype)
    out = save_components(components, args.out_dir, source=Path(args.checkpoint).name)
    print(f"wrote {out} (unet {sum(p.numel() for p in components.unet.parameters()):,} parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
