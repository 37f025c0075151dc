"""Config loading: YAML file (or one section of it) + dotlist overrides onto a structured schema.

Every config of the project (``pipeline.run``, ``pipeline.evaluate``, ``pipeline.sweep``,
``pipeline.export``, ``python -m stages.optimize``) is read by :func:`load_structured` or its two
halves :func:`read_yaml` and :func:`merge_config` + :func:`to_object`, and every failure is a
:class:`ConfigError` naming the file and the full key (``config key 'method.isd.sd_branch'``).

Closed sets of values are :class:`Choice` enums, so OmegaConf itself refuses a bad value with
its full key; YAML values stay the lowercase strings.

OmegaConf leaves three shapes of input unexplained; they are named here:

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
from enum import Enum
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names the file and the full key."""


class Choice(str, Enum):
    """A closed set of config values. Members are named by their value (OmegaConf matches a YAML
    string to a member's *name*), and compare, hash, print and serialise as that string, so
    ``config.loss == "isd"``, ``f"{config.loss}"`` and JSON digests read as before."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The allowed strings, in declaration order."""
        return tuple(member.value for member in cls)

    @classmethod
    def parse(cls: type[T], value: Any, key: str) -> T:
        """The member named ``value``, or :class:`ConfigError` naming ``key`` and the allowed values
        (for values read before a schema exists, such as a preset that picks the schema)."""
        try:
            return cls(value)  # type: ignore[call-arg]
        except ValueError:
            raise ConfigError(f"config key '{key}' must be one of {list(cls.values())}, got {value!r}") from None  # type: ignore[attr-defined]


def require(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` ``config key '<key>': <message>`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def describe(error: OmegaConfBaseException, key_prefix: str = "") -> str:
    """``config key '<full key>': <first line>`` of an OmegaConf error."""
    key = getattr(error, "full_key", None)
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"config key '{key_prefix}{key}': {first}" if key else first


def _name_list_item(error: OmegaConfBaseException, layer: Any) -> None:
    """OmegaConf names only the last key of a bad value inside a list item (``format`` for
    ``prompts.sources[0].format``); find the one place in ``layer`` it can be and name that."""
    key, value = getattr(error, "full_key", None), getattr(error, "value", None)
    if not key or "." in str(key) or "[" in str(key):
        return
    places: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for name, child in node.items():
                here = f"{path}.{name}" if path else str(name)
                if name == key and child == value and path.endswith("]"):
                    places.append(here)
                walk(child, here)
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{path}[{index}]")

    walk(OmegaConf.to_container(layer) if OmegaConf.is_config(layer) else layer, "")
    if len(places) == 1:
        error.full_key = places[0]


def read_yaml(path: str | Path, section: str | None = None, what: str = "config") -> DictConfig:
    """The mapping in YAML file ``path`` (or its ``section``; empty when absent).

    Raises :class:`ConfigError` for a missing file (``<what> file not found``), bad YAML, or a top
    level that is not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: cannot parse YAML: {error}") from None
    check_top_level(raw, str(path))
    if section is None:
        return raw
    part = raw.get(section, None)
    if part is None:
        return OmegaConf.create({})
    check_top_level(part, f"{path}: section '{section}'")
    return part


def check_top_level(raw: Any, source: str) -> None:
    """Raise unless the loaded YAML is a mapping of config keys."""
    if not isinstance(raw, DictConfig):
        kind = "a list" if isinstance(raw, ListConfig) else type(raw).__name__
        raise ConfigError(f"{source}: the top level must be a mapping of config keys, got {kind}")


def merge_config(
    schema: Any, *layers: Any, overrides: Sequence[str] = (), source: str = "<config>", key_prefix: str = ""
) -> DictConfig:
    """``schema`` (a dataclass or an instance: its defaults) ← each of ``layers`` (dicts or
    DictConfigs) ← dotlist ``overrides``; every ``???`` key left is refused as required.
    ``key_prefix`` is written before each key in messages (``method.`` for a section)."""
    merged = OmegaConf.structured(schema)
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer if layer is not None else {})
        except OmegaConfBaseException as error:
            _name_list_item(error, layer)
            raise ConfigError(f"{source}: {describe(error, key_prefix)}") from None
    merged = apply_overrides(merged, overrides, key_prefix)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{source}: config key '{key_prefix}{missing[0]}' is required")
    return merged


def to_object(merged: DictConfig, source: str = "<config>", key_prefix: str = "") -> Any:
    """The dataclass instance of ``merged``; a schema class refusing a value in ``__post_init__``
    is reported under its config key."""
    schema = OmegaConf.get_type(merged)
    try:
        return OmegaConf.to_object(merged)
    except (ValueError, OmegaConfBaseException) as error:
        text = describe(error, key_prefix) if isinstance(error, OmegaConfBaseException) else str(error)
        text = name_the_keys(text, schema, key_prefix) if dataclasses.is_dataclass(schema) else text
        raise ConfigError(f"{source}: {text if text.startswith('config key') else 'config key ' + text}") from None


def load_structured(
    schema: type[T] | T,
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    section: str | None = None,
    what: str = "config",
    key_prefix: str = "",
) -> T:
    """The recipe in one call: :func:`read_yaml` (optional ``path``, optional ``section``) →
    :func:`merge_config` onto ``schema`` with ``overrides`` → :func:`to_object`."""
    raw = read_yaml(path, section, what) if path is not None else None
    source = str(path) if path is not None else f"{what} overrides"
    merged = merge_config(schema, raw, overrides=overrides, source=source, key_prefix=key_prefix)
    return to_object(merged, source, key_prefix)


def _indexes_a_list(config: DictConfig, key: str) -> bool:
    node: Any = config
    for part in key.split("."):
        if isinstance(node, ListConfig):
            return True
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    return False


def apply_overrides(merged: DictConfig, overrides: Sequence[str], key_prefix: str = "") -> DictConfig:
    """Merge dotlist ``overrides`` onto ``merged``; those that index into a list are applied
    one by one with ``OmegaConf.update`` after checking the index."""
    plain, indexed = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        (indexed if _indexes_a_list(merged, key) else plain).append(item)
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(plain))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"command-line override: {describe(exc, key_prefix)}") from None
    for item in indexed:
        key = item.split("=", 1)[0].strip()
        _check_index(merged, key)
        value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        try:
            OmegaConf.update(merged, key, value, merge=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"command-line override '{item}': {describe(exc, key_prefix)}") from None
    return merged


def _check_index(config: DictConfig, key: str) -> None:
    node: Any = config
    path: list[str] = []
    for part in key.split("."):
        if isinstance(node, ListConfig):
            where = ".".join(path)
            if not part.isdigit():
                raise ConfigError(f"command-line override: config key '{where}' is a list: index it with a number ({where}.0...), got '{part}'")
            if int(part) >= len(node):
                raise ConfigError(
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
        for candidate in (kind, *typing.get_args(kind)):
            if dataclasses.is_dataclass(candidate):
                keys.setdefault(candidate.__name__, key)
                for name, sub in dataclass_keys(candidate, f"{key}.").items():
                    keys.setdefault(name, sub)
    return keys


def name_the_keys(message: str, schema: type, prefix: str = "") -> str:
    """``message`` with ``SomeConfig.field`` written as its config key (``method.schedule.field``)."""
    keys = dataclass_keys(schema, prefix)
    return re.sub(r"\b([A-Z]\w*Config)\.", lambda m: f"{keys[m.group(1)]}." if m.group(1) in keys else m.group(0), message)
