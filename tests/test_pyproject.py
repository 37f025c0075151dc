"""pyproject.toml: the console scripts resolve to the same ``main`` as ``python -m <module>``;
pytest's warning filters name the module they silence."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from test_cli_help import CLIS

tomllib = pytest.importorskip("tomllib")
REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]


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


def test_warning_filters_silence_one_module_each():
    """A category-wide ``ignore::DeprecationWarning`` would hide the deprecations of every library
    the project depends on (and its own); each filter names the module that warns."""
    for entry in PYPROJECT["tool"]["pytest"]["ini_options"].get("filterwarnings", []):
        action, message, category, module = (entry.split(":", 4) + [""] * 4)[:4]
        if action == "ignore":
            assert module.strip() and message.strip(), f"filter {entry!r} must name the warning and the module it silences"
