"""Generate the config reference (docs/CONFIG.md) from the schema's dataclasses.

Every key of :class:`pipeline.config.PipelineConfig` with its type, default and the docstring
written under its field, so the reference cannot drift from the code:
``python -m pipeline.config_reference > docs/CONFIG.md`` (a test checks the file is current).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from enum import Enum
from functools import lru_cache
from typing import Any, Iterator

from pipeline.config import PipelineConfig

HEADER = """# Config reference

Generated from the schema by `python -m pipeline.config_reference > docs/CONFIG.md`; do not edit
by hand. Keys are OmegaConf dotted paths: set them in the YAML file or on the command line
(`python -m pipeline.run configs/dataset.yaml variants=4 method.iterations=3000`). Defaults are
those of `method_preset: paper`; `method_preset: tiny` starts `method` from `OptimizeConfig.tiny()`.
"""


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The string literal written right after each annotated field of ``cls``'s class body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:] + [None]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _type_name(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
    text = text.replace("typing.", "")
    if text.startswith("Optional[") and text.endswith("]"):  # unwrap exactly one level
        return "optional " + text[len("Optional[") : -1]
    return text


def _choices(cls: type, name: str) -> str | None:
    """``one of `a`, `b``` for an Enum field, else None."""
    kind = typing.get_type_hints(cls).get(name)
    if isinstance(kind, type) and issubclass(kind, Enum):
        return "one of " + ", ".join(f"`{member.value}`" for member in kind)
    return None


def _default_text(value: Any) -> str:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, str):
        return f"`{value!r}`" if len(value) <= 60 else f"`{value[:57]!r}…`"
    return f"`{value!r}`"


def iter_keys(instance: Any, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every leaf of a dataclass instance, depth first."""
    cls = type(instance)
    docs = field_docs(cls)
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from iter_keys(value, key + ".")
            continue
        doc = docs.get(f.name, "")
        yield key, _choices(cls, f.name) or _type_name(f.type), _default_text(value), doc


def render_reference() -> str:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, type_name, default, doc in iter_keys(PipelineConfig()):
        cells = [f"`{key}`", type_name, default, doc]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return HEADER + "\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.config_reference",
        description="Print the config reference (every key, type, default, meaning) as Markdown.",
        epilog="examples:\n  python -m pipeline.config_reference > docs/CONFIG.md      # regenerate the docs\n"
        "  python -m pipeline.config_reference | grep tracking       # the keys of one section\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    sys.stdout.write(render_reference())


if __name__ == "__main__":
    main()
