"""``python -m stages.optimize``: a tiny end-to-end run on CPU and clear errors for bad input."""

import json

import pytest
from PIL import Image

from stages.optimize.__main__ import main, split_overrides
from stages.optimize.config import load_optimize_config

SMALL = [
    "iterations=2", "nerf.renderer.num_samples_per_ray=8", "schedule.resolutions=[16,16]",
    "export.preview_resolution=16", "export.turntable_frames=3", "export.turntable_resolution=16",
    "export.mesh_resolution=16",
]


def test_split_overrides():
    method, models, shortcut = split_overrides(["models=tiny", "models.device=cpu", "method.iterations=3", "loss=sds"])
    assert (method, models, shortcut) == (["iterations=3", "loss=sds"], ["device=cpu"], "tiny")
    assert split_overrides(["models=toyworld"])[2] == "toyworld"
    with pytest.raises(ValueError, match="models=toyworld"):
        split_overrides(["models=huge"])
    with pytest.raises(ValueError, match="key=value"):
        split_overrides(["iterations"])


@pytest.mark.slow
def test_tiny_run_writes_an_asset(tmp_path, capsys):
    out = tmp_path / "apple"
    args = ["--prompt", "a red apple", "--out", str(out), "--no-progress", "--seed", "1", "--reference-steps", "2",
            "models=tiny", *SMALL]
    assert main(args) == 0
    asset = json.loads((out / "asset.json").read_text())
    assert asset["prompt"] == "a red apple" and asset["representation"] == "nerf" and asset["method"] == "isd"
    for name in asset["files"].values():
        assert (out / name).is_file(), name
    with Image.open(out / "reference.png") as ref:
        assert ref.mode == "RGB"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 2 and metrics["loss_ip"] > 0 and metrics["loss_mvd"] > 0
    method = load_optimize_config(out / "method.yaml")
    assert method.iterations == 2 and method.nerf.renderer.num_samples_per_ray == 8


def test_toy_world_run_uses_the_toy_models_and_its_reference(tmp_path):
    out = tmp_path / "ring"
    args = ["--prompt", "a ring", "--out", str(out), "--no-progress", "--seed", "3", "models=toyworld", *SMALL]
    assert main(args) == 0
    asset = json.loads((out / "asset.json").read_text())
    assert asset["models"]["sd"] == "toyworld" and asset["models"]["toyworld"] == "default"
    from stages.toyworld import ToyWorldReferenceSampler, load_world, nearest_object

    sampler = ToyWorldReferenceSampler()
    with Image.open(out / "reference.png") as ref:  # the seed's draw from the prompt's prior
        assert nearest_object(load_world(), "a ring", ref)[0] == sampler.object_index("a ring", 3)
    assert main(["--prompt", "a chair", "--out", str(tmp_path / "x"), "models=toyworld", *SMALL]) != 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reference", "nowhere.png"], "nowhere.png"),
        (["iterations=0"], "method.iterations"),
        (["nosuch.key=1"], "nosuch"),
        (["--config", "missing.yaml"], "missing.yaml"),
    ],
)
def test_bad_input_exits_with_a_clear_message(tmp_path, capsys, extra, message):
    code = main(["--prompt", "x", "--out", str(tmp_path / "o"), "models=tiny", *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_non_finite_loss_stops_the_run_naming_the_iteration(tmp_path, capsys, monkeypatch):
    """The optimiser's guard stops the one-asset CLI too (it was only the pipeline's callback)."""
    import torch

    import stages.optimize.__main__ as cli
    from stages.guidance.image_target import ImageTargetGuidance
    from stages.guidance.set import GuidanceSet

    nan = ImageTargetGuidance(lambda cameras, height, width: torch.full((len(cameras), 3, height, width), float("nan")))
    monkeypatch.setattr(cli, "build_guidance", lambda config, models: GuidanceSet(ip=nan, mvd=nan))
    out = tmp_path / "ring"
    code = main(["--prompt", "a ring", "--out", str(out), "--no-progress", "models=toyworld", *SMALL])
    err = capsys.readouterr().err
    assert code == 1 and "non-finite loss nan at iteration 0" in err, err
    assert not (out / "asset.json").exists()


def test_overrides_may_come_before_and_after_options():
    from stages.optimize.__main__ import parse_args

    args = parse_args(["--prompt", "x", "models=tiny", "--out", "o", "--no-progress", "iterations=20"])
    assert args.overrides == ["models=tiny", "iterations=20"] and args.out == "o" and args.no_progress
