"""CLIP features for evaluation: load from the hub / a directory, or build a tiny random one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from stages.models.sources import ModelSourceError, hub_errors, hub_kwargs, resolve_source
from stages.models.tiny import tiny_clip_text_config, tiny_clip_vision_config, tiny_tokenizer


@dataclass
class ClipFeatures:
    """A CLIP model with its tokenizer and image processor; features are L2-normalised."""

    model: CLIPModel
    tokenizer: CLIPTokenizer
    processor: CLIPImageProcessor
    device: torch.device

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> Tensor:
        """(N, D) unit-norm image features of RGB images."""
        if not images:
            raise ValueError("no images to embed")
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        features = self.model.get_image_features(pixel_values=pixels.to(self.device))
        return _unit(_as_tensor(features)).float().cpu()

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> Tensor:
        """(N, D) unit-norm text features."""
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt")
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return _unit(_as_tensor(features)).float().cpu()


def _as_tensor(features) -> Tensor:
    # transformers 5 may return a model output instead of a bare tensor.
    if isinstance(features, Tensor):
        return features
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(features, name, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"unexpected CLIP feature output {type(features).__name__}")


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def load_clip(source: str, device: torch.device, seed: int = 0, key: str = "evaluate.clip") -> ClipFeatures:
    """CLIP from ``tiny`` (random, seeded), a hub id, or a local ``CLIPModel`` directory."""
    resolved = resolve_source(source, key)
    if resolved.kind == "tiny":
        torch.manual_seed(seed)
        config = CLIPConfig(
            text_config=tiny_clip_text_config(32).to_dict(),
            vision_config=tiny_clip_vision_config().to_dict(),
            projection_dim=16,
        )
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = CLIPModel(config)
        torch.random.set_rng_state(generator_state)
        size = config.vision_config.image_size
        processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        return ClipFeatures(model.eval().to(device), tiny_tokenizer(), processor, device)
    if resolved.kind == "file":
        raise ModelSourceError(f"{key}: expects a CLIPModel directory or hub id, not a single file {source!r}")
    kwargs = dict(hub_kwargs())
    if resolved.subfolder:
        kwargs["subfolder"] = resolved.subfolder
    with hub_errors(resolved, "CLIP model"):
        model = CLIPModel.from_pretrained(resolved.location, **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(resolved.location, **kwargs)
        processor = CLIPImageProcessor.from_pretrained(resolved.location, **kwargs)
    return ClipFeatures(model.eval().to(device), tokenizer, processor, device)


def to_pil(image: np.ndarray | Tensor | Image.Image) -> Image.Image:
    """A render ((3,H,W) / (H,W,3) in [0,1], or uint8) as a PIL RGB image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(array, mode="RGB")
