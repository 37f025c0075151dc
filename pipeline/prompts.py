"""Prompt sources: txt / jsonl / json / csv / parquet files and inline lists.

Errors name the file (and line or row) so a bad prompt list fails before any work starts.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pipeline.config import ConfigError, PromptsConfig, PromptSource


def _open_text(path: str) -> str:
    """Read a local path or a pyarrow filesystem URI as UTF-8 text."""
    if "://" in path:
        import pyarrow.fs as pafs

        try:
            fs, inner = pafs.FileSystem.from_uri(path)
            with fs.open_input_stream(inner) as stream:
                return stream.read().decode("utf-8")
        except (FileNotFoundError, OSError) as error:
            raise ConfigError(f"prompt file not found: {path} ({error})") from None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"prompt file not found: {path}")
    return file.read_text(encoding="utf-8")


def _format_of(source: PromptSource) -> str:
    if source.format != "auto":
        return source.format
    suffix = Path(source.path.split("?")[0]).suffix.lower().lstrip(".")
    if suffix in ("txt", "jsonl", "json", "csv", "parquet"):
        return suffix
    raise ConfigError(f"prompt file {source.path}: cannot tell its format from the suffix; set format")


def _checked(prompt: object, where: str) -> str:
    if not isinstance(prompt, str):
        raise ConfigError(f"{where}: prompt must be a string, got {type(prompt).__name__}")
    prompt = prompt.strip()
    if not prompt:
        raise ConfigError(f"{where}: empty prompt")
    return prompt


def _from_record(record: object, column: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected an object with a '{column}' field")
    if column not in record:
        raise ConfigError(f"{where}: no '{column}' field (has {sorted(record)})")
    return _checked(record[column], where)


def read_source(source: PromptSource) -> list[str]:
    """The prompts of one file, in file order, stripped; raises ConfigError naming file:line."""
    return [prompt for prompt, _ in read_source_with_origin(source)]


def read_source_with_origin(source: PromptSource) -> list[tuple[str, str]]:
    """(prompt, where) of one file: ``where`` names the file and line (row, item) it came from."""
    kind = _format_of(source)
    prompts: list[tuple[str, str]] = []
    if kind == "parquet":
        import pyarrow.parquet as pq

        if "://" not in source.path and not Path(source.path).is_file():
            raise ConfigError(f"prompt file not found: {source.path}")
        table = pq.read_table(source.path)
        if source.column not in table.column_names:
            raise ConfigError(f"{source.path}: no '{source.column}' column (has {table.column_names})")
        for row, value in enumerate(table.column(source.column).to_pylist()):
            where = f"{source.path} row {row}"
            prompts.append((_checked(value, where), where))
    else:
        text = _open_text(source.path)
        if kind == "txt":
            for line_no, line in enumerate(text.splitlines(), start=1):
                if line.strip() and not line.lstrip().startswith("#"):
                    prompts.append((line.strip(), f"{source.path}:{line_no}"))
        elif kind == "jsonl":
            for line_no, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{source.path}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{where}: invalid JSON ({error.msg})") from None
                prompts.append((_from_record(record, source.column, where), where))
        elif kind == "json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{source.path}:{error.lineno}: invalid JSON ({error.msg})") from None
            if not isinstance(data, list):
                raise ConfigError(f"{source.path}: expected a JSON list of prompts")
            for index, item in enumerate(data):
                where = f"{source.path} item {index}"
                prompts.append((_checked(item, where) if isinstance(item, str) else _from_record(item, source.column, where), where))
        elif kind == "csv":
            reader = csv.DictReader(io.StringIO(text))
            if reader.fieldnames is None or source.column not in reader.fieldnames:
                raise ConfigError(f"{source.path}: no '{source.column}' column (header {reader.fieldnames})")
            for record in reader:
                where = f"{source.path}:{reader.line_num}"
                prompts.append((_checked(record[source.column], where), where))
        else:  # validate_config already rejected other names
            raise ConfigError(f"prompt file {source.path}: unknown format '{kind}'")
    if not prompts:
        raise ConfigError(f"{source.path}: the prompt list is empty")
    return prompts[: source.limit] if source.limit is not None else prompts


def read_prompts(config: PromptsConfig) -> list[str]:
    """All prompts: every source in order, then the inline list. Duplicates are kept once."""
    return [prompt for prompt, _ in read_prompts_with_origin(config)]


def read_prompts_with_origin(config: PromptsConfig) -> list[tuple[str, str]]:
    """(prompt, where it first appeared) for every prompt of :func:`read_prompts`, in its order."""
    prompts: list[tuple[str, str]] = []
    for source in config.sources:
        prompts.extend(read_source_with_origin(source))
    for index, prompt in enumerate(config.inline):
        where = f"config key 'prompts.inline[{index}]'"
        prompts.append((_checked(prompt, where), where))
    if not prompts:
        raise ConfigError("config key 'prompts': no prompts (give prompts.sources or prompts.inline)")
    first: dict[str, str] = {}
    for prompt, where in prompts:
        first.setdefault(prompt, where)
    return list(first.items())
