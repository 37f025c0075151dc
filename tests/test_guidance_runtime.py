"""The bounds a guidance runs its models with: slices, passes, row chunks and compile buckets."""

from __future__ import annotations

import pytest
import torch

from stages.guidance.protocol import GuidanceRequest, request_noise
from stages.guidance.runtime import (
    GuidanceRuntime,
    RowBounded,
    ViewSlice,
    bucket_of,
    buckets,
    passes,
    row_chunks,
    slice_noise,
    slice_request,
    view_slices,
)


def test_view_slices_cut_requests_into_whole_groups_of_at_most_the_bound():
    assert view_slices([8, 4, 3], 4) == [ViewSlice(0, 0, 4), ViewSlice(0, 4, 8), ViewSlice(1, 0, 4), ViewSlice(2, 0, 3)]
    assert view_slices([8], 3) == [ViewSlice(0, 0, 3), ViewSlice(0, 3, 6), ViewSlice(0, 6, 8)]
    # MVDream: 4-view groups stay whole; a bound below one group still gives one group per slice
    assert view_slices([8], 6, group=4) == [ViewSlice(0, 0, 4), ViewSlice(0, 4, 8)]
    assert view_slices([8], 2, group=4) == [ViewSlice(0, 0, 4), ViewSlice(0, 4, 8)]


def test_passes_fill_up_to_the_bound_in_order_and_an_oversize_item_runs_alone():
    assert passes([4, 4, 4, 2, 2], 8) == [range(0, 2), range(2, 5)]
    assert passes([3, 9, 1], 4) == [range(0, 1), range(1, 2), range(2, 3)]
    assert passes([], 4) == []


def test_row_chunks_and_buckets():
    assert row_chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert row_chunks(16, 10, multiple=4) == [slice(0, 8), slice(8, 16)]
    assert buckets(16) == [1, 2, 4, 8, 16] and buckets(24, 4) == [4, 8, 16, 24] and buckets(3, 4) == [4]
    assert [bucket_of(n, 24, 4) for n in (4, 8, 12, 20, 24)] == [4, 8, 16, 24, 24]
    with pytest.raises(ValueError, match="exceed"):
        bucket_of(25, 24, 4)
    with pytest.raises(ValueError, match="vae_chunk"):
        GuidanceRuntime(vae_chunk=0)


def test_a_slice_is_the_request_restricted_to_its_views_with_its_part_of_the_noise():
    rgb = torch.rand(6, 3, 8, 8)
    request = GuidanceRequest("a", rgb, torch.arange(6) * 100, seed=7, c2w=torch.eye(4).repeat(6, 1, 1),
                              elevation=torch.arange(6.0), azimuth=-torch.arange(6.0), fovy=torch.arange(6.0) / 10,
                              family="mvd")
    part = slice_request(request, 2, 5)
    assert torch.equal(part.rgb, rgb[2:5]) and part.timesteps.tolist() == [200, 300, 400]
    assert part.elevation.tolist() == [2.0, 3.0, 4.0] and part.c2w.shape == (3, 4, 4)
    assert torch.equal(part.fovy, torch.arange(2.0, 5.0) / 10)
    assert (part.seed, part.family, part.asset_id) == (7, "mvd", "a")
    assert slice_request(request, 0, 6) is request
    noise = slice_noise(7, 6, (4, 2, 2), ViewSlice(0, 2, 5))
    assert torch.equal(noise, request_noise(7, (6, 4, 2, 2))[2:5])


def test_row_bounded_splits_calls_and_pads_to_buckets_only_when_compiled():
    seen = []

    def double(module, x, y):
        seen.append(x.shape[0])
        return module(x) + y

    eager = RowBounded(double, torch.nn.Identity(), limit=4)
    x = torch.arange(10.0).view(10, 1)
    assert torch.equal(eager(x, x), 2 * x) and seen == [4, 4, 2] and dict(eager.calls) == {4: 2, 2: 1}
    padded = RowBounded(double, torch.nn.Identity(), limit=4)
    padded.compiled = True  # the padding path alone, without torch.compile
    seen.clear()
    assert torch.equal(padded(x[:7], x[:7]), 2 * x[:7]) and seen == [4, 4]  # 4 + 3 rows, the 3 padded to 4
