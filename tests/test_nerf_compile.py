"""``nerf.compile``: the hash grid + MLPs under ``torch.compile``, same values as eager, and a
bounded number of compiled graphs (queries are padded to power-of-two buckets)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from stages.scene.nerf import NeRFConfig, NeRFScene
from stages.scene.nerf.field import compile_bucket


def _scenes(backend: str) -> tuple[NeRFScene, NeRFScene]:
    compiled = NeRFConfig.tiny()
    compiled.compile = backend
    return NeRFScene(NeRFConfig.tiny(), seed=0), NeRFScene(compiled, seed=0)


def _points(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(seed)) * 1.2 - 0.6


def _assert_parity(eager: NeRFScene, compiled: NeRFScene, n: int, rtol: float) -> None:
    points = _points(n)
    want, got = eager.field(points), compiled.field(points)
    for key in want:
        assert got[key].shape == want[key].shape
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=1e-6)
    for scene, out in ((eager, want), (compiled, got)):
        (out["density"].square().mean() + out["albedo"].mean()).backward()
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        if p.grad is not None:
            scale = float(p.grad.abs().max()) or 1.0
            assert float((q.grad - p.grad).abs().max()) <= rtol * scale, name


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def test_buckets_are_powers_of_two_from_1024():
    assert [compile_bucket(n) for n in (1, 1024, 1025, 3000, 4096, 4097)] == [1024, 1024, 2048, 4096, 4096, 8192]


def test_compiled_graph_matches_eager_and_recompiles_once_per_bucket():
    """aot_eager traces the same aten graph (forward and the hash grid's backward): values and
    gradients of padded queries equal eager ones, and sizes sharing a bucket share a graph."""
    eager, compiled = _scenes("aot_eager")
    _assert_parity(eager, compiled, 1500, rtol=1e-6)  # padded to 2048
    sizes = [900, 1000, 1500, 2000, 3000, 4000]
    with torch.no_grad():
        for n in sizes:
            compiled.field(_points(n))
    buckets = {compile_bucket(n) for n in sizes}
    assert buckets == {1024, 2048, 4096}
    # the 2048 bucket was compiled with autograd above, so it is traced again without it
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(buckets) + 1


def test_a_render_compiles_one_graph_per_chunk_bucket():
    _, compiled = _scenes("aot_eager")
    compiled.config.renderer.chunk_samples = 700
    from test_splats_helpers import orbit_cameras

    plan = compiled.plan_render(orbit_cameras(2), 12, 12)
    sizes = {compile_bucket(s1 - s0) for _, _, s0, s1 in plan.samples.chunks}
    out = compiled.render_planned(plan)
    (out["rgb"].mean()).backward()
    assert len(plan.samples.chunks) > len(sizes) >= 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(sizes)


def test_bad_backend_names_the_key():
    cfg = NeRFConfig.tiny()
    cfg.compile = "turbo"
    with pytest.raises(ValueError, match="nerf.compile"):
        cfg.validate()


@pytest.mark.slow
def test_inductor_matches_eager_within_1e_4():
    """The real compiler (C++ kernels on the CPU): values and table gradients ≤ 1e-4 relative."""
    eager, compiled = _scenes("inductor")
    _assert_parity(eager, compiled, 3000, rtol=1e-4)
