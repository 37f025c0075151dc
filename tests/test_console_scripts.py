"""The console scripts of pyproject.toml resolve to the same ``main`` as ``python -m <module>``."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from test_cli_help import CLIS

tomllib = pytest.importorskip("tomllib")
REPO = Path(__file__).resolve().parents[1]
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]


def test_every_user_cli_has_a_console_script():
    targets = {target.split(":")[0] for target in SCRIPTS.values()}
    for module in ("pipeline.run", "pipeline.export", "pipeline.evaluate", "pipeline.gallery", "pipeline.sweep", "stages.optimize.__main__"):
        assert module in targets, f"no console script runs {module}"
    assert all(name.startswith("modedreamer-") for name in SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_resolves_to_a_main_with_help(name):
    module, _, attr = SCRIPTS[name].partition(":")
    main = getattr(importlib.import_module(module), attr)
    assert callable(main) and attr == "main"
    assert module in CLIS, f"{module} answers --help in tests/test_cli_help.py"
