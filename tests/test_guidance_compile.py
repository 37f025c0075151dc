"""``resources.<ip|mvd>.compile``: compiled guidance equals eager, and shape buckets bound recompiles.

The compile backend here is ``aot_eager`` (AOTAutograd traces forward and backward graphs, no
code generation) wrapped in dynamo's compile counter: it exercises what a real compile
exercises (graph capture, guards, the padded buckets, the backward through the compiled VAE)
at a fraction of inductor's compile time on this CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from stages.guidance.ip_guidance import IPComponents, IPGuidance
from stages.guidance.mvdream_guidance import MVDreamGuidance
from stages.guidance.protocol import GuidanceRequest, IPSettings, MVDreamSettings
from stages.guidance.runtime import GuidanceRuntime, bucket_of, buckets
from stages.models.ip_adapter import load_ip_adapter
from stages.models.mvdream_load import load_mvdream
from stages.models.sd import build_tiny_sd
from test_mvdream_guidance import request as mvd_request

RES = 32
pytestmark = pytest.mark.slow  # graph capture of two tiny UNets + VAEs: ~30 s on 2 cores


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_ip_guidance_equals_eager_and_shares_one_graph_per_bucket():
    sd = build_tiny_sd(0)
    components = IPComponents(sd, load_ip_adapter(sd.unet, "tiny", "tiny", seed=0))
    counter = CompileCounterWithBackend("aot_eager")
    runtime = GuidanceRuntime(vae_chunk=4, unet_rows=16, compile=True, compile_backend=counter)
    compiled, eager = IPGuidance(components, RES, runtime=runtime), IPGuidance(components, RES)
    reference = np.random.RandomState(0).rand(32, 32, 3)
    for g in (compiled, eager):
        g.register("car", "a red car", reference, IPSettings(view_prompts=False))

    def ask(views: int, seed: int) -> GuidanceRequest:
        g = torch.Generator().manual_seed(seed)
        return GuidanceRequest("car", torch.rand(views, 3, RES, RES, generator=g), torch.randint(20, 980, (views,), generator=g), seed=seed)

    # ISD: 4 UNet rows per view. 3 views: 12 rows padded to the bucket 16, 3 images to 4; 4 views: 16 and 4.
    for views, seed in ((3, 1), (4, 2)):
        (got,), (want,) = compiled.grad([ask(views, seed)]), eager.grad([ask(views, seed)])
        assert _relative_error(got.grad_rgb, want.grad_rgb) <= 1e-4
    assert dict(compiled.denoiser.calls) == {16: 2} and dict(compiled.latent_encoder.calls) == {4: 2}
    assert counter.frame_count == 2  # one graph per model: the second shape reused the padded bucket
    assert [bucket_of(rows, 16) for rows in (1, 3, 5, 12, 16)] == [1, 4, 8, 16, 16] and buckets(16) == [1, 2, 4, 8, 16]


def test_compiled_mvdream_guidance_equals_eager_with_whole_view_groups():
    models = load_mvdream("tiny", seed=0)
    counter = CompileCounterWithBackend("aot_eager")
    runtime = GuidanceRuntime(vae_chunk=4, unet_rows=10, compile=True, compile_backend=counter)
    compiled = MVDreamGuidance(models, RES, runtime=runtime)
    eager = MVDreamGuidance(models, RES)
    for g in (compiled, eager):
        g.register("chair", "a wooden chair", None, MVDreamSettings(recon_loss=False))
    # The bound 10 rounds down to whole 4-view groups: forwards of 8 rows (buckets 4·2^k: 4, 8).
    # [4 views]: one pass (VAE 4, UNet 8); [4, 4]: two such passes; [8 views]: sliced into two
    # 4-view passes, the same shapes again: no recompile after the first call.
    batches = [[(4, [700])], [(4, [300]), (4, [500])], [(8, [700, 200])]]
    for batch in batches:
        requests = [mvd_request("chair", views, groups, seed=views + groups[0], size=RES) for views, groups in batch]
        for got, want in zip(compiled.grad(requests), eager.grad(requests)):
            assert _relative_error(got.grad_rgb, want.grad_rgb) <= 1e-4
    assert dict(compiled.denoiser.calls) == {8: 5} and dict(compiled.latent_encoder.calls) == {4: 5}
    assert counter.frame_count == 2 and buckets(10, 4) == [4, 8]
