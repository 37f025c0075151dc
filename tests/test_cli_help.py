"""Every command-line entry point answers ``--help`` with its usage and examples, and nothing else."""

from __future__ import annotations

import importlib

import pytest

CLIS = [
    "pipeline.run", "pipeline.export", "pipeline.gallery", "pipeline.evaluate", "pipeline.sweep", "pipeline.config_reference",
    "stages.optimize.__main__", "stages.models.mvdream_convert", "stages.toy2d",
    "benchmarks.guidance", "benchmarks.optimize", "benchmarks.pipeline", "benchmarks.batching", "benchmarks.full",
    "benchmarks.tracking", "benchmarks.gallery",
]


@pytest.mark.parametrize("module", CLIS)
def test_help_shows_usage_and_examples(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    prog = "python -m " + module.removesuffix(".__main__")
    assert exit_info.value.code == 0 and out.startswith(f"usage: {prog}"), out[:200]
    assert "examples:" in out and f"{prog} " in out.split("examples:", 1)[1]
    assert len(out) < 6000  # usage, not a dump (config_reference prints the reference only when asked)
