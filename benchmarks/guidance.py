"""UNet throughput of the ISD guidance: noise predictions/s by batch, one-forward ISD vs four forwards.

    python -m benchmarks.guidance [--out benchmarks/out/guidance.json] [--quick] [--device auto]

CPU: the tiny UNet (``stages.models.tiny``) with a tiny IP-Adapter. CUDA: an SD1.5-size UNet
built from its config (``SD15_UNET_CONFIG``) with random fp16 weights and a random IP-Adapter of
the real ``ip-adapter_sd15`` shapes, 64×64 latents (512 px renders). No weights are downloaded.
Every forward goes through the per-sample IP-scale processors, as ``IPGuidance`` runs them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPVisionConfig

from benchmarks.common import environment, format_table, time_call, write_json
from stages.models.device import resolve_device
from stages.models.ip_adapter import install_ip_adapter_state, per_sample_ip_scale, tiny_ip_adapter_state_dict
from stages.models.sd import SD15_UNET_CONFIG, place, seeded
from stages.models.tiny import tiny_clip_vision_config, tiny_unet_config

DEFAULT_OUT = Path("benchmarks/out/guidance.json")


def build_unet(full_size: bool, device: torch.device, dtype: torch.dtype) -> tuple[UNet2DConditionModel, int]:
    """A random UNet with a random IP-Adapter installed; returns it and the image-embed width."""
    config = SD15_UNET_CONFIG if full_size else tiny_unet_config()
    vision = CLIPVisionConfig(projection_dim=1024) if full_size else tiny_clip_vision_config()
    with torch.device(device):
        unet = seeded(0, lambda: UNet2DConditionModel.from_config(config))
    unet = place(unet, device, dtype)
    state = tiny_ip_adapter_state_dict(unet, vision, "base", seed=1)
    install_ip_adapter_state(unet, {g: {k: v.to(device, dtype) for k, v in s.items()} for g, s in state.items()})
    return place(unet, device, dtype), int(vision.projection_dim)


def _inputs(unet, batch: int, latent: int, embed_dim: int, device, dtype, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype),
        "timestep": torch.randint(20, 980, (batch,), generator=g).to(device),
        "encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype),
        "added_cond_kwargs": {"image_embeds": [torch.randn(batch, 1, embed_dim, generator=g).to(device, dtype)]},
    }


def isd_rows(unet, views: int, latent: int, embed_dim: int, device, dtype) -> tuple[dict[str, Any], torch.Tensor]:
    """The 4·views rows of one ISD call and their IP scales: IP-cond, IP-uncond at 0.5, SD-cond,
    SD-uncond at 0."""
    inputs = _inputs(unet, 4 * views, latent, embed_dim, device, dtype, seed=1)
    return inputs, torch.tensor([0.5] * (2 * views) + [0.0] * (2 * views))


def isd_chunks(inputs: dict[str, Any], scales: torch.Tensor, views: int) -> list[tuple[dict[str, Any], torch.Tensor]]:
    """The same rows as four forwards of ``views`` rows each (the unbatched ISD)."""
    embeds = inputs["added_cond_kwargs"]["image_embeds"][0]
    rows = lambda k: slice(k * views, (k + 1) * views)  # noqa: E731
    return [
        (
            {
                "sample": inputs["sample"][rows(k)],
                "timestep": inputs["timestep"][rows(k)],
                "encoder_hidden_states": inputs["encoder_hidden_states"][rows(k)],
                "added_cond_kwargs": {"image_embeds": [embeds[rows(k)]]},
            },
            scales[rows(k)],
        )
        for k in range(4)
    ]


def _forward(unet, inputs: dict[str, Any], scales: torch.Tensor) -> None:
    with torch.no_grad(), per_sample_ip_scale(unet, scales):
        unet(**inputs)


def run(
    device: torch.device,
    batches: Sequence[int],
    isd_views: Sequence[int],
    latent: int,
    repeats: int,
    full_size: bool,
) -> dict[str, Any]:
    """Measure and return the results dict (see module doc)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet, embed_dim = build_unet(full_size, device, dtype)
    throughput = []
    for batch in batches:
        inputs = _inputs(unet, batch, latent, embed_dim, device, dtype)
        scales = torch.full((batch,), 0.5)
        seconds = time_call(lambda: _forward(unet, inputs, scales), repeats=repeats, warmup=1, device=device)
        throughput.append({"batch": batch, "seconds": seconds, "predictions_per_s": batch / seconds})

    isd = []
    for views in isd_views:
        inputs, scales = isd_rows(unet, views, latent, embed_dim, device, dtype)
        chunks = isd_chunks(inputs, scales, views)

        def four() -> None:
            for chunk, chunk_scales in chunks:
                _forward(unet, chunk, chunk_scales)

        one_s = time_call(lambda: _forward(unet, inputs, scales), repeats=repeats, warmup=1, device=device)
        four_s = time_call(four, repeats=repeats, warmup=1, device=device)
        isd.append({"views": views, "one_forward_s": one_s, "four_forwards_s": four_s, "speedup": four_s / one_s})

    return {
        "benchmark": "guidance",
        "model": "sd15-size-random" if full_size else "tiny",
        "dtype": str(dtype).replace("torch.", ""),
        "latent_size": latent,
        "repeats": repeats,
        "environment": environment(device),
        "unet_throughput": throughput,
        "isd_one_vs_four": isd,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.guidance", description=__doc__.splitlines()[0],
        epilog="examples:\n  python -m benchmarks.guidance\n  python -m benchmarks.guidance --quick --device cpu --out /tmp/guidance.json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, batches 1 and 4, one repeat (for tests)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per point (median reported)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    full_size = device.type == "cuda" and not args.quick
    if args.quick:
        batches, views, latent, repeats = (1, 4), (1,), 8, 1
    elif full_size:
        batches, views, latent, repeats = (1, 4, 16, 64), (1, 4), 64, 5
    else:
        batches, views, latent, repeats = (1, 4, 16, 64), (1, 4), 16, 3
    results = run(device, batches, views, latent, args.repeats or repeats, full_size)

    print(f"UNet noise predictions ({results['model']}, {results['dtype']}, {latent}x{latent} latents, {device})")
    print(format_table(results["unet_throughput"], ["batch", "seconds", "predictions_per_s"]))
    print("\nISD: one forward of 4·B rows vs four forwards of B rows")
    print(format_table(results["isd_one_vs_four"], ["views", "one_forward_s", "four_forwards_s", "speedup"]))
    path = write_json(results, args.out)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
