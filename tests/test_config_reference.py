"""docs/CONFIG.md is generated from the schema and must match it; every key is documented."""

from pathlib import Path

from pipeline.config_reference import iter_keys, render_reference
from pipeline.config import PipelineConfig

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"


def test_config_reference_is_current():
    assert REFERENCE.read_text(encoding="utf-8") == render_reference(), (
        "docs/CONFIG.md is stale: run `python -m pipeline.config_reference > docs/CONFIG.md`"
    )


def test_every_config_key_has_a_documented_meaning():
    undocumented = [key for key, _type, _default, doc in iter_keys(PipelineConfig()) if not doc]
    assert not undocumented, f"config keys without a docstring under their field: {undocumented}"


def test_optional_types_unwrap_one_level():
    from pipeline.config_reference import _type_name

    assert _type_name("Optional[int]") == "optional int"
    assert _type_name("Optional[list[float]]") == "optional list[float]"
    assert _type_name("list[str]") == "list[str]"
