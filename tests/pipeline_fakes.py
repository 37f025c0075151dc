"""Small stand-ins for the models and the optimiser, with the real signatures.

Used by tests/test_pipeline*.py to exercise the orchestration (batching, retries, resume,
manifest) in seconds. Ray workers get these by value (``register_pickle_by_value``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from stages.guidance.protocol import SETTINGS, GuidanceRequest, GuidanceResponse, UnknownAssetError, request_noise
from stages.guidance.set import GuidanceSet
from stages.optimize.loop import check_finite_loss


class FakeGuidance:
    """grad_rgb = (rgb − target(prompt)) + 0.01·noise(seed): depends on the request alone.

    The target colour is a hash of the prompt; a prompt containing ``"NaN"`` yields NaN grads.
    ``batch_sizes`` records how many requests each ``grad`` call got.
    """

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.prompts: dict[str, str] = {}
        self.batch_sizes: list[int] = []

    def register(self, asset_id: str, prompt: str, reference: Any | None = None, settings: Any | None = None) -> None:
        self.prompts[asset_id] = prompt

    def release(self, asset_id: str) -> None:
        self.prompts.pop(asset_id, None)

    def target(self, prompt: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(sum(map(ord, prompt)))
        return torch.rand(3, generator=g).view(1, 3, 1, 1)

    def grad(self, requests: Sequence[GuidanceRequest]) -> list[GuidanceResponse]:
        self.batch_sizes.append(len(requests))
        if self.delay_s:
            time.sleep(self.delay_s)
        out = []
        for request in requests:
            if request.asset_id not in self.prompts:
                raise UnknownAssetError(request.asset_id)
            prompt = self.prompts[request.asset_id]
            noise = request_noise(request.seed, request.rgb.shape)
            grad = request.rgb - self.target(prompt) + 0.01 * noise
            if "NaN" in prompt:
                grad = grad * float("nan")
            out.append(
                GuidanceResponse(request.asset_id, grad, float((grad**2).mean()), float(grad.norm()), request.timesteps)
            )
        return out


class FakeSampler:
    """Reference images: a flat colour from (prompt, seed); ``sample_many`` batches."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def sample_many(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        self.batch_sizes.append(len(prompts))
        return [Image.new("RGB", (16, 16), (seed % 256, len(p) % 256, 7)) for p, seed in zip(prompts, seeds)]


@dataclass
class FakeResult:
    scene: torch.nn.Module
    iterations: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def fake_optimize(config, guidance: GuidanceSet, reference, seed, checkpoint_dir, prompt, asset_id, callback=None, *, step_s=0.0):
    """Gradient descent on a (1, 3, 8, 8) image against the guidance; checkpoints every
    ``config.checkpoint_every`` steps and resumes from them; ``step_s`` slows each step."""
    delay = step_s
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint = checkpoint_dir / "fake.pt"
    scene = torch.nn.Module()
    scene.rgb = torch.nn.Parameter(torch.full((1, 3, 8, 8), 0.5))
    start, history = 0, []
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        scene.rgb.data.copy_(state["rgb"])
        start, history = int(state["step"]), json.loads(state["history"])
    resumed_from = start
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (checkpoint_dir / "pid").write_text(str(os.getpid()))
    models = [(family, g) for family, g in (("ip", guidance.ip), ("mvd", guidance.mvd)) if g is not None]
    for family, model in models:
        model.register(asset_id, prompt, reference, SETTINGS[family]())
    began = time.perf_counter()
    for step in range(start, config.iterations):
        grads = []
        for index, (family, model) in enumerate(models):
            request = GuidanceRequest(
                asset_id, scene.rgb.detach().clone(), torch.tensor([500]), seed=seed * 1000 + step * 2 + index, family=family
            )
            grads.append(model.grad([request])[0].grad_rgb)
        grad = sum(grads)
        scene.rgb.data -= 0.1 * grad
        loss = float((grad**2).mean())
        check_finite_loss({"loss": loss}, step, asset_id)  # the optimiser's guard, as in optimize_asset
        history.append({"loss": loss, "step": float(step)})
        if delay:
            time.sleep(delay)
        done = step + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"rgb": scene.rgb.detach(), "step": done, "history": json.dumps(history)}, tmp)
            os.replace(tmp, checkpoint)
        if callback is not None:
            callback(step, {"loss": loss}, None)
    metrics = {"loss": history[-1]["loss"], "resumed_from": float(resumed_from)}
    return FakeResult(scene, config.iterations, metrics, history, time.perf_counter() - began)


def fake_export(scene, out_dir: Path, config, reference=None) -> dict[str, str]:
    out_dir = Path(out_dir)
    torch.save({"rgb": scene.rgb.detach()}, out_dir / "checkpoint.pt")
    image = (scene.rgb.detach().clamp(0, 1)[0].permute(1, 2, 0) * 255).byte().numpy()
    Image.fromarray(image).save(out_dir / "preview.png")
    return {"checkpoint": "checkpoint.pt", "preview": "preview.png"}


def fake_components(delay_s: float = 0.0, step_s: float = 0.0, mvd: bool = False, reference: bool = True):
    """Fake optimiser/export with a fake IP guidance (and optionally MVDream / reference) actor."""
    import functools

    from pipeline.components import Components

    return Components(
        optimize=functools.partial(fake_optimize, step_s=step_s),
        export=fake_export,
        ip_guidance=functools.partial(FakeGuidance, delay_s),
        mvd_guidance=functools.partial(FakeGuidance, delay_s) if mvd else None,
        reference_sampler=FakeSampler if reference else None,
    )
