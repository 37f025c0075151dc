"""The guidance benchmark: its quick mode writes the JSON, and its two ISD forms do the same work."""

from __future__ import annotations

import json

import torch

from benchmarks.common import format_table
from benchmarks.guidance import main


def test_quick_benchmark_writes_json(tmp_path, capsys):
    out = tmp_path / "guidance.json"
    returned = main(["--quick", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(returned))
    assert data["model"] == "tiny" and data["environment"]["device"] == "cpu"
    assert [row["batch"] for row in data["unet_throughput"]] == [1, 4]
    assert all(row["seconds"] > 0 for row in data["unet_throughput"])
    (isd,) = data["isd_one_vs_four"]
    assert isd["views"] == 1 and isd["one_forward_s"] > 0 and isd["four_forwards_s"] > 0
    printed = capsys.readouterr().out
    assert "predictions_per_s" in printed and str(out) in printed


def test_one_forward_and_four_forwards_do_the_same_work():
    """The speedup compares like with like: the batched ISD forward (per-row IP scales) predicts
    what the four unbatched forwards predict, with the same FLOPs, counted independently."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.guidance import build_unet, isd_chunks, isd_rows
    from stages.models.ip_adapter import per_sample_ip_scale

    cpu = torch.device("cpu")
    unet, embed_dim = build_unet(False, cpu, torch.float32)
    inputs, scales = isd_rows(unet, 2, 8, embed_dim, cpu, torch.float32)
    assert scales.tolist() == [0.5] * 4 + [0.0] * 4

    def predict(rows, row_scales):
        with torch.no_grad(), per_sample_ip_scale(unet, row_scales):
            return unet(**rows).sample

    def flops(run) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            run()
        return counter.get_total_flops()

    chunks = isd_chunks(inputs, scales, 2)
    batched = predict(inputs, scales)
    separate = torch.cat([predict(rows, row_scales) for rows, row_scales in chunks])
    assert len(chunks) == 4 and torch.allclose(batched, separate, atol=1e-5)
    # Same FLOPs except one thing: an unbatched chunk whose scales are all 0 (SD rows) skips the
    # IP attention, the batched forward runs it on every row. Counted on one SD chunk with it on.
    sd_rows, sd_scales = chunks[2]
    ip_attention = flops(lambda: predict(sd_rows, sd_scales + 0.1)) - flops(lambda: predict(sd_rows, sd_scales))
    one = flops(lambda: predict(inputs, scales))
    four = flops(lambda: [predict(rows, row_scales) for rows, row_scales in chunks])
    assert ip_attention > 0 and one == four + 2 * ip_attention


def test_format_table_aligns_columns():
    table = format_table([{"a": 1, "b": 0.123456}, {"a": 100, "b": 2.0}], ["a", "b"])
    lines = table.splitlines()
    assert lines[0].split() == ["a", "b"] and lines[2].split() == ["1", "0.1235"]
    assert len({len(line) for line in lines}) == 1
