"""The shapes of config input OmegaConf does not explain by itself, as errors naming the key.

- a YAML file whose top level is not a mapping (a list, a scalar);
- dotlist overrides that index into a list (``prompts.sources.0.limit=2``), which
  ``OmegaConf.from_dotlist`` turns into a dict keyed ``"0"`` that cannot merge onto the list;
- a schema dataclass whose ``__post_init__`` refuses a value in the words of its Python class
  (``ScheduleConfig.resolutions ...``): the class becomes its config key (``method.schedule``).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def check_top_level(raw: Any, source: str, error: type[Exception]) -> None:
    """Raise ``error`` unless the loaded YAML is a mapping of config keys."""
    if not isinstance(raw, DictConfig):
        kind = "a list" if isinstance(raw, ListConfig) else type(raw).__name__
        raise error(f"{source}: the top level must be a mapping of config keys (prompts:, output:, ...), got {kind}")


def _indexes_a_list(config: DictConfig, key: str) -> bool:
    node: Any = config
    for part in key.split("."):
        if isinstance(node, ListConfig):
            return True
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    return False


def apply_overrides(merged: DictConfig, overrides: Sequence[str], describe: Any, error: type[Exception]) -> DictConfig:
    """Merge dotlist ``overrides`` onto ``merged``; those that index into a list are applied
    one by one with ``OmegaConf.update`` after checking the index. ``describe`` turns an
    OmegaConf error into a message; ``error`` is the exception type raised."""
    plain, indexed = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        (indexed if _indexes_a_list(merged, key) else plain).append(item)
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(plain))
    except OmegaConfBaseException as exc:
        raise error(f"command-line override: {describe(exc)}") from None
    for item in indexed:
        key = item.split("=", 1)[0].strip()
        _check_index(merged, key, error)
        value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        try:
            OmegaConf.update(merged, key, value, merge=True)
        except OmegaConfBaseException as exc:
            raise error(f"command-line override '{item}': {describe(exc)}") from None
    return merged


def _check_index(config: DictConfig, key: str, error: type[Exception]) -> None:
    node: Any = config
    path: list[str] = []
    for part in key.split("."):
        if isinstance(node, ListConfig):
            where = ".".join(path)
            if not part.isdigit():
                raise error(f"command-line override: config key '{where}' is a list: index it with a number ({where}.0...), got '{part}'")
            if int(part) >= len(node):
                raise error(
                    f"command-line override: config key '{where}' has {len(node)} entries, so '{key}' names none "
                    f"(indices 0..{len(node) - 1}); add entries in the YAML or override the whole list"
                )
            node = node[int(part)]
        elif isinstance(node, DictConfig) and part in node:
            node = node._get_node(part)
        else:
            return
        path.append(part)


def dataclass_keys(schema: type, prefix: str = "") -> dict[str, str]:
    """``{dataclass name: config key}`` for every dataclass under ``schema`` (first place it appears)."""
    keys: dict[str, str] = {}
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        key = f"{prefix}{field.name}"
        kind = hints.get(field.name)
        candidates = [kind, *typing.get_args(kind)]
        for candidate in candidates:
            if dataclasses.is_dataclass(candidate):
                keys.setdefault(candidate.__name__, key)
                for name, sub in dataclass_keys(candidate, f"{key}.").items():
                    keys.setdefault(name, sub)
    return keys


def name_the_keys(message: str, schema: type) -> str:
    """``message`` with ``SomeConfig.field`` written as its config key (``method.schedule.field``)."""
    keys = dataclass_keys(schema)
    return re.sub(r"\b([A-Z]\w*Config)\.", lambda m: f"{keys[m.group(1)]}." if m.group(1) in keys else m.group(0), message)
